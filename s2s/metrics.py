"""Prometheus metrics of one server process, served at ``GET /metrics``.

Each app has its own ``ServerMetrics`` (its own ``CollectorRegistry``, never the global one), so
several apps in one process (tests) do not clash. Each call gets a ``CallMetrics``: its timings
go into the server's histograms, its link figures into per-call gauges labelled ``call_id``
(removed when the call ends), and its running counts into the server's counters.

Names are ``s2s_*`` in base units (seconds, bits per second). ``merge_expositions`` joins the
expositions of several worker processes into one, each sample labelled with its ``worker``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from s2s.rtpstats import LinkFigures

#: Seconds, for latencies a caller can hear: 5 ms to 5 s.
VOICE_BUCKETS = (
    0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
)  # fmt: skip

_IN, _OUT = "in", "out"


class ServerMetrics:
    """Every metric of one server process, registered in its own ``registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.active_calls = Gauge("s2s_active_calls", "Calls in progress.", registry=r)
        self.calls_started = Counter("s2s_calls_started", "Calls started.", registry=r)
        self.calls_ended = Counter(
            "s2s_calls_ended", "Calls ended, by why they ended.", ["reason"], registry=r
        )
        self.setup = Histogram(
            "s2s_call_setup_seconds",
            "SDP offer received to the peer connection being connected (ICE and DTLS done).",
            buckets=VOICE_BUCKETS, registry=r,
        )  # fmt: skip
        self.channel_open = Histogram(
            "s2s_data_channel_open_seconds",
            "SDP offer received to the oai-events data channel being open.",
            buckets=VOICE_BUCKETS, registry=r,
        )  # fmt: skip
        self.turn_latency = Histogram(
            "s2s_turn_latency_seconds",
            "End of the caller's turn (VAD speech_stopped, or the client's response.create) "
            "to the first frame of the reply's audio sent.",
            buckets=VOICE_BUCKETS, registry=r,
        )  # fmt: skip
        self.barge_in_latency = Histogram(
            "s2s_barge_in_latency_seconds",
            "Caller speech detected during a reply to the reply's queued audio being dropped.",
            buckets=VOICE_BUCKETS, registry=r,
        )  # fmt: skip
        self.frames_sent = Counter(
            "s2s_speaker_frames", "Outbound 20 ms audio frames sent.", registry=r
        )
        self.frames_late = Counter(
            "s2s_speaker_frames_late",
            "Outbound audio frames sent more than 20 ms after their slot.",
            registry=r,
        )
        self.audio_in = Counter(
            "s2s_audio_in",
            "Receive-pipeline events of callers' audio (concealed frames, FEC, NACKs...).",
            ["kind"], registry=r,
        )  # fmt: skip
        per_call = ["call_id"]
        both_ways = ["call_id", "direction"]
        self.rtt = Gauge(
            "s2s_call_rtt_seconds", "Round trip time from RTCP receiver reports.", per_call,
            registry=r,
        )  # fmt: skip
        self.jitter = Gauge(
            "s2s_call_jitter_seconds",
            "RTP interarrival jitter; in: the caller's audio here, out: ours at the caller.",
            both_ways, registry=r,
        )  # fmt: skip
        self.packets_lost = Gauge(
            "s2s_call_packets_lost", "RTP packets lost over the call, per direction.", both_ways,
            registry=r,
        )  # fmt: skip
        self.loss = Gauge(
            "s2s_call_loss_ratio", "Fraction of RTP packets lost lately, per direction.",
            both_ways, registry=r,
        )  # fmt: skip
        self.bitrate = Gauge(
            "s2s_call_bitrate_bits_per_second", "Audio payload bitrate, per direction.",
            both_ways, registry=r,
        )  # fmt: skip
        self._per_call: tuple[Gauge, ...] = (
            self.rtt,
            self.jitter,
            self.packets_lost,
            self.loss,
            self.bitrate,
        )

    def call_started(self) -> None:
        self.calls_started.inc()
        self.active_calls.inc()

    def call_ended(self, reason: str) -> None:
        self.calls_ended.labels(reason).inc()
        self.active_calls.dec()

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)

    def forget(self, call_id: str) -> None:
        """Remove every per-call series of ``call_id``."""
        for gauge in self._per_call:
            gauge.remove_by_labels({"call_id": call_id})


class CallMetrics:
    """One call's share of the server's metrics; keeps its latest figures for its stats event."""

    def __init__(self, server: ServerMetrics, call_id: str) -> None:
        self.server = server
        self.call_id = call_id
        #: The latest turn latency and barge-in latency of this call, in seconds.
        self.last_turn_s: float | None = None
        self.last_barge_in_s: float | None = None
        self._counted: dict[tuple[Counter, str], float] = {}

    def connected(self, seconds: float) -> None:
        self.server.setup.observe(seconds)

    def channel_open(self, seconds: float) -> None:
        self.server.channel_open.observe(seconds)

    def turn(self, seconds: float) -> None:
        self.last_turn_s = seconds
        self.server.turn_latency.observe(seconds)

    def barge_in(self, seconds: float) -> None:
        self.last_barge_in_s = seconds
        self.server.barge_in_latency.observe(seconds)

    def link(self, figures: LinkFigures) -> None:
        """Set the call's per-call gauges; a figure not known has no series."""
        s, cid = self.server, self.call_id
        _set(s.rtt, figures.rtt_s, cid)
        for direction, jitter, lost, fraction, bitrate in (
            (_IN, figures.jitter_in_s, figures.packets_lost_in, figures.fraction_lost_in,
             figures.bitrate_in_bps),
            (_OUT, figures.jitter_out_s, figures.packets_lost_out, figures.fraction_lost_out,
             figures.bitrate_out_bps),
        ):  # fmt: skip
            _set(s.jitter, jitter, cid, direction)
            _set(s.packets_lost, lost, cid, direction)
            _set(s.loss, fraction, cid, direction)
            _set(s.bitrate, bitrate, cid, direction)

    def count(self, frames_sent: int, frames_late: int, audio_in: Mapping[str, float]) -> None:
        """Add what the call's running totals grew by since the last count to the counters."""
        self._add(self.server.frames_sent, "", frames_sent)
        self._add(self.server.frames_late, "", frames_late)
        for kind, total in audio_in.items():
            self._add(self.server.audio_in, kind, total)

    def close(self) -> None:
        """The call ended: its per-call series go."""
        self.server.forget(self.call_id)

    def _add(self, counter: Counter, kind: str, total: float) -> None:
        before = self._counted.get((counter, kind), 0.0)
        if total > before:
            (counter.labels(kind) if kind else counter).inc(total - before)
            self._counted[counter, kind] = total


def _set(gauge: Gauge, value: float | None, *labels: str) -> None:
    if value is None:
        gauge.remove(*labels)
    else:
        gauge.labels(*labels).set(value)


@dataclass(slots=True)
class MergedScrape:
    """The last whole-server scrape of a worker of several, when it was made (loop time), and
    the one being made, which requests meanwhile wait for rather than make another."""

    at: float = float("-inf")
    body: bytes = b""
    making: asyncio.Future[bytes] | None = None


def merge_expositions(texts: Sequence[str], labels: Sequence[str]) -> bytes:
    """One exposition from several processes' ones, each sample labelled ``worker=labels[i]``.

    Families of the same name are joined (one HELP and TYPE each, from the first text that has
    the family); a ``worker`` label a sample already has is replaced.
    """
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} expositions but {len(labels)} worker labels")
    families: dict[str, Metric] = {}
    for text, worker in zip(texts, labels, strict=True):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            elif merged.type != family.type:
                raise ValueError(
                    f"{family.name} is a {merged.type} in one exposition, a {family.type} in "
                    f"worker {worker!r}'s"
                )
            for sample in family.samples:
                merged.samples.append(sample._replace(labels={**sample.labels, "worker": worker}))
    registry = CollectorRegistry()
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families

"""A call's audio link as RTCP sees it: round trip, jitter, loss and bitrate, both ways.

``LinkSampler`` reads successive ``RTCPeerConnection.getStats()`` reports of one call (one report
per sampling interval: no per-packet work) and turns them into ``LinkFigures``:

- *in* is the caller's audio as we receive it (aiortc's ``inbound-rtp``, and the caller's sender
  reports as ``remote-outbound-rtp``);
- *out* is our audio as the caller receives it (``outbound-rtp``, and the caller's receiver
  reports about it as ``remote-inbound-rtp``, which also carry the round trip time).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiortc.stats import (
    RTCInboundRtpStreamStats,
    RTCOutboundRtpStreamStats,
    RTCRemoteInboundRtpStreamStats,
    RTCRemoteOutboundRtpStreamStats,
)

#: Opus's RTP clock; RTCP jitter is counted in its ticks.
CLOCK_RATE = 48_000


@dataclass(frozen=True, slots=True)
class LinkFigures:
    """One sample of a call's audio link; None where it is not known (yet)."""

    rtt_s: float | None = None
    jitter_in_s: float | None = None
    jitter_out_s: float | None = None
    packets_lost_in: int | None = None
    packets_lost_out: int | None = None
    fraction_lost_in: float | None = None
    fraction_lost_out: float | None = None
    bitrate_in_bps: float | None = None
    bitrate_out_bps: float | None = None


class LinkSampler:
    """Turns one call's successive ``getStats()`` reports into ``LinkFigures``.

    Rates and the inbound loss fraction are deltas since the previous sample (since ``started``
    for the first one). The inbound bitrate comes from the caller's RTCP sender reports (aiortc
    counts no received bytes), over the time between two of them, and keeps its last value
    while no new report has come.
    """

    def __init__(self, started: float) -> None:
        self._out = (started, 0)  # (local time, bytes sent)
        self._in_counts = (0, 0)  # (packets received, packets lost)
        self._sender_report: tuple[float, int] | None = None  # (remote time, bytes sent)
        self._bitrate_in: float | None = None

    def sample(self, report: Mapping[str, Any], now: float) -> LinkFigures:
        """The figures of ``report``, a ``getStats()`` result taken at loop time ``now``."""
        inbound = outbound = remote_in = remote_out = None
        for stats in report.values():
            if getattr(stats, "kind", None) != "audio":
                continue
            match stats:
                case RTCRemoteInboundRtpStreamStats():
                    remote_in = stats
                case RTCInboundRtpStreamStats():
                    inbound = stats
                case RTCRemoteOutboundRtpStreamStats():
                    remote_out = stats
                case RTCOutboundRtpStreamStats():
                    outbound = stats
        figures: dict[str, Any] = {}
        if inbound is not None:
            figures["jitter_in_s"] = inbound.jitter / CLOCK_RATE
            figures["packets_lost_in"] = inbound.packetsLost
            received = inbound.packetsReceived - self._in_counts[0]
            lost = inbound.packetsLost - self._in_counts[1]
            self._in_counts = (inbound.packetsReceived, inbound.packetsLost)
            if received + lost > 0:
                # Duplicates make RTCP's loss count go down; a fraction stays within 0..1.
                figures["fraction_lost_in"] = min(1.0, max(0.0, lost / (received + lost)))
        if remote_in is not None:
            if remote_in.roundTripTime is not None:
                figures["rtt_s"] = float(remote_in.roundTripTime)
            figures["jitter_out_s"] = remote_in.jitter / CLOCK_RATE
            figures["packets_lost_out"] = remote_in.packetsLost
            # aiortc passes on the receiver report's 8-bit fixed-point fraction (RFC 3550 6.4.1)
            # where the stats spec has a number from 0 to 1.
            figures["fraction_lost_out"] = remote_in.fractionLost / 256
        if outbound is not None:
            then, sent = self._out
            if now > then:
                figures["bitrate_out_bps"] = (outbound.bytesSent - sent) * 8 / (now - then)
            self._out = (now, outbound.bytesSent)
        if remote_out is not None and remote_out.remoteTimestamp is not None:
            at, sent = remote_out.remoteTimestamp.timestamp(), remote_out.bytesSent
            previous = self._sender_report
            if previous is not None and at > previous[0] and sent >= previous[1]:
                self._bitrate_in = (sent - previous[1]) * 8 / (at - previous[0])
            if previous is None or at > previous[0]:
                self._sender_report = (at, sent)
        figures["bitrate_in_bps"] = self._bitrate_in
        return LinkFigures(**figures)

"""A call's figures, sampled on a timer: one ``getStats()`` into the server's metrics, the FEC
strength the speaker encodes with, and the ``s2s.session.stats`` event.

The figures come from RTCP (``rtpstats.LinkSampler``), the speaker's frame counts and, on the
tuned transport, the receive pipeline's recovery counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiortc import RTCPeerConnection

from s2s.audio import SpeakerTrack
from s2s.log import CallLogger
from s2s.metrics import CallMetrics
from s2s.protocol.server_events import ServerEvent, SessionStats
from s2s.rtc import VoiceInput
from s2s.rtpstats import LinkSampler

# Metrics are sampled this often when a call sends no stats events.
_METRICS_INTERVAL_S = 5.0


class CallStats:
    """Samples one call. ``voice_in`` is the tuned inbound path once negotiated (None on the
    stock transport)."""

    def __init__(
        self,
        pc: RTCPeerConnection,
        speaker: SpeakerTrack,
        metrics: CallMetrics,
        log: CallLogger,
        *,
        created_at: float,
    ) -> None:
        self.voice_in: VoiceInput | None = None
        self._pc = pc
        self._speaker = speaker
        self._metrics = metrics
        self._log = log
        self._created_at = created_at

    def receive_counters(self) -> dict[str, float]:
        """The receive pipeline's running counts for this call, by name (``concealed_frames``,
        ``fec_frames``, ``red_frames``, ``nacks_sent``...); each must only grow over the call.

        They go out in ``s2s.session.stats`` as ``audio_in`` and are added to the
        ``s2s_audio_in_total{kind=NAME}`` counter. Empty on the stock transport.
        """
        if self.voice_in is None:
            return {}
        counts = self.voice_in.stats.as_dict()
        for gauge in ("jitter_ms", "wait_ms"):  # levels, not counts
            del counts[gauge]
        return counts

    def count(self) -> dict[str, float]:
        """Add the call's running counts to the server's counters; returns ``receive_counters``."""
        audio_in = self.receive_counters()
        self._metrics.count(self._speaker.frames_sent, self._speaker.frames_late, audio_in)
        return audio_in

    async def run(self, interval: float, send: Callable[[ServerEvent], None]) -> None:
        """Every ``interval`` seconds (every 5 s into metrics only when it is 0), until cancelled:
        sample the call and ``send`` an ``s2s.session.stats`` event."""
        loop = asyncio.get_running_loop()
        link = LinkSampler(loop.time())
        encoder = self._speaker.encoder
        while True:
            await asyncio.sleep(interval if interval > 0 else _METRICS_INTERVAL_S)
            try:
                figures = link.sample(await self._pc.getStats(), loop.time())
                self._metrics.link(figures)
                audio_in = self.count()
                if encoder is not None and figures.fraction_lost_out is not None:
                    # FEC strength follows the loss the caller reports on our audio.
                    encoder.set_expected_loss(figures.fraction_lost_out)
            except Exception:
                # Figures are not worth a call: a sampling bug is logged, and the call goes on.
                self._log.warning("could not sample the call's stats", exc_info=True)
                continue
            if interval <= 0:
                continue
            m = self._metrics
            send(SessionStats(
                call_seconds=round(loop.time() - self._created_at, 3),
                rtt_ms=_ms(figures.rtt_s), jitter_in_ms=_ms(figures.jitter_in_s),
                jitter_out_ms=_ms(figures.jitter_out_s), packets_lost_in=figures.packets_lost_in,
                packets_lost_out=figures.packets_lost_out,
                fraction_lost_in=figures.fraction_lost_in,
                fraction_lost_out=figures.fraction_lost_out,
                bitrate_in_bps=_round(figures.bitrate_in_bps),
                bitrate_out_bps=_round(figures.bitrate_out_bps),
                frames_late=self._speaker.frames_late, turn_latency_ms=_ms(m.last_turn_s),
                barge_in_latency_ms=_ms(m.last_barge_in_s), audio_in=audio_in,
            ))  # fmt: skip


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _round(value: float | None) -> int | None:
    return None if value is None else round(value)

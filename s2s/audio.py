"""PCM plumbing between WebRTC and a model: resampling, framing and a paced outbound track.

Everything here works on mono ``int16`` numpy arrays; ``av.AudioFrame`` appears only at the
edges (frames decoded by aiortc in, frames handed to aiortc's encoder out).
"""

from __future__ import annotations

import asyncio
import collections
import fractions
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from s2s import opus

WEBRTC_RATE = 48_000
PACKET_MS = 20
PACKET_SAMPLES = WEBRTC_RATE * PACKET_MS // 1000
_PACKET_S = PACKET_MS / 1000
# A speaker this far behind its schedule (a stalled loop) skips the slots that passed instead of
# sending a burst of catch-up frames that the far end's jitter buffer would only drop.
_MAX_LAG_S = 0.1
#: A frame taken for sending more than one packet's time after its slot is counted as late: the
#: far end's jitter buffer then has to stretch to cover the gap.
LATE_S = PACKET_MS / 1000
# Outbound frames and packets are stamped in samples at 48 kHz.
_TIME_BASE = fractions.Fraction(1, WEBRTC_RATE)


class Resampler:
    """Turns audio into mono ``int16`` at ``rate``, whatever rate and layout it arrives in."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._av = av.AudioResampler(format="s16", layout="mono", rate=rate)

    def from_frame(self, frame: av.AudioFrame) -> np.ndarray:
        """Resample one decoded WebRTC frame (any layout) to mono at ``rate``."""
        if frame.sample_rate == self.rate and frame.format.name == "s16":
            # Only the layout differs (aiortc decodes to packed stereo): downmix in numpy,
            # at a fraction of a resampler call's cost.
            channels = len(frame.layout.channels)
            pcm = frame.to_ndarray().reshape(-1)
            if channels == 1:
                return pcm
            mixed: np.ndarray = pcm.reshape(-1, channels).sum(axis=1, dtype=np.int32) // channels
            return mixed.astype(np.int16)
        out = self._av.resample(frame)
        if not out:
            return np.zeros(0, np.int16)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in out])

    def from_pcm(self, pcm: np.ndarray, rate: int) -> np.ndarray:
        """Resample mono ``int16`` samples at ``rate`` to mono at ``self.rate``."""
        if rate == self.rate or pcm.size == 0:
            return pcm
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(pcm, np.int16).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = rate
        return self.from_frame(frame)


class FrameChunker:
    """Cuts a stream of samples into frames of exactly ``size`` samples."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._pending = np.zeros(0, np.int16)

    def push(self, pcm: np.ndarray) -> list[np.ndarray]:
        data = np.concatenate([self._pending, pcm]) if self._pending.size else pcm
        whole = data.size // self.size * self.size
        self._pending = data[whole:].copy()
        return [data[i : i + self.size] for i in range(0, whole, self.size)]

    def clear(self) -> None:
        self._pending = np.zeros(0, np.int16)


class PcmQueue:
    """A FIFO of samples that hands out exactly ``n`` at a time, padding with silence."""

    def __init__(self) -> None:
        self._chunks: collections.deque[np.ndarray] = collections.deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, pcm: np.ndarray) -> None:
        if pcm.size:
            self._chunks.append(pcm)
            self._size += pcm.size

    def pop(self, n: int) -> tuple[np.ndarray, int]:
        """Return ``n`` samples and how many of them were queued audio (the rest is silence)."""
        out = np.zeros(n, np.int16)
        filled = 0
        while filled < n and self._chunks:
            head = self._chunks[0]
            take = min(n - filled, head.size)
            out[filled : filled + take] = head[:take]
            filled += take
            if take == head.size:
                self._chunks.popleft()
            else:
                self._chunks[0] = head[take:]
        self._size -= filled
        return out, filled

    def clear(self) -> int:
        dropped = self._size
        self._chunks.clear()
        self._size = 0
        return dropped


class OpusEncoder:
    """Mono Opus at 48 kHz, one packet per 20 ms frame, encoded inline (``s2s.opus``).

    s2s encodes outbound audio itself rather than handing PCM frames to aiortc, whose encoder
    runs each frame through a thread-pool hop, computes the RTP audio level in pure Python and
    upmixes mono to stereo (-3 dB) at a fixed 96 kbps. In-band FEC is on; how many bits it gets
    follows the loss the far end reports (``set_expected_loss``).
    """

    def __init__(self, bitrate: int = 32_000, *, fec: bool = True) -> None:
        self._opus = opus.Encoder(bitrate, fec=fec, loss_percent=_DEFAULT_LOSS_PERCENT)
        self._silent_run = 0

    def set_expected_loss(self, fraction: float) -> None:
        """Protect against ``fraction`` (0..1) of packets lost; never below the default."""
        self._opus.set_expected_loss(max(_DEFAULT_LOSS_PERCENT, round(100 * fraction)))

    def encode(self, pcm: np.ndarray, index: int, *, silent: bool = False) -> av.Packet[Any]:
        """Encode frame number ``index`` (``PACKET_SAMPLES`` samples; ``silent`` if all zero)."""
        if silent:
            self._silent_run += 1
            if self._silent_run > _IDLE_AFTER_FRAMES:
                # libopus spends more on digital silence (~0.17 ms a frame, more in SILK mode)
                # than on speech, and a voice call is mostly silence on the model's side. After a
                # while of it, send what a fresh encoder sends for silence, and start afresh when
                # sound returns: the far end sees one consistent stream.
                return self._packet(_OPUS_SILENCE, index)
        elif self._silent_run > _IDLE_AFTER_FRAMES:
            self._opus.reset()
            self._silent_run = 0
        else:
            self._silent_run = 0
        return self._packet(self._opus.encode(pcm), index)

    def _packet(self, data: bytes, index: int) -> av.Packet[Any]:
        # Stamped with the frame's place: aiortc turns it into the RTP timestamp.
        packet = av.Packet(data)
        packet.pts = index * PACKET_SAMPLES
        packet.time_base = _TIME_BASE
        return packet


# Loss libopus protects against before the far end has reported any (RTCP): enough to turn FEC
# on for speech (libopus adds no FEC at 0%), little enough to cost a few percent of bitrate.
_DEFAULT_LOSS_PERCENT = 5

# What a fresh libopus encoder emits for a 20 ms frame of digital silence (a CELT frame).
_OPUS_SILENCE = b"\xf8\xff\xfe"
# Frames of silence still encoded (the far end's decoder fades out on them) before idling.
_IDLE_AFTER_FRAMES = 3
# Peak level, in LSBs, up to which a frame counts as silence: 8 is -72 dBFS, far below hearing
# at any sane volume and below the decay of a sound into silence after Opus.
_SILENT_LSB = 8


class SpeakerTrack(MediaStreamTrack):
    """The call's outbound audio: 48 kHz mono Opus, 20 ms packets, paced by the wall clock.

    ``write()`` queues model audio and ``flush()`` drops whatever is queued (barge-in). ``recv()``
    is driven by aiortc's sender and returns encoded packets.

    Time is cut into 20 ms slots counted from the call's first packet, and slot ``k`` is RTP
    timestamp ``k * 960``: whatever the load, the stream carries one packet per 20 ms of RTP time
    and its RTP clock is the wall clock. A packet never leaves before its slot (a live stream's
    up to half a slot early), so the far end never receives faster than real time; a speaker
    stalled past ``_MAX_LAG_S`` skips the slots that passed (the far end conceals them) and its
    queue is trimmed rather than played out in a burst.
    """

    kind = "audio"

    def __init__(
        self,
        lead_ms: float = 10.0,
        bitrate: int = 32_000,
        *,
        encode: bool = True,
        max_backlog_ms: float | None = None,
        live: bool = False,
    ) -> None:
        super().__init__()
        #: None: hand PCM frames to aiortc's own encoder (the untuned, stock path).
        self.encoder = OpusEncoder(bitrate) if encode else None
        self._queue = PcmQueue()
        self._lead_s = lead_ms / 1000
        self._max_backlog = (
            None if max_backlog_ms is None else int(max_backlog_ms * WEBRTC_RATE / 1000)
        )
        # When slot 0 was due; slot k is due ``k`` packets later.
        self._start: float | None = None
        # The next slot (the packet last taken for sending had the one before).
        self._slot = 0
        self._frames = 0
        self._tick = asyncio.Event()
        #: A live stream (echo, full duplex): frames go out as they arrive (``_follow_input``)
        #: and a lasting backlog over ``max_backlog_ms`` is dropped (``_trim``).
        self._live = live
        self._arrived = asyncio.Event()
        # Audio written to an empty queue waits ``lead`` before its first frame goes out, so
        # the frames behind it, arriving with network and scheduling jitter, find the queue
        # ahead of the clock instead of leaving a gap. A backlog plays without waiting.
        self._armed_at: float | None = None
        #: Samples of queued (non-filler) audio sent so far.
        self.played_samples = 0
        #: Slots skipped because the track fell more than ``_MAX_LAG_S`` behind (no packet
        #: carries their RTP time; the far end conceals them).
        self.slots_skipped = 0
        #: Frames taken for sending more than ``LATE_S`` after their slot (a stalled loop).
        self.frames_late = 0
        #: Samples dropped from the head of a live stream's backlog to keep its latency bounded.
        self.trimmed_samples = 0
        # The smallest backlog seen in the current trim window (see ``_trim``).
        self._floor: int | None = None

    @property
    def queued_samples(self) -> int:
        return len(self._queue)

    @property
    def frames_sent(self) -> int:
        return self._frames

    def write(self, pcm: np.ndarray) -> None:
        """Queue mono ``int16`` samples at 48 kHz for sending."""
        if not len(self._queue) and pcm.size and not self._live:
            self._armed_at = asyncio.get_running_loop().time()
        self._queue.push(pcm)
        self._arrived.set()

    def flush(self) -> int:
        """Drop everything queued; returns the number of samples dropped."""
        self._armed_at = None
        return self._queue.clear()

    async def recv(self) -> av.Packet[Any] | av.AudioFrame:
        samples = await self.next_pcm()
        index = self._slot - 1
        if self.encoder is None:
            frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = WEBRTC_RATE
            frame.pts = index * PACKET_SAMPLES
            frame.time_base = _TIME_BASE
            return frame
        # Within a few LSBs of zero (-72 dBFS) is silence: decoded Opus "silence" from a caller
        # is +/-1 LSB of comfort noise, and a sound's Opus tail decays through single digits.
        silent = int(samples.max()) <= _SILENT_LSB and int(samples.min()) >= -_SILENT_LSB
        return self.encoder.encode(samples, index, silent=silent)

    async def next_pcm(self) -> np.ndarray:
        """Wait for the next 20 ms slot and return its samples (what ``recv()`` encodes)."""
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._start is None:
            self._start = now
        due = self._start + self._slot * _PACKET_S
        if now - due > _MAX_LAG_S:
            # Stalled: the slots that passed are gone. Their audio stays queued, and a live
            # stream's lasting backlog is trimmed below; a reply plays on from where it was.
            current = int((now - self._start) / _PACKET_S)
            self.slots_skipped += current - self._slot
            self._slot = current
            due = self._start + current * _PACKET_S
        if self._live:
            await self._follow_input(due)
        elif due > now:
            await asyncio.sleep(due - now)
        now = loop.time()
        # Measured after the sleep: an event loop that wakes us late makes the frame late too.
        if now - due > LATE_S:
            self.frames_late += 1
        self._trim()
        samples, filled = self._next_samples(now)
        self.played_samples += filled
        self._slot += 1
        self._frames += 1
        self._tick.set()
        return samples

    async def _follow_input(self, due: float) -> None:
        """A live stream's slot: send its audio the moment it arrives, within the slot.

        A packet per fixed tick would hold each echoed or full-duplex frame until the next tick
        (10 ms on average, plus a safety lead). Instead a live slot takes its packet anywhere in
        the half-slot either side of its time: audio already queued leaves when the slot opens,
        audio that arrives while it is open leaves at once, and a slot that closes with nothing
        queued sends silence. The input's frames, a packet's time apart, each find a slot open
        when they arrive, so they go out as they come; what arrives early waits for its slot,
        so the stream never runs ahead of its RTP clock.
        """
        loop = asyncio.get_running_loop()
        closes = due + _PACKET_S / 2
        while not len(self._queue):
            remaining = closes - loop.time()
            if remaining <= 0:
                return  # nothing came: silence
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                return
        opens = due - _PACKET_S / 2
        if opens > loop.time():
            await asyncio.sleep(opens - loop.time())

    async def ticked(self) -> None:
        """Wait until the next frame has been taken for sending."""
        self._tick.clear()
        await self._tick.wait()

    def _trim(self) -> None:
        """Keep a live stream's latency from creeping up.

        A live stream (echo, full duplex) whose input arrived in a burst (a late packet, a
        rebuilt gap) gets ahead of the clock, and would keep that lag for the rest of the call.
        A burst is not a backlog, though: only audio that stayed queued for a whole window, the
        floor of the queue over it, is latency, and only what is over the bound is dropped.
        """
        if self._max_backlog is None:
            return
        # What stays queued once this slot's frame has gone: the frame about to play is not lag.
        queued = max(0, len(self._queue) - PACKET_SAMPLES)
        self._floor = queued if self._floor is None else min(self._floor, queued)
        if (self._frames + 1) % _TRIM_WINDOW_FRAMES == 0:
            if self._floor > self._max_backlog:
                # A live stream sends each frame as it comes, so all of a lasting floor is lag.
                excess = self._floor if self._live else self._floor - self._max_backlog
                self._queue.pop(excess)
                self.trimmed_samples += excess
            self._floor = None

    def _next_samples(self, now: float) -> tuple[np.ndarray, int]:
        if not len(self._queue) or (
            self._armed_at is not None and now - self._armed_at < self._lead_s
        ):
            return _SILENCE, 0
        samples, filled = self._queue.pop(PACKET_SAMPLES)
        if not len(self._queue):
            self._armed_at = None
        return samples, filled


_SILENCE = np.zeros(PACKET_SAMPLES, np.int16)
_TRIM_WINDOW_FRAMES = 25  # half a second

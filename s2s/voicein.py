"""The caller's audio on its way in: reordering, loss recovery and Opus decoding, inline.

A receive jitter buffer in a phone smooths arrival times for a sound card that plays at a fixed
clock. s2s feeds a model, which takes samples as fast as they come: smoothing would only add
latency. What the model does need is every 20 ms frame, in order. So ``VoiceReceiver`` hands a
packet on the moment it is next in line, and holds back only when one is missing: it waits for
the gap to fill (reordered, retransmitted after a NACK, or carried in a later RED packet) for as
long as the measured jitter says a late packet may still come, then rebuilds the frame from the
in-band FEC of the packet after it, or conceals it (Opus PLC). Nothing is ever skipped, so the
caller's timeline the model sees is exactly as long as what they said.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from s2s import opus

_SEQ_MOD = 1 << 16
# A gap longer than this (the caller muted, or its stream restarted) is not concealed in full:
# a few frames of PLC fade it out, then the timeline resumes at the next packet.
_MAX_CONCEAL_FRAMES = 25
_FADE_FRAMES = 3
# More than this many frames buffered behind a gap: stop waiting, whatever the jitter says.
_MAX_HELD_FRAMES = 10

#: Packets behind the stream in a row (1 s) that mean it started over.
_RESTART_AFTER_LATE = 50


@dataclass(slots=True)
class ReceiveStats:
    """What happened to a call's inbound audio; counters only grow."""

    packets: int = 0
    #: Packets that came wrapped in RED (RFC 2198).
    red_packets: int = 0
    #: Frames decoded from their own packet.
    decoded_frames: int = 0
    #: Frames rebuilt from the next packet's in-band FEC.
    fec_frames: int = 0
    #: Frames rebuilt from a redundant copy in a RED packet.
    red_frames: int = 0
    #: Frames made up by packet-loss concealment.
    concealed_frames: int = 0
    #: Sequence numbers asked for again (RTCP NACK) and retransmissions that came back.
    nacks_sent: int = 0
    retransmits: int = 0
    #: Packets that came after their frame had been recovered or concealed, or twice.
    late_packets: int = 0
    #: Packets dropped as malformed (RED that is, or wraps another codec; Opus libopus refuses).
    bad_packets: int = 0
    #: Times the stream started over (another source, or a run of packets all behind it).
    restarts: int = 0
    #: Packets past the rate any real sender keeps (``s2s.rtc.MAX_PACKETS_PER_S``), dropped.
    excess_packets: int = 0
    #: Interarrival jitter (RFC 3550) and the current wait for a missing packet, in ms.
    jitter_ms: float = 0.0
    wait_ms: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in self.__dataclass_fields__}


@dataclass(slots=True)
class _Held:
    timestamp: int
    payload: bytes
    arrived: float
    redundant: bool


Deliver = Callable[[np.ndarray, int], None]


class VoiceReceiver:
    """Opus packets in (any order, some missing), 20 ms mono PCM frames out: in order, all there.

    ``deliver(pcm, rtp_timestamp)`` is called for each frame. ``push`` returns the sequence
    numbers to ask for again when ``nack`` is on (the caller sends the RTCP NACK).
    """

    def __init__(
        self,
        deliver: Deliver,
        *,
        nack: bool = False,
        min_wait_ms: float = 5.0,
        max_wait_ms: float = 80.0,
    ) -> None:
        self.stats = ReceiveStats()
        self._deliver = deliver
        self._nack = nack
        self._min_wait = min_wait_ms / 1000
        self._max_wait = max_wait_ms / 1000
        self._decoder = opus.Decoder()
        self._held: dict[int, _Held] = {}
        self._next: int | None = None
        self._nacked: dict[int, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        # RFC 3550 jitter in RTP units, and the last packet's relative transit time.
        self._jitter = 0.0
        self._transit: float | None = None
        self._rtt = 0.05
        self._late_run = 0  # packets behind the stream in a row
        self.stats.wait_ms = 1000 * self.wait_s

    @property
    def wait_s(self) -> float:
        """How long a gap is held open before the missing frame is rebuilt."""
        wait = 3 * self._jitter / opus.RATE + 0.002
        if self._nack:
            # A retransmission needs a round trip; worth waiting for only when it is short.
            wait = max(wait, 1.2 * self._rtt + 0.005)
        return min(self._max_wait, max(self._min_wait, wait))

    def push(
        self,
        seq: int,
        timestamp: int,
        payload: bytes,
        redundant: list[tuple[int, bytes]] | None = None,
    ) -> list[int]:
        """Take one packet (``redundant``: RED's older copies as (timestamp offset, payload))."""
        now = self._loop.time()
        self.stats.packets += 1
        if redundant is not None:
            self.stats.red_packets += 1
        if self._next is None:
            self._next = seq
        ext = self._extend(seq)
        self._update_jitter(timestamp, now)
        sent_at = self._nacked.pop(ext, None)
        if sent_at is not None:
            self.stats.retransmits += 1
            self._rtt += 0.25 * ((now - sent_at) - self._rtt)
        held = self._held.get(ext)
        if ext < self._next or (held is not None and not held.redundant):
            self.stats.late_packets += 1
            self._late_run += 1
            if self._late_run < _RESTART_AFTER_LATE:
                return []
            # So many in a row are no late packets: the stream started over further back (a
            # sender restarted, a gateway switched source); its frames would all be dropped.
            self.restart()
            return self.push(seq, timestamp, payload, redundant)
        self._late_run = 0
        self._held[ext] = _Held(timestamp, payload, now, redundant=False)
        for offset, data in redundant or ():
            older = ext - round(offset / opus.FRAME)
            if older >= self._next and older not in self._held and data:
                self._held[older] = _Held(timestamp - offset, data, now, redundant=True)
        self._drain()
        return self._after_push(ext, now)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def restart(self) -> None:
        """A new stream (another source, a sender that started over): what was held of the old
        one goes, its sequence numbers and jitter with it, and the decoder starts fresh."""
        self.close()
        self._held.clear()
        self._nacked.clear()
        self._next = self._transit = None
        self._late_run = 0
        self._decoder = opus.Decoder()
        self.stats.restarts += 1

    # -- internals -------------------------------------------------------------------------------

    def _extend(self, seq: int) -> int:
        assert self._next is not None
        delta = (seq - self._next) % _SEQ_MOD
        if delta >= _SEQ_MOD // 2:
            delta -= _SEQ_MOD
        return self._next + delta

    def _update_jitter(self, timestamp: int, now: float) -> None:
        transit = now * opus.RATE - timestamp
        if self._transit is not None:
            # Timestamps wrap at 2**32; a wrap shows as a jump of about that size.
            step = abs((transit - self._transit + 2**31) % 2**32 - 2**31)
            if step < opus.RATE:  # a jump over a second is a stream restart, not jitter
                self._jitter += (step - self._jitter) / 16
        self._transit = transit
        self.stats.jitter_ms = 1000 * self._jitter / opus.RATE

    def _drain(self) -> None:
        assert self._next is not None
        while (held := self._held.pop(self._next, None)) is not None:
            if held.redundant:
                self.stats.red_frames += 1
            else:
                self.stats.decoded_frames += 1
            self._emit(self._decoded(held.payload), held.timestamp)
        if not self._held and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _after_push(self, newest: int, now: float) -> list[int]:
        assert self._next is not None
        if not self._held:
            return []
        if len(self._held) > _MAX_HELD_FRAMES:
            self._recover(now, force=True)
            return []
        self.stats.wait_ms = 1000 * self.wait_s
        if self._timer is None:
            self._schedule(now)
        if not self._nack:
            return []
        # Only the last few: a packet further back could not come back before its frame is
        # concealed, and asking for a whole long gap on every packet was a storm of NACKs.
        start = max(self._next, newest - _MAX_HELD_FRAMES)
        missing = [s for s in range(start, newest) if s not in self._held and s not in self._nacked]
        for s in missing:
            self._nacked[s] = now
        if len(self._nacked) > 4 * _MAX_HELD_FRAMES:  # forget requests that never came back
            for s in sorted(self._nacked)[: -2 * _MAX_HELD_FRAMES]:
                del self._nacked[s]
        self.stats.nacks_sent += len(missing)
        return [s % _SEQ_MOD for s in missing]

    def _schedule(self, now: float) -> None:
        first = min(self._held)
        due = self._held[first].arrived + self.wait_s
        self._timer = self._loop.call_at(max(due, now), self._expire)

    def _expire(self) -> None:
        self._timer = None
        self._recover(self._loop.time(), force=False)

    def _recover(self, now: float, *, force: bool) -> None:
        """Rebuild the frames missing before held packets whose wait is over."""
        assert self._next is not None
        while self._held and self._next not in self._held:
            first = min(self._held)
            if not force and now - self._held[first].arrived < self.wait_s - 0.001:
                self._schedule(now)
                return
            gap = first - self._next
            head = self._held[first]
            if gap > _MAX_CONCEAL_FRAMES:
                for i in range(_FADE_FRAMES):
                    self._conceal(head.timestamp - (gap - i) * opus.FRAME)
                self._next = first
            else:
                for i in range(gap - 1):
                    self._conceal(head.timestamp - (gap - i) * opus.FRAME)
                self.stats.fec_frames += 1
                self._emit(self._decoded(head.payload, fec=True), head.timestamp - opus.FRAME)
                self._next = first
            self._drain()
            force = force and len(self._held) > _MAX_HELD_FRAMES

    def _decoded(self, payload: bytes, *, fec: bool = False) -> np.ndarray:
        """A packet's frame (``fec``: the one before it, from its redundancy); a packet libopus
        cannot read is a lost one, concealed (raised, it closed the call's whole transport)."""
        try:
            return self._decoder.recover(payload) if fec else self._decoder.decode(payload)
        except opus.OpusError:
            self.stats.bad_packets += 1
            return self._decoder.conceal()

    def _conceal(self, timestamp: int) -> None:
        self.stats.concealed_frames += 1
        self._emit(self._decoder.conceal(), timestamp)

    def _emit(self, pcm: np.ndarray, timestamp: int) -> None:
        assert self._next is not None
        self._next += 1
        self._deliver(pcm, timestamp % (1 << 32))


def parse_red(payload: bytes) -> tuple[int, bytes, list[tuple[int, bytes]]]:
    """Split an RFC 2198 RED payload: (primary payload type, primary, [(ts offset, older)]).

    Raises ``ValueError`` when the headers do not fit the payload.
    """
    headers: list[tuple[int, int]] = []
    pos = 0
    while True:
        if pos >= len(payload):
            raise ValueError("RED payload ends inside its headers")
        first = payload[pos]
        if not first & 0x80:
            primary_type = first & 0x7F
            pos += 1
            break
        if pos + 4 > len(payload):
            raise ValueError("RED payload ends inside a block header")
        word = int.from_bytes(payload[pos + 1 : pos + 4], "big")
        headers.append((word >> 10, word & 0x3FF))
        pos += 4
    older: list[tuple[int, bytes]] = []
    for offset, length in headers:
        if pos + length > len(payload):
            raise ValueError("RED block longer than the payload")
        older.append((offset, payload[pos : pos + length]))
        pos += length
    return primary_type, payload[pos:], older

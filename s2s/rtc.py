"""Peer connections as s2s makes them: no STUN by default, and audio tuned for talking to a model.

aiortc gets the media path right for general use, not for voice AI: it holds 80 ms of inbound
audio in a fixed jitter buffer, decodes on a thread per receiver, skips lost frames, drops RED,
never NACKs audio, and answers without any Opus parameters. ``tune_audio`` fixes the
negotiation and ``VoiceInput`` takes over the audio receiver's packet handling. Both touch
aiortc internals (named below, guarded, and checked by the tests); they can go when aiortc grows
settings for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpCodecParameters,
    RTCRtpReceiver,
    RTCRtpTransceiver,
)
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtcrtpparameters import RTCRtcpFeedback
from aiortc.rtcrtpreceiver import StreamStatistics
from aiortc.rtp import RtpPacket
from aiortc.sdp import SessionDescription

from s2s import opus
from s2s.voicein import ReceiveStats, VoiceReceiver, parse_red

log = logging.getLogger(__name__)

# Private receiver state that VoiceInput keeps up to date so aiortc's RTCP receiver reports
# (loss, jitter; what the caller's RTT and bitrate control see) stay right.
_REMOTE_STREAMS = "_RTCRtpReceiver__remote_streams"
_ACTIVE_SOURCES = "_RTCRtpReceiver__active_ssrc"
#: Sources (SSRCs) a receiver keeps statistics of: one a track, and some to spare.
MAX_SOURCES = 4
#: Distinct sources a peer may send under in one call (a browser uses one a track, and one
#: more for retransmissions); past them the call ends (see ``watch_sources``).
MAX_CALL_SOURCES = 100


#: Inbound audio packets a second a call takes (each is decoded on the event loop all calls
#: share): ten times a 20 ms sender's, above even a 2.5 ms one's (400); past it they are
#: dropped before decoding (20,000 a second saturated the loop). What comes before the count,
#: SRTP and aiortc's routing, a flood still costs.
MAX_PACKETS_PER_S = 500

#: An offer's media sections (audio, camera, data channel: 3 are used) and distinct ICE
#: candidates (a few per network interface; a container host may have a dozen) past which it is
#: refused.
MAX_SECTIONS = 8
MAX_CANDIDATES = 64


class OfferError(ValueError):
    """The SDP offer cannot be answered; the message says why."""


def check_offer(offer_sdp: str) -> None:
    """Refuse (``OfferError``) an offer of more sections or candidates than a call uses, before
    aiortc parses it: each section gets a receiver (with a decoder thread), and each candidate
    connectivity checks sent to whatever address it names; and one with no DTLS fingerprint,
    which aiortc would answer and then fail on, leaving the call to wait out its peer timeout."""
    lines = offer_sdp.splitlines()
    if not any(line.startswith("a=fingerprint:") for line in lines):
        raise OfferError("the offer has no DTLS fingerprint (a=fingerprint)")
    sections = sum(line.startswith("m=") for line in lines)
    offered = [line for line in lines if line.startswith("a=candidate:")]
    # A client that does not trickle repeats its candidates in every section; with the sections
    # bundled on one transport they are checked once, so count them once.
    bundled = any(line.startswith("a=group:BUNDLE") for line in lines)
    candidates = len(set(offered)) if bundled else len(offered)
    if sections > MAX_SECTIONS or candidates > MAX_CANDIDATES:
        raise OfferError(
            f"the offer has {sections} media sections and {candidates} candidates: at most "
            f"{MAX_SECTIONS} and {MAX_CANDIDATES}"
        )


def receive_one_of_each(pc: RTCPeerConnection, *, camera: bool) -> list[RTCRtpTransceiver]:
    """After the offer is applied: receive one microphone and (with ``camera``) one camera, and
    nothing of any other section, whose tracks would be decoded (a thread each) into queues
    nothing reads, for as long as the call lasts. Returns the audio transceivers, the one used
    first; ``OfferError`` if there is none."""
    audio = [t for t in pc.getTransceivers() if t.kind == "audio"]
    if not audio:
        raise OfferError("the offer has no audio section")
    for transceiver in audio[1:]:
        transceiver.direction = "inactive"
    video = [t for t in pc.getTransceivers() if t.kind == "video"]
    for i, transceiver in enumerate(video):
        transceiver.direction = "recvonly" if camera and i == 0 else "inactive"
    return audio


def limit_sources(receiver: RTCRtpReceiver) -> None:
    """Keep what ``receiver`` knows of its sources (SSRCs) to the ``MAX_SOURCES`` heard last.

    aiortc routes RTP of any new SSRC with a known payload type to the receiver of that kind,
    which keeps statistics of every one and reports on all of them: past about 57 its receiver
    report no longer fits a packet, its RTCP task dies of it silently, and closing the call
    waits for that task for ever. A peer needs one source per track (retransmissions come under
    another). What aiortc's router and SRTP keep per source ``watch_sources`` bounds."""
    known: list[dict[int, Any]] = [
        k
        for name in (_REMOTE_STREAMS, _ACTIVE_SOURCES)
        if isinstance(k := getattr(receiver, name, None), dict)
    ]
    if len(known) < 2 or not hasattr(receiver, "_handle_rtp_packet"):
        log.warning("aiortc's receiver internals changed; its sources are not limited")
        return
    handle = receiver._handle_rtp_packet

    async def handle_limited(packet: RtpPacket, arrival_time_ms: int) -> None:
        await handle(packet, arrival_time_ms)
        for sources in known:
            if packet.ssrc in sources:  # the live one last: never let go, and the one reported
                sources[packet.ssrc] = sources.pop(packet.ssrc)
            while len(sources) > MAX_SOURCES:
                del sources[next(iter(sources))]  # the least recently heard

    receiver._handle_rtp_packet = handle_limited  # type: ignore[method-assign]


def watch_sources(pc: RTCPeerConnection, flooded: Callable[[], None]) -> None:
    """Call ``flooded`` once the peer has sent RTP or RTCP under more than ``MAX_CALL_SOURCES``
    SSRCs, and drop what comes under a new one from then on; every receiver keeps statistics of
    its last few sources alone (``limit_sources``).

    aiortc's router and libsrtp keep state for every source a peer ever sent under, for as long
    as the call lasts: a peer cycling through SSRCs would grow both without bound."""
    for receiver in pc.getReceivers():
        limit_sources(receiver)
    seen: set[int] = set()
    over = False

    def admits(ssrc: int) -> bool:
        nonlocal over
        if ssrc in seen:
            return True
        if len(seen) < MAX_CALL_SOURCES:
            seen.add(ssrc)
            return True
        if not over:
            over = True
            flooded()
        return False

    bundled = {id(t): t for r in pc.getReceivers() if (t := r.transport) is not None}
    for dtls in bundled.values():
        if not hasattr(dtls, "_handle_rtp_data") or not hasattr(dtls, "_handle_rtcp_data"):
            log.warning("aiortc's DTLS transport internals changed; sources are not counted")
            return
        # Both see a packet once SRTP has let it in, before aiortc routes it; the sender's SSRC
        # is at bytes 8-12 of an RTP header and 4-8 of an RTCP one.
        rtp, rtcp = dtls._handle_rtp_data, dtls._handle_rtcp_data

        async def counted_rtp(data: bytes, arrival_time_ms: int, rtp: Any = rtp) -> None:
            if len(data) < 12 or admits(int.from_bytes(data[8:12], "big")):
                await rtp(data, arrival_time_ms=arrival_time_ms)

        async def counted_rtcp(data: bytes, rtcp: Any = rtcp) -> None:
            if len(data) < 8 or admits(int.from_bytes(data[4:8], "big")):
                await rtcp(data)

        dtls._handle_rtp_data = counted_rtp  # type: ignore[method-assign]
        dtls._handle_rtcp_data = counted_rtcp  # type: ignore[method-assign]


async def close_transports(pc: RTCPeerConnection) -> None:
    """What ``pc.close()`` stops, each part bounded on its own, for a close that hung on one:
    every receiver and sender (a receiver stops its decoder thread before it waits for its
    RTCP task, the part that hangs), then the DTLS, ICE and SCTP transports (sockets, consent
    checks)."""
    for transceiver in pc.getTransceivers():
        for part in (transceiver.receiver, transceiver.sender):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await part.stop()
    transports: list[Any] = []
    if pc.sctp is not None:
        transports.append(pc.sctp)
    for transceiver in pc.getTransceivers():
        dtls = transceiver.receiver.transport
        if dtls is not None:
            transports += [dtls, dtls.transport]
    if pc.sctp is not None:
        transports += [pc.sctp.transport, pc.sctp.transport.transport]
    for transport in dict.fromkeys(transports):  # bundled: the same ones, once each
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await transport.stop()
    pc.remove_all_listeners()


def new_peer_connection(ice_servers: list[RTCIceServer] | None = None) -> RTCPeerConnection:
    """A peer connection that never reaches for a public STUN server unless told to.

    With ``iceServers=None`` aiortc falls back to a public STUN server and ICE gathering then
    waits on its timeout when the network is closed; an explicit (possibly empty) list avoids it.
    """
    return RTCPeerConnection(RTCConfiguration(iceServers=list(ice_servers or [])))


@dataclass(frozen=True, slots=True)
class VoiceCodecs:
    """What the answer agreed for the caller's audio."""

    opus: int
    red: int | None = None
    nack: bool = False


def tune_audio(transceiver: RTCRtpTransceiver, offer_sdp: str, bitrate: int) -> VoiceCodecs | None:
    """Shape the answer for ``transceiver`` (after the offer is applied, before the answer).

    Asks the caller for mono Opus with in-band FEC, no DTX (server VAD needs the silence) and at
    most ``bitrate``; accepts RED and audio NACK when the caller offers them. Returns None when
    the call has no Opus (G.711 callers stay on aiortc's path).
    """
    codecs: list[RTCRtpCodecParameters] = transceiver._codecs  # aiortc's negotiated list
    chosen = next((c for c in codecs if c.mimeType.lower() == "audio/opus"), None)
    if chosen is None or chosen.payloadType is None:
        return None
    offered = _offered_codecs(offer_sdp, transceiver.mid)
    chosen.parameters = {
        "minptime": 10,
        "useinbandfec": 1,
        "usedtx": 0,
        "stereo": 0,
        "maxaveragebitrate": bitrate,
    }
    remote_opus = next((c for c in offered if c.payloadType == chosen.payloadType), None)
    nack = remote_opus is not None and any(f.type == "nack" for f in remote_opus.rtcpFeedback)
    if nack:
        chosen.rtcpFeedback = [*chosen.rtcpFeedback, RTCRtcpFeedback(type="nack")]
    red = next(
        (
            c
            for c in offered
            if c.mimeType.lower() == "audio/red"
            and c.clockRate == opus.RATE
            and _red_wraps(c, chosen.payloadType)
        ),
        None,
    )
    if red is not None:
        codecs.append(
            RTCRtpCodecParameters(
                mimeType="audio/red", clockRate=opus.RATE, channels=red.channels,
                payloadType=red.payloadType, parameters=dict(red.parameters),
            )
        )  # fmt: skip
    return VoiceCodecs(chosen.payloadType, red.payloadType if red else None, nack)


def _offered_codecs(offer_sdp: str, mid: str | None) -> list[RTCRtpCodecParameters]:
    description = SessionDescription.parse(offer_sdp)
    for media in description.media:
        if media.kind == "audio" and (mid is None or media.rtp.muxId == mid):
            return list(media.rtp.codecs)
    return []


def _red_wraps(red: RTCRtpCodecParameters, opus_type: int) -> bool:
    # RED's fmtp lists the payload type of each block ("111/111"): only Opus-in-RED is taken.
    blocks = [key for key in red.parameters if "/" in key or key.isdigit()]
    return bool(blocks) and all(part == str(opus_type) for key in blocks for part in key.split("/"))


def prefer_red(answer_sdp: str, codecs: VoiceCodecs) -> str:
    """Put RED first in the answer's audio format list, so the caller sends its audio in RED.

    aiortc sends with the first codec of its own list, which must stay Opus; the order in the
    SDP only tells the caller what s2s prefers to receive.
    """
    if codecs.red is None:
        return answer_sdp
    lines = answer_sdp.split("\r\n")
    for i, line in enumerate(lines):
        if line.startswith("m=audio "):
            head = line.split(" ")
            formats = [f for f in head[3:] if f != str(codecs.red)]
            lines[i] = " ".join([*head[:3], str(codecs.red), *formats])
            break
    return "\r\n".join(lines)


class VoiceInput:
    """Takes over an audio receiver's packets: ``VoiceReceiver`` instead of aiortc's jitter
    buffer and decoder thread, frames pushed straight onto the remote track's queue.

    The track then yields mono 48 kHz ``int16`` numpy arrays, not ``av.AudioFrame``s:
    its one reader is the call's mic pump, which works on arrays, and wrapping each frame only
    for the pump to unwrap it took 6% of a loaded echo server's CPU.

    aiortc's decoder thread is still started by the receiver and idles on its empty queue; when
    the receiver stops, it ends the track as before.
    """

    def __init__(self, receiver: RTCRtpReceiver, codecs: VoiceCodecs, max_wait_ms: float) -> None:
        self._receiver = receiver
        self._codecs = codecs
        self._streams: dict[int, StreamStatistics] = getattr(receiver, _REMOTE_STREAMS)
        self._pipeline = VoiceReceiver(self._deliver, nack=codecs.nack, max_wait_ms=max_wait_ms)
        self._ssrc: int | None = None  # the source whose packets the pipeline holds
        # A token bucket of packets: each is decoded on the event loop every call shares.
        self._allowance = float(MAX_PACKETS_PER_S)
        self._counted_at = time.monotonic()

    @classmethod
    def install(
        cls, receiver: RTCRtpReceiver, codecs: VoiceCodecs, max_wait_ms: float
    ) -> VoiceInput | None:
        """Route ``receiver``'s RTP through s2s; None (aiortc's path kept) if aiortc changed."""
        if not isinstance(getattr(receiver, _REMOTE_STREAMS, None), dict) or not hasattr(
            receiver, "_handle_rtp_packet"
        ):
            log.warning("aiortc's receiver internals changed; keeping its own audio path")
            return None
        voice = cls(receiver, codecs, max_wait_ms)
        # The DTLS transport calls this for every RTP packet of this receiver's SSRC.
        receiver._handle_rtp_packet = voice.handle_rtp_packet  # type: ignore[method-assign]
        return voice

    @property
    def stats(self) -> ReceiveStats:
        return self._pipeline.stats

    def close(self) -> None:
        self._pipeline.close()

    async def handle_rtp_packet(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        if not self._receiver._enabled:
            return
        now = time.monotonic()
        elapsed, self._counted_at = now - self._counted_at, now
        self._allowance = min(MAX_PACKETS_PER_S, self._allowance + elapsed * MAX_PACKETS_PER_S)
        if self._allowance < 1:
            self._pipeline.stats.excess_packets += 1
            return
        self._allowance -= 1
        red = packet.payload_type == self._codecs.red
        if packet.payload_type != self._codecs.opus and not red:
            return
        if packet.ssrc != self._ssrc:
            if self._ssrc is not None:  # another source: its numbers start anywhere
                self._pipeline.restart()
            self._ssrc = packet.ssrc
        stream = self._streams.get(packet.ssrc)
        if stream is None:
            stream = self._streams[packet.ssrc] = StreamStatistics(opus.RATE)
        stream.add(packet)
        payload = packet.payload
        older: list[tuple[int, bytes]] | None = None
        if red:
            try:
                inner, payload, older = parse_red(packet.payload)
            except ValueError:
                self._pipeline.stats.bad_packets += 1
                return
            if inner != self._codecs.opus:
                self._pipeline.stats.bad_packets += 1
                return
        if not payload:
            return
        lost = self._pipeline.push(packet.sequence_number, packet.timestamp, payload, older)
        if lost:
            await self._receiver._send_rtcp_nack(packet.ssrc, lost)

    def _deliver(self, pcm: np.ndarray, timestamp: int) -> None:
        track: Any = self._receiver._track
        if track is not None:
            track._queue.put_nowait(pcm)


def set_audio_prefetch(receiver: RTCRtpReceiver, frames: int) -> bool:
    """Make aiortc's own audio path release after ``frames`` frames instead of its 4.

    For peers that keep aiortc's receive path (test and benchmark callers). Returns False, and
    leaves aiortc's buffer, if this aiortc no longer has the attribute.
    """
    current = getattr(receiver, _JITTER_ATTR, None)
    if not isinstance(current, JitterBuffer) or current.capacity != _JITTER_CAPACITY:
        log.warning("cannot size aiortc's audio jitter buffer; keeping its default")
        return False
    setattr(receiver, _JITTER_ATTR, JitterBuffer(capacity=_JITTER_CAPACITY, prefetch=frames))
    return True


# aiortc builds every audio receiver with JitterBuffer(capacity=16, prefetch=4).
_JITTER_ATTR = "_RTCRtpReceiver__jitter_buffer"
_JITTER_CAPACITY = 16

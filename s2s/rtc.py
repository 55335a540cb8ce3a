"""Peer connections as s2s makes them: no STUN by default, and voice-sized receive buffering."""

from __future__ import annotations

import logging

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpReceiver
from aiortc.jitterbuffer import JitterBuffer

log = logging.getLogger(__name__)

# aiortc builds every audio receiver with JitterBuffer(capacity=16, prefetch=4): 80 ms held
# before a frame is released, on top of the sender's pacing. It has no setting for this, so the
# buffer is swapped right after the receiver is created. This is the one place s2s touches an
# aiortc private; it can go when aiortc lets callers size the audio jitter buffer.
_JITTER_ATTR = "_RTCRtpReceiver__jitter_buffer"
_JITTER_CAPACITY = 16


def new_peer_connection(ice_servers: list[RTCIceServer] | None = None) -> RTCPeerConnection:
    """A peer connection that never reaches for a public STUN server unless told to.

    With ``iceServers=None`` aiortc falls back to a public STUN server and ICE gathering then
    waits on its timeout when the network is closed; an explicit (possibly empty) list avoids it.
    """
    return RTCPeerConnection(RTCConfiguration(iceServers=list(ice_servers or [])))


def set_audio_prefetch(receiver: RTCRtpReceiver, frames: int) -> bool:
    """Make ``receiver`` release audio after ``frames`` frames instead of aiortc's 4.

    Returns False (and leaves aiortc's buffer) if this aiortc no longer has the attribute.
    """
    current = getattr(receiver, _JITTER_ATTR, None)
    if not isinstance(current, JitterBuffer) or current.capacity != _JITTER_CAPACITY:
        log.warning("cannot size aiortc's audio jitter buffer; keeping its default")
        return False
    setattr(receiver, _JITTER_ATTR, JitterBuffer(capacity=_JITTER_CAPACITY, prefetch=frames))
    return True

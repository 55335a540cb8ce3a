"""A real aiortc peer calls the real server running the echo backend."""

from __future__ import annotations

import numpy as np

from tests.conftest import Server
from tests.peer import FRAME, RATE, MicTrack, Peer
from tests.signals import dominant_frequency, loud_spans, rms, silence, tone


async def test_tone_comes_back_with_its_frequency_and_timing(server: Server) -> None:
    mic = MicTrack()
    peer = Peer(server.url, mic)
    try:
        await peer.connect()
        await peer.wait_audio(0.2)
        start = mic.play(np.concatenate([tone(440, 0.8), silence(1.0)]))
        await peer.wait_audio(1.2, since=peer.frames[-1][0])
        sent_at = mic.frame_times[start // FRAME]
        received = peer.audio(since=sent_at)
        spans = loud_spans(received)
        assert len(spans) == 1, f"expected one tone burst back, got {spans}"
        begin, end = spans[0]
        # Echo round trip through both jitter buffers, the server's pacing and the echo backend.
        latency = peer.arrival_time(begin, since=sent_at) - sent_at
        assert 0.0 < latency < 0.3, latency
        assert abs((end - begin) / RATE - 0.8) < 0.03, (end - begin) / RATE
        body = received[begin + 4800 : end - 4800]
        assert abs(dominant_frequency(body) - 440) < 3
        # One -3 dB mono->stereo upmix, in the test peer's aiortc encoder (0.212 RMS -> 0.150);
        # the server's own encoder sends mono and adds none.
        assert 0.13 < rms(body) < 0.17, rms(body)
    finally:
        await peer.close()

"""The tuned media path end to end: what the answer asks for, and what the server does with it."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import numpy as np

from s2s.session import Session
from tests.conftest import Server, StartServer
from tests.peer import MicTrack, Peer
from tests.speech import speak


def with_red_and_nack(offer: str) -> str:
    """The offer as a browser with RED (and a client with audio NACK) would make it."""
    opus = re.search(r"a=rtpmap:(\d+) opus/48000/2", offer)
    assert opus is not None
    pt = opus.group(1)
    offer = re.sub(r"(m=audio \d+ \S+) ", r"\1 63 ", offer, count=1)
    extra = f"a=rtpmap:63 red/48000/2\r\na=fmtp:63 {pt}/{pt}\r\na=rtcp-fb:{pt} nack\r\n"
    return offer.replace(opus.group(0) + "\r\n", opus.group(0) + "\r\n" + extra, 1)


def session_of(server: Server, peer: Peer) -> Session:
    assert peer.call_url is not None
    session = server.registry.get(peer.call_url.rsplit("/", 1)[1])
    assert session is not None
    return session


def opus_fmtp(answer: str) -> str:
    pt = re.search(r"a=rtpmap:(\d+) opus/48000/2", answer)
    assert pt is not None
    fmtp = re.search(rf"a=fmtp:{pt.group(1)} (\S+)", answer)
    return fmtp.group(1) if fmtp else ""


async def test_answer_asks_for_mono_fec_no_dtx_and_the_bitrate(start_server: StartServer) -> None:
    server = await start_server(opus_bitrate=24_000)
    peer = Peer(server.url)
    try:
        await peer.connect()
        assert peer.answer is not None
        params = dict(p.split("=") for p in opus_fmtp(peer.answer).split(";"))
        assert params == {
            "minptime": "10", "useinbandfec": "1", "usedtx": "0", "stereo": "0",
            "maxaveragebitrate": "24000",
        }  # fmt: skip
        assert "red/48000" not in peer.answer  # not offered, not answered
        assert "nack" not in peer.answer
    finally:
        await peer.close()


async def test_stock_transport_answers_as_aiortc_does(start_server: StartServer) -> None:
    server = await start_server(transport="stock")
    peer = Peer(server.url, edit_offer=with_red_and_nack)
    try:
        await peer.connect()
        assert peer.answer is not None
        assert opus_fmtp(peer.answer) == ""
        assert "red/48000" not in peer.answer
        assert session_of(server, peer).voice_in is None
    finally:
        await peer.close()


async def test_red_and_nack_are_accepted_when_offered(start_server: StartServer) -> None:
    server = await start_server()
    peer = Peer(server.url, edit_offer=with_red_and_nack)
    try:
        await peer.connect()
        answer = peer.answer
        assert answer is not None
        media = re.search(r"m=audio \d+ \S+ (.*)", answer)
        assert media is not None and media.group(1).split()[0] == "63"  # RED preferred
        opus = re.search(r"a=rtpmap:(\d+) opus/48000/2", answer)
        assert opus is not None
        assert f"a=fmtp:63 {opus.group(1)}/{opus.group(1)}" in answer
        assert f"a=rtcp-fb:{opus.group(1)} nack" in answer
    finally:
        await peer.close()


async def test_lost_uplink_packets_are_asked_for_again_and_retransmitted(
    start_server: StartServer,
) -> None:
    server = await start_server()
    speech = speak("One two three four five six seven eight nine ten.")
    peer = Peer(server.url, MicTrack(speech), edit_offer=with_red_and_nack, loss=0.1)
    try:
        await peer.connect()
        await peer.wait_audio(speech.size / 48_000 - 0.3, timeout=15)
        stats = session_of(server, peer).voice_in
        assert stats is not None
        assert len(peer.dropped) > 5
        assert stats.stats.nacks_sent > 0
        # aiortc's sender keeps its packets and resends what a NACK names.
        assert stats.stats.retransmits > 0
    finally:
        await peer.close()


async def test_lost_uplink_packets_are_rebuilt_not_skipped(start_server: StartServer) -> None:
    server = await start_server()
    speech = speak("The quick brown fox jumps over the lazy dog.")
    peer = Peer(server.url, MicTrack(speech, encode=True), loss=0.1)
    try:
        await peer.connect()
        session = session_of(server, peer)
        assert session.voice_in is not None
        stats = session.voice_in.stats
        async with asyncio.timeout(15):
            while stats.packets + len(peer.dropped) < speech.size // 960:
                await peer.wait_audio(0.2, since=asyncio.get_running_loop().time())
        peer.mic.stop()  # aiortc's sender stops: no more packets, no more losses
        await peer.wait_audio(0.3, since=asyncio.get_running_loop().time())
        dropped = set(peer.dropped)
        last = max(i for i, seq in enumerate(peer.sent) if seq not in dropped)
        # A loss after the last packet that arrives is never known to be one.
        known_lost = sum(seq in dropped for seq in peer.sent[:last])
        assert known_lost > 5
        # Every frame sent is accounted for: the model's timeline is as long as the caller's.
        assert stats.decoded_frames == stats.packets
        assert stats.fec_frames + stats.concealed_frames == known_lost
        assert stats.fec_frames > stats.concealed_frames  # speech packets carry FEC
    finally:
        await peer.close()


async def _bytes_sent(pc: Any) -> tuple[float, int]:
    """When, and how many bytes of audio ``pc`` had sent then."""
    report = await pc.getStats()
    sent = [s for s in report.values() if s.type == "outbound-rtp"]
    return asyncio.get_running_loop().time(), int(sent[0].bytesSent)


async def test_outbound_bitrate_follows_the_setting(start_server: StartServer) -> None:
    speech = speak("Testing the bitrate of the outbound audio, one two three four five six.")
    rates = []
    for bitrate in (16_000, 48_000):
        server = await start_server(opus_bitrate=bitrate)
        peer = Peer(server.url, MicTrack(speech))
        try:
            await peer.connect()
            pc = session_of(server, peer).pc
            began, before = await _bytes_sent(pc)
            await peer.wait_audio(speech.size / 48_000 - 0.3, timeout=15)
            ended, after = await _bytes_sent(pc)
            # Over the time measured, not the speech's length: a slow start adds no bytes.
            rates.append(8 * (after - before) / (ended - began))
        finally:
            await peer.close()
    low, high = rates
    assert 8_000 < low < 22_000
    assert high > 1.8 * low


def test_speech_packets_carry_fec_that_rebuilds_a_lost_frame() -> None:
    from s2s import opus

    pcm = speak("A sentence long enough to carry some forward error correction.")
    frames = pcm[: pcm.size // 960 * 960].reshape(-1, 960)
    for fec, expect_audio in ((True, True), (False, False)):
        encoder = opus.Encoder(32_000, fec=fec, loss_percent=10)
        packets = [encoder.encode(f) for f in frames]
        # A fresh decoder asked to rebuild the frame before each packet gets audio only from a
        # packet that carries FEC data; otherwise it conceals from nothing: silence.
        rebuilt = [opus.Decoder().recover(p) for p in packets[20:-20]]
        loud = sum(int(np.abs(r).max()) > 100 for r in rebuilt)
        assert (loud > len(rebuilt) // 2) is expect_audio

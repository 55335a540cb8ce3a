"""How calls end: hang-up, the client closing, a client that vanishes; and that nothing leaks."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import weakref
from pathlib import Path

import pytest

from s2s.audio import SpeakerTrack
from tests.conftest import Server, StartServer
from tests.peer import ColourCamera, Peer

ROOT = Path(__file__).resolve().parent.parent


async def wait_until(condition, *, timeout: float, what: str) -> None:
    """Poll ``condition`` every 50 ms until it holds, failing after ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            # Server-side state (the registry, task lists) has no event to await: poll it.
            while not condition():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


async def test_hangup_ends_the_call_and_frees_it(server: Server) -> None:
    peer = Peer(server.url)
    try:
        await peer.connect()
        await peer.next_event("session.created")
        call_id = peer.call_url.rsplit("/", 1)[1]
        session = server.registry.get(call_id)
        assert session is not None
        assert await peer.hangup() == 200
        # Hang-up returns once the call is released.
        assert server.registry.get(call_id) is None
        assert session.end_reason == "hangup"
        assert session.pc.connectionState == "closed"
        assert session.speaker.readyState == "ended"
        await wait_until(
            lambda: peer.pc.connectionState == "closed", timeout=5, what="client close"
        )
        assert await peer.hangup() == 404
    finally:
        await peer.close()


async def test_client_closing_its_side_ends_the_call(server: Server) -> None:
    peer = Peer(server.url)
    await peer.connect()
    await peer.next_event("session.created")
    session = server.registry.get(peer.call_url.rsplit("/", 1)[1])
    await peer.close()
    await wait_until(lambda: len(server.registry) == 0, timeout=5, what="the call to end")
    assert session is not None and session.end_reason in ("connection_closed", "peer_gone")


@pytest.mark.parametrize("kind", ["audio", "video"])
async def test_a_caller_that_switches_its_sources_often_can_still_hang_up(
    server: Server, kind: str
) -> None:
    """A peer sending its audio, or its camera, under 80 SSRCs: the server's receiver reports
    keep fitting a packet, so its RTCP task lives on and the call closes (past about 57
    sources, aiortc's report overflowed, its task died, and closing the call waited for it
    forever: the call's count and model stream were never let go)."""
    import random
    import time

    from aiortc.rtp import RtpPacket

    peer = Peer(server.url, camera=ColourCamera((200, 30, 30)) if kind == "video" else None)
    try:
        await peer.connect()
        await peer.next_event("session.created")
        call_id = peer.call_url.rsplit("/", 1)[1]
        (media,) = [t for t in peer.pc.getTransceivers() if t.kind == kind]
        sender = media.sender
        codec = "audio/opus" if kind == "audio" else "video/vp8"
        payload_type = next(c.payloadType for c in media._codecs if c.mimeType.lower() == codec)
        payload = b"\xf8\xff\xfe" if kind == "audio" else b"\x10\x00\x00\x00"
        flooded = time.time()
        for i in range(80):  # a hostile or broken peer: RTP straight onto its transport
            packet = RtpPacket(payload_type=payload_type, sequence_number=i, timestamp=960 * i,
                               ssrc=random.getrandbits(32), payload=payload)  # fmt: skip
            await sender.transport._send_rtp(packet.serialize())

        async def reported_since_flood() -> bool:
            stats = await sender.getStats()
            return any(
                s.type == "remote-inbound-rtp" and s.timestamp.timestamp() > flooded
                for s in stats.values()
            )

        # The server's receiver reports on the peer's track again (its RTCP task is alive).
        async with asyncio.timeout(10):
            while not await reported_since_flood():  # noqa: ASYNC110 - RTCP has no event here
                await asyncio.sleep(0.1)
        # Its statistics are the live source's, even once another came and went since.
        session = server.registry.get(call_id)
        assert session is not None
        (received,) = [t for t in session.pc.getTransceivers() if t.kind == kind]
        packet = RtpPacket(payload_type=payload_type, sequence_number=1, timestamp=960,
                           ssrc=12345, payload=payload)  # fmt: skip
        await sender.transport._send_rtp(packet.serialize())
        sources = received.receiver._RTCRtpReceiver__remote_streams  # type: ignore[attr-defined]
        async with asyncio.timeout(5):  # it has come (aiortc's own record of sources)
            while 12345 not in sources:  # noqa: ASYNC110 - no event for it
                await asyncio.sleep(0.01)

        async def reported() -> list[int]:
            stats = await received.receiver.getStats()
            return [s.ssrc for s in stats.values() if s.type == "inbound-rtp"]

        async with asyncio.timeout(5):  # the live source's next packet
            while await reported() != [sender._ssrc]:  # noqa: ASYNC110 - no event for it
                await asyncio.sleep(0.05)
        async with asyncio.timeout(10):
            assert await peer.hangup() == 200
        assert server.registry.get(call_id) is None
    finally:
        await peer.close()


async def test_a_caller_that_sends_under_ever_new_sources_is_ended(server: Server) -> None:
    """Past ``MAX_CALL_SOURCES`` SSRCs the call ends with an error: aiortc's router and SRTP
    keep state for every source a call ever used, which a peer cycling SSRCs grew for ever."""
    import random

    from aiortc.rtp import RtpPacket

    from s2s.rtc import MAX_CALL_SOURCES

    peer = Peer(server.url)
    try:
        await peer.connect()
        await peer.next_event("session.created")
        session = server.registry.get(peer.call_url.rsplit("/", 1)[1])
        assert session is not None
        (media,) = [t for t in peer.pc.getTransceivers() if t.kind == "audio"]
        payload_type = next(c.payloadType for c in media._codecs if c.mimeType == "audio/opus")
        for i in range(MAX_CALL_SOURCES + 50):
            packet = RtpPacket(payload_type=payload_type, sequence_number=i, timestamp=960 * i,
                               ssrc=random.getrandbits(32), payload=b"\xf8\xff\xfe")  # fmt: skip
            await media.sender.transport._send_rtp(packet.serialize())
        error = await peer.next_event("error", timeout=10)
        assert error["error"]["code"] == "too_many_sources"
        await wait_until(lambda: server.registry.get(session.call_id) is None, timeout=10,
                         what="the call to end")  # fmt: skip
        assert session.end_reason == "too_many_sources"
    finally:
        await peer.close()


async def test_a_call_whose_close_hangs_is_let_go_and_its_transports_stopped(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer connection whose close never returns (a receiver whose stop waits for a task that
    died) is given up after a bound: the call is released, and its DTLS, ICE and SCTP
    transports are stopped all the same (sockets, consent checks)."""
    from s2s import session as session_module

    monkeypatch.setattr(session_module, "CLOSE_TIMEOUT_S", 0.5)
    peer = Peer(server.url)
    try:
        await peer.connect()
        await peer.next_event("session.created")
        call_id = peer.call_url.rsplit("/", 1)[1]
        session = server.registry.get(call_id)
        assert session is not None
        receiver = session.pc.getTransceivers()[0].receiver
        stop = receiver.stop

        async def stops_then_hangs() -> None:  # its decoder thread and tasks do end
            await stop()
            await asyncio.Event().wait()

        monkeypatch.setattr(receiver, "stop", stops_then_hangs)
        async with asyncio.timeout(10):
            assert await peer.hangup() == 200
        assert server.registry.get(call_id) is None
        dtls = receiver.transport
        assert (dtls.state, dtls.transport.state) == ("closed", "closed")
        assert session.pc.sctp is not None and session.pc.sctp.state == "closed"
    finally:
        await peer.close()


async def test_audio_packets_past_any_real_senders_rate_are_dropped_before_decoding(
    server: Server,
) -> None:
    """A peer pushing RTP far faster than real time (each packet is decoded on the event loop
    every call shares): past 500 packets a second they are counted and dropped, and the call
    goes on."""
    from aiortc.rtp import RtpPacket

    peer = Peer(server.url)
    try:
        await peer.connect()
        await peer.next_event("session.created")
        session = server.registry.get(peer.call_url.rsplit("/", 1)[1])
        assert session is not None and session.voice_in is not None
        audio = peer.pc.getTransceivers()[0]
        sender = audio.sender
        opus = next(c.payloadType for c in audio._codecs if c.mimeType.lower() == "audio/opus")
        # (A source of its own: SRTP would refuse the peer's own sequence numbers again.)
        for i in range(3000):  # a few tenths of a second's sending: thousands a second
            packet = RtpPacket(payload_type=opus, sequence_number=i, timestamp=960 * i,
                               ssrc=1234, payload=b"\xf8\xff\xfe")  # fmt: skip
            await sender.transport._send_rtp(packet.serialize())
            if i % 10 == 0:  # paced: sent all at once, most would overflow the socket's buffer
                await asyncio.sleep(0.002)
        stats = session.voice_in.stats
        async with asyncio.timeout(10):
            while stats.excess_packets < 1000:  # noqa: ASYNC110 - no event for it
                await asyncio.sleep(0.05)
        peer.send({"type": "session.update", "session": {"type": "realtime"}})
        await peer.next_event("session.updated", timeout=5)
    finally:
        await peer.close()


async def test_vanished_client_is_cleaned_up_within_peer_timeout(start_server: StartServer) -> None:
    server = await start_server(peer_timeout_s=1.5)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.vanishing_client",
        server.url,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        async with asyncio.timeout(20):
            line = await proc.stdout.readline()
        call_id = line.decode().strip().rsplit("/", 1)[1]
        session = server.registry.get(call_id)
        assert session is not None
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        killed_at = asyncio.get_running_loop().time()
        await wait_until(lambda: len(server.registry) == 0, timeout=5, what="cleanup")
        elapsed = asyncio.get_running_loop().time() - killed_at
        assert session.end_reason == "peer_timeout"
        assert 1.0 < elapsed < 3.0, elapsed
        assert session.pc.connectionState == "closed"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_twenty_calls_leave_no_tasks_tracks_or_sessions(server: Server) -> None:
    baseline = {t.get_name() for t in asyncio.all_tasks()}
    speakers: weakref.WeakSet[SpeakerTrack] = weakref.WeakSet()
    for batch in range(4):
        peers = [Peer(server.url) for _ in range(5)]
        await asyncio.gather(*(p.connect() for p in peers))
        await asyncio.gather(*(p.next_event("session.created") for p in peers))
        await asyncio.gather(*(p.wait_audio(0.1) for p in peers))
        assert len(server.registry) == 5
        for p in peers:
            session = server.registry.get(p.call_url.rsplit("/", 1)[1])
            speakers.add(session.speaker)
        # Half the calls hang up over HTTP; the others just close their peer connection.
        for i, p in enumerate(peers):
            if (i + batch) % 2:
                assert await p.hangup() == 200
            await p.close()
        await wait_until(lambda: len(server.registry) == 0, timeout=5, what="calls to end")
    del peers, p, session

    def leftover() -> set[str]:
        return {t.get_name() for t in asyncio.all_tasks()} - baseline - {_current_name()}

    await wait_until(lambda: not leftover(), timeout=5, what="tasks to finish")
    gc.collect()
    assert len(speakers) == 0, "speaker tracks are still referenced"


def _current_name() -> str:
    task = asyncio.current_task()
    return task.get_name() if task else ""


async def test_a_client_that_asks_for_more_events_than_it_reads_is_ended(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small requests can ask for big replies (a 200 KB item, retrieved again and again) faster
    than SCTP sends them: past a cap of unsent bytes the call ends (``slow_consumer``) instead
    of aiortc queueing them without bound in the server's memory."""
    from s2s import datachannel

    monkeypatch.setattr(datachannel, "_MAX_BUFFERED_BYTES", 1_000_000)
    peer = Peer(server.url)
    try:
        await peer.connect()
        await peer.next_event("session.created")
        session = server.registry.get(peer.call_id)
        text = {"type": "input_text", "text": "x" * 200_000}
        item = {"type": "message", "role": "user", "id": "big", "content": [text]}
        peer.send({"type": "conversation.item.create", "item": item})
        await peer.next_event("conversation.item.added")
        for _ in range(20):
            peer.send({"type": "conversation.item.retrieve", "item_id": "big"})
        await wait_until(lambda: len(server.registry) == 0, timeout=10, what="the call to end")
        assert session is not None and session.end_reason == "slow_consumer"
    finally:
        await peer.close()

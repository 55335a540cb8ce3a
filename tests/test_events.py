"""The ``oai-events`` data channel: session.created, and errors for anything it cannot take."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from s2s.realtime import conversation
from tests.conftest import Server, StartServer
from tests.peer import Peer


async def test_session_created_when_the_channel_opens(server: Server) -> None:
    peer = Peer(server.url)
    try:
        await peer.connect()
        event = await peer.next_event("session.created")
        session = event["session"]
        assert session["id"] == peer.call_url.rsplit("/", 1)[1]
        assert session["model"] == "echo"
        assert session["type"] == "realtime"
        assert event["event_id"].startswith("event_")
        assert peer.events.index(event) == 0
    finally:
        await peer.close()


async def test_session_from_the_offer_form_is_applied(server: Server) -> None:
    config = {
        "type": "realtime",
        "model": "gpt-realtime",
        "instructions": "Be brief.",
        "audio": {"output": {"voice": "marin"}},
        "tracing": "auto",
    }
    peer = Peer(server.url, session=config)
    try:
        await peer.connect()
        session = (await peer.next_event("session.created"))["session"]
        assert session["instructions"] == "Be brief."
        assert session["audio"]["output"]["voice"] == "marin"
    finally:
        await peer.close()


async def test_bad_events_get_errors_and_the_call_goes_on(start_server: StartServer) -> None:
    server = await start_server(max_event_bytes=2000)
    peer = Peer(server.url)
    try:
        await peer.connect()
        await peer.next_event("session.created")
        cases = [
            ("{not json", "invalid_json", None),
            (json.dumps({"type": "no.such.event", "event_id": "evt_1"}), "unknown_event", "evt_1"),
            (
                json.dumps({"type": "session.update", "session": {"instructions": 5}}),
                "invalid_event",
                None,
            ),
            (json.dumps({"type": "session.update", "pad": "x" * 3000}), "message_too_large", None),
            (json.dumps([1, 2]), "invalid_event", None),
            (b"\xff\xfe binary", "invalid_json", None),
        ]
        for raw, code, event_id in cases:
            mark = len(peer.events)
            peer.send(raw)
            error = (await peer.next_event("error", after=mark))["error"]
            assert error["code"] == code, (raw, error)
            assert error["event_id"] == event_id
            assert error["message"]
        wrong_type = [e for e in peer.events if e.get("type") == "error"][2]["error"]
        assert wrong_type["param"] == "session.instructions"

        # Still served: events are handled and audio still flows.
        mark = len(peer.events)
        peer.send({"type": "session.update", "session": {"instructions": "Hi", "tools": []}})
        updated = await peer.next_event("session.updated", after=mark)
        assert updated["session"]["instructions"] == "Hi"
        await peer.wait_audio(0.2, since=asyncio.get_running_loop().time())
        assert len(server.registry) == 1
    finally:
        await peer.close()


async def test_output_audio_buffer_clear_with_no_response_yet_is_quietly_taken(
    server: Server,
) -> None:
    """Nothing to clear and no response to name (``output_audio_buffer.cleared`` must name
    one): no event, and no error."""
    peer = Peer(server.url)
    try:
        await peer.connect()
        await peer.next_event("session.created")
        peer.send({"type": "output_audio_buffer.clear", "event_id": "c1"})
        peer.send({"type": "session.update", "session": {}})
        await peer.next_event("session.updated")
        assert not [e for e in peer.events if e["type"] in ("error", "output_audio_buffer.cleared")]
    finally:
        await peer.close()


async def test_the_event_rate_counts_utf8_bytes_not_characters(start_server: StartServer) -> None:
    """Events of 4-byte characters cost their bytes: 6,000 emoji are 24 kB, not 6 kB, so the
    third goes past a 60 kB burst (ten passed it when characters were counted)."""
    # A burst of two seconds' worth: small events and pictures, so it need not hold one's chunks.
    server = await start_server(max_event_bytes_per_s=30_000, max_event_bytes=30_000,
                                image_max_bytes=1_000)  # fmt: skip
    peer = Peer(server.url)
    try:
        await peer.connect()
        await peer.next_event("session.created")
        event = json.dumps({"type": "session.update", "session": {"instructions": "😀" * 6_000}},
                           ensure_ascii=False)  # fmt: skip
        assert len(event) < 6_100 and 24_000 < len(event.encode()) < 24_100
        for _ in range(3):
            peer.send(event)
        error = await peer.next_event("error")
        assert error["error"]["code"] == "rate_limited"
        assert "ended" not in error["error"]["message"]
        # Events are handled in order: the two taken are answered before this one.
        peer.send({"type": "session.update", "session": {"instructions": "Hi"}})
        updates: list[dict[str, Any]] = []
        mark = 0
        while not updates or updates[-1]["session"]["instructions"] != "Hi":
            updates.append(await peer.next_event("session.updated", after=mark))
            mark = peer.events.index(updates[-1]) + 1
        assert len(updates) == 3
    finally:
        await peer.close()


async def test_the_oldest_items_are_forgotten_past_the_conversations_bytes(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Items are capped in bytes as well as in count (500 items of 256 kB would be 125 MB a
    call): past the cap the oldest go, silently, as they do past 500. The cap is lowered here
    from 16 MiB to 1 MB, so five 200 kB items pass it."""
    monkeypatch.setattr(conversation, "_MAX_BYTES", 1_000_000)
    server = await start_server()
    peer = Peer(server.url)
    try:
        await peer.connect()
        await peer.next_event("session.created")
        text = "😀" * 50_000  # 200 kB as UTF-8: measured in bytes, not characters
        for i in range(6):
            peer.send(json.dumps({"type": "conversation.item.create", "item": {
                "id": f"big{i}", "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": text}],
            }}, ensure_ascii=False))  # fmt: skip
        mark = 0
        for i in range(6):
            done = await peer.next_event("conversation.item.done", after=mark)
            assert done["item"]["id"] == f"big{i}"
            mark = peer.events.index(done) + 1
        for i in range(6):
            peer.send({"type": "conversation.item.retrieve", "item_id": f"big{i}"})
        # Events are handled in order: every retrieve is answered before this.
        peer.send({"type": "session.update", "session": {}})
        end = peer.events.index(await peer.next_event("session.updated", after=mark))
        answers = peer.events[mark:end]
        assert [e["item"]["id"] for e in answers if e["type"] == "conversation.item.retrieved"] == [
            "big2", "big3", "big4", "big5"
        ]  # fmt: skip
        assert [e["error"]["code"] for e in answers if e["type"] == "error"] == [
            "item_not_found"
        ] * 2
        assert not [e for e in peer.events if e["type"] == "conversation.item.deleted"]
    finally:
        await peer.close()


async def test_events_kept_for_a_channel_not_yet_open_are_bounded_in_size() -> None:
    """Server events made before the caller's data channel opens (an app backend's sideband
    can make them, 256 KiB each) are kept to 1 Mi characters, the newest: 256 of them could
    have held 64 MiB."""
    import logging

    from s2s.config import Settings
    from s2s.datachannel import EventChannel
    from s2s.log import CallLogger
    from s2s.protocol.server_events import Error, ErrorDetail

    events = EventChannel(Settings(), CallLogger(logging.getLogger(__name__), "call"), print)
    for i in range(20):
        events.send(Error(error=ErrorDetail(message=f"{i:02d}" + "x" * 200_000, code="big")))
    kept = list(events._pending)
    assert 0 < sum(map(len, kept)) <= 1 << 20 and len(kept) == 5
    assert all(f'"message":"{i:02d}' in text for i, text in zip(range(15, 20), kept, strict=True))


async def test_an_app_backends_events_are_handled_before_the_callers_backlog() -> None:
    """A sideband's events (a cancel, a tool's output) do not wait behind the caller's queued
    events (pictures to decode, say): they are handled next."""
    import logging

    from s2s.config import Settings
    from s2s.datachannel import EventChannel
    from s2s.eventrate import event_rate
    from s2s.log import CallLogger

    settings = Settings()
    events = EventChannel(settings, CallLogger(logging.getLogger(__name__), "call"), print)
    for i in range(5):
        assert events.receive(json.dumps({"type": "input_audio_buffer.clear", "event_id": f"c{i}"}))
    backend = json.dumps({"type": "response.cancel", "event_id": "b0"})
    assert events.receive(backend, event_rate(settings))
    order = []
    async with asyncio.timeout(5):
        for _ in range(6):
            order.append((await events.next_event()).event_id)
    assert order == ["b0", "c0", "c1", "c2", "c3", "c4"]

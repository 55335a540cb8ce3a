"""The ``oai-events`` data channel: session.created, and errors for anything it cannot take."""

from __future__ import annotations

import asyncio
import json

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

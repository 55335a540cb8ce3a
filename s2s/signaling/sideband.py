"""``GET /v1/realtime?call_id=…``: an app backend's WebSocket onto one of its calls."""

from __future__ import annotations

import asyncio

from aiohttp import WSMsgType, web

from s2s.eventrate import event_rate
from s2s.protocol.codec import utf8_size
from s2s.signaling.errors import error_response, server_key
from s2s.signaling.state import KEYS, REGISTRY, SETTINGS

# Server events queued for a slow app backend before it is cut off, in count and in bytes: a
# caller that retrieves a large item again and again makes 256 KiB events as fast as it may send.
_SIDEBAND_BACKLOG = 1024
_SIDEBAND_BACKLOG_BYTES = 16 * 1024 * 1024
#: Sidebands one call may have at once: each holds a backlog of up to 16 MiB of events.
MAX_SIDEBANDS = 4
#: How an s2s extension event's text begins (msgspec writes a struct's tag first).
_EXTENSION = '{"type":"s2s.'


async def sideband(request: web.Request) -> web.StreamResponse:
    """``GET /v1/realtime?call_id=…`` (WebSocket): an app backend watches and steers a call.

    It receives every server event the call's data channel gets and may send client events into
    the call. Only the key that created the call (or minted its client secret) may attach. Our
    ``s2s.*`` events come only with ``s2s_events=1``: OpenAI's Python agents validate every
    event against OpenAI's own and report each one they do not know as an error.
    """
    key = server_key(request)
    if isinstance(key, web.Response):
        return key
    call_id = request.query.get("call_id", "")
    session = request.app[REGISTRY].get(call_id)
    if session is None:
        return error_response(404, "call_not_found", f"no call {call_id!r}", param="call_id")
    if request.app[KEYS].required and session.owner != key:
        return error_response(403, "not_call_owner", "this key did not create that call")
    if len(session.listeners) >= MAX_SIDEBANDS:
        return error_response(
            429, "too_many_sidebands", f"the call has {MAX_SIDEBANDS} sidebands already"
        )
    ws = web.WebSocketResponse(heartbeat=20, max_msg_size=request.app[SETTINGS].max_event_bytes)
    # Each event with its size, counted into ``backlog`` until it is sent; None closes the socket.
    outbox: asyncio.Queue[tuple[str, int] | None] = asyncio.Queue(_SIDEBAND_BACKLOG)
    backlog = {"bytes": 0}

    closing = {"code": 1000, "why": b"call ended"}
    # Its own limits: an app backend's bursts neither cost the caller's events nor end the call.
    settings = request.app[SETTINGS]
    rate = event_rate(settings)

    extensions = request.query.get("s2s_events", "") in ("1", "true")

    def forward(text: str) -> None:
        if not extensions and text.startswith(_EXTENSION):
            return
        size = utf8_size(text)
        if not outbox.full() and backlog["bytes"] + size <= _SIDEBAND_BACKLOG_BYTES:
            outbox.put_nowait((text, size))
            backlog["bytes"] += size
            return
        # A backend that does not read: drop it, not the call.
        session.listeners.discard(forward)
        closing.update(code=1011, why=b"too slow")
        if outbox.full():
            outbox.get_nowait()
        outbox.put_nowait(None)

    async def pump() -> None:
        while (queued := await outbox.get()) is not None:
            text, size = queued
            backlog["bytes"] -= size
            await ws.send_str(text)
        await ws.close(code=closing["code"], message=closing["why"])  # type: ignore[arg-type]

    async def until_ended() -> None:
        await session.wait_ended()
        await outbox.put(None)

    # Counted before the handshake completes, so sidebands opened at once cannot all pass the
    # limit above; what the call sends meanwhile waits in the outbox.
    session.listeners.add(forward)
    try:
        await ws.prepare(request)
    except BaseException:
        session.listeners.discard(forward)
        raise
    session.log.info("sideband attached")
    sender = asyncio.create_task(pump(), name=f"{call_id}/sideband")
    watcher = asyncio.create_task(until_ended(), name=f"{call_id}/sideband-end")
    try:
        async for message in ws:
            events = message.type in (WSMsgType.TEXT, WSMsgType.BINARY)
            if events and not session.receive(message.data, rate):
                # A backend that keeps flooding is cut off; the call goes on.
                session.log.warning("sideband closed: it flooded the call with events")
                closing.update(code=1008, why=b"rate limited")
                break
            if session.ended:
                break
    finally:
        session.listeners.discard(forward)
        for task in (sender, watcher):
            task.cancel()
        await asyncio.gather(sender, watcher, return_exceptions=True)
        await ws.close(code=closing["code"], message=closing["why"])  # type: ignore[arg-type]
    return ws

"""Webhooks to an app backend and the s2s.client helpers, against real servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from s2s.client import WebhookError, attach, verify_webhook
from tests.conftest import StartServer
from tests.peer import Peer

SECRET = "whsec-test"


class Receiver:
    """An app backend's webhook endpoint that fails each webhook's first delivery: it answers
    with a redirect (an http-to-https one, say), which must not count as delivered."""

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}
        self.events: list[dict] = []
        self.arrived = asyncio.Event()
        self.redirected: list[str] = []  # requests that followed the redirect

    async def handle(self, request: web.Request) -> web.Response:
        webhook_id = request.headers["webhook-id"]
        self.attempts[webhook_id] = self.attempts.get(webhook_id, 0) + 1
        if self.attempts[webhook_id] == 1:
            raise web.HTTPFound("/elsewhere")
        self.events.append(verify_webhook(SECRET, request.headers, await request.read()))
        self.arrived.set()
        return web.Response(status=204)

    async def elsewhere(self, request: web.Request) -> web.Response:
        self.redirected.append(request.method)
        return web.Response(status=200)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    hook = Receiver()
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    app.router.add_route("*", "/elsewhere", hook.elsewhere)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield hook, f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    await runner.cleanup()


async def test_call_started_and_ended_webhooks_are_signed_and_retried(
    start_server: StartServer, receiver: tuple[Receiver, str]
) -> None:
    hook, url = receiver
    server = await start_server(webhook_url=url, webhook_secret=SECRET)
    peer = Peer(server.url)
    try:
        await peer.connect()
        call_id = peer.call_url.rsplit("/", 1)[1]
        # The app backend steers the call with the packaged client while it runs.
        async with attach(server.url, call_id, None) as call:
            await call.send({"type": "session.update", "session": {"instructions": "Hi."}})
            async with asyncio.timeout(5):
                async for event in call:
                    if event["type"] == "session.updated":
                        assert event["session"]["instructions"] == "Hi."
                        break
                else:
                    raise AssertionError("the sideband closed before session.updated")
        assert await peer.hangup() == 200
    finally:
        await peer.close()
    async with asyncio.timeout(10):
        while len(hook.events) < 2:
            hook.arrived.clear()
            await hook.arrived.wait()
    started, ended = hook.events
    assert started["type"] == "realtime.call.started" and started["data"]["call_id"] == call_id
    assert ended["type"] == "realtime.call.ended" and ended["data"]["reason"] == "hangup"
    assert ended["data"]["duration_s"] > 0
    assert sorted(hook.attempts.values()) == [2, 2]  # each first delivery failed, then retried
    assert hook.redirected == []  # a redirect is a failed attempt, not followed


def test_forged_or_stale_webhooks_are_refused() -> None:
    from s2s.webhooks import sign

    body = b'{"type": "realtime.call.ended"}'
    import time

    now = int(time.time())
    good = {"webhook-id": "wh_1", "webhook-timestamp": str(now),
            "webhook-signature": sign(SECRET, "wh_1", now, body)}  # fmt: skip
    assert verify_webhook(SECRET, good, body)["type"] == "realtime.call.ended"
    with pytest.raises(WebhookError):
        verify_webhook("other-secret", good, body)
    with pytest.raises(WebhookError):
        verify_webhook(SECRET, good, body + b" ")
    stale = {**good, "webhook-timestamp": str(now - 3600),
             "webhook-signature": sign(SECRET, "wh_1", now - 3600, body)}  # fmt: skip
    with pytest.raises(WebhookError):
        verify_webhook(SECRET, stale, body)
    with pytest.raises(WebhookError):
        verify_webhook(SECRET, {}, body)
    unkeyed = {**good, "webhook-signature": sign("", "wh_1", now, body)}
    with pytest.raises(WebhookError):  # anyone can sign with an empty key
        verify_webhook("", unkeyed, body)


def test_a_whsec_secret_signs_as_standard_webhooks_libraries_check() -> None:
    """A ``whsec_`` secret is base64 after its prefix: the key is its decoded bytes (used raw,
    no Standard Webhooks library could check our signatures)."""
    import base64
    import hashlib
    import hmac

    from s2s.webhooks import sign

    key = bytes(range(24))
    secret = "whsec_" + base64.b64encode(key).decode()
    body = b'{"type": "realtime.call.ended"}'
    expected = hmac.new(key, b"wh_1.1700000000." + body, hashlib.sha256).digest()
    assert sign(secret, "wh_1", 1_700_000_000, body) == "v1," + base64.b64encode(expected).decode()


async def test_a_sideband_gets_s2s_events_only_when_it_asks(start_server: StartServer) -> None:
    """OpenAI's Python agents check every event against OpenAI's own and report each unknown
    one as an error (every 5 s for s2s.session.stats): a sideband gets s2s's events only with
    ``s2s_events=1``, which ``attach`` asks for; the OpenAI events come to both."""
    server = await start_server(stats_interval_s=0.3)
    peer = Peer(server.url)
    try:
        await peer.connect()
        await peer.next_event("session.created")
        plain = attach(server.url, peer.call_id, None, s2s_events=False)
        extended = attach(server.url, peer.call_id, None)
        async with plain as openai_only, extended as everything:
            peer.send({"type": "session.update", "session": {"instructions": "Hi."}})
            seen: dict[str, list[str]] = {"plain": [], "extended": []}

            async def read(name: str, sideband: Any) -> None:
                async for event in sideband:
                    seen[name].append(event["type"])
                    if name == "extended" and seen[name].count("s2s.session.stats") >= 2:
                        return

            async with asyncio.timeout(10):
                await read("extended", everything)
            with pytest.raises(TimeoutError):  # what it was sent meanwhile, then nothing
                async with asyncio.timeout(0.5):
                    await read("plain", openai_only)
        assert "session.updated" in seen["plain"] and "session.updated" in seen["extended"]
        assert not [t for t in seen["plain"] if t.startswith("s2s.")], seen["plain"]
    finally:
        await peer.close()

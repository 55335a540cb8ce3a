"""A small Python client for app backends: attach to a live call, and check webhooks.

async with attach("http://127.0.0.1:8080", call_id, api_key) as call:
    await call.send({"type": "response.create", "response": {"instructions": "..."}})
    async for event in call:
        ...

event = verify_webhook(secret, request.headers, await request.read())
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from s2s.webhooks import sign

_TOLERANCE_S = 300


class Sideband:
    """One app backend's connection to one call."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws

    async def send(self, event: dict[str, Any]) -> None:
        await self._ws.send_str(json.dumps(event))

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._events()

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        async for message in self._ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                yield json.loads(message.data)

    @property
    def closed(self) -> bool:
        return self._ws.closed


@asynccontextmanager
async def attach(
    base_url: str, call_id: str, api_key: str | None, *, s2s_events: bool = True
) -> AsyncIterator[Sideband]:
    """Watch and steer call ``call_id``; raises ``aiohttp.WSServerHandshakeError`` if refused.
    With ``s2s_events``, s2s's own events (``s2s.session.stats``...) come too."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    params = {"call_id": call_id} | ({"s2s_events": "1"} if s2s_events else {})
    async with aiohttp.ClientSession() as http:
        url = f"{base_url.rstrip('/')}/v1/realtime"
        async with http.ws_connect(url, params=params, headers=headers) as ws:
            yield Sideband(ws)


class WebhookError(ValueError):
    pass


def verify_webhook(secret: str, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """The webhook's event if its signature is good and recent, else ``WebhookError``."""
    if not secret:  # anyone can sign with an empty key
        raise WebhookError("no webhook secret to check the signature with")
    try:
        webhook_id = headers["webhook-id"]
        timestamp = int(headers["webhook-timestamp"])
        signatures = headers["webhook-signature"].split()
    except (KeyError, ValueError) as exc:
        raise WebhookError(f"missing or malformed webhook headers: {exc}") from None
    if abs(time.time() - timestamp) > _TOLERANCE_S:
        raise WebhookError("webhook timestamp is too old or in the future")
    expected = sign(secret, webhook_id, timestamp, body)
    if not any(hmac.compare_digest(expected, s) for s in signatures):
        raise WebhookError("webhook signature does not match")
    event: dict[str, Any] = json.loads(body)
    return event

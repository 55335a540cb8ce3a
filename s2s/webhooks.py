"""Webhooks to app backends: call started, call ended; signed, retried, never in a call's way.

Deliveries follow the Standard Webhooks scheme: headers ``webhook-id``, ``webhook-timestamp``
and ``webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``.
``s2s.client.verify_webhook`` checks them on the receiving side.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import time
from typing import Any

import aiohttp
import msgspec

from s2s.protocol.ids import new_id

log = logging.getLogger(__name__)

_QUEUE = 1000  # undelivered webhooks kept; past this the oldest is dropped (and logged)
_ATTEMPTS = 5
_FIRST_BACKOFF_S = 0.5
_TIMEOUT_S = 10.0
#: At shutdown, how long what is queued may take to go (within the supervisor's 15 s margin).
_CLOSE_S = 5.0


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks' ``v1`` signature. A ``whsec_`` secret is base64 after its prefix, as
    those libraries read it; any other is used as it is."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    key = secret.encode()
    if secret.startswith("whsec_"):
        with contextlib.suppress(binascii.Error):  # not base64 after all: the bytes as given
            key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class Webhooks:
    """Queues events and delivers them in order from one background task."""

    def __init__(self, url: str, secret: str) -> None:
        self.url = url
        self._secret = secret
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(_QUEUE)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._deliver(), name="webhooks/sender")

    async def close(self) -> None:
        """Deliver what is queued (the calls shutdown ended have their ``call.ended`` there),
        for up to ``_CLOSE_S``, then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_S):
                await self._queue.join()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def emit(self, event_type: str, data: dict[str, Any]) -> None:
        """Queue one webhook; returns at once."""
        webhook_id = new_id("wh")
        body = msgspec.json.encode(
            {"id": webhook_id, "type": event_type, "created_at": int(time.time()), "data": data}
        )
        if self._queue.full():
            dropped, _ = self._queue.get_nowait()
            self._queue.task_done()
            log.warning("webhook queue full: dropped %s", dropped)
        self._queue.put_nowait((webhook_id, body))

    async def _deliver(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_TIMEOUT_S)) as http:
            while True:
                webhook_id, body = await self._queue.get()
                try:
                    await self._post(http, webhook_id, body)
                finally:
                    self._queue.task_done()

    async def _post(self, http: aiohttp.ClientSession, webhook_id: str, body: bytes) -> None:
        backoff = _FIRST_BACKOFF_S
        for attempt in range(1, _ATTEMPTS + 1):
            timestamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                "webhook-id": webhook_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(self._secret, webhook_id, timestamp, body),
            }
            try:
                # Not followed: a redirect turns the POST into a GET without its body (counted
                # as delivered), and would take the signed headers to wherever it points.
                async with http.post(
                    self.url, data=body, headers=headers, allow_redirects=False
                ) as resp:
                    if resp.status < 300:
                        return
                    why = f"HTTP {resp.status}"
                    if 300 <= resp.status < 400:
                        why += f" (a redirect to {resp.headers.get('Location')}: not followed)"
            except (aiohttp.ClientError, TimeoutError) as exc:
                why = str(exc) or type(exc).__name__
            log.info("webhook %s attempt %d failed: %s", webhook_id, attempt, why)
            if attempt < _ATTEMPTS:
                await asyncio.sleep(backoff)
                backoff *= 2
        log.warning("webhook %s not delivered after %d attempts", webhook_id, _ATTEMPTS)

"""Requests relayed to another worker of the same server over its private unix socket.

A call lives wholly in the process that answered its offer; a hang-up or sideband request that
the kernel hands to another worker is relayed here, as is an offer sent on to a less loaded
worker. Relayed requests carry ``S2S-Forwarded`` so the receiver never relays them again; the
header only counts on the unix socket (``is_relayed``), never from the public port.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict

from s2s.pool import Pool

log = logging.getLogger(__name__)

FORWARDED_HEADER = "S2S-Forwarded"
# Hop-by-hop headers and those the relaying side recomputes.
_DROP = {
    "connection", "keep-alive", "transfer-encoding", "content-length", "upgrade", "host",
    "te", "trailer", "proxy-authorization", "proxy-authenticate",
    "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
    "sec-websocket-accept", FORWARDED_HEADER.lower(),
}  # fmt: skip


class OwnerUnreachable(ConnectionError):
    """The other worker did not take the request (it is restarting, or gone with its calls)."""


class HandshakeRefused(Exception):
    """The owner refused the sideband WebSocket; ``status`` is its HTTP status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the owner answered {status}")
        self.status = status


def is_relayed(request: web.Request) -> bool:
    """Whether another worker relayed ``request`` (trusted only on the private unix socket)."""
    return FORWARDED_HEADER in request.headers and on_private_socket(request)


def on_private_socket(request: web.Request) -> bool:
    """Whether ``request`` came over a worker's unix socket (in the run directory, which only
    the server's own user can open), not over the network."""
    if request.transport is None:
        return False
    sock = request.transport.get_extra_info("socket")
    return sock is not None and sock.family == socket.AF_UNIX


def _headers(request: web.Request, pool: Pool) -> CIMultiDict[str]:
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _DROP)
    headers[FORWARDED_HEADER] = str(pool.index)
    if request.remote:
        # The caller's address as this worker saw it; one the client wrote itself would end up
        # in the owner's log as the caller's (it is not trusted on a direct request either).
        headers["X-Forwarded-For"] = request.remote
    return headers


class Relay:
    """One client session per other worker, over that worker's unix socket."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._http: dict[int, aiohttp.ClientSession] = {}

    def _session(self, worker: int) -> aiohttp.ClientSession:
        http = self._http.get(worker)
        if http is None:
            # No cap on connections: each relayed sideband holds one for its whole life, and at
            # aiohttp's default 100 every other relayed request (hang-ups, offers) would queue
            # behind them for ever.
            connector = aiohttp.UnixConnector(path=str(self._pool.socket_path(worker)), limit=0)
            # No timeout overall: a relayed hang-up waits for the call's release like a local one.
            http = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, timeout=aiohttp.ClientTimeout()
            )
            self._http[worker] = http
        return http

    async def close(self) -> None:
        for http in self._http.values():
            await http.close()
        self._http.clear()

    async def http(self, request: web.Request, worker: int) -> web.Response:
        """Send ``request`` to ``worker`` and answer with its response, status and headers."""
        body = await request.read()
        url = f"http://worker-{worker}{request.path_qs}"
        try:
            async with self._session(worker).request(
                request.method, url, data=body, headers=_headers(request, self._pool)
            ) as upstream:
                data = await upstream.read()
                headers = CIMultiDict(
                    (k, v) for k, v in upstream.headers.items() if k.lower() not in _DROP
                )
                return web.Response(status=upstream.status, body=data, headers=headers)
        except aiohttp.ClientConnectionError as exc:
            raise OwnerUnreachable(f"worker {worker}: {exc}") from exc

    async def fetch(self, worker: int, path: str, *, timeout: float = 2.0) -> str:
        """GET ``path`` from ``worker`` itself (marked relayed, so it answers for itself)."""
        headers = {FORWARDED_HEADER: str(self._pool.index)}
        try:
            async with (
                asyncio.timeout(timeout),
                self._session(worker).get(
                    f"http://worker-{worker}{path}", headers=headers
                ) as upstream,
            ):
                upstream.raise_for_status()
                return await upstream.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise OwnerUnreachable(f"worker {worker}: {exc or type(exc).__name__}") from exc

    async def websocket(
        self, request: web.Request, worker: int, *, max_msg_size: int
    ) -> web.WebSocketResponse:
        """Open the same WebSocket on ``worker`` and pass frames both ways until one side closes.

        Raises ``HandshakeRefused`` (before answering the client) if the owner refuses it.
        """
        downstream = web.WebSocketResponse(heartbeat=20, max_msg_size=max_msg_size)
        if not downstream.can_prepare(request).ok:
            # Not a WebSocket request: refused here, before it takes one of the call's places.
            raise web.HTTPBadRequest(text="a sideband is a WebSocket: send an upgrade request")
        url = f"http://worker-{worker}{request.path_qs}"
        try:
            # The owner's events are server events: its own limit holds them, not a client's.
            upstream = await self._session(worker).ws_connect(
                url, headers=_headers(request, self._pool), max_msg_size=0
            )
        except aiohttp.WSServerHandshakeError as exc:
            raise HandshakeRefused(exc.status) from None
        except aiohttp.ClientConnectionError as exc:
            raise OwnerUnreachable(f"worker {worker}: {exc}") from exc
        try:
            await downstream.prepare(request)
            await _splice(upstream, downstream, name=f"relay/{worker}{request.path_qs}")
        finally:
            await upstream.close()
            if downstream.prepared:
                await downstream.close()
        return downstream


async def _splice(
    upstream: aiohttp.ClientWebSocketResponse, downstream: web.WebSocketResponse, *, name: str
) -> None:
    """Frames both ways; the first direction to end ends the other."""

    async def owner_to_client() -> None:
        code, reason = 1000, ""
        while True:
            message = await upstream.receive()
            if message.type is WSMsgType.TEXT:
                await downstream.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await downstream.send_bytes(message.data)
            elif message.type is WSMsgType.CLOSE:
                code, reason = int(message.data), str(message.extra or "")
                break
            elif message.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                # Gone without a close of its own (it crashed, the link broke): not a normal end.
                code, reason = 1011, "the call's server is gone"
                break
        # The owner's close code (1000 call ended, 1011 too slow) is what the client sees.
        await downstream.close(code=code, message=reason.encode())

    async def client_to_owner() -> None:
        async for message in downstream:
            if message.type is WSMsgType.TEXT:
                await upstream.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await upstream.send_bytes(message.data)

    tasks = [
        asyncio.create_task(owner_to_client(), name=f"{name}/down"),
        asyncio.create_task(client_to_owner(), name=f"{name}/up"),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception):
            log.warning("%s: relay ended with %r", name, result)

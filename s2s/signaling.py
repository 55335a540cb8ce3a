"""HTTP endpoints: OpenAI-style WebRTC call set-up, hang-up, health and metrics.

This is the only module that turns errors into HTTP statuses: 400 for an offer or session it
cannot take, 404 for an unknown call, 413/415 for bodies of the wrong size or type, 503 (with
``Retry-After``) when the server is full. Error bodies are JSON in OpenAI's ``{"error": {...}}``
shape; nothing that failed is ever answered with 200.

With ``--workers`` (an app with a ``POOL``), requests about a call another worker owns are relayed
to it (``route_to_owner``), and an offer goes to the least loaded worker (``create_call``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import WSMsgType, web
from prometheus_client import CONTENT_TYPE_LATEST

from s2s.auth import DEFAULT_SECRET_TTL_S, Keys, bearer
from s2s.backends import Backend
from s2s.backends.base import NoCapacity, PlacingBackend
from s2s.config import Settings
from s2s.forwarding import HandshakeRefused, OwnerUnreachable, Relay, is_relayed
from s2s.metrics import ServerMetrics, merge_expositions
from s2s.pool import Pool, new_call_id
from s2s.protocol.session_config import ServerVad, SessionConfig, SessionPatch
from s2s.registry import KeyLimit, ServerFull, SessionRegistry
from s2s.rtc import new_peer_connection
from s2s.session import OfferError, Session
from s2s.tools import ToolError, take_tools
from s2s.vad import VadService

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
BACKEND = web.AppKey("backend", Backend)
REGISTRY = web.AppKey("registry", SessionRegistry)
VAD = web.AppKey("vad", VadService)
KEYS = web.AppKey("keys", Keys)
METRICS = web.AppKey("metrics", ServerMetrics)
#: Set only in a worker of ``s2s serve --workers N`` (N > 1).
POOL = web.AppKey("pool", Pool)
RELAY = web.AppKey("relay", Relay)

CALLS_PATH = "/v1/realtime/calls"
_ALLOW_HEADERS = "Authorization, Content-Type, X-OpenAI-Agents-SDK, OpenAI-Beta"
_ALLOW_METHODS = "GET, POST, OPTIONS"


def add_routes(app: web.Application) -> None:
    app.router.add_post(CALLS_PATH, create_call)
    app.router.add_post("/v1/realtime/client_secrets", create_client_secret)
    app.router.add_get("/v1/realtime", sideband)
    app.router.add_post(CALLS_PATH + "/{call_id}/hangup", hangup_call)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {
        "error": {"type": "invalid_request_error", "code": code, "message": message, "param": param}
    }
    return web.json_response(body, status=status, headers=headers)


class _BadRequest(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.response = error_response(status, code, message, param=param)


async def create_call(request: web.Request) -> web.Response:
    """``POST /v1/realtime/calls``: the SDP offer in, 201 with the SDP answer out."""
    app = request.app
    settings = app[SETTINGS]
    if (pool := app.get(POOL)) is not None and not is_relayed(request):
        relayed = await _to_least_loaded(request, pool)
        if relayed is not None:
            return relayed
    keys = app[KEYS]
    token = bearer(request.headers.get("Authorization"))
    secret = None
    if keys.required and keys.server_key(token) is None:
        secret = keys.redeem(token)
        if secret is None:
            return _unauthorized("a server API key or an unused, unexpired client secret")
    try:
        offer, patch = await _read_offer(request, settings.max_sdp_bytes)
    except _BadRequest as exc:
        return exc.response
    refused = _tools_refused(patch, app[BACKEND])
    if refused is not None:
        return refused
    owner = keys.server_key(token)
    if secret is not None:
        # The secret's session is the call's; the client cannot widen it with its own.
        patch = secret.session
        owner = secret.owner
    backend = app[BACKEND]
    call_id = new_call_id(pool.index if pool is not None else None)
    # Server VAD is on by default for models that take turns; continuous ones (echo) run none.
    config = SessionConfig(
        id=call_id, model=settings.model, turn_detection=ServerVad() if backend.turn_based else None
    )
    if patch is not None:
        config.apply(patch)
    session = Session(
        call_id, new_peer_connection(), backend, app[VAD], settings, config, metrics=app[METRICS]
    )
    session.owner = owner
    registry = app[REGISTRY]
    try:
        registry.admit(session)
    except KeyLimit as exc:
        await session.release()
        return error_response(
            429, "too_many_calls", str(exc), headers={"Retry-After": str(settings.retry_after_s)}
        )
    except ServerFull as exc:
        await session.release()
        return error_response(
            503,
            "server_full",
            f"no capacity for another call ({exc})",
            headers={"Retry-After": str(settings.retry_after_s)},
        )
    if isinstance(backend, PlacingBackend):
        try:
            await backend.place(call_id)
        except NoCapacity as exc:
            await registry.discard(session)
            return error_response(
                503, "server_full", f"no model worker has room for another call ({exc})",
                headers={"Retry-After": str(settings.retry_after_s)},
            )  # fmt: skip
    try:
        answer = await session.accept(offer)
    except OfferError as exc:
        await registry.discard(session)
        return error_response(400, "invalid_offer", str(exc), param="sdp")
    registry.start(session)
    passed_on = is_relayed(request)
    remote = request.headers.get("X-Forwarded-For") if passed_on else request.remote
    session.log.info("call created from %s%s", remote, " (passed on)" if passed_on else "")
    return web.Response(
        status=201,
        text=answer,
        content_type="application/sdp",
        headers={"Location": f"{CALLS_PATH}/{call_id}"},
    )


async def _to_least_loaded(request: web.Request, pool: Pool) -> web.Response | None:
    """Relay the offer to a worker with fewer calls than this one; None to take it here."""
    if request.app[REGISTRY].draining:
        return None  # answered 503 here; the others are draining too
    target = pool.least_loaded()
    if target == pool.index:
        return None
    try:
        return await request.app[RELAY].http(request, target)
    except OwnerUnreachable as exc:  # it died a moment ago; the offer's body is spent
        log.warning("could not hand an offer on: %s", exc)
        return error_response(
            503,
            "worker_unavailable",
            "the worker chosen for this call just went away; try again",
            headers={"Retry-After": "1"},
        )


async def _read_offer(request: web.Request, max_bytes: int) -> tuple[str, SessionPatch | None]:
    """The offer SDP and optional session config, from an SDP or a multipart body."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise _BadRequest(413, "offer_too_large", f"the offer exceeds {max_bytes} bytes")
    ctype = request.content_type
    if ctype == "application/sdp":
        return _check_sdp(await _read_limited(request, max_bytes)), None
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await _read_form(request)
    raise _BadRequest(
        415,
        "unsupported_media_type",
        f"expected application/sdp or multipart/form-data, got {ctype or 'no content type'}",
    )


async def _read_form(request: web.Request) -> tuple[str, SessionPatch | None]:
    """OpenAI's unified interface: an ``sdp`` field and an optional ``session`` JSON field."""
    try:
        form = await request.post()
    except ValueError as exc:  # aiohttp's multipart parser on a broken body
        raise _BadRequest(400, "invalid_body", f"malformed form body: {exc}") from None
    sdp, session = form.get("sdp"), form.get("session")
    if not isinstance(sdp, str):
        raise _BadRequest(400, "missing_sdp", "the form has no 'sdp' field", "sdp")
    patch = None
    if session is not None:
        if not isinstance(session, str):
            raise _BadRequest(400, "invalid_session", "'session' must be a JSON field", "session")
        try:
            patch = msgspec.json.decode(session, type=SessionPatch)
        except msgspec.DecodeError as exc:
            message = f"invalid session: {exc}"
            raise _BadRequest(400, "invalid_session", message, "session") from None
    return _check_sdp(sdp.encode()), patch


def _tools_refused(patch: SessionPatch | None, backend: Backend) -> web.Response | None:
    """A 400 for tools a call could not use: malformed ones, or any on a continuous model."""
    if patch is None:
        return None
    try:
        tools, _ = take_tools(patch.tools, patch.tool_choice, ([], "auto"), "session")
    except ToolError as exc:
        return error_response(400, exc.code, str(exc), param=exc.param)
    if tools and not backend.turn_based:
        message = f"the {backend.name} model cannot call tools"
        return error_response(400, "tools_not_supported", message, param="session.tools")
    return None


async def _read_limited(request: web.Request, max_bytes: int) -> bytes:
    body = await request.content.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise _BadRequest(413, "offer_too_large", f"the offer exceeds {max_bytes} bytes")
    return body


def _check_sdp(data: bytes) -> str:
    try:
        sdp = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _BadRequest(400, "invalid_offer", "the offer is not UTF-8 text", "sdp") from None
    if not sdp.lstrip().startswith("v=0"):
        message = "the offer is not an SDP description (no v=0)"
        raise _BadRequest(400, "invalid_offer", message, "sdp")
    return sdp


def _unauthorized(what: str) -> web.Response:
    return error_response(
        401, "invalid_api_key", f"this endpoint needs {what} in 'Authorization: Bearer ...'",
        headers={"WWW-Authenticate": "Bearer"},
    )  # fmt: skip


def _server_key(request: web.Request) -> str | web.Response | None:
    """The caller's server key; a 401 response if keys are required and none matches."""
    keys = request.app[KEYS]
    key = keys.server_key(bearer(request.headers.get("Authorization")))
    if keys.required and key is None:
        return _unauthorized("a server API key")
    return key


async def create_client_secret(request: web.Request) -> web.Response:
    """``POST /v1/realtime/client_secrets``: a single-use ``ek_`` key for a browser."""
    owner = _server_key(request)
    if isinstance(owner, web.Response):
        return owner
    try:
        body = msgspec.json.decode(await request.read() or b"{}", type=_SecretRequest)
    except msgspec.DecodeError as exc:
        return error_response(400, "invalid_request", f"invalid body: {exc}")
    refused = _tools_refused(body.session, request.app[BACKEND])
    if refused is not None:
        return refused
    ttl = body.expires_after.seconds if body.expires_after else DEFAULT_SECRET_TTL_S
    secret = request.app[KEYS].mint(owner or "", body.session, ttl)
    session = msgspec.to_builtins(secret.session)
    return web.json_response(
        {"value": secret.value, "expires_at": secret.expires_at, "session": session}
    )


class _ExpiresAfter(msgspec.Struct):
    seconds: int
    anchor: str = "created_at"


class _SecretRequest(msgspec.Struct):
    expires_after: _ExpiresAfter | None = None
    session: SessionPatch = msgspec.field(default_factory=SessionPatch)


_SIDEBAND_BACKLOG = 1024  # server events queued for a slow app backend before it is cut off


async def sideband(request: web.Request) -> web.StreamResponse:
    """``GET /v1/realtime?call_id=…`` (WebSocket): an app backend watches and steers a call.

    It receives every server event the call's data channel gets and may send client events into
    the call. Only the key that created the call (or minted its client secret) may attach.
    """
    key = _server_key(request)
    if isinstance(key, web.Response):
        return key
    call_id = request.query.get("call_id", "")
    session = request.app[REGISTRY].get(call_id)
    if session is None:
        return error_response(404, "call_not_found", f"no call {call_id!r}", param="call_id")
    if request.app[KEYS].required and session.owner != key:
        return error_response(403, "not_call_owner", "this key did not create that call")
    ws = web.WebSocketResponse(heartbeat=20, max_msg_size=request.app[SETTINGS].max_event_bytes)
    await ws.prepare(request)
    outbox: asyncio.Queue[str | None] = asyncio.Queue(_SIDEBAND_BACKLOG)

    closing = {"code": 1000, "why": b"call ended"}

    def forward(text: str) -> None:
        try:
            outbox.put_nowait(text)
        except asyncio.QueueFull:  # a backend that does not read: drop it, not the call
            session.listeners.discard(forward)
            closing.update(code=1011, why=b"too slow")
            outbox.get_nowait()
            outbox.put_nowait(None)

    async def pump() -> None:
        while (text := await outbox.get()) is not None:
            await ws.send_str(text)
        await ws.close(code=closing["code"], message=closing["why"])  # type: ignore[arg-type]

    async def until_ended() -> None:
        await session.wait_ended()
        await outbox.put(None)

    session.listeners.add(forward)
    session.log.info("sideband attached")
    sender = asyncio.create_task(pump(), name=f"{call_id}/sideband")
    watcher = asyncio.create_task(until_ended(), name=f"{call_id}/sideband-end")
    try:
        async for message in ws:
            if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                session.receive(message.data)
            if session.ended:
                break
    finally:
        session.listeners.discard(forward)
        for task in (sender, watcher):
            task.cancel()
        await asyncio.gather(sender, watcher, return_exceptions=True)
        await ws.close()
    return ws


async def hangup_call(request: web.Request) -> web.Response:
    """``POST /v1/realtime/calls/{call_id}/hangup``."""
    denied = _server_key(request)
    if isinstance(denied, web.Response):
        return denied
    call_id = request.match_info["call_id"]
    if not await request.app[REGISTRY].hangup(call_id):
        return error_response(404, "call_not_found", f"no call {call_id!r}", param="call_id")
    return web.Response(status=200)


async def healthz(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    body = {
        "status": "ok",
        "model": request.app[BACKEND].name,
        "calls": len(registry),
        "max_calls": registry.max_sessions,
        "tasks": len(asyncio.all_tasks()),  # for soak tests and leak hunting
    }
    if (pool := request.app.get(POOL)) is not None:
        # "calls" is this worker's; "worker_calls" every worker's, for the whole server's load.
        body.update(worker=pool.index, pid=os.getpid(), worker_calls=pool.counts())
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: the Prometheus text format, open like ``/healthz`` (scrapers rarely
    carry keys; keep the port private). It names live calls' ids; with API keys on, an id alone
    lets no one hang up or watch a call.
    """
    body = request.app[METRICS].exposition()
    pool = request.app.get(POOL)
    if pool is not None and not is_relayed(request):
        # Several workers: this one's figures and every other's, each labelled worker="i". A
        # worker that does not answer (restarting) is left out of this scrape.
        texts, labels = [body.decode()], [str(pool.index)]
        for worker in range(pool.size):
            if worker == pool.index:
                continue
            try:
                texts.append(await request.app[RELAY].fetch(worker, "/metrics"))
                labels.append(str(worker))
            except OwnerUnreachable:
                log.warning("worker %d did not answer for /metrics", worker)
        body = merge_expositions(texts, labels)
    # CONTENT_TYPE_LATEST carries a charset, which aiohttp wants apart from the content type.
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# What a refused sideband handshake relayed from the owner meant (its body does not come back).
_REFUSALS = {
    401: ("invalid_api_key", "this endpoint needs a server API key"),
    403: ("not_call_owner", "this key did not create that call"),
    404: ("call_not_found", "no such call"),
}


@web.middleware
async def route_to_owner(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Relay a request about a call to the worker that owns it, if that is not this one."""
    pool = request.app.get(POOL)
    if pool is None or is_relayed(request):
        return await handler(request)
    if request.path == "/v1/realtime":
        call_id = request.query.get("call_id", "")
    else:
        call_id = request.match_info.get("call_id", "")
    owner = pool.owner(call_id)
    if owner is None or owner == pool.index:
        return await handler(request)
    relay = request.app[RELAY]
    try:
        if request.path == "/v1/realtime":
            # Keys are the same in every worker: refuse here with the full 401, not via the owner.
            denied = _server_key(request)
            if isinstance(denied, web.Response):
                return denied
            max_size = request.app[SETTINGS].max_event_bytes
            return await relay.websocket(request, owner, max_msg_size=max_size)
        return await relay.http(request, owner)
    except HandshakeRefused as exc:
        code, message = _REFUSALS.get(exc.status, ("refused", "the call's worker refused"))
        return error_response(exc.status, code, message)
    except OwnerUnreachable:  # its worker is gone, and its calls with it
        return error_response(404, "call_not_found", f"no call {call_id!r}", param="call_id")


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Let a page on another origin create and hang up calls, as OpenAI's clients do."""
    origin = request.headers.get("Origin")
    allowed = request.app[SETTINGS].allowed_origins
    if origin and allowed and origin not in allowed and request.path.startswith("/v1/"):
        return error_response(403, "origin_not_allowed", f"origin {origin!r} is not allowed")
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        response: web.StreamResponse = web.Response(status=204)
        response.headers["Access-Control-Allow-Methods"] = _ALLOW_METHODS
        response.headers["Access-Control-Allow-Headers"] = _ALLOW_HEADERS
        response.headers["Access-Control-Max-Age"] = "600"
    else:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "Location"
        response.headers["Vary"] = "Origin"
    if isinstance(response, web.HTTPException):
        raise response
    return response

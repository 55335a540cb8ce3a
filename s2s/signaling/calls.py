"""``POST /v1/realtime/calls`` (the SDP offer in, the answer out) and hang-up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
import msgspec
from aiohttp import web

from s2s.auth import ClientSecret, bearer, is_client_secret
from s2s.backends import Backend
from s2s.backends.base import NoCapacity, PlacingBackend
from s2s.config import Settings
from s2s.forwarding import OwnerUnreachable, is_relayed
from s2s.pool import Pool, new_call_id
from s2s.protocol.session_config import ServerVad, SessionConfig, SessionPatch
from s2s.registry import KeyLimit, ServerFull
from s2s.rtc import OfferError, new_peer_connection
from s2s.session import Session
from s2s.signaling.errors import BadRequest, error_response, server_key, unauthorized
from s2s.signaling.state import BACKEND, KEYS, METRICS, POOL, REGISTRY, RELAY, SETTINGS, VAD
from s2s.tools import ToolError, take_tools

log = logging.getLogger(__name__)

CALLS_PATH = "/v1/realtime/calls"


async def create_call(request: web.Request) -> web.Response:
    """``POST /v1/realtime/calls``: the SDP offer in, 201 with the SDP answer out."""
    app = request.app
    if (pool := app.get(POOL)) is not None and not is_relayed(request):
        relayed = await _to_least_loaded(request, pool)
        if relayed is not None:
            return relayed
    keys = app[KEYS]
    token = bearer(request.headers.get("Authorization"))
    secret = None
    if keys.server_key(token) is None and (keys.required or is_client_secret(token)):
        # Without keys any token is let in, but a minted secret still carries its session.
        secret = keys.redeem(token)
        if secret is None and keys.required:
            return unauthorized("a server API key or an unused, unexpired client secret")
    try:
        response = await _create(request, token, secret)
    except BaseException:
        if secret is not None:  # no call was made with it (a 500)
            keys.restore(secret)
        raise
    if secret is not None and response.status != 201:
        # No call was made with it: the client may try again (a 503 says when) with the same.
        keys.restore(secret)
    return response


async def _create(
    request: web.Request, token: str | None, secret: ClientSecret | None
) -> web.Response:
    """The call an authorized offer asks for: 201 with the answer, or the error response."""
    app = request.app
    settings, keys = app[SETTINGS], app[KEYS]
    pool = app.get(POOL)
    try:
        offer, patch = await _read_offer(request, settings.max_sdp_bytes)
    except BadRequest as exc:
        return exc.response
    refused = tools_refused(patch, app[BACKEND])
    if refused is not None:
        return refused
    owner = keys.server_key(token)
    if secret is not None:
        # The secret's session is the call's; the client cannot widen it with its own.
        patch = secret.session
        owner = secret.owner or None  # minted keyless: no key to count the call against
    backend = app[BACKEND]
    call_id = new_call_id(pool.index if pool is not None else None)
    config = session_config(call_id, settings, backend, patch)
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
    placing = backend if isinstance(backend, PlacingBackend) else None
    try:
        if placing is not None:
            await placing.place(call_id)
        answer = await session.accept(offer)
    except BaseException as exc:
        # Whatever failed, the call was not made: its place on a model worker and its count
        # (a server's, a key's) are free again.
        if placing is not None and not isinstance(exc, NoCapacity):
            placing.unplace(call_id)
        await registry.discard(session)
        if isinstance(exc, NoCapacity):
            return error_response(
                503, "server_full", f"no model worker has room for another call ({exc})",
                headers={"Retry-After": str(settings.retry_after_s)},
            )  # fmt: skip
        if isinstance(exc, OfferError):
            return error_response(400, "invalid_offer", str(exc), param="sdp")
        raise
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
    """The offer SDP and optional session config, from an SDP, a form or a JSON body (OpenAI's
    SDKs send each: the raw offer, multipart ``sdp`` and ``session`` parts, and JSON). The SDP
    is held to ``max_bytes``; a body that also holds a session, to that and ``_SESSION_BYTES``."""
    ctype = request.content_type
    body_limit = max_bytes if ctype == "application/sdp" else max_bytes + _SESSION_BYTES
    if request.content_length is not None and request.content_length > body_limit:
        raise BadRequest(413, "offer_too_large", f"the offer exceeds {body_limit} bytes")
    if ctype == "application/sdp":
        return _check_sdp(await read_limited(request, max_bytes)), None
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await _read_form(request, max_bytes)
    if ctype == "application/json":
        sdp, patch = _read_json(await read_limited(request, body_limit))
        if len(sdp.encode()) > max_bytes:
            raise BadRequest(413, "offer_too_large", f"the offer exceeds {max_bytes} bytes")
        return sdp, patch
    raise BadRequest(
        415,
        "unsupported_media_type",
        "expected application/sdp, multipart/form-data or application/json, got "
        f"{ctype or 'no content type'}",
    )


async def _read_form(request: web.Request, max_bytes: int) -> tuple[str, SessionPatch | None]:
    """OpenAI's unified interface: an ``sdp`` field and an optional ``session`` JSON field."""
    try:
        async with _body_in_time():
            form = await request.post()
    except BadRequest:
        raise
    except web.HTTPException as exc:  # past the server's body size, say
        code = "offer_too_large" if exc.status == 413 else "invalid_body"
        raise BadRequest(exc.status, code, exc.text or exc.reason) from None
    except Exception as exc:  # aiohttp's multipart parser on a broken body raises many kinds
        raise BadRequest(400, "invalid_body", f"malformed form body: {exc!r}") from None
    sdp, session = _part(form.get("sdp")), _part(form.get("session"))
    if sdp is None:
        raise BadRequest(400, "missing_sdp", "the form has no 'sdp' field", "sdp")
    if len(sdp) > max_bytes:  # a chunked form has no Content-Length to refuse it by
        raise BadRequest(413, "offer_too_large", f"the offer exceeds {max_bytes} bytes")
    return _check_sdp(sdp), None if session is None else _session_patch(session)


def _session_patch(raw: bytes) -> SessionPatch:
    """An offer's ``session``, or a 400 that names what is wrong in it."""
    try:
        return msgspec.json.decode(raw, type=SessionPatch)
    except msgspec.DecodeError as exc:
        raise BadRequest(400, "invalid_session", f"invalid session: {exc}", "session") from None


def _part(value: object) -> bytes | None:
    """A form field's bytes: aiohttp gives a text part as ``str``, a part typed otherwise
    (``application/sdp``, ``application/json``: openai-node's) as bytes, a file as a field."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, web.FileField):
        return value.file.read()
    return None


#: What a form or JSON offer may hold beside its SDP: the session (as session.update's cap).
_SESSION_BYTES = 256 * 1024


class _JsonOffer(msgspec.Struct):
    sdp: str
    session: msgspec.Raw = msgspec.Raw()  # decoded as a SessionPatch below: its errors name it


def _read_json(body: bytes) -> tuple[str, SessionPatch | None]:
    """``{"sdp": ..., "session": {...}}``, as openai-python's ``calls.create`` posts it."""
    try:
        offer = msgspec.json.decode(body, type=_JsonOffer)
    except msgspec.DecodeError as exc:
        raise BadRequest(400, "missing_sdp", f"expected {{'sdp': ..., 'session': ...}}: {exc}",
                         "sdp") from None  # fmt: skip
    session = bytes(offer.session)
    patch = None if session in (b"", b"null") else _session_patch(session)
    return _check_sdp(offer.sdp.encode()), patch


def session_config(
    session_id: str, settings: Settings, backend: Backend, patch: SessionPatch | None
) -> SessionConfig:
    """A call's session: the server's defaults with ``patch`` applied."""
    # Server VAD is on by default for models that take turns; continuous ones (echo) run none.
    config = SessionConfig(
        id=session_id, model=settings.model,
        turn_detection=ServerVad() if backend.turn_based else None,
    )  # fmt: skip
    if patch is not None:
        config.apply(patch)
    return config


def tools_refused(patch: SessionPatch | None, backend: Backend) -> web.Response | None:
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


async def read_limited(
    request: web.Request, max_bytes: int, code: str = "offer_too_large", what: str = "the offer"
) -> bytes:
    """The whole body, up to ``max_bytes`` (413 ``code`` past it). ``content.read(n)`` would
    return what the first network segment brought (a real offer often comes in several)."""
    chunks, size = [], 0
    async with _body_in_time():
        while chunk := await request.content.readany():
            size += len(chunk)
            if size > max_bytes:
                raise BadRequest(413, code, f"{what} exceeds {max_bytes} bytes")
            chunks.append(chunk)
    return b"".join(chunks)


#: How long a request's body may take to arrive: one that stalls would hold its socket and its
#: handler for ever (aiohttp has no such timeout of its own).
BODY_TIMEOUT_S = 10.0


@contextlib.asynccontextmanager
async def _body_in_time() -> AsyncIterator[None]:
    """Read a body within ``BODY_TIMEOUT_S`` (408 past it); a client gone halfway is a 400."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            yield
    except TimeoutError:
        message = f"the request body did not arrive within {BODY_TIMEOUT_S:g} s"
        raise BadRequest(408, "request_timeout", message) from None
    except (aiohttp.ClientError, ConnectionError) as exc:  # nobody is left to read the answer
        log.info("a request's body was cut off: %r", exc)
        raise BadRequest(400, "incomplete_body", "the connection closed mid-body") from None


def _check_sdp(data: bytes) -> str:
    try:
        sdp = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(400, "invalid_offer", "the offer is not UTF-8 text", "sdp") from None
    if not sdp.lstrip().startswith("v=0"):
        message = "the offer is not an SDP description (no v=0)"
        raise BadRequest(400, "invalid_offer", message, "sdp")
    return sdp


async def hangup_call(request: web.Request) -> web.Response:
    """``POST /v1/realtime/calls/{call_id}/hangup``."""
    key = server_key(request)
    if isinstance(key, web.Response):
        return key
    call_id = request.match_info["call_id"]
    session = request.app[REGISTRY].get(call_id)
    if session is None:
        return error_response(404, "call_not_found", f"no call {call_id!r}", param="call_id")
    if request.app[KEYS].required and session.owner != key:
        return error_response(403, "not_call_owner", "this key did not create that call")
    if not await request.app[REGISTRY].hangup(call_id):
        return error_response(404, "call_not_found", f"no call {call_id!r}", param="call_id")
    return web.Response(status=200)

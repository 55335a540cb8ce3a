"""``POST /v1/realtime/client_secrets``: single-use keys for browsers."""

from __future__ import annotations

import msgspec
from aiohttp import web

from s2s.auth import DEFAULT_SECRET_TTL_S
from s2s.protocol.ids import new_id
from s2s.protocol.session_config import SessionPatch
from s2s.signaling.calls import read_limited, session_config, tools_refused
from s2s.signaling.errors import BadRequest, error_response, server_key
from s2s.signaling.state import BACKEND, KEYS, SETTINGS


async def create_client_secret(request: web.Request) -> web.Response:
    """``POST /v1/realtime/client_secrets``: a single-use ``ek_`` key for a browser."""
    owner = server_key(request)
    if isinstance(owner, web.Response):
        return owner
    try:  # its session is kept (of 10,000 secrets) till it expires: a bounded body
        raw = await read_limited(request, _MAX_BODY_BYTES, "request_too_large", "the body")
    except BadRequest as exc:
        return exc.response
    try:
        body = msgspec.json.decode(raw or b"{}", type=_SecretRequest)
    except msgspec.DecodeError as exc:
        return error_response(400, "invalid_request", f"invalid body: {exc}")
    refused = tools_refused(body.session, request.app[BACKEND])
    if refused is not None:
        return refused
    ttl = body.expires_after.seconds if body.expires_after else DEFAULT_SECRET_TTL_S
    try:
        secret = request.app[KEYS].mint(owner or "", body.session, ttl)
    except OverflowError as exc:  # too many live secrets: they expire, so later works
        return error_response(429, "too_many_client_secrets", str(exc),
                              headers={"Retry-After": "60"})  # fmt: skip
    # The whole session a call made with it gets, as GA's answer holds (not just the patch).
    backend, settings = request.app[BACKEND], request.app[SETTINGS]
    session = session_config(new_id("sess"), settings, backend, secret.session).to_wire()
    return web.json_response(
        {"value": secret.value, "expires_at": secret.expires_at, "session": session}
    )


_MAX_BODY_BYTES = 256 * 1024


class _ExpiresAfter(msgspec.Struct):
    seconds: int
    anchor: str = "created_at"


class _SecretRequest(msgspec.Struct):
    expires_after: _ExpiresAfter | None = None
    session: SessionPatch = msgspec.field(default_factory=SessionPatch)

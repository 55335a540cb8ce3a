"""Middleware: relay a request to the worker that owns its call; CORS for other origins."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from s2s.forwarding import HandshakeRefused, OwnerUnreachable, is_relayed
from s2s.signaling.errors import error_response, server_key
from s2s.signaling.state import POOL, RELAY, SETTINGS

_ALLOW_HEADERS = "Authorization, Content-Type, X-OpenAI-Agents-SDK, OpenAI-Beta"
_ALLOW_METHODS = "GET, POST, OPTIONS"

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
            denied = server_key(request)
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

"""Middleware: relay a request to the worker that owns its call; CORS for other origins."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from aiohttp import web
from yarl import URL

from s2s.config import LOOPBACK
from s2s.forwarding import HandshakeRefused, OwnerUnreachable, is_relayed, on_private_socket
from s2s.signaling.errors import error_response, server_key
from s2s.signaling.state import POOL, RELAY, SETTINGS

_ALLOW_HEADERS = "Authorization, Content-Type, X-OpenAI-Agents-SDK, OpenAI-Beta"
# A preflight's own list of headers, when it is one: openai-node in a browser sends its
# X-Stainless-* and OpenAI-Organization/-Project headers, more than any fixed list keeps up with.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_HEADER_LIST = re.compile(rf"{_TOKEN}(?:[ \t]*,[ \t]*{_TOKEN})*")
_MAX_HEADER_LIST = 1024
_ALLOW_METHODS = "GET, POST, OPTIONS"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# What a refused sideband handshake relayed from the owner meant (its body does not come back).
_REFUSALS = {
    401: ("invalid_api_key", "this endpoint needs a server API key"),
    403: ("not_call_owner", "this key did not create that call"),
    404: ("call_not_found", "no such call"),
    429: ("too_many_sidebands", "the call has as many sidebands as it takes"),
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
    settings = request.app[SETTINGS]
    allowed = settings.allowed_origins
    api = request.path.startswith("/v1/")
    if origin and allowed and origin not in allowed and api:
        return error_response(403, "origin_not_allowed", f"origin {origin!r} is not allowed")
    if api and not settings.api_keys and not allowed and not on_private_socket(request):
        refused = _keyless_refusal(request, origin, settings.host)
        if refused is not None:
            return refused
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        response: web.StreamResponse = web.Response(status=204)
        response.headers["Access-Control-Allow-Methods"] = _ALLOW_METHODS
        asked = request.headers.get("Access-Control-Request-Headers", "").strip()
        echoed = len(asked) <= _MAX_HEADER_LIST and _HEADER_LIST.fullmatch(asked)
        response.headers["Access-Control-Allow-Headers"] = (
            f"{_ALLOW_HEADERS}, {asked}" if echoed else _ALLOW_HEADERS
        )
        response.headers["Access-Control-Max-Age"] = "600"
    else:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = _as_json(exc) if api else exc
    if origin and api:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "Location"
        response.headers["Vary"] = "Origin"
    if isinstance(response, web.HTTPException):
        raise response
    return response


# aiohttp's own refusals (no such route, a method a route lacks, a body past its limit, a GET
# that is no WebSocket) come as text: the API's errors are JSON, whoever raises them.
_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _as_json(exc: web.HTTPException) -> web.StreamResponse:
    if exc.status < 400 or exc.content_type == "application/json":
        return exc
    headers = {name: exc.headers[name] for name in ("Allow", "Retry-After") if name in exc.headers}
    message = exc.text if exc.text and exc.text != f"{exc.status}: {exc.reason}" else exc.reason
    return error_response(exc.status, _CODES.get(exc.status, "invalid_request"), message,
                          headers=headers)  # fmt: skip


def _keyless_refusal(request: web.Request, origin: str | None, bound: str) -> web.Response | None:
    """Without keys the API is this machine's: any web page its user opens could otherwise
    make calls, or watch, steer and hang up theirs (the sideband is a WebSocket, which no
    browser keeps to its own origin). So a cross-site page is refused unless it is a local one
    (another dev server) or ``--allow-origin`` names it, and on loopback a Host that is not a
    loopback name is refused too (DNS rebinding: a page whose own name now points here)."""
    host = _hostname(f"http://{request.host}")
    if bound in LOOPBACK and host not in LOOPBACK:
        message = (
            f"host {request.host!r} is not this machine's: without --api-key or --allow-origin "
            "only loopback names are served"
        )
        return error_response(403, "host_not_allowed", message)
    if origin is None:
        return None  # not a browser page: a program of this machine's user, or a sideband
    named = _hostname(origin) if origin != "null" else None
    if named is not None and (named in LOOPBACK or named == host):
        return None
    message = (
        f"origin {origin!r} may not use a server without --api-key (a page of another site); "
        "give --allow-origin or --api-key"
    )
    return error_response(403, "origin_not_allowed", message)


def _hostname(url: str) -> str | None:
    """The host ``url`` names, or None for one that does not parse (a port out of range...)."""
    try:
        return URL(url).host
    except ValueError:
        return None

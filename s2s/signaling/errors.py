"""Error responses in OpenAI's ``{"error": {...}}`` shape, and the API key check."""

from __future__ import annotations

from aiohttp import web

from s2s.auth import bearer
from s2s.signaling.state import KEYS


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A JSON error response with ``status``, in OpenAI's ``{"error": {...}}`` shape."""
    body = {
        "error": {"type": "invalid_request_error", "code": code, "message": message, "param": param}
    }
    return web.json_response(body, status=status, headers=headers)


class BadRequest(Exception):
    """A request refused while it is read; ``response`` is the error to answer it with."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.response = error_response(status, code, message, param=param)


def unauthorized(what: str) -> web.Response:
    """A 401 saying the endpoint needs ``what`` as a bearer token."""
    return error_response(
        401, "invalid_api_key", f"this endpoint needs {what} in 'Authorization: Bearer ...'",
        headers={"WWW-Authenticate": "Bearer"},
    )  # fmt: skip


def server_key(request: web.Request) -> str | web.Response | None:
    """The caller's server key; a 401 response if keys are required and none matches."""
    keys = request.app[KEYS]
    key = keys.server_key(bearer(request.headers.get("Authorization")))
    if keys.required and key is None:
        return unauthorized("a server API key")
    return key

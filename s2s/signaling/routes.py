"""The HTTP routes of the server, all in one table."""

from __future__ import annotations

from aiohttp import web

from s2s.signaling.calls import CALLS_PATH, create_call, hangup_call
from s2s.signaling.client_secrets import create_client_secret
from s2s.signaling.health import healthz, metrics
from s2s.signaling.sideband import sideband


def add_routes(app: web.Application) -> None:
    """Route every endpoint of the server on ``app``."""
    app.router.add_post(CALLS_PATH, create_call)
    app.router.add_post("/v1/realtime/client_secrets", create_client_secret)
    app.router.add_get("/v1/realtime", sideband)
    app.router.add_post(CALLS_PATH + "/{call_id}/hangup", hangup_call)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)

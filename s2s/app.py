"""The aiohttp application: routes, the web demo, and the model's and calls' lifetime."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from s2s.auth import Keys
from s2s.backends import Backend, load_backend
from s2s.config import Settings
from s2s.forwarding import Relay
from s2s.metrics import MergedScrape, ServerMetrics
from s2s.pool import Pool
from s2s.protocol.server_events import ServerShutdown
from s2s.registry import SessionRegistry
from s2s.signaling.middleware import cors_middleware, route_to_owner
from s2s.signaling.routes import add_routes
from s2s.signaling.state import (
    BACKEND,
    KEYS,
    MERGED_SCRAPE,
    METRICS,
    POOL,
    REGISTRY,
    RELAY,
    SETTINGS,
    VAD,
)
from s2s.vad import VadService
from s2s.webhooks import Webhooks

log = logging.getLogger(__name__)


def create_app(settings: Settings, pool: Pool | None = None) -> web.Application:
    """The server's app; with ``pool``, one worker of several (``s2s serve --workers N``)."""
    app = web.Application(middlewares=[cors_middleware, route_to_owner])
    app[SETTINGS] = settings
    secrets_dir = pool.secrets_dir if pool is not None else None
    app[KEYS] = Keys(settings.api_keys, secrets_dir, settings.single_use_client_secrets)
    if pool is not None:
        app[POOL] = pool
        app.cleanup_ctx.append(_relay)
    app[METRICS] = ServerMetrics()
    app.cleanup_ctx.append(_model_and_calls)
    add_routes(app)
    index = settings.web_dir / "index.html"

    async def serve_index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(index)

    app.router.add_get("/", serve_index)
    app.router.add_static("/web/", settings.web_dir)
    return app


async def _model_and_calls(app: web.Application) -> AsyncIterator[None]:
    """Load the model once for the process; on shutdown end every call, then unload it."""
    settings = app[SETTINGS]
    backend: Backend
    if settings.ray_address:
        from s2s.worker.edge import ClusterBackend

        cluster = await ClusterBackend.connect(
            settings.ray_address, settings.model, prompt_tokens=settings.prompt_tokens,
            prefill_tokens=settings.prefill_tokens,
        )  # fmt: skip
        app[METRICS].registry.register(cluster.metrics)
        backend = cluster
    else:
        backend = await load_backend(
            settings.model, settings.device, max_calls=settings.max_sessions,
            prompt_tokens=settings.prompt_tokens, prefill_tokens=settings.prefill_tokens,
            cuda_graphs=settings.cuda_graphs,
        )  # fmt: skip
    app[BACKEND] = backend
    vad = VadService()
    await vad.start()
    app[VAD] = vad
    webhooks = None
    if settings.webhook_url:
        webhooks = Webhooks(settings.webhook_url, settings.webhook_secret)
        webhooks.start()
    registry = SessionRegistry(
        settings.max_sessions,
        settings.max_calls_per_key,
        webhooks,
        app[METRICS],
        app.get(POOL),
    )
    app[REGISTRY] = registry
    log.info("model %s ready; up to %d calls", backend.name, settings.max_sessions)
    try:
        yield
    finally:
        await registry.close_all("server_shutdown")
        await vad.close()
        await backend.close()
        if webhooks is not None:
            await webhooks.close()


async def _relay(app: web.Application) -> AsyncIterator[None]:
    relay = Relay(app[POOL])
    app[RELAY] = relay
    app[MERGED_SCRAPE] = MergedScrape()
    try:
        yield
    finally:
        await relay.close()


async def drain(app: web.Application, hurry: asyncio.Event | None = None) -> None:
    """Stop taking calls, tell every caller, and give calls the grace period to end (``hurry``
    set: no longer)."""
    registry = app[REGISTRY]
    grace = app[SETTINGS].shutdown_grace_s
    registry.draining = True
    for session in registry.sessions():
        session.send(ServerShutdown(grace_s=grace))
    log.info("draining %d calls for up to %g s", len(registry), grace)
    await registry.drain(grace, hurry)
    # The calls left end now, not in the app's cleanup: aiohttp first waits for every open
    # handler, and an app backend's sideband stays open as long as its call (60 s more).
    await registry.close_all("server_shutdown")

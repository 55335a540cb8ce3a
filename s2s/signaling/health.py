"""``GET /healthz`` and ``GET /metrics``: open endpoints for load balancers and scrapers."""

from __future__ import annotations

import asyncio
import logging
import os

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from s2s.forwarding import OwnerUnreachable, is_relayed
from s2s.metrics import merge_expositions
from s2s.pool import Pool
from s2s.signaling.state import BACKEND, MERGED_SCRAPE, METRICS, POOL, REGISTRY, RELAY

log = logging.getLogger(__name__)


async def healthz(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    body: dict[str, object] = {
        "status": "draining" if registry.draining else "ok",
        "model": request.app[BACKEND].name,
        "calls": len(registry),
        "max_calls": registry.max_sessions,
        "tasks": len(asyncio.all_tasks()),  # for soak tests and leak hunting
    }
    if (pool := request.app.get(POOL)) is not None:
        # "calls" is this worker's; "worker_calls" every worker's, for the whole server's load.
        body.update(worker=pool.index, pid=os.getpid(), worker_calls=pool.counts())
    # Shutting down: a load balancer should send new calls elsewhere (they would get 503).
    return web.json_response(body, status=503 if registry.draining else 200)


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: the Prometheus text format, open like ``/healthz`` (scrapers rarely
    carry keys; keep the port private). It names live calls' ids; with API keys on, an id alone
    lets no one hang up or watch a call.
    """
    body = request.app[METRICS].exposition()
    pool = request.app.get(POOL)
    if pool is not None and not is_relayed(request):
        body = await _whole_server(request, pool, body)
    # CONTENT_TYPE_LATEST carries a charset, which aiohttp wants apart from the content type.
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


#: How long a whole-server scrape is reused: each one asks every other worker, and /metrics is
#: open, so a burst of requests would otherwise cost every worker a request each.
_MERGED_FOR_S = 1.0


async def _whole_server(request: web.Request, pool: Pool, body: bytes) -> bytes:
    """This worker's figures and every other's, each labelled worker="i"; a worker that does not
    answer (restarting) is left out of this scrape."""
    loop = asyncio.get_running_loop()
    cached = request.app[MERGED_SCRAPE]
    if loop.time() - cached.at < _MERGED_FOR_S:
        return cached.body
    if cached.making is None or cached.making.done():
        cached.making = loop.create_task(_merge(request, pool, body), name="metrics/merge")
    # Shielded: a scraper that hangs up does not cancel the scrape the others wait for.
    return await asyncio.shield(cached.making)


async def _merge(request: web.Request, pool: Pool, body: bytes) -> bytes:
    others = [worker for worker in range(pool.size) if worker != pool.index]
    relay = request.app[RELAY]
    answers = await asyncio.gather(
        *(relay.fetch(worker, "/metrics") for worker in others), return_exceptions=True
    )
    texts, labels = [body.decode()], [str(pool.index)]
    for worker, answer in zip(others, answers, strict=True):
        if isinstance(answer, OwnerUnreachable):
            log.warning("worker %d did not answer for /metrics", worker)
        elif isinstance(answer, BaseException):
            raise answer
        else:
            texts.append(answer)
            labels.append(str(worker))
    cached = request.app[MERGED_SCRAPE]
    cached.at, cached.body = asyncio.get_running_loop().time(), merge_expositions(texts, labels)
    return cached.body

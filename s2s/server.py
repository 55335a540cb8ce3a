"""Running the app: one server process, or one worker of several (see ``s2s.supervisor``)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Callable

from aiohttp import web

from s2s.app import create_app, drain
from s2s.config import Settings
from s2s.pool import Pool

log = logging.getLogger("s2s")


async def serve(
    settings: Settings,
    pool: Pool | None = None,
    *,
    ready: Callable[[], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM (or ``stop``), then end every call and unload the model.

    A worker (``pool`` given) shares the public port with the others (``SO_REUSEPORT``: the
    kernel spreads connections) and also listens on its private unix socket, where the other
    workers relay requests about its calls. ``ready`` is called once it is listening.
    """
    app = create_app(settings, pool)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    # Everything start-up made (torch, transformers, the model, the VAD) lives as long as the
    # process. Frozen, it is out of the cyclic collector's way: a full collection walked all of
    # it while every call's audio waited (40-170 ms pauses, growing, on the 2-core test VM with
    # the echo model; more with a big model's Python objects).
    gc.collect()
    gc.freeze()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_port=pool is not None)
        await site.start()
        if pool is None:
            for sock in runner.addresses:
                log.info("s2s listening on http://%s:%s/", *sock[:2])
        else:
            path = pool.socket_path(pool.index)
            path.unlink(missing_ok=True)  # left by this worker's predecessor, if it crashed
            await web.UnixSite(runner, str(path)).start()
            log.info("worker %d ready (pid %d)", pool.index, os.getpid())
        if ready is not None:
            ready()
        stop = stop or asyncio.Event()
        hurry = asyncio.Event()

        def on_signal() -> None:
            if stop.is_set() and not hurry.is_set():
                log.warning("signalled again: the calls end now")
                hurry.set()
            stop.set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        await stop.wait()
        log.info("shutting down")
        deadline = loop.time() + settings.shutdown_grace_s
        await drain(app, hurry)
        if pool is not None:
            # Other workers may still be draining: keep answering (503) until they are done or
            # the grace is up (counted from the signal, as the supervisor counts it), so a
            # connection the kernel hands this worker meanwhile gets a refusal, not a reset.
            while sum(pool.counts()) and loop.time() < deadline:  # noqa: ASYNC110 - shared memory has no event
                await asyncio.sleep(0.1)
    finally:
        await runner.cleanup()

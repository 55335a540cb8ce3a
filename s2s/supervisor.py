"""``s2s serve --workers N``: a small parent that runs N server processes, each pinned to a core.

aiortc does a call's media work (SRTP, Opus, jitter buffers, pacing) on its process's one event
loop, so one process holds one core's worth of calls, and an unpinned one, migrated between
cores by the scheduler, holds about half as many as a pinned one. So: one worker per core.

Every worker binds the public port with ``SO_REUSEPORT`` and the kernel spreads connections over
them; a call lives wholly in the worker that answered its offer (``s2s.pool``, ``s2s.forwarding``
route everything else about it there). This parent only starts the workers, restarts one that
dies, passes SIGTERM/SIGINT on, sends the ``realtime.call.ended`` webhooks of the calls a dead
worker took with it, and removes the run directory they share when they are gone.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

import uvloop

from s2s import log as s2s_log
from s2s.config import Settings
from s2s.pool import Pool, create_run_dir, forget_worker, take_live_calls
from s2s.server import serve
from s2s.webhooks import Webhooks

log = logging.getLogger("s2s")

# A worker that dies sooner than this after it started is restarted only after a pause, so a
# worker that cannot run does not spin the machine.
_QUICK_DEATH_S = 5.0
_RESTART_PAUSE_S = 2.0
# Beyond --shutdown-grace: what closing the last calls and unloading the model may take.
_STOP_MARGIN_S = 15.0


def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def supervise(settings: Settings, workers: int) -> int:
    """Run ``workers`` server processes until SIGINT or SIGTERM; the exit status."""
    return uvloop.run(Supervisor(settings, workers).run())


class Supervisor:
    def __init__(self, settings: Settings, workers: int) -> None:
        self._settings = settings
        self._size = workers
        self._cores = usable_cores()
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: dict[int, BaseProcess] = {}
        self._run_dir = Path()
        self._stopping = asyncio.Event()
        self._webhooks: Webhooks | None = None

    async def run(self) -> int:
        if self._settings.webhook_url:
            self._webhooks = Webhooks(self._settings.webhook_url, self._settings.webhook_secret)
            self._webhooks.start()
        try:
            return await self._run()
        finally:
            if self._webhooks is not None:
                await self._webhooks.close()

    async def _run(self) -> int:
        host = self._settings.host
        # Bound but never listening, it takes no connections; it fixes the port every worker
        # binds (the one the kernel picked, with --port 0) for as long as the server runs.
        reserved = _reserve_port(host, self._settings.port)
        self._run_dir = Path(tempfile.mkdtemp(prefix="s2s-"))
        try:
            port = reserved.getsockname()[1]
            self._settings = replace(self._settings, port=port, workers=self._size)
            create_run_dir(self._run_dir, self._size, len(self._settings.api_keys))
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stop)
            started = [loop.create_future() for _ in range(self._size)]
            keepers = [
                asyncio.create_task(self._keep(i, started[i]), name=f"worker-{i}")
                for i in range(self._size)
            ]
            up = all(await asyncio.gather(*started))
            failed = not up and not self._stopping.is_set()  # not just stopped while starting
            if up:
                log.info("s2s listening on http://%s:%s/ (%d workers, run directory %s)",
                         host, port, self._size, self._run_dir)  # fmt: skip
            elif failed:
                log.error("a worker failed to start; stopping")
                self._stop()
            await self._stopping.wait()
            grace = self._settings.shutdown_grace_s + _STOP_MARGIN_S
            _, late = await asyncio.wait(keepers, timeout=grace)
            for proc in self._procs.values():
                if proc.is_alive():
                    log.error("worker pid %d did not stop in %g s; killing it", proc.pid, grace)
                    proc.kill()
            if late:
                await asyncio.wait(late)
            return 1 if failed else 0
        finally:
            reserved.close()
            shutil.rmtree(self._run_dir, ignore_errors=True)

    def _stop(self) -> None:
        if not self._stopping.is_set():
            log.info("stopping %d workers", self._size)
        self._stopping.set()
        for proc in self._procs.values():
            if proc.is_alive():
                proc.terminate()  # SIGTERM: the worker drains its calls for --shutdown-grace

    async def _keep(self, index: int, started: asyncio.Future[bool]) -> None:
        """Run worker ``index``, and run it again whenever it dies, until the server stops."""
        try:
            await self._keep_running(index, started)
        except Exception:
            log.exception("worker %d cannot be run; stopping the server", index)
            if not started.done():
                started.set_result(False)
            self._stop()

    async def _keep_running(self, index: int, started: asyncio.Future[bool]) -> None:
        while not self._stopping.is_set():
            born = time.monotonic()
            proc, parent = self._spawn(index)
            try:
                ready = await _ready(parent)
                if not started.done():
                    started.set_result(ready)
                code = await _exited(proc)
            finally:
                parent.close()
            forget_worker(self._run_dir, index, len(self._settings.api_keys))
            self._end_calls_of(index, code)
            if self._stopping.is_set() or not started.result():
                return  # stopping, or the server never came up (run() is stopping it)
            lived = time.monotonic() - born
            log.error("worker %d (pid %s) died with exit code %s after %.1f s; restarting it",
                      index, proc.pid, code, lived)  # fmt: skip
            if lived < _QUICK_DEATH_S:
                try:
                    async with asyncio.timeout(_RESTART_PAUSE_S):
                        await self._stopping.wait()
                except TimeoutError:
                    pass

    def _end_calls_of(self, index: int, code: int | None) -> None:
        """The webhooks for calls a worker took with it (killed, crashed, or past the grace)."""
        if self._webhooks is None:
            return
        now = time.monotonic()
        for call_id, started in take_live_calls(self._run_dir, index):
            log.warning("call %s ended with worker %d (exit code %s)", call_id, index, code)
            self._webhooks.emit("realtime.call.ended", {
                "call_id": call_id, "reason": "worker_died",
                "duration_s": round(max(0.0, now - started), 3),
            })  # fmt: skip

    def _spawn(self, index: int) -> tuple[BaseProcess, Connection]:
        core = self._cores[index % len(self._cores)]
        parent, child = self._ctx.Pipe()
        args = (self._settings, index, self._size, self._run_dir, child)
        proc = self._ctx.Process(target=run_worker, args=args, name=f"s2s-worker-{index}")
        # A process is born with the affinity of the thread that starts it, so every thread
        # the worker ever makes (aiortc's, the model's) stays on its core from the start.
        os.sched_setaffinity(0, {core})
        try:
            proc.start()
        finally:
            os.sched_setaffinity(0, self._cores)
        child.close()
        self._procs[index] = proc
        log.info("worker %d started (pid %s) on core %d", index, proc.pid, core)
        if self._stopping.is_set():
            proc.terminate()
        return proc, parent


def _reserve_port(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await done
    finally:
        loop.remove_reader(fd)


async def _ready(parent: Connection) -> bool:
    """True once the worker says it is listening; False if it died first."""
    await _readable(parent.fileno())
    try:
        parent.recv()
    except EOFError:
        return False
    return True


async def _exited(proc: BaseProcess) -> int | None:
    await _readable(proc.sentinel)
    proc.join()
    return proc.exitcode


def run_worker(
    settings: Settings, index: int, size: int, run_dir: Path, parent: Connection
) -> None:
    """A worker process's main: serve as worker ``index`` until SIGTERM or the parent is gone."""
    # Out of the terminal's process group: Ctrl-C reaches the supervisor alone, which passes it
    # on as one SIGTERM (twice, and the worker's calls would end at once, with no grace).
    os.setsid()
    s2s_log.configure(settings.log_level)
    pool = Pool(index, size, run_dir, settings.api_keys)
    try:
        uvloop.run(_serve_worker(settings, pool, parent))
    finally:
        pool.close()


async def _serve_worker(settings: Settings, pool: Pool, parent: Connection) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def parent_gone() -> None:
        # The parent never writes: its end becoming readable means it closed (it died), and a
        # worker must not outlive it.
        loop.remove_reader(parent.fileno())
        log.error("worker %d: the supervisor is gone; stopping", pool.index)
        stop.set()

    def ready() -> None:
        parent.send(pool.index)
        loop.add_reader(parent.fileno(), parent_gone)

    await serve(settings, pool, ready=ready, stop=stop)

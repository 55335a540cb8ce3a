"""A model worker in a process of its own, and the server's handle on it.

The server's event loop carries every call's RTP; a model's Python (the engine's kernel launches,
the codec, the tokenizer) would hold the same GIL for tens of milliseconds per tick. So the model
runs in a child process (spawned: no forked CUDA or torch thread state) that owns the device,
and the server exchanges one message each way per tick with it over a pipe. The pipe's blocking
send and receive run on one helper thread of the server, where waiting releases the GIL.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

import msgspec

from s2s.config import CUDA_GRAPHS
from s2s.worker.messages import (
    Hello,
    Stop,
    Tick,
    TickResult,
    encoder,
    hello_decoder,
    request_decoder,
    result_decoder,
)

log = logging.getLogger(__name__)

#: How long a worker may take to load its model and say hello (a real checkpoint from disk).
LOAD_TIMEOUT_S = 600.0
#: How long a tick may take before its worker counts as hung (``WorkerProcess.hung_after_s``).
HUNG_AFTER_S = 60.0
#: How often a worker looks whether its server is still there.
ORPHAN_CHECK_S = 1.0


class WorkerError(RuntimeError):
    """The worker could not start, or it died: its calls' model state is gone."""


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """What a model worker loads and what it sets aside for its calls, all at load."""

    #: The model: ``moshi:PATH_OR_HUB_ID`` or ``qwen3-omni:PATH_OR_HUB_ID``.
    spec: str
    #: cpu, cuda or cuda:N; None: CUDA when there is one.
    device: str | None = None
    #: Call slots (``--max-sessions``, ``s2s worker --max-calls``).
    max_calls: int = 32
    #: ``--cuda-graphs``: ``auto`` is Moshi's on a GPU, not Qwen3-Omni's, whose graphs have not
    #: yet been checked on one.
    cuda_graphs: str = "auto"
    #: A turn-based model's prompt budget (``--prompt-tokens``): its key/value caches are
    #: allocated at load to hold a prompt this long and the longest reply, in every slot.
    prompt_tokens: int = 8192

    def __post_init__(self) -> None:
        if self.cuda_graphs not in CUDA_GRAPHS:
            raise ValueError(f"cuda_graphs is one of {CUDA_GRAPHS}, not {self.cuda_graphs!r}")
        if self.max_calls < 1 or self.prompt_tokens < 1:
            raise ValueError("a worker needs at least one call slot and one prompt token")


class WorkerProcess:
    """A running model worker; ``tick()`` is its whole interface."""

    def __init__(
        self, process: Any, conn: Connection, hello: Hello, options: WorkerOptions
    ) -> None:
        self.process = process
        self.hello = hello
        #: What it was started with, so a replacement can be started the same way.
        self.options = options
        self._conn = conn
        # One thread: ticks are strictly one at a time, as the worker handles them.
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model-worker")
        self._closed = False
        #: A tick not answered in this long means the worker hangs (a stuck device, say): it is
        #: killed, and the tick fails as if it had died. Far above any tick's work, a prefill's
        #: included.
        self.hung_after_s = HUNG_AFTER_S

    @classmethod
    async def start(cls, options: WorkerOptions) -> WorkerProcess:
        """Spawn a worker for ``options.spec`` (``moshi:PATH_OR_HUB_ID``) and wait for its
        model."""
        spec = options.spec
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        level = logging.getLogger("s2s").getEffectiveLevel()
        process = context.Process(
            target=_serve, args=(child, options, level, os.getpid()),
            name=f"s2s-worker[{spec}]", daemon=True,
        )  # fmt: skip
        process.start()
        child.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(LOAD_TIMEOUT_S):
                raw = await loop.run_in_executor(None, parent.recv_bytes)
            hello = hello_decoder.decode(raw)
        except BaseException as exc:
            # Not started, or no longer wanted (the server shuts down while it loads): a child
            # left loading would hold a second model on the device, and the thread waiting for
            # its hello would hold up the server's exit until it said it.
            process.kill()  # its end of the pipe closes: the thread waiting for hello returns
            await asyncio.shield(loop.run_in_executor(None, process.join, 5))
            parent.close()
            if isinstance(exc, (EOFError, OSError, TimeoutError, msgspec.DecodeError)):
                raise WorkerError(f"the model worker for {spec} did not start: {exc!r}") from exc
            raise
        if hello.error:
            parent.close()
            await loop.run_in_executor(None, process.join, 5)
            if process.is_alive():
                process.kill()
            raise WorkerError(f"the model worker for {spec} failed to load: {hello.error}")
        log.info("model worker pid %s: %s on %s, %s slots", process.pid, spec, hello.device,
                 hello.slots)  # fmt: skip
        return cls(process, parent, hello, options)

    async def replacement(self, calls: list[str]) -> WorkerProcess:
        """Start another worker as this one was started, this one having died (what is left of
        it is closed first); ``calls`` join it next."""
        await self.close()
        return await WorkerProcess.start(self.options)

    async def tick(self, tick: Tick) -> TickResult:
        """Send one tick and wait for its result; ``WorkerError`` if the worker is gone."""
        if self._closed:
            raise WorkerError("the model worker is closed")
        data = encoder.encode(tick)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.hung_after_s):
                raw = await loop.run_in_executor(self._io, self._round_trip, data)
        except (EOFError, OSError) as exc:
            self._closed = True
            raise WorkerError(f"the model worker (pid {self.process.pid}) died: {exc!r}") from exc
        except TimeoutError as exc:
            self._closed = True
            self.process.kill()  # which ends the round trip waiting in the io thread
            raise WorkerError(
                f"the model worker (pid {self.process.pid}) did not answer a tick in "
                f"{self.hung_after_s:g} s and was killed"
            ) from exc
        return result_decoder.decode(raw)

    def _round_trip(self, data: bytes) -> bytes:
        self._conn.send_bytes(data)
        return self._conn.recv_bytes()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            loop = asyncio.get_running_loop()
            # Already gone; or hung with a tick in flight, the Stop queued behind it: killed below.
            with contextlib.suppress(OSError, ValueError, TimeoutError):
                async with asyncio.timeout(5):
                    stop = encoder.encode(Stop())
                    await loop.run_in_executor(self._io, self._conn.send_bytes, stop)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.process.join, 10)
        if self.process.is_alive():
            self.process.kill()
            await loop.run_in_executor(None, self.process.join, 5)
        self._conn.close()
        self._io.shutdown(wait=False)


class ModelWorker(Protocol):
    """A model on its device, serving many calls one tick at a time (``s2s.worker.moshi``,
    ``s2s.worker.omni``)."""

    @property
    def calls(self) -> Collection[str]:
        """The calls that have joined (and not left)."""
        ...

    def hello(self, spec: str) -> Hello:
        """What the worker serves, once loaded."""
        ...

    def handle(self, tick: Tick) -> TickResult:
        """Apply the tick's changes, then run one step for every call that has one."""
        ...


def pick_device_and_dtype(device: str | None) -> tuple[str, Any]:
    """``device``, or CUDA when there is one, else the CPU; bf16 on CUDA, fp32 on the CPU."""
    import torch

    chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if chosen.startswith("cuda") else torch.float32
    return chosen, dtype


class DeviceLost(RuntimeError):
    """The device failed in a way that stays (a CUDA error after an illegal memory access, a
    device-side assert): nothing more can run on it in this process."""


def device_broken(device: Any) -> bool:
    """Whether ``device`` (a ``torch.device`` or its name) is left unusable after an error: a
    CUDA context with a sticky error fails every call from then on, a synchronisation included.
    Out of memory is not that: the next step may fit."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return False
    try:
        torch.cuda.synchronize(device)
    except RuntimeError:
        return True
    return False


def give_up_if_lost(device: Any, exc: BaseException) -> None:
    """Raise ``DeviceLost`` if ``exc`` left ``device`` unusable (``device_broken``): every
    step from now on would fail too, so the worker ends and its server starts another."""
    if device_broken(device):
        raise DeviceLost(f"{device} no longer works: {exc!r}") from exc


def load_worker(options: WorkerOptions) -> ModelWorker:
    """Load the model of ``options.spec`` (``moshi:…`` or ``qwen3-omni:…``) as ``options``
    say."""
    spec, device, max_calls = options.spec, options.device, options.max_calls
    name, _, location = spec.partition(":")
    match name:
        case "moshi" if location:
            from s2s.worker.moshi import MoshiWorker

            graphs = {"auto": None, "on": True, "off": False}[options.cuda_graphs]
            return MoshiWorker.load(location, device, max_calls, graphs)
        case "qwen3-omni" if location:
            from s2s.worker.omni import OmniWorker

            return OmniWorker.load(
                location, device, max_calls, graphs=options.cuda_graphs == "on",
                prompt_tokens=options.prompt_tokens,
            )  # fmt: skip
    raise ValueError(f"no model worker for {spec!r}")


def _serve(conn: Connection, options: WorkerOptions, level: int, server_pid: int) -> None:
    """The worker process: load the model, say hello, then one tick at a time until Stop."""
    spec = options.spec
    logging.basicConfig(
        level=level, format=f"%(asctime)s %(levelname)s %(name)s [worker {os.getpid()}] %(message)s"
    )
    # A session of its own: Ctrl-C reaches the terminal's process group, and the worker must
    # not end with it, since the server first drains its calls, still on this model, for its
    # grace period (then says Stop). A service manager should signal the server alone, as
    # systemd's KillMode=mixed does (README).
    os.setsid()
    # A server killed outright (SIGKILL, out of memory) closes no pipe while the model loads:
    # the worker would load on, holding the device, beside the model a restarted server loads.
    threading.Thread(target=_end_with, args=(server_pid,), name="s2s-orphan", daemon=True).start()
    try:
        worker = load_worker(options)
    except Exception as exc:
        log.exception("loading %s failed", spec)
        conn.send_bytes(encoder.encode(Hello(spec, "", 0, 0, 0, 0, error=repr(exc))))
        return
    conn.send_bytes(encoder.encode(worker.hello(spec)))
    while True:
        try:
            request = request_decoder.decode(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the server is gone
        if isinstance(request, Stop):
            return
        try:
            result = worker.handle(request)
        except DeviceLost:
            log.exception("the device failed for good; this worker ends")
            return  # its server sees it gone, and starts another
        except Exception as exc:
            log.exception("tick failed")
            if device_broken(getattr(worker, "device", "cpu")):
                log.error("the device no longer works; this worker ends")
                return
            result = TickResult(error=repr(exc))
        conn.send_bytes(encoder.encode(result))


def _end_with(server_pid: int) -> None:
    """End this process once the server that started it is gone (it is then another's child)."""
    while os.getppid() == server_pid:
        time.sleep(ORPHAN_CHECK_S)
    os._exit(1)

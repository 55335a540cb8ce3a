"""Model workers on a Ray cluster: the worker actor, the registry workers sign in at, and joining
a cluster.

Only ``s2s serve --ray-address`` and ``s2s worker`` import this module, so without them nothing
imports Ray.

A worker actor holds the same worker a local worker process runs (``MoshiWorker``,
``OmniWorker``) and takes the same ticks (msgpack bytes, ``s2s.worker.messages``) from any
number of edges; ticks that arrive while a step runs go together into the next step. A call
that no tick has named for ``evict_after_s`` (its edge died) leaves with the next tick, so its
slot is free again (``s2s.worker.shared``). The registry (``s2s.worker.registry``) is one named,
detached actor in the ``s2s`` namespace: workers register their model and slots and report which
calls they hold, about once a second; edges ask it to place calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import ray

from s2s.worker.handle import ClusterUnavailable
from s2s.worker.messages import (
    Hello,
    Tick,
    TickResult,
    encoder,
    hello_decoder,
    request_decoder,
)
from s2s.worker.process import (
    LOAD_TIMEOUT_S,
    DeviceLost,
    WorkerError,
    WorkerOptions,
    device_broken,
    load_worker,
)
from s2s.worker.registry import REPORT_INTERVAL_S, WorkerRegistry
from s2s.worker.shared import Liveness, Outbox, merged

log = logging.getLogger(__name__)

NAMESPACE = "s2s"
REGISTRY_NAME = "s2s-registry"
#: The custom resource a node offers for each CPU model worker it may host (tiny test models);
#: a worker on a GPU node asks for one GPU instead.
WORKER_RESOURCE = "s2s_worker"


#: Ray passes an argument or result over 100 KiB through its object store (a put, a fetch, a
#: free), which costs milliseconds per tick; a tick carries 3.8 KB of audio per call each way,
#: so past ~26 calls it would. Up to 1 MiB (about 270 calls) goes inline in the call instead,
#: for the edge's ticks (this process) and the worker's answers (the actor's).
INLINE_TICKS = {"RAY_max_direct_call_object_size": str(1 << 20)}


def connect(address: str) -> None:
    """Join the cluster at ``address`` (its head's ``HOST:PORT``, or ``auto``) as a driver;
    ``ClusterUnavailable`` with the reason if there is none there."""
    if address != "auto":
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ClusterUnavailable(f"--ray-address {address!r} is neither HOST:PORT nor auto")
        try:  # ray.init would retry an address nobody listens at for a long while
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise ClusterUnavailable(f"no Ray cluster answers at {address}: {exc}") from None
    if ray.is_initialized():
        return
    os.environ.update(INLINE_TICKS)
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterUnavailable(f"could not join the Ray cluster at {address}: {exc}") from exc


def registry() -> Any:
    """The cluster's worker registry (an actor handle); the first caller starts it, on the
    head node: a GPU node it landed on would take it down with its workers (their calls could
    not move while it restarted, and it would come back knowing no worker), while the cluster
    lives and dies with its head anyway."""
    actor = ray.remote(WorkerRegistry).options(
        name=REGISTRY_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_restarts=-1, resources={"node:__internal_head__": 0.001},
    )  # fmt: skip
    return actor.remote()


class ModelWorkerActor:
    """A model worker as a Ray actor (an async one): loads the model, registers, then steps
    whatever calls the ticks carry, from any edge. Ray restarts it (``max_restarts``); it
    registers anew."""

    def __init__(self, name: str, options: WorkerOptions, evict_after_s: float) -> None:
        logging.basicConfig(
            level=logging.INFO,
            format=f"%(asctime)s %(levelname)s %(name)s [worker {name}] %(message)s",
        )
        self._worker = load_worker(options)
        self._hello = self._worker.hello(options.spec)
        self._name = name
        self._incarnation = uuid.uuid4().hex
        #: When a tick last named each call, to evict those of edges that died.
        self._liveness = Liveness(evict_after_s)
        #: Outputs of calls a step made that none of its ticks named, for their edges.
        self._outbox = Outbox()
        self._step_ms = 0.0
        #: Ticks waiting for the next step, and the task that runs steps while there are any.
        self._queue: list[tuple[Tick, asyncio.Future[TickResult]]] = []
        self._stepper: asyncio.Task[None] | None = None
        # Steps run on one thread of their own (the actor's event loop takes ticks meanwhile),
        # evictions on the upkeep thread: the lock keeps them apart.
        self._steps = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="s2s-step")
        self._lock = threading.Lock()
        self._registry = registry()
        self._register()
        threading.Thread(target=self._upkeep, name="s2s-worker-upkeep", daemon=True).start()
        hello = self._hello
        log.info("%s on %s, %d slots, registered", options.spec, hello.device, hello.slots)

    def _register(self) -> None:
        me = ray.get_runtime_context().current_actor
        hello = encoder.encode(self._hello)
        ray.get(self._registry.register.remote(
            self._name, self._incarnation, hello, me, self._liveness.evict_after_s
        ))  # fmt: skip

    def hello(self) -> bytes:
        return encoder.encode(self._hello)

    def pid(self) -> int:
        return os.getpid()

    async def tick(self, data: bytes) -> bytes:
        """One tick from one edge (msgpack ``Tick`` in, msgpack ``TickResult`` out). Ticks of
        several edges that arrive while a step runs are stepped together in the next one, so a
        busy worker runs one batch per step, not one per edge."""
        request = request_decoder.decode(data)
        if not isinstance(request, Tick):
            return encoder.encode(TickResult(error="a worker actor takes only ticks"))
        done: asyncio.Future[TickResult] = asyncio.get_running_loop().create_future()
        self._queue.append((request, done))
        if self._stepper is None or self._stepper.done():
            self._stepper = asyncio.create_task(self._step_queued(), name="worker/steps")
        return encoder.encode(await done)

    async def _step_queued(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch, self._queue = self._queue, []
            ticks = [tick for tick, _ in batch]
            result = await loop.run_in_executor(self._steps, self._handle, merged(ticks))
            for (_, done), answer in zip(batch, self._outbox.split(ticks, result), strict=True):
                if not done.done():  # its edge may have given up waiting
                    done.set_result(answer)
            self._outbox.keep_only(self._worker.calls)

    def _handle(self, tick: Tick) -> TickResult:
        with self._lock:
            tick = self._liveness.take(tick, time.monotonic())
            try:
                result = self._worker.handle(tick)
            except DeviceLost:
                # Nothing will run on this device in this process again: it ends, and Ray
                # starts the actor afresh (--max-restarts) while edges move the calls.
                log.exception("the device failed for good; this worker ends")
                os._exit(1)
            except Exception as exc:
                log.exception("tick failed")
                if device_broken(getattr(self._worker, "device", "cpu")):
                    log.error("the device no longer works; this worker ends")
                    os._exit(1)
                result = TickResult(error=repr(exc))
        self._step_ms = result.step_ms
        return result

    def _upkeep(self) -> None:
        while True:
            time.sleep(REPORT_INTERVAL_S)
            try:
                self._evict_and_report()
            except Exception:
                log.exception("upkeep failed")

    def _evict_and_report(self) -> None:
        with self._lock:
            stale = self._liveness.evict(time.monotonic())
            if stale:
                log.info("%d calls not ticked for %g s: their edge is gone; freeing their slots",
                         len(stale), self._liveness.evict_after_s)  # fmt: skip
            leaving = set(self._liveness.leaving)
            calls = [call for call in self._worker.calls if call not in leaving]
        report = self._registry.report.remote(self._name, self._incarnation, calls, self._step_ms)
        if not ray.get(report, timeout=10):
            log.warning("the registry did not know this worker (it restarted): registering again")
            self._register()


def start_worker(
    options: WorkerOptions,
    *,
    name: str = "",
    evict_after_s: float = 15.0,
    max_restarts: int = -1,
    detached: bool = False,
) -> tuple[str, Any, Hello]:
    """Start a worker actor for ``options.spec`` on the cluster this process joined and wait
    until its model is loaded: its name, actor handle and hello. It asks for one GPU when
    ``options.device`` is CUDA (or None on a cluster with GPUs), else for one ``s2s_worker``
    resource. It ends with this process unless ``detached``: a process killed while its worker
    loads (or at any time) leaves no worker holding a GPU with no one to stop it."""  # fmt: skip
    spec, device = options.spec, options.device
    name = name or f"{spec.partition(':')[0]}-{uuid.uuid4().hex[:8]}"
    resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    gpu = device.startswith("cuda") if device else resources.get("GPU", 0) > 0
    need = "GPU" if gpu else WORKER_RESOURCE
    if resources.get(need, 0) < 1:
        raise WorkerError(
            f"no node of the cluster offers {need!r}: start a node with "
            + ("GPUs" if gpu else f"ray start --resources '{{\"{WORKER_RESOURCE}\": 1}}'")
        )
    placement: dict[str, Any] = {"num_gpus": 1} if gpu else {"resources": {WORKER_RESOURCE: 1}}
    placement |= {"name": name, "namespace": NAMESPACE, "num_cpus": 0,
                  "max_restarts": max_restarts}  # fmt: skip
    if detached:
        placement["lifetime"] = "detached"
    placement["runtime_env"] = {"env_vars": INLINE_TICKS}
    actor_class: Any = ray.remote(ModelWorkerActor)
    try:
        actor = actor_class.options(**placement).remote(name, options, evict_after_s)
    except ValueError as exc:  # Ray's word for a name already taken
        raise WorkerError(f"cannot start worker {name!r}: {exc}") from exc
    try:
        hello = hello_decoder.decode(ray.get(actor.hello.remote(), timeout=LOAD_TIMEOUT_S))
    except (ray.exceptions.RayError, TimeoutError) as exc:
        ray.kill(actor, no_restart=True)
        raise WorkerError(f"the model worker for {spec} did not start: {exc}") from exc
    return name, actor, hello


def stop_worker(name: str, actor: Any) -> None:
    """Take a worker off the registry and end it for good (its last reports, still on their
    way, cannot register it again: ``WorkerRegistry.leave``)."""
    ray.get(registry().leave.remote(name))
    ray.kill(actor, no_restart=True)

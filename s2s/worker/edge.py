"""An edge's side of the cluster: calls here, their model on worker actors elsewhere.

``ClusterBackend`` is the backend of ``s2s serve --ray-address``. Each new call gets a place on
the worker of its model with the most free slots (the registry decides, so edges do not race for
the last slot) and keeps it for its life. The calls on one worker are driven by one scheduler of
their model (``MoshiBackend`` or ``Qwen3OmniBackend``), exactly as with a local worker process,
through a ``ClusterWorker`` handle: each tick carries every frame and change of this edge's calls
on that worker. When the worker dies, the scheduler asks the handle for a replacement: the registry
places all of its calls on another worker, and the calls go on there with fresh model state
(``model_unavailable``), their WebRTC legs untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import ray
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from s2s.backends.base import NoCapacity
from s2s.backends.moshi import MoshiBackend, MoshiStream
from s2s.backends.qwen3_omni import Qwen3OmniBackend, Qwen3OmniStream
from s2s.worker import cluster
from s2s.worker.handle import ClusterUnavailable
from s2s.worker.messages import (
    Change,
    Hello,
    Tick,
    TickResult,
    encoder,
    hello_decoder,
    result_decoder,
)
from s2s.worker.process import WorkerError
from s2s.worker.registry import Placement, WorkerState

log = logging.getLogger(__name__)

#: A tick not answered in this long counts as the worker's death (a hung node): the calls move.
#: A Moshi tick is one 80 ms frame; a turn-based model's may carry a prefill piece and, after a
#: move, the encoders over a whole conversation's audio sent again, so it gets longer (a worker
#: found gone takes no calls for a while: ``WorkerRegistry.down``).
TICK_TIMEOUT_S = {"moshi": 2.0, "qwen3-omni": 10.0}
#: How long a place given to an offer is kept for its call's stream.
PLACE_KEPT_S = 60.0
#: How often the edge refreshes its view of the workers (for /metrics).
REFRESH_S = 2.0
#: How long a place is waited for: a registry that does not answer (its node died, it is being
#: restarted) fails the offer (503) or the move instead of holding it up for good.
REGISTRY_TIMEOUT_S = 5.0


class ClusterWorker:
    """A worker actor as one edge's scheduler uses it (a ``WorkerHandle``)."""

    def __init__(self, registry: Any, model: str, placement: Placement) -> None:
        self.registry: Any = registry
        self.model = model
        self._tick_timeout_s = TICK_TIMEOUT_S[model.partition(":")[0]]
        self.name, self.incarnation = placement.name, placement.incarnation
        self._hello = hello_decoder.decode(placement.hello)
        self._actor: Any = placement.actor
        #: This edge's calls on the worker, as the ticks sent it joins and leaves.
        self.calls: set[str] = set()

    @property
    def hello(self) -> Hello:
        return self._hello

    async def tick(self, tick: Tick) -> TickResult:
        left = []
        for change in tick.changes:
            if change.kind == "join":
                self.calls.add(change.call)
            elif change.kind == "leave":
                self.calls.discard(change.call)
                left.append(change.call)
        try:
            async with asyncio.timeout(self._tick_timeout_s):
                raw = await self._actor.tick.remote(encoder.encode(tick))
        except (ray.exceptions.RayError, TimeoutError) as exc:
            raise WorkerError(f"model worker {self.name} is gone: {exc!r}") from exc
        if left:  # their places are free at once, not at the worker's next report
            self.registry.release.remote(self.name, left)
        return result_decoder.decode(raw)

    async def replacement(self, calls: list[str]) -> ClusterWorker:
        """``calls`` (the scheduler's open calls: those on the dead worker and any whose join
        had not reached it yet), placed together on another worker."""
        self.registry.down.remote(self.name, self.incarnation)
        try:
            async with asyncio.timeout(REGISTRY_TIMEOUT_S):
                placement = await self.registry.place.remote(self.model, calls, self.name)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            # The place may still be given once this has stopped waiting: let it go then.
            self.registry.forget.remote(calls)
            raise WorkerError(f"the worker registry did not place the calls: {exc!r}") from exc
        if placement is None:
            raise WorkerError(f"no other worker of {self.model} has room for {len(calls)} calls")
        log.warning("%d calls of worker %s move to %s", len(calls), self.name, placement.name)
        moved = ClusterWorker(self.registry, self.model, placement)
        moved.calls = set(calls)
        return moved

    async def close(self) -> None:
        """Leave the worker (it is the cluster's, and goes on serving other edges)."""
        if self.calls:
            with contextlib.suppress(WorkerError):
                await self.tick(Tick([Change("leave", call) for call in sorted(self.calls)]))


#: The model kinds whose workers run on a cluster, and the scheduler that drives each.
SCHEDULERS: dict[str, type[MoshiBackend] | type[Qwen3OmniBackend]] = {
    "moshi": MoshiBackend,
    "qwen3-omni": Qwen3OmniBackend,
}
Scheduler = MoshiBackend | Qwen3OmniBackend
Stream = MoshiStream | Qwen3OmniStream


class ClusterBackend:
    """``moshi:…`` or ``qwen3-omni:…`` served by worker actors on a Ray cluster
    (``s2s serve --ray-address``)."""

    def __init__(
        self, registry: Any, model: str, hello: Hello, *, prompt_tokens: int = 8192,
        prefill_tokens: int = 0,
    ) -> None:  # fmt: skip
        self.registry: Any = registry
        self.model = model
        self.name = model.partition(":")[0]
        self._scheduler_class = SCHEDULERS[self.name]
        self.turn_based = self._scheduler_class.turn_based
        self.steers = self._scheduler_class.steers
        #: What a turn-based model's scheduler sends with each turn (--prompt-tokens,
        #: --prefill-tokens), as a local worker's gets it.
        self._options = (
            {"prompt_tokens": prompt_tokens, "prefill_tokens": prefill_tokens}
            if self.turn_based
            else {}
        )
        self.input_rate, self.output_rate = hello.input_rate, hello.output_rate
        self.frame_samples = hello.frame_samples
        #: The schedulers of this edge's calls, each driving the worker its calls are on now
        #: (after a move, another than the one they were placed on).
        self._schedulers: list[Scheduler] = []
        #: Places given to offers not yet answered, with when they were given.
        self._placed: dict[str, tuple[Placement, float]] = {}
        #: Every open call's scheduler (whose worker is where the call is now) and stream.
        self._calls: dict[str, tuple[Scheduler, Stream]] = {}
        #: The registry's view of the workers of this edge's model, refreshed every few seconds.
        self.workers: list[WorkerState] = []
        self.metrics = WorkerMetrics(self)
        self._follow = asyncio.create_task(self._follow_registry(), name="cluster/registry")

    @classmethod
    async def connect(
        cls, address: str, model: str, *, wait_s: float = 30.0, prompt_tokens: int = 8192,
        prefill_tokens: int = 0,
    ) -> ClusterBackend:  # fmt: skip
        """Join the cluster and wait up to ``wait_s`` for a worker of ``model`` to register;
        ``ClusterUnavailable`` if there is no cluster at ``address`` or no such worker."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, cluster.connect, address)
        registry = await loop.run_in_executor(None, cluster.registry)
        try:
            async with asyncio.timeout(wait_s):
                while (hello := await registry.hello_of.remote(model)) is None:
                    log.info("waiting for a worker of %s to register", model)
                    await asyncio.sleep(1.0)
        except TimeoutError:
            raise ClusterUnavailable(
                f"no worker of {model} registered on the cluster at {address} in {wait_s:g} s; "
                f"start one with: s2s worker --ray-address {address} --model {model}"
            ) from None
        log.info("cluster at %s: workers of %s are registered", address, model)
        return cls(
            registry, model, hello_decoder.decode(hello), prompt_tokens=prompt_tokens,
            prefill_tokens=prefill_tokens,
        )  # fmt: skip

    async def place(self, call_id: str) -> None:
        """Reserve a place for the call on the worker of its model with most free slots."""
        try:
            async with asyncio.timeout(REGISTRY_TIMEOUT_S):
                placement = await self.registry.place.remote(self.model, [call_id])
        except (ray.exceptions.RayError, TimeoutError) as exc:
            self.registry.forget.remote([call_id])  # as above: a place given late is let go
            raise NoCapacity(f"the worker registry did not answer: {exc!r}") from exc
        if placement is None:
            raise NoCapacity(f"every worker of {self.model} is full")
        # An offer refused after its place was given never opens a stream: forget its place
        # (the registry's lapses by itself).
        now = time.monotonic()
        self._placed = {c: p for c, p in self._placed.items() if now - p[1] < PLACE_KEPT_S}
        self._placed[call_id] = (placement, now)

    def unplace(self, call_id: str) -> None:
        """The offer ``call_id`` was placed for is refused: its place is free at once."""
        kept = self._placed.pop(call_id, None)
        if kept is not None:
            self.registry.release.remote(kept[0].name, [call_id])

    async def open_stream(self, call_id: str) -> Stream:
        if call_id not in self._placed:
            await self.place(call_id)
        placement, _ = self._placed.pop(call_id)
        key = (placement.name, placement.incarnation)
        # The scheduler now driving that worker: one whose calls moved off it no longer is.
        scheduler = next((s for s in self._schedulers if _driving(s) == key), None)
        if scheduler is None:
            worker = ClusterWorker(self.registry, self.model, placement)
            scheduler = self._scheduler_class(worker, **self._options)
            self._schedulers.append(scheduler)
        log.info("call %s placed on model worker %s", call_id, placement.name)
        stream: Stream = await scheduler.open_stream(call_id)
        self._calls = {c: s for c, s in self._calls.items() if not s[1].closed}
        self._calls[call_id] = (scheduler, stream)
        return stream

    def where(self, call_id: str) -> str | None:
        """The worker that holds ``call_id`` now (after any move); None once it ended."""
        scheduler, stream = self._calls.get(call_id, (None, None))
        if scheduler is None or stream is None or stream.closed:
            return None
        return scheduler.worker.name if isinstance(scheduler.worker, ClusterWorker) else None

    def calls_by_worker(self) -> dict[str, int]:
        """How many of this edge's calls each worker holds now."""
        counts: dict[str, int] = {}
        for call in self._calls:
            if (name := self.where(call)) is not None:
                counts[name] = counts.get(name, 0) + 1
        return counts

    async def close(self) -> None:
        self._follow.cancel()
        await asyncio.gather(self._follow, return_exceptions=True)
        for scheduler in self._schedulers:
            await scheduler.close()

    async def _follow_registry(self) -> None:
        while True:
            try:
                states = await self.registry.workers.remote()
                self.workers = [s for s in states if s.model == self.model]
            except ray.exceptions.RayError as exc:
                log.warning("the worker registry did not answer: %s", exc)
            await asyncio.sleep(REFRESH_S)


def _driving(scheduler: Scheduler) -> tuple[str, str] | None:
    """The worker (name, incarnation) ``scheduler`` ticks now."""
    worker = scheduler.worker
    return (worker.name, worker.incarnation) if isinstance(worker, ClusterWorker) else None


class WorkerMetrics:
    """The workers an edge uses, for its ``/metrics`` (a prometheus ``Collector``)."""

    def __init__(self, backend: ClusterBackend) -> None:
        self._backend = backend

    def collect(self) -> Iterator[Metric]:
        backend = self._backend
        calls = GaugeMetricFamily(
            "s2s_model_worker_calls", "This edge's calls on each model worker.", labels=["worker"]
        )
        free = GaugeMetricFamily(
            "s2s_model_worker_free_slots", "Free call slots of each model worker (all edges).",
            labels=["worker"],
        )  # fmt: skip
        step = GaugeMetricFamily(
            "s2s_model_worker_step_seconds", "Each model worker's last tick's work.",
            labels=["worker"],
        )  # fmt: skip
        up = GaugeMetricFamily(
            "s2s_model_worker_up", "1 if the model worker takes calls.", labels=["worker"]
        )
        mine = backend.calls_by_worker()
        for state in backend.workers:
            calls.add_metric([state.name], mine.get(state.name, 0))
            free.add_metric([state.name], state.free)
            step.add_metric([state.name], state.step_ms / 1000)
            up.add_metric([state.name], 1.0 if state.up else 0.0)
        yield from (calls, free, step, up)

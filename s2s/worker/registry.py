"""The registry model workers sign in at: which workers a cluster has, what model each serves,
which calls it holds, and where a new call goes.

It runs as one named, detached Ray actor (``s2s.worker.cluster.registry``), but is a plain class
with no Ray in it, so its placing, its reservations and its view of dead or silent workers can be
tested on their own, with a clock of the test's.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from s2s.worker.messages import Hello, encoder, hello_decoder

#: How often a worker tells the registry which calls it holds (and evicts orphaned ones).
REPORT_INTERVAL_S = 1.0
#: A worker that has not reported for this long gets no new calls (it died or hangs).
SILENT_AFTER_S = 5.0
#: A worker silent this long is forgotten (its metrics go); one that reports again registers.
FORGET_AFTER_S = 300.0


@dataclass(frozen=True)
class Placement:
    """Where the registry put calls: a worker (its actor) and what it said at start."""

    name: str
    incarnation: str
    hello: bytes
    actor: Any


@dataclass(frozen=True)
class WorkerState:
    """One worker as the registry sees it, for metrics and tests."""

    name: str
    model: str
    slots: int
    free: int
    calls: tuple[str, ...]
    step_ms: float
    up: bool


@dataclass
class _Worker:
    name: str
    #: New each time the actor (re)starts, so news about a dead one cannot touch its successor.
    incarnation: str
    hello: Hello
    actor: Any
    evict_after_s: float
    last_report: float
    calls: set[str] = field(default_factory=set)
    #: Calls placed here that the worker has not reported yet, with when the place lapses.
    reserved: dict[str, float] = field(default_factory=dict)
    step_ms: float = 0.0
    #: An edge found it gone (``WorkerRegistry.down``): no new calls before then.
    down_until: float = 0.0

    def held(self, now: float) -> set[str]:
        self.reserved = {c: t for c, t in self.reserved.items() if t > now}
        return self.calls | self.reserved.keys()

    def up(self, now: float) -> bool:
        return now >= self.down_until and now - self.last_report < SILENT_AFTER_S


class WorkerRegistry:
    """Which workers the cluster has, what model each serves and which calls it holds (run as
    the named actor ``registry()`` returns; a plain class, so it can be tested as one)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._workers: dict[str, _Worker] = {}
        self._clock = clock
        #: Incarnations that left for good: one still reporting (it is being stopped) must not
        #: register again.
        self._left: collections.deque[str] = collections.deque(maxlen=1024)

    def register(
        self, name: str, incarnation: str, hello: bytes, actor: Any, evict_after_s: float
    ) -> None:
        """A worker started (or restarted: it starts again with no calls)."""
        if incarnation in self._left:
            return
        self._workers[name] = _Worker(
            name, incarnation, hello_decoder.decode(hello), actor, evict_after_s, self._clock()
        )

    def report(self, name: str, incarnation: str, calls: list[str], step_ms: float) -> bool:
        """What a worker holds now (it sends this about once a second); False if the registry
        does not know it (the registry restarted): it should register again."""
        if incarnation in self._left:
            return True  # stopping: it has nothing more to tell
        if (worker := self._current(name, incarnation)) is None:
            return False
        worker.calls, worker.step_ms = set(calls), step_ms
        for call in calls:  # it has them: later reports say when they are gone
            worker.reserved.pop(call, None)
        worker.last_report = self._clock()
        return True

    def release(self, name: str, calls: list[str]) -> None:
        """Calls an edge ended on ``name``: their places are free without waiting for a report."""
        if (worker := self._workers.get(name)) is not None:
            for call in calls:
                worker.reserved.pop(call, None)
                worker.calls.discard(call)

    def forget(self, calls: list[str]) -> None:
        """Calls whose placing an edge gave up waiting for: any place given them is free."""
        for worker in self._workers.values():
            for call in calls:
                worker.reserved.pop(call, None)

    def down(self, name: str, incarnation: str) -> None:
        """An edge saw this incarnation of the worker die (or miss a tick's deadline): no new
        calls for as long as it keeps calls no edge ticks, so the ones moved off it have left.
        A worker that is dead stops reporting and stays out; one that was only slow for a while
        reports on and takes calls again after that."""
        if (worker := self._current(name, incarnation)) is not None:
            hold = worker.evict_after_s + 2 * REPORT_INTERVAL_S
            worker.down_until = self._clock() + hold

    def leave(self, name: str) -> None:
        """The worker is stopping for good."""
        if (worker := self._workers.pop(name, None)) is not None:
            self._left.append(worker.incarnation)

    def _forget_silent(self, now: float) -> None:
        """Forget workers that stopped reporting long ago: dead for good (a lost node, restarts
        used up, a detached worker gone), they would be listed, down, forever."""
        for name in [n for n, w in self._workers.items() if now - w.last_report > FORGET_AFTER_S]:
            del self._workers[name]

    def place(self, model: str, calls: list[str], exclude: str = "") -> Placement | None:
        """Put ``calls`` together on the worker of ``model`` with the most free slots (not on
        ``exclude``); None if no worker of that model has room for them all."""
        now = self._clock()
        self._forget_silent(now)
        fits = [
            (worker.hello.slots - len(worker.held(now)), worker)
            for worker in self._workers.values()
            if worker.hello.model == model and worker.up(now) and worker.name != exclude
        ]
        fits = [(free, worker) for free, worker in fits if free >= len(calls)]
        if not fits:
            return None
        _, best = max(fits, key=lambda fit: fit[0])
        # Held until the worker reports the calls, or for as long as it would keep a call no
        # edge ticks (the edge died before its first tick).
        lapse = now + best.evict_after_s + 2 * REPORT_INTERVAL_S
        best.reserved.update(dict.fromkeys(calls, lapse))
        return Placement(best.name, best.incarnation, encoder.encode(best.hello), best.actor)

    def hello_of(self, model: str) -> bytes | None:
        """What some worker of ``model`` said at start (the model's rates), if there is one."""
        for worker in self._workers.values():
            if worker.hello.model == model:
                return encoder.encode(worker.hello)
        return None

    def workers(self) -> list[WorkerState]:
        now = self._clock()
        self._forget_silent(now)
        states = []
        for w in self._workers.values():
            free = w.hello.slots - len(w.held(now))
            calls = tuple(sorted(w.calls))
            states.append(WorkerState(w.name, w.hello.model, w.hello.slots, free, calls,
                                      w.step_ms, w.up(now)))  # fmt: skip
        return states

    def _current(self, name: str, incarnation: str) -> _Worker | None:
        worker = self._workers.get(name)
        return worker if worker is not None and worker.incarnation == incarnation else None

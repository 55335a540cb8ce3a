"""The server's handle on one model worker, wherever it runs.

A backend's scheduler (``MoshiBackend``, ``Qwen3OmniBackend``) needs only this: the worker's
``hello`` (its rates and slots), one ``tick`` per model frame, a ``replacement`` when the worker
died, and ``close``. A worker in a child process (``s2s.worker.process.WorkerProcess``) and one
on a Ray cluster (``s2s.worker.edge.ClusterWorker``) both are one.
"""

from __future__ import annotations

from typing import Protocol

from s2s.worker.messages import Hello, Tick, TickResult

#: After a replacement that failed, how long a scheduler waits before a tick tries again (a
#: worker that cannot load fails fast, and would otherwise be retried back to back).
RESTART_BACKOFF_S = 5.0


class WorkerHandle(Protocol):
    """One model worker as the scheduler sees it."""

    @property
    def hello(self) -> Hello:
        """What the worker said once its model was loaded."""
        ...

    async def tick(self, tick: Tick) -> TickResult:
        """One tick there and back; ``WorkerError`` if the worker is gone."""
        ...

    async def replacement(self, calls: list[str]) -> WorkerHandle:
        """Another worker for ``calls`` (every open call of the scheduler; they join it next),
        this one having died; ``WorkerError`` if none."""
        ...

    async def close(self) -> None:
        """Let go of the worker; its calls here are over."""
        ...


class ClusterUnavailable(RuntimeError):
    """No Ray cluster at the address given, or no worker of the model on it (start-up)."""

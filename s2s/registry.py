"""The live calls of one server process, with a cap on how many there may be.

With ``--workers``, the cap is the whole server's: admission counts every worker's calls
(``s2s.pool``) and publishes this process's count for the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

from s2s.log import CallLogger
from s2s.metrics import ServerMetrics
from s2s.pool import Pool
from s2s.session import Session
from s2s.webhooks import Webhooks

log = logging.getLogger(__name__)

# How long hang-up and shutdown wait for a call's tasks to finish releasing it.
_RELEASE_TIMEOUT_S = 5.0


class ServerFull(RuntimeError):
    pass


class KeyLimit(RuntimeError):
    pass


class SessionRegistry:
    """Admits, runs and ends sessions; each runs in its own task and fails on its own."""

    def __init__(
        self,
        max_sessions: int,
        max_per_owner: int = 0,
        webhooks: Webhooks | None = None,
        metrics: ServerMetrics | None = None,
        pool: Pool | None = None,
    ) -> None:
        self.max_sessions = max_sessions
        self._pool = pool
        self._webhooks = webhooks
        self._metrics = metrics or ServerMetrics()
        self._started: dict[str, float] = {}
        self.max_per_owner = max_per_owner
        #: Set on shutdown: no new calls are admitted.
        self.draining = False
        self._sessions: dict[str, Session] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    async def drain(self, grace_s: float, hurry: asyncio.Event | None = None) -> None:
        """Admit no more calls and wait up to ``grace_s`` for the current ones to end, or until
        ``hurry`` is set (an operator signalled again)."""
        self.draining = True
        tasks = list(self._tasks.values())
        if not tasks:
            return
        calls = asyncio.ensure_future(asyncio.wait(tasks))  # cancelling it leaves the calls be
        waits: list[asyncio.Future[Any]] = [calls]
        if hurry is not None:
            waits.append(asyncio.ensure_future(hurry.wait()))
        try:
            await asyncio.wait(waits, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    def get(self, call_id: str) -> Session | None:
        return self._sessions.get(call_id)

    def admit(self, session: Session) -> None:
        """Count ``session`` against the caps from now on (negotiation included)."""
        if self.draining:
            raise ServerFull("the server is shutting down")
        if self._pool is None:
            self._check_room(session.owner, len(self._sessions), self._held_here(session.owner))
            self._sessions[session.call_id] = session
            return
        with self._pool.admission() as load:
            owned = load.held_by(session.owner) if session.owner is not None else 0
            self._check_room(session.owner, load.total, owned)
            self._sessions[session.call_id] = session
            self._publish()

    def _held_here(self, owner: str | None) -> int:
        return sum(1 for s in self._sessions.values() if owner is not None and s.owner == owner)

    def _check_room(self, owner: str | None, held: int, owned: int) -> None:
        if self.max_per_owner and owner is not None and owned >= self.max_per_owner:
            raise KeyLimit(f"this key holds {owned} of its {self.max_per_owner} calls")
        if held >= self.max_sessions:
            raise ServerFull(f"{held} of {self.max_sessions} calls in progress")

    def _publish(self) -> None:
        if self._pool is not None:
            owners = Counter(s.owner for s in self._sessions.values() if s.owner is not None)
            self._pool.publish(len(self._sessions), owners)

    async def discard(self, session: Session) -> None:
        """Free a session that was admitted but never started (its offer was refused)."""
        self._sessions.pop(session.call_id, None)
        self._publish()
        await session.release()

    def start(self, session: Session) -> None:
        task = asyncio.create_task(session.run(), name=f"{session.call_id}/session")
        self._started[session.call_id] = time.monotonic()
        self._metrics.call_started()
        if self._webhooks is not None:
            self._webhooks.emit("realtime.call.started", {"call_id": session.call_id})
            if self._pool is not None:  # should this process die, the supervisor ends it
                self._pool.call_started(session.call_id, self._started[session.call_id])
        self._tasks[session.call_id] = task
        task.add_done_callback(lambda t: self._finished(session, t))

    def _finished(self, session: Session, task: asyncio.Task[None]) -> None:
        self._sessions.pop(session.call_id, None)
        self._publish()
        self._tasks.pop(session.call_id, None)
        started = self._started.pop(session.call_id, time.monotonic())
        self._metrics.call_ended(session.end_reason or "released")
        if self._webhooks is not None:
            self._webhooks.emit("realtime.call.ended", {
                "call_id": session.call_id, "reason": session.end_reason,
                "duration_s": round(time.monotonic() - started, 3),
            })  # fmt: skip
            if self._pool is not None:
                self._pool.call_ended(session.call_id)
        if not task.cancelled() and (exc := task.exception()) is not None:
            CallLogger(log, session.call_id).error("call failed", exc_info=exc)

    async def hangup(self, call_id: str) -> bool:
        """End a call and wait until it is released. False if there is no such call."""
        session = self._sessions.get(call_id)
        if session is None:
            return False
        session.end("hangup")
        task = self._tasks.get(call_id)
        if task is not None:
            await asyncio.wait([task], timeout=_RELEASE_TIMEOUT_S)
        return True

    async def close_all(self, reason: str) -> None:
        for session in list(self._sessions.values()):
            session.end(reason)
        tasks = list(self._tasks.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=_RELEASE_TIMEOUT_S)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)

"""One model worker shared by the edges of a cluster (``s2s.worker.cluster.ModelWorkerActor``).

Each edge ticks the worker for its own calls, and the worker steps whatever ticks arrived
together. Two things follow that a worker with one server (a child process) never meets:

- an edge can die, and nothing says so: a call no tick has named for a while leaves
  (``Liveness``);
- a turn-based worker (``OmniWorker``) steps every answering call on each tick, whichever calls
  the tick names, so a step can make output for a call whose edge's tick was not in it: that
  output waits for the call's next tick (``Outbox``).
"""

from __future__ import annotations

from collections.abc import Collection

from s2s.worker.messages import CallOutput, Change, Tick, TickResult


class Liveness:
    """When ticks last named each call, and the calls none has named for ``evict_after_s``
    (their edge is gone). Their leaves go in front of the next tick's changes rather than in a
    tick of their own: a turn-based worker steps every answering call on each tick it takes,
    and the outputs of a tick no edge sent would reach no one."""

    def __init__(self, evict_after_s: float) -> None:
        self.evict_after_s = evict_after_s
        self._seen: dict[str, float] = {}
        #: Evicted calls whose leave the worker has not taken yet.
        self.leaving: list[str] = []

    def evict(self, now: float) -> list[str]:
        """The calls found gone since the last time (their leaves wait for the next tick)."""
        stale = [c for c, seen in self._seen.items() if now - seen > self.evict_after_s]
        for call in stale:
            del self._seen[call]
        self.leaving += stale
        return stale

    def take(self, tick: Tick, now: float) -> Tick:
        """``tick`` noted, with the evicted calls' leaves in front of its changes."""
        if self.leaving:
            tick = Tick([Change("leave", c) for c in self.leaving] + tick.changes, tick.frames)
            self.leaving = []
        for change in tick.changes:
            if change.kind == "leave":
                self._seen.pop(change.call, None)
            else:
                self._seen[change.call] = now
        self._seen.update(dict.fromkeys(tick.frames, now))
        return tick


def merged(ticks: list[Tick]) -> Tick:
    """Ticks of several edges as one: their calls are distinct, so their changes may go in any
    order between edges."""
    return Tick(
        [change for tick in ticks for change in tick.changes],
        {call: pcm for tick in ticks for call, pcm in tick.frames.items()},
    )


class Outbox:
    """Outputs of calls that no tick of the step that made them named, held for the next tick
    that names the call, joined to what the call makes meanwhile (its text and audio in order,
    and its ``done``)."""

    def __init__(self) -> None:
        self._held: dict[str, CallOutput] = {}

    def split(self, ticks: list[Tick], result: TickResult) -> list[TickResult]:
        """The result of a step of ``merged(ticks)`` as each tick's: the outputs of the calls
        it names (with what was held for them); those of calls none names are held."""
        named = {call for tick in ticks for call in tick.frames}
        self.hold({c: o for c, o in result.outputs.items() if c not in named})
        return [
            TickResult(self.deliver(tick, result.outputs), result.step_ms, result.error)
            for tick in ticks
        ]

    def hold(self, outputs: dict[str, CallOutput]) -> None:
        for call, output in outputs.items():
            held = self._held.get(call)
            self._held[call] = output if held is None else joined(held, output)

    def deliver(self, tick: Tick, outputs: dict[str, CallOutput]) -> dict[str, CallOutput]:
        """The outputs for the calls ``tick`` names: what was held for them, then ``outputs``."""
        mine = {}
        for call in tick.frames:
            held, fresh = self._held.pop(call, None), outputs.get(call)
            if held is not None and fresh is not None:
                mine[call] = joined(held, fresh)
            elif (output := held or fresh) is not None:
                mine[call] = output
        return mine

    def keep_only(self, calls: Collection[str]) -> None:
        """Let go of what is held for calls that left."""
        for call in [c for c in self._held if c not in calls]:
            del self._held[call]


def joined(first: CallOutput, then: CallOutput) -> CallOutput:
    """One call's output of two steps as one. Of two responses, only the later counts: the
    call's edge asked for it, which ended the earlier one there."""
    if first.response_id != then.response_id:
        return CallOutput(then.text, then.audio, then.error or first.error, then.response_id,
                          then.done)  # fmt: skip
    return CallOutput(first.text + then.text, first.audio + then.audio, then.error or first.error,
                      then.response_id, then.done or first.done)  # fmt: skip

"""``moshi:PATH_OR_HUB_ID``: kyutai's full-duplex Moshi through transformers, many calls per step.

Moshi listens and speaks at once in 80 ms frames (1920 samples at 24 kHz). Every call sends one
frame per 80 ms; the backend's scheduler ticks once per frame period and sends every waiting
frame, with the joins, leaves, resets and steers since the last tick, to the model worker in one
message (``s2s.worker``). The worker, a process of its own (or a Ray actor on another machine:
``s2s.worker.edge``) that owns the device, runs one batched step for all of them (Mimi encode,
``MoshiEngine``, Mimi decode) and answers with every call's audio and text. A frame waits at
most one period for its tick; changes are applied between steps, so no call waits for another's
join.

Full duplex has no turns, so the Realtime events map like this:
- Moshi's inner-monologue text becomes ``response.output_audio_transcript.delta`` events of a
  response the backend opens when text starts and closes after a second without text.
- ``response.cancel`` / barge-in reset the call's state: its past is forgotten (masked), queued
  audio is dropped, and Moshi starts listening afresh.
- Steering (``s2s.response.steer`` / ``session.update`` instructions) forces the instructions'
  text tokens into Moshi's text stream, one per frame, which steers what it says next.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from s2s.backends.base import (
    ContinuousStream,
    ModelEvent,
    ModelUnavailable,
    ResponseFinished,
    Steering,
    StepResult,
)
from s2s.protocol.ids import new_id
from s2s.worker.handle import RESTART_BACKOFF_S, WorkerHandle
from s2s.worker.messages import CallOutput, Change, Tick
from s2s.worker.process import WorkerError, WorkerOptions, WorkerProcess

log = logging.getLogger(__name__)

#: Steps in a row that may fail (2 s) before the worker is replaced.
MAX_FAILED_TICKS = 25
_QUIET_FRAMES_END_TEXT = 12  # ~1 s without text closes the transcript's response


@dataclass(eq=False)
class _Job:
    pcm: np.ndarray
    done: asyncio.Future[StepResult]


class MoshiBackend:
    name = "moshi"
    turn_based = False
    steers = True

    def __init__(self, worker: WorkerHandle) -> None:
        self.worker = worker
        # Open calls, in the order they joined (a replacement worker takes them in that order).
        self._streams: dict[MoshiStream, None] = {}
        hello = worker.hello
        self.input_rate, self.output_rate = hello.input_rate, hello.output_rate
        self.frame_samples = hello.frame_samples
        self._pending: dict[MoshiStream, _Job] = {}
        self._changes: list[Change] = []
        self._failed_ticks = 0
        self._wake = asyncio.Event()
        self._scheduler = asyncio.create_task(self._schedule(), name="moshi/scheduler")

    @classmethod
    async def load(
        cls, location: str, device: str | None = None, *, max_calls: int = 32,
        cuda_graphs: str = "auto",
    ) -> MoshiBackend:  # fmt: skip
        """A backend whose model worker is a child process of this one."""
        spec = f"moshi:{location}"
        return cls(await WorkerProcess.start(WorkerOptions(spec, device, max_calls, cuda_graphs)))

    async def open_stream(self, call_id: str) -> MoshiStream:
        stream = MoshiStream(self, call_id)
        self._streams[stream] = None
        self.change(Change("join", call_id))
        return stream

    async def close(self) -> None:
        self._scheduler.cancel()
        await asyncio.gather(self._scheduler, return_exceptions=True)
        await self.worker.close()

    # -- scheduling --------------------------------------------------------------------------

    def submit(self, stream: MoshiStream, pcm: np.ndarray) -> asyncio.Future[StepResult]:
        done: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        self._pending[stream] = _Job(pcm, done)
        self._wake.set()
        return done

    def change(self, change: Change) -> None:
        self._changes.append(change)
        self._wake.set()

    async def _schedule(self) -> None:
        """Tick once per frame period and step every call whose frame is waiting, together.

        Ticks are scheduled from the scheduler's start time, so they do not drift; a tick that
        overran its period is followed at once by the next. A call's frame waits at most one
        period for its tick, the price of one batched forward for all calls.
        """
        loop = asyncio.get_running_loop()
        period = self.frame_samples / self.input_rate
        start = loop.time()
        ticks = 0
        while True:
            await self._wake.wait()
            ticks = max(ticks + 1, int((loop.time() - start) / period) + 1)
            delay = start + ticks * period - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self._wake.clear()
            batch, self._pending = self._pending, {}
            resets = {stream: stream.resets for stream in batch}
            changes, self._changes = self._changes, []
            frames = {s.call_id: job.pcm.tobytes() for s, job in batch.items() if not s.closed}
            try:
                result = await self.worker.tick(Tick(changes, frames))
                if result.error:
                    raise RuntimeError(f"the model worker's step failed: {result.error}")
            except WorkerError as exc:
                await self._replace_worker(exc, batch)
                continue
            except Exception as exc:
                await self._step_failed(exc, batch)
                continue
            self._failed_ticks = 0
            if result.step_ms > 1000 * period:
                log.debug("moshi tick took %.0f ms for %d calls", result.step_ms, len(frames))
            for stream, job in batch.items():
                if job.done.done():
                    continue
                if stream.resets != resets[stream]:
                    # Reset (cancel, barge-in) while this step ran: what it made is the old
                    # response's; the reset reaches the model with the next tick.
                    job.done.set_result(StepResult(events=stream.take_notices()))
                    continue
                output = result.outputs.get(stream.call_id)
                if output is None and stream.call_id in frames:
                    self._rejoin(stream)
                if output is not None and output.error:
                    job.done.set_exception(WorkerError(output.error))
                    continue
                try:
                    step = stream.finish(output) if output else StepResult()
                except Exception as exc:  # a fault in one call's output fails that call alone
                    log.exception("call %s: its step's output failed", stream.call_id)
                    job.done.set_exception(exc)
                    continue
                step.events[:0] = stream.take_notices()
                job.done.set_result(step)
            if self._pending or self._changes:
                self._wake.set()

    def _rejoin(self, stream: MoshiStream) -> None:
        """The worker stepped without this call, so it does not hold it (a shared worker lets a
        call go that no tick named for a while): it joins again, with fresh model state, and
        hears why."""
        log.warning("call %s: the model worker no longer held it; joining again", stream.call_id)
        self.change(Change("join", stream.call_id))
        message = "the model's worker had let this call go: its model state starts afresh"
        stream.notices.append(ModelUnavailable(message))
        if stream.response_id is not None:
            stream.notices.append(ResponseFinished(stream.response_id))
        stream.response_id, stream.quiet = None, 0

    async def _step_failed(self, exc: Exception, batch: dict[MoshiStream, _Job]) -> None:
        """A step the worker could not run (out of memory, say) is a frame of silence for each
        of its calls, which hear ``model_unavailable`` once per run of failures; the calls go
        on. A worker whose steps keep failing is replaced."""
        self._failed_ticks += 1
        log.error("moshi step failed (%d in a row): %s", self._failed_ticks, exc)
        if self._failed_ticks >= MAX_FAILED_TICKS:
            self._failed_ticks = 0
            died = WorkerError(f"{MAX_FAILED_TICKS} steps in a row failed, the last: {exc}")
            await self._replace_worker(died, batch)
            return
        if self._failed_ticks == 1:
            for stream in batch:
                stream.notices.append(ModelUnavailable(f"the model's step failed: {exc}"))
        self._answer_silence(batch)

    def _answer_silence(self, batch: dict[MoshiStream, _Job]) -> None:
        silence = np.zeros(self.frame_samples, np.int16)
        for stream, job in batch.items():
            if not job.done.done():
                job.done.set_result(StepResult(audio=silence, events=stream.take_notices()))

    async def _replace_worker(self, died: WorkerError, batch: dict[MoshiStream, _Job]) -> None:
        """The worker died: start another and rejoin every call with fresh model state; the
        calls stay up, and each hears ``model_unavailable`` at once, not once the new worker has
        loaded. If no worker starts, the calls' next steps fail (the calls end)."""
        log.error("%s; starting another", died)
        message = "the model's worker restarted: this call's model state starts afresh"
        for stream in self._streams:
            # The response Moshi was speaking is over; the call hears why with its next step.
            stream.notices.append(ModelUnavailable(message))
            if stream.response_id is not None:
                stream.notices.append(ResponseFinished(stream.response_id))
            stream.response_id, stream.quiet = None, 0
        self._answer_silence(batch)
        try:
            self.worker = await self.worker.replacement([s.call_id for s in self._streams])
        except Exception as exc:
            log.error("no model worker: %s", exc)
            _fail(self._pending, exc)
            self._pending = {}
            await asyncio.sleep(RESTART_BACKOFF_S)  # before the next call's tick tries again
            return
        # Every live call joins the new worker before anything else it asked for.
        pending = [c for c in self._changes if c.kind != "join"]
        self._changes = [Change("join", s.call_id) for s in self._streams] + pending
        self._wake.set()


def _fail(batch: dict[MoshiStream, _Job], exc: Exception) -> None:
    for job in batch.values():
        if not job.done.done():
            job.done.set_exception(exc)


@dataclass(eq=False)
class MoshiStream(ContinuousStream):
    backend: MoshiBackend
    call_id: str
    closed: bool = False
    response_id: str | None = None
    quiet: int = 0
    #: How many times the call was reset: a step sent before the last reset is dropped.
    resets: int = 0
    #: Events for the call's next step from outside the model (its worker was replaced).
    notices: list[ModelEvent] = field(default_factory=list)

    def take_notices(self) -> list[ModelEvent]:
        notices, self.notices = self.notices, []
        return notices

    async def step(self, pcm: np.ndarray) -> StepResult:
        return await self.backend.submit(self, pcm)

    async def steer(self, steering: Steering) -> None:
        if steering.instructions:
            self.backend.change(Change("steer", self.call_id, steering.instructions))

    async def reset(self) -> None:
        self.response_id = None
        self.resets += 1
        self.backend.change(Change("reset", self.call_id))

    async def close(self) -> None:
        self.closed = True
        self.backend._streams.pop(self, None)
        self.backend.change(Change("leave", self.call_id))

    def finish(self, output: CallOutput) -> StepResult:
        """One frame's output from the worker as the call's events see it."""
        audio = (
            np.frombuffer(output.audio, np.int16)
            if output.audio
            else np.zeros(self.backend.frame_samples, np.int16)
        )
        text = output.text
        events: list[Any] = []
        if text:
            self.quiet = 0
            if self.response_id is None:
                self.response_id = new_id("resp")
        elif self.response_id is not None:
            self.quiet += 1
            if self.quiet >= _QUIET_FRAMES_END_TEXT:
                events.append(ResponseFinished(self.response_id))
                rid, self.response_id = self.response_id, None
                return StepResult(audio=audio, response_id=rid, events=events)
        return StepResult(audio=audio, text=text, response_id=self.response_id, events=events)

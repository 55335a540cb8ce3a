"""``local``, the default model: an offline voice assistant built from parts whose weights ship
inside their wheels. It hears with pocketsphinx (streaming while the caller speaks, so the
transcript is ready when the turn ends), replies with a small deterministic policy
(``local_policy``) and speaks with espeak-ng.

Everything heavy runs off the event loop: recognition in ASR worker processes (pocketsphinx
holds the GIL while it decodes), synthesis on the single thread libespeak-ng allows. Each
call's jobs run in order on its own worker task.
Replies are synthesized a sentence at a time, about a second and a half ahead of playback, so a
change of voice, speed or instructions mid-response (steering) applies to the rest of it, and a
cancel has little to throw away. Audio goes out one word per step, each with its text, so the
session can align the transcript with what was played.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from s2s.backends import local_policy as policy
from s2s.backends.base import (
    InputTranscribed,
    ModelEvent,
    ResponseFinished,
    ResponseRequest,
    Steering,
    StepResult,
    ToolCalled,
)
from s2s.log import CallLogger
from s2s.speech import asr
from s2s.speech.asr import ASR_RATE, AsrWorkers, dither
from s2s.speech.espeak import Espeak, Speech

log = logging.getLogger(__name__)

_FRAME = ASR_RATE // 50  # 20 ms
_FEED_FRAMES = 5  # the recognizer is fed 100 ms at a time while the caller speaks
_PREFIX_FRAMES = 15  # 300 ms of audio before the VAD's onset go to the recognizer too
_MAX_TURN_FRAMES = 1500  # 30 s of uncommitted audio kept for push-to-talk
_SYNTH_AHEAD_S = 1.5


@dataclass(eq=False)
class _Plan:
    response_id: str
    sentences: collections.deque[str]
    style: policy.Style
    voice: str
    speed: float
    audio: bool
    first: bool = True


@dataclass(eq=False)
class _Pacing:
    handed_samples: int = 0
    since: float | None = None


class LocalBackend:
    name = "local"
    turn_based = True
    steers = True
    input_rate = ASR_RATE
    frame_samples = _FRAME

    def __init__(self, espeak: Espeak) -> None:
        self.output_rate = espeak.rate
        self.espeak = espeak
        self.tts = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="local-tts")
        self.asr = AsrWorkers(processes=max(1, min(2, os.cpu_count() or 1)))

    @classmethod
    async def load(cls) -> LocalBackend:
        loop = asyncio.get_running_loop()
        espeak = await loop.run_in_executor(None, Espeak.shared)
        backend = cls(espeak)
        await backend.asr.start()
        return backend

    async def open_stream(self, call_id: str) -> LocalStream:
        return LocalStream(self, call_id)

    async def close(self) -> None:
        self.tts.shutdown(wait=True, cancel_futures=True)
        self.asr.close()


class LocalStream:
    def __init__(self, backend: LocalBackend, call_id: str) -> None:
        self._b = backend
        self._call_id = call_id
        self._asr = backend.asr.assign()
        self._log = CallLogger(log, call_id)
        self._rng = np.random.default_rng()
        self._turn: collections.deque[np.ndarray] = collections.deque(maxlen=_MAX_TURN_FRAMES)
        self._feed: list[np.ndarray] = []
        self._streaming = False
        self._transcripts: dict[str, str] = {}
        self._jobs: asyncio.Queue[tuple[Callable[..., Awaitable[None]], tuple[Any, ...]]]
        self._jobs = asyncio.Queue()
        self._out: collections.deque[StepResult] = collections.deque()
        self._events: list[ModelEvent] = []
        self._generation = 0
        self._plan: _Plan | None = None
        self._synthesizing = False
        self._pacing = _Pacing()
        self._worker = asyncio.create_task(self._work(), name=f"{call_id}/local")

    # -- the streaming interface -------------------------------------------------------------

    async def step(self, pcm: np.ndarray) -> StepResult:
        pcm = dither(pcm, self._rng)
        self._turn.append(pcm)
        if self._streaming:
            self._feed.append(pcm)
            if len(self._feed) >= _FEED_FRAMES:
                self._enqueue(self._asr_feed, self._take_feed())
        self._maybe_synthesize()
        result = self._out.popleft() if self._out else StepResult()
        if result.audio.size:
            loop = asyncio.get_running_loop()
            if self._pacing.since is None:
                self._pacing.since = loop.time()
            self._pacing.handed_samples += result.audio.size
        if self._events:
            result = StepResult(
                result.audio, result.text, result.response_id, self._events + result.events
            )
            self._events = []
        return result

    async def speech_started(self, item_id: str, since_ms: int) -> None:
        if not self._streaming:
            self._streaming = True
            prefix = list(self._turn)[-_PREFIX_FRAMES:]
            self._enqueue(self._asr_start, _join(prefix))

    async def commit(self, item_id: str) -> None:
        if self._streaming:
            self._enqueue(self._asr_finish, item_id, self._take_feed(), None)
        else:
            self._enqueue(self._asr_finish, item_id, _join([]), _join(list(self._turn)))
        self._streaming = False
        self._turn.clear()

    async def clear_input(self) -> None:
        if self._streaming:
            self._enqueue(self._asr_finish, None, _join([]), None)
        self._streaming = False
        self._feed.clear()
        self._turn.clear()

    async def respond(self, request: ResponseRequest) -> None:
        self._generation += 1
        self._enqueue(self._plan_reply, request, self._generation)

    async def steer(self, steering: Steering) -> None:
        plan = self._plan
        if plan is None:
            return
        if steering.voice is not None:
            plan.voice = steering.voice
        if steering.speed is not None:
            plan.speed = steering.speed
        if steering.instructions is not None:
            style = policy.Style.from_instructions(steering.instructions)
            plan.sentences = collections.deque(
                policy.restyle(list(plan.sentences), plan.style, style)
            )
            plan.style = style

    async def reset(self) -> None:
        self._generation += 1
        self._plan = None
        self._out.clear()
        self._pacing = _Pacing()

    async def close(self) -> None:
        self._worker.cancel()
        await asyncio.gather(self._worker, return_exceptions=True)
        await self._run(self._asr, asr.worker_release, self._call_id)

    def _take_feed(self) -> np.ndarray:
        pcm = _join(self._feed)
        self._feed = []
        return pcm

    # -- jobs, in order, on the call's worker ------------------------------------------------

    def _enqueue(self, job: Callable[..., Awaitable[None]], *args: Any) -> None:
        self._jobs.put_nowait((job, args))

    async def _work(self) -> None:
        while True:
            job, args = await self._jobs.get()
            try:
                await job(*args)
            except Exception:
                self._log.exception("local model job failed")

    async def _run(self, executor: concurrent.futures.Executor, fn: Callable[..., Any],
                   *args: Any) -> Any:  # fmt: skip
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    async def _asr_start(self, prefix: np.ndarray) -> None:
        await self._run(self._asr, asr.worker_start, self._call_id, prefix)

    async def _asr_feed(self, pcm: np.ndarray) -> None:
        await self._run(self._asr, asr.worker_feed, self._call_id, pcm)

    async def _asr_finish(self, item_id: str | None, rest: np.ndarray,
                          whole: np.ndarray | None) -> None:  # fmt: skip
        if whole is not None:
            await self._run(self._asr, asr.worker_start, self._call_id, whole)
        text = await self._run(self._asr, asr.worker_finish, self._call_id, rest)
        if item_id is not None:
            self._transcripts[item_id] = text
            self._events.append(InputTranscribed(item_id, text))

    async def _plan_reply(self, request: ResponseRequest, generation: int) -> None:
        if generation != self._generation:
            return
        reply = policy.reply(
            request.conversation,
            request.instructions,
            request.trigger,
            self._transcripts,
            request.pictures,
            request.tools,
            request.tool_required,
        )
        if reply.tool_call is not None:
            call, rid = reply.tool_call, request.response_id
            self._out.append(StepResult(response_id=rid, events=[
                ToolCalled(rid, call.name, call.arguments), ResponseFinished(rid),
            ]))  # fmt: skip
            return
        self._plan = _Plan(
            response_id=request.response_id, sentences=collections.deque(reply.sentences),
            style=reply.style, voice=request.voice, speed=request.speed,
            audio="audio" in request.modalities,
        )  # fmt: skip
        self._pacing = _Pacing()
        self._synthesizing = True
        await self._synthesize(generation)

    def _maybe_synthesize(self) -> None:
        plan = self._plan
        if plan is None or self._synthesizing:
            return
        pacing = self._pacing
        played_s = 0.0 if pacing.since is None else asyncio.get_running_loop().time() - pacing.since
        ahead_s = (
            pacing.handed_samples / self._b.output_rate
            - played_s
            + _queued_s(self._out, self._b.output_rate)
        )
        if ahead_s < _SYNTH_AHEAD_S:
            self._synthesizing = True
            self._enqueue(self._synthesize, self._generation)

    async def _synthesize(self, generation: int) -> None:
        try:
            plan = self._plan
            if plan is None or generation != self._generation:
                return
            sentence = plan.sentences.popleft() if plan.sentences else ""
            text = sentence if plan.first else " " + sentence
            plan.first = False
            segments: list[StepResult] = []
            if sentence and plan.audio:
                speak = functools.partial(
                    self._b.espeak.synthesize, voice=plan.style.voice(plan.voice), speed=plan.speed
                )
                speech = await self._run(self._b.tts, speak, sentence)
                if generation != self._generation:
                    return
                segments = _word_segments(speech, text, plan.response_id)
            elif sentence:
                segments = [StepResult(text=text, response_id=plan.response_id)]
            if not plan.sentences:
                self._plan = None
                segments.append(
                    StepResult(response_id=plan.response_id,
                               events=[ResponseFinished(plan.response_id)])
                )  # fmt: skip
            self._out.extend(segments)
        finally:
            self._synthesizing = False


def _join(frames: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(frames) if frames else np.zeros(0, np.int16)


def _queued_s(out: collections.deque[StepResult], rate: int) -> float:
    return sum(r.audio.size for r in out) / rate


def _word_segments(speech: Speech, text: str, response_id: str) -> list[StepResult]:
    """One step result per word: the word's sound and the text from it to the next word."""
    offset = len(text) - len(text.lstrip(" "))
    words = speech.words
    if not words:
        return [StepResult(audio=speech.pcm, text=text, response_id=response_id)]
    cuts = [0] + [w.sample for w in words[1:]] + [speech.pcm.size]
    starts = [0] + [w.start + offset for w in words[1:]] + [len(text)]
    return [
        StepResult(audio=speech.pcm[cuts[i] : cuts[i + 1]], text=text[starts[i] : starts[i + 1]],
                   response_id=response_id)
        for i in range(len(words))
    ]  # fmt: skip

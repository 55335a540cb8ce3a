"""``moshi:PATH_OR_HUB_ID``: kyutai's full-duplex Moshi through transformers, many calls per step.

Moshi listens and speaks at once in 80 ms frames (1920 samples at 24 kHz). Every call sends one
frame per 80 ms; the backend's scheduler ticks once per frame period and runs one batched step
for every call whose frame is waiting, on the device's single thread (``MoshiEngine``), so one
GPU serves many calls in one forward. A frame waits at most one period for its tick; joins,
leaves and resets are applied between steps, so no call waits for another's join.

Mimi (the codec) is batched too: one streaming encoder and decoder whose rows are the calls
(``mimi_stream``); calls whose frame is not waiting at a tick keep their codec state untouched.

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
import concurrent.futures
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from s2s.backends.base import ContinuousStream, ResponseFinished, Steering, StepResult
from s2s.backends.mimi_stream import MimiStreamDecoder, MimiStreamEncoder
from s2s.backends.moshi_engine import MoshiEngine, Row
from s2s.protocol import new_id

log = logging.getLogger(__name__)

_QUIET_FRAMES_END_TEXT = 12  # ~1 s without text closes the transcript's response


def pick_device_and_dtype(device: str | None) -> tuple[str, Any]:
    import torch

    chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if chosen.startswith("cuda") else torch.float32
    return chosen, dtype


@dataclass(eq=False)
class _Job:
    pcm: np.ndarray
    done: asyncio.Future[StepResult]


class MoshiBackend:
    name = "moshi"
    turn_based = False

    def __init__(self, model: Any, tokenizer: Any | None, device: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.sentencepiece = tokenizer is not None and any(
            piece.startswith("▁") for piece in tokenizer.get_vocab()
        )
        self.device = device
        self.input_rate = self.output_rate = int(model.config.sampling_rate)
        self.frame_samples = int(self.input_rate / model.config.audio_encoder_config.frame_rate)
        self.engine = MoshiEngine(model)
        # One codec batch for every call: row i of the encoder and decoder is codec_rows[i].
        self.encoder = MimiStreamEncoder(model.audio_encoder, batch_size=0)
        self.decoder = MimiStreamDecoder(model.audio_encoder, batch_size=0)
        self.codec_rows: list[MoshiStream] = []
        self.executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"moshi-{device}"
        )
        self._pending: dict[MoshiStream, _Job] = {}
        self._changes: list[tuple[str, MoshiStream]] = []
        self._wake = asyncio.Event()
        self._scheduler = asyncio.create_task(self._schedule(), name="moshi/scheduler")

    @classmethod
    async def load(cls, location: str, device: str | None = None) -> MoshiBackend:
        loop = asyncio.get_running_loop()
        model, tokenizer, chosen = await loop.run_in_executor(None, _load, location, device)
        return cls(model, tokenizer, chosen)

    async def open_stream(self, call_id: str) -> MoshiStream:
        stream = MoshiStream(self, call_id)
        self._change("join", stream)
        return stream

    async def close(self) -> None:
        self._scheduler.cancel()
        await asyncio.gather(self._scheduler, return_exceptions=True)
        self.executor.shutdown(wait=True, cancel_futures=True)

    # -- scheduling --------------------------------------------------------------------------

    def submit(self, stream: MoshiStream, pcm: np.ndarray) -> asyncio.Future[StepResult]:
        done: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        self._pending[stream] = _Job(pcm, done)
        self._wake.set()
        return done

    def _change(self, kind: str, stream: MoshiStream) -> None:
        self._changes.append((kind, stream))
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
            changes, self._changes = self._changes, []
            try:
                results = await loop.run_in_executor(self.executor, self._run, batch, changes)
            except Exception as exc:
                log.exception("moshi step failed")
                for job in batch.values():
                    if not job.done.done():
                        job.done.set_exception(exc)
                continue
            for stream, job in batch.items():
                if not job.done.done():
                    job.done.set_result(results.get(stream, StepResult()))
            if self._pending or self._changes:
                self._wake.set()

    def _run(self, batch: dict[MoshiStream, _Job],
             changes: list[tuple[str, MoshiStream]]) -> dict[MoshiStream, StepResult]:  # fmt: skip
        """One scheduler tick on the device thread: apply joins/leaves/resets, then step.

        Mimi encode, the language model and Mimi decode each run once for all waiting calls.
        """
        import torch

        for kind, stream in changes:
            self._apply(kind, stream)
        ready = sorted(
            ((s, s.row) for s in batch if s.row is not None and not s.closed),
            key=lambda pair: self.codec_rows.index(pair[0]),
        )
        if not ready:
            return {}
        model = self.model
        with torch.inference_mode():
            pcm = np.stack([batch[s].pcm for s, _ in ready]).astype(np.float32) / 32768
            audio = torch.from_numpy(pcm).to(model.device, model.dtype)[:, None, :]
            indexes = torch.tensor([self.codec_rows.index(s) for s, _ in ready])
            codes = self.encoder.step(audio, indexes)[:, : self.engine.k, 0]
            outputs = self.engine.step({row: codes[i] for i, (_, row) in enumerate(ready)})
            speaking = [(s, c) for s, row in ready if (c := outputs[row].codes) is not None]
            waves: dict[MoshiStream, np.ndarray] = {}
            if speaking:
                frames = torch.stack([c for _, c in speaking])[:, :, None]
                rows = torch.tensor([self.codec_rows.index(s) for s, _ in speaking])
                decoded = self.decoder.step(frames, rows).float().clamp(-1, 1) * 32767
                samples = decoded.reshape(len(speaking), -1).cpu().numpy().astype(np.int16)
                waves = {s: samples[i] for i, (s, _) in enumerate(speaking)}
            return {s: s.finish(outputs[row], waves.get(s)) for s, row in ready}

    def _apply(self, kind: str, stream: MoshiStream) -> None:
        """A join, leave, reset or steer of ``stream``, between steps on the device thread."""
        if kind == "join" and not stream.closed:
            stream.row = self.engine.join(stream.call_id)
            self.codec_rows.append(stream)
            self.encoder.add_row()
            self.decoder.add_row()
        elif kind == "leave" and stream.row is not None:
            self.engine.leave(stream.row)
            stream.row = None
            index = self.codec_rows.index(stream)
            self.codec_rows.pop(index)  # the codec's later rows move down by one, as this list
            self.encoder.remove_row(index)
            self.decoder.remove_row(index)
        elif kind == "reset" and stream.row is not None:
            self.engine.reset(stream.row)
            index = self.codec_rows.index(stream)
            self.encoder.reset(index)
            self.decoder.reset(index)
        elif kind == "steer" and stream.row is not None:
            stream.row.forced_text = list(stream.forced)


@dataclass(eq=False)
class MoshiStream(ContinuousStream):
    backend: MoshiBackend
    call_id: str
    row: Row | None = None
    closed: bool = False
    response_id: str | None = None
    quiet: int = 0
    forced: list[int] = field(default_factory=list)

    async def step(self, pcm: np.ndarray) -> StepResult:
        return await self.backend.submit(self, pcm)

    async def steer(self, steering: Steering) -> None:
        tokenizer = self.backend.tokenizer
        if steering.instructions and tokenizer is not None:
            self.forced = list(tokenizer.encode(steering.instructions, add_special_tokens=False))
            self.backend._change("steer", self)

    async def reset(self) -> None:
        self.response_id = None
        self.backend._change("reset", self)

    async def close(self) -> None:
        self.closed = True
        self.backend._change("leave", self)

    # -- on the device thread ----------------------------------------------------------------

    def finish(self, output: Any, wave: np.ndarray | None) -> StepResult:
        audio = wave if wave is not None else np.zeros(self.backend.frame_samples, np.int16)
        text = self._text(output.text_token)
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

    def _text(self, token: int) -> str:
        tokenizer = self.backend.tokenizer
        if tokenizer is None or token in tokenizer.all_special_ids:
            return ""
        piece: str = tokenizer.convert_ids_to_tokens(token)
        # SentencePiece marks a word's start with "▁"; a word-level vocabulary has whole words.
        return piece.replace("▁", " ") if self.backend.sentencepiece else " " + piece


def _load(location: str, device: str | None) -> tuple[Any, Any | None, str]:
    from transformers import AutoTokenizer, MoshiForConditionalGeneration

    chosen, dtype = pick_device_and_dtype(device)
    model: Any = MoshiForConditionalGeneration.from_pretrained(location, dtype=dtype)
    model = model.to(chosen).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError):
        log.info("no tokenizer at %s: Moshi's text stream will not be transcribed", location)
        tokenizer = None
    return model, tokenizer, chosen

"""Qwen3-Omni on its device: the worker side of ``qwen3-omni:PATH_OR_HUB_ID``.

``OmniWorker.handle`` applies a tick's changes (a ``respond`` queues the call's turn; a reset or
leave cancels the call's response at once), runs one piece of the oldest queued turn's prefill
(the prompt built from the turns it carries, at most ``prefill_tokens`` of its positions per
tick, 512 by default), and then runs one step of ``s2s.omni.engine.OmniEngine`` for every call
that is answering: each gets the text its step made and, once speech has started, one 80 ms
frame of audio. A turn joins the steps once its prefill is complete, after as many ticks as its
prompt has pieces; so a new turn delays the others' next frame by one piece at most, however
long its history, and a burst of turns is admitted one after another, oldest first. A turn waits
in the queue while every slot is answering. What the outputs mean for a call's events is the
server's business (``s2s.backends.qwen3_omni``). Each response samples with its own seed
(``response_seed``), so it does not depend on the calls answered beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s2s.omni.engine import OmniEngine
from s2s.omni.media import Media
from s2s.omni.model import load_model
from s2s.omni.prompt import AUDIO_RATE, Message, Prompter
from s2s.omni.request import (
    MAX_FRAMES,
    MAX_TEXT_TOKENS,
    RESIDUAL_SAMPLING,
    TALKER_SAMPLING,
    Decoding,
    Request,
    cache_positions,
)
from s2s.omni.sampling import Sampling
from s2s.worker.messages import CallOutput, Change, Hello, Respond, Tick, TickResult, Turn
from s2s.worker.process import give_up_if_lost, pick_device_and_dtype

log = logging.getLogger(__name__)

#: The caller's audio comes in 20 ms frames at Whisper's rate.
FRAME_SAMPLES = AUDIO_RATE // 50
#: Prompt budget: the oldest turns are left out of a prompt longer than this.
PROMPT_TOKENS = 8192
#: Over budget, a prompt's oldest turns are left out until it is within this share of it, and
#: its next turns start from there until the budget is reached again (the Realtime API's
#: ``retention_ratio``), so a call's kept cache matches all but the new turn.
PROMPT_RETAIN = 0.8
#: Prompt positions prefilled per tick: what a new turn may add to the others' step time.
PREFILL_TOKENS = 512


class OmniWorker:
    """Every call's Qwen3-Omni state on one device; each tick is one decode step for all."""

    def __init__(
        self, model: Any, prompter: Prompter, device: str, max_calls: int,
        limits: dict[str, Any] | None = None, prefill_tokens: int = PREFILL_TOKENS,
        graphs: bool = False, prompt_tokens: int = PROMPT_TOKENS,
    ) -> None:  # fmt: skip
        """``graphs``: replay the steps from CUDA graphs (``--cuda-graphs on``); if they cannot
        be set up, the worker says why in its log and steps eagerly. ``prompt_tokens``: the
        prompt budget; every slot's caches are allocated now to hold such a prompt and the
        longest reply, and a respond's larger budget is cut to it."""
        limits = limits or {}
        self.prefill_tokens = prefill_tokens
        self.prompt_tokens = prompt_tokens
        self.model = model
        self.prompter = prompter
        self.device = device
        # generate()'s defaults unless the checkpoint's generation_config.json says otherwise
        # (the tiny test checkpoint does: its random model never stops by itself).
        self.max_text_tokens = int(limits.get("thinker_max_new_tokens", MAX_TEXT_TOKENS))
        self.max_frames = int(limits.get("talker_max_new_tokens", MAX_FRAMES))
        self.decoding = decoding_from(limits)
        positions = cache_positions(prompt_tokens, self.max_text_tokens, self.max_frames)
        try:
            self.engine = _engine(model, max_calls, graphs, positions, self.decoding)
        except torch.OutOfMemoryError as exc:
            raise RuntimeError(
                f"the key/value caches of {max_calls} calls do not fit beside the model "
                f"({positions[0]} thinker and {positions[1]} talker positions each, for a "
                f"{prompt_tokens}-token prompt and the longest reply): lower --max-sessions or "
                f"--prompt-tokens"
            ) from exc
        cached = self.engine.thinker_cache.nbytes + self.engine.talker_cache.nbytes
        log.info(
            "key/value caches: %d slots of %d thinker and %d talker positions, %.2f GiB",
            max_calls, *positions, cached / 2**30,
        )  # fmt: skip
        self.max_calls = max_calls
        speakers = list(model.config.talker_config.speaker_id)
        self.speakers = {name.lower(): name for name in speakers}
        # generate()'s default voice where the checkpoint has it (OpenAI's voice names are not
        # the model's: "alloy" gets it too).
        self.default_speaker = self.speakers.get("ethan", speakers[0])
        #: Every joined call's state between its turns.
        self.calls: dict[str, _Call] = {}
        #: Turns waiting for their prefill, oldest first (one call appears at most once).
        self.waiting: dict[str, Respond] = {}
        #: The engine row answering each call, and what the row was asked.
        self.answering: dict[str, int] = {}
        self.rows: dict[int, _Answer] = {}

    @classmethod
    def load(cls, location: str, device: str | None, max_calls: int,
             prefill_tokens: int = PREFILL_TOKENS, graphs: bool = False,
             prompt_tokens: int = PROMPT_TOKENS) -> OmniWorker:  # fmt: skip
        chosen, dtype = pick_device_and_dtype(device)
        model = load_model(location, chosen, dtype)
        prompter = Prompter.from_pretrained(location)
        config = Path(location) / "generation_config.json"
        limits = json.loads(config.read_text()) if config.is_file() else {}
        log.info("loaded %s on %s (%s)", location, chosen, dtype)
        return cls(model, prompter, chosen, max_calls, limits, prefill_tokens, graphs,
                   prompt_tokens)  # fmt: skip

    def hello(self, spec: str) -> Hello:
        return Hello(
            model=spec, device=self.device, input_rate=AUDIO_RATE, output_rate=24_000,
            frame_samples=FRAME_SAMPLES, slots=self.max_calls,
        )  # fmt: skip

    def handle(self, tick: Tick) -> TickResult:
        started = time.perf_counter()
        outputs: dict[str, CallOutput] = {}
        for change in tick.changes:
            try:
                self._apply(change)
            except Exception as exc:  # one call's change must not cost the others theirs
                log.exception("call %s: %s failed", change.call, change.kind)
                self._give_up_if_lost(exc)
                if change.respond is not None:
                    self._fail(outputs, change.call, change.respond.response_id, exc)
        self._prefill(outputs)
        if self.engine.active:
            try:
                steps = self.engine.step()
            except Exception as exc:  # out of memory, say: these responses end, the rest go on
                log.exception("the step failed; the responses it was making end")
                self._give_up_if_lost(exc)
                for call, row in list(self.answering.items()):
                    if row in self.engine.rows:
                        self._fail(outputs, call, self.rows[row].response_id, exc)
                        self._forget(call)
                self.engine.abandon()
                steps = []
            for step in steps:
                answer = self.rows.get(step.row)
                if answer is None:  # cancelled before this step
                    continue
                output = CallOutput(text=answer.text(self.prompter.tokenizer, step.text),
                                    response_id=answer.response_id)  # fmt: skip
                if step.audio is not None:
                    pcm = (step.audio.float().clamp(-1, 1) * 32767).to(torch.int16)
                    output.audio = pcm.cpu().numpy().tobytes()
                if step.done:
                    output.done = step.reason or "stop"
                    self._forget(answer.call)
                outputs[answer.call] = output
        return TickResult(outputs, step_ms=1000 * (time.perf_counter() - started))

    def _apply(self, change: Change) -> None:
        """A join, leave, reset or respond, between steps."""
        call = change.call
        if change.kind == "join":
            self.calls.setdefault(call, _Call())
        elif change.kind in ("leave", "reset"):
            self._cancel(call)  # a reset (barge-in) keeps the cache for the turn that follows
            if change.kind == "leave":
                self.calls.pop(call, None)
                self.engine.forget(call)
        elif change.kind == "respond" and change.respond is not None:
            if call not in self.calls:  # evicted, or this worker restarted: the edge rejoins
                raise ValueError(f"call {call} has not joined this worker")
            self._cancel(call)
            self.waiting[call] = change.respond
            # Kept now: a respond that replaces this one before its prefill may refer to it.
            self.calls[call].keep(change.respond.turns)

    def _prefill(self, outputs: dict[str, CallOutput]) -> None:
        """One piece of the oldest turn's prefill, beginning the next queued turn if none is
        under way; a turn that fails is answered at once with its error."""
        # A turn whose call's reply was just cancelled waits for the step that ends it, which
        # leaves the call's caches for the turn to take (``OmniEngine.begin``).
        ending = {r.request.conversation for r in self.engine.rows.values() if r.cancelled}
        ready = ((c, r) for c, r in self.waiting.items() if c not in ending)
        if not self.engine.prefilling and self.engine.free and (turn := next(ready, None)):
            call, respond = turn
            del self.waiting[call]
            try:
                self._respond(call, respond)
            except (RuntimeError, ValueError) as exc:  # a prompt over budget, a bad request...
                self._give_up_if_lost(exc)  # (a CUDA error is a RuntimeError too)
                self._fail(outputs, call, respond.response_id, exc)
            except Exception as exc:  # a fault in one call's prompt fails its turn, not all
                log.exception("call %s: building the prompt failed", call)
                self._give_up_if_lost(exc)
                self._fail(outputs, call, respond.response_id, exc)
        for row in self.engine.prefilling[:1]:
            answer = self.rows.get(row)
            if answer is None:  # no turn of this worker's (it cannot be stepped): let it go
                self.engine.cancel(row)
                continue
            try:
                self.engine.prefill(row, answer.prefill_tokens or self.prefill_tokens)
            except Exception as exc:  # a bad picture...: the engine has dropped the row
                if not isinstance(exc, RuntimeError | ValueError):
                    log.exception("call %s: the prefill failed", answer.call)
                self._give_up_if_lost(exc)
                self._forget(answer.call)
                self._fail(outputs, answer.call, answer.response_id, exc)

    def _give_up_if_lost(self, exc: Exception) -> None:
        """Raise ``DeviceLost`` if ``exc`` left the device unusable: every step and prefill
        from now on would fail too, so this worker ends, and its server starts another (the
        calls rejoining it)."""
        give_up_if_lost(self.engine.device, exc)

    @staticmethod
    def _fail(outputs: dict[str, CallOutput], call: str, response_id: str, exc: Exception) -> None:
        log.warning("call %s: response %s failed: %s", call, response_id, exc)
        outputs[call] = CallOutput(response_id=response_id, done=f"failed: {exc}")

    def _respond(self, call: str, respond: Respond) -> None:
        state = self.calls[call]
        messages = [state.message(turn) for turn in respond.turns]
        # What the caches were allocated for bounds what an edge may ask.
        budget = min(respond.prompt_tokens or self.prompt_tokens, self.prompt_tokens)
        first = 1 if messages and messages[0].role == "system" else 0
        # The turns before the last prompt's start stay out: found by its item id (none if that
        # turn is gone), or for turns without one, counted.
        item, dropped = state.start
        if item:
            found = (i for i, m in enumerate(messages[first:]) if m.item == item)
            dropped = next(found, 0)
        if not respond.truncate:
            dropped = 0  # the whole conversation, or an error
        retain = PROMPT_RETAIN if respond.retain is None else respond.retain
        inputs, dropped = self.prompter.fit(
            messages, budget, dropped, retain, state.media, truncate=respond.truncate,
            post_instructions=respond.post_instructions or None,
        )  # fmt: skip
        start = messages[first + dropped].item if first + dropped < len(messages) else ""
        state.start = (start, dropped)
        speaker = self.speakers.get(respond.voice.lower(), self.default_speaker)
        count, state.responses = state.responses, state.responses + 1
        request = Request(
            inputs, speaker=speaker, speak=respond.speak, max_text_tokens=self.max_text_tokens,
            max_frames=self.max_frames, decoding=self.decoding, seed=response_seed(call, count),
            conversation=call, media=state.media.latest,
        )  # fmt: skip
        row = self.engine.begin(request)
        self.answering[call] = row
        self.rows[row] = _Answer(call, respond.response_id, respond.prefill_tokens)

    def _cancel(self, call: str) -> None:
        self.waiting.pop(call, None)
        row = self.answering.get(call)
        if row is not None:
            if row in self.engine.rows or row in self.engine.prefills:
                self.engine.cancel(row)
            self._forget(call)

    def _forget(self, call: str) -> None:
        row = self.answering.pop(call, None)
        if row is not None:
            self.rows.pop(row, None)


def _engine(
    model: Any, max_calls: int, graphs: bool, positions: tuple[int, int], decoding: Decoding
) -> OmniEngine:
    """The engine, with CUDA graphs if asked, every shape its replies (decoding as
    ``decoding``) can meet captured now; if they cannot be set up or captured, it says why in
    the log and steps eagerly."""
    if not graphs:
        return OmniEngine(model, max_rows=max_calls, positions=positions)
    try:
        engine = OmniEngine(model, max_rows=max_calls, graphs=True, positions=positions)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError) as exc:  # no CUDA here
        engine = OmniEngine(model, max_rows=max_calls, positions=positions)
        return _eager(engine, exc)
    started = time.perf_counter()
    try:
        count = engine.capture(decoding)
    except (RuntimeError, ValueError) as exc:  # out of memory among them: graphs hold some
        return _eager(engine, exc)
    log.info("captured %d step graphs in %.1f s", count, time.perf_counter() - started)
    return engine


def _eager(engine: OmniEngine, exc: Exception) -> OmniEngine:
    log.error("CUDA graphs failed (%s); steps run eagerly", exc)
    engine.graphs, engine.graphs_failed = None, f"{type(exc).__name__}: {exc}"
    return engine


def decoding_from(config: dict[str, Any]) -> Decoding:
    """How replies pick their tokens: ``generate()``'s talker settings (``talker_do_sample``,
    ``talker_temperature``, ``talker_top_k``, ``talker_top_p``, ``talker_repetition_penalty``)
    where the checkpoint's ``generation_config.json`` gives them, else ``generate()``'s
    defaults. A greedy talker has a greedy code predictor, as ``generate()`` passes the talker's
    ``do_sample`` on to it. (The tiny test checkpoint's talker is greedy, so a test's reply does
    not depend on its call's random id.)"""
    default = TALKER_SAMPLING
    speech = residual = None
    if config.get("talker_do_sample", True):
        speech = Sampling(
            temperature=float(config.get("talker_temperature", default.temperature)),
            top_k=int(config.get("talker_top_k", default.top_k)),
            top_p=float(config.get("talker_top_p", default.top_p)),
        )
        residual = RESIDUAL_SAMPLING
    penalty = float(config.get("talker_repetition_penalty", Decoding().repetition_penalty))
    return Decoding(speech=speech, residual=residual, repetition_penalty=penalty)


def response_seed(call: str, index: int) -> int:
    """The sampling seed of ``call``'s response number ``index`` (from 0): a hash of the two that
    is the same in every process and run (Python's ``hash()`` of a string is not)."""
    digest = hashlib.blake2b(f"{call}\n{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # below 2**63, as Request wants


@dataclass(slots=True)
class _Call:
    """One joined call's state between its turns: its responses so far (each one's seed), the
    turn its prompts start from (``PROMPT_RETAIN``), and what it was sent by item id (each
    turn's audio and pictures cross once) and has prepared and encoded (``Media``)."""

    responses: int = 0
    start: tuple[str, int] = ("", 0)  # the first kept turn's item id, and the turns before it
    heard: dict[str, bytes] = field(default_factory=dict)
    pictures: dict[str, list[bytes]] = field(default_factory=dict)
    media: Media = field(default_factory=Media)

    def keep(self, turns: list[Turn]) -> None:
        """What a respond's ``turns`` carry or name, by item id; nothing else."""
        heard, seen = self.heard, self.pictures
        named = [turn for turn in turns if turn.item]
        self.heard = {
            turn.item: turn.audio or heard[turn.item]
            for turn in named
            if turn.audio or (turn.heard and turn.item in heard)
        }
        self.pictures = {
            turn.item: seen.get(turn.item, [])[: turn.seen] + list(turn.pictures)
            for turn in named
            if len(seen.get(turn.item, [])) >= turn.seen
        }

    def message(self, turn: Turn) -> Message:
        """``turn`` as the prompt builder reads it, with its audio (int16, sent now or with an
        earlier respond) and its pictures as JPEG bytes: ``media`` converts, decodes and
        encodes only what it has not seen."""
        audio = self.heard.get(turn.item) if turn.item else None
        if audio is None and turn.heard:
            raise ValueError(f"the audio of item {turn.item} was sent to another worker")
        audio = audio or turn.audio
        if len(audio) % 2:
            raise ValueError(f"{len(audio)} bytes of audio are not 16-bit samples")
        clips = [np.frombuffer(audio, np.int16)] if audio else []
        pictures = self.pictures.get(turn.item) if turn.item else None
        if pictures is None and turn.seen:
            raise ValueError(f"the pictures of item {turn.item} were sent to another worker")
        pictures = list(turn.pictures) if pictures is None else pictures
        return Message(turn.role, turn.text, clips, pictures, item=turn.item)


class _Answer:
    """One response in progress: whose it is, and its text so far (decoded whole, so that a
    character split over tokens comes out once it is complete)."""

    def __init__(self, call: str, response_id: str, prefill_tokens: int = 0) -> None:
        self.call, self.response_id = call, response_id
        self.prefill_tokens = prefill_tokens  # 0: the worker's
        self.tokens: list[int] = []
        self.said = ""

    def text(self, tokenizer: Any, tokens: list[int]) -> str:
        if not tokens:
            return ""
        self.tokens += tokens
        whole: str = tokenizer.decode(self.tokens, skip_special_tokens=True)
        if whole.endswith("\ufffd"):  # half a character: wait for the rest
            return ""
        new, self.said = whole[len(self.said) :], whole
        return new

"""Qwen3-Omni answering many calls at once, one 80 ms codec frame of speech per step.

``OmniEngine`` runs the modules of a loaded ``Qwen3OmniMoeForConditionalGeneration`` the way its
``generate()`` chains them, but interleaved, so speech starts after the first step instead of
after the whole reply:

- ``begin(request)`` takes a slot for one call, and ``prefill(row, tokens)`` runs its prompt in
  pieces of at most ``tokens`` positions, between steps, so a long prompt does not hold the other
  calls' next frame back by all of it (``s2s.omni.prefill``): the thinker over its prompt (audio,
  pictures, earlier turns), which picks the first text token; then the talker over its own
  prompt (the user turns projected from the thinker's embeddings and hidden states, the speaker,
  the first text token), which picks the first frame's first code. Then the call steps with the
  others. ``add(request)`` does both at once, the prefill whole.
- ``step()`` advances every call by one: the thinker decodes the next text token; the talker's
  code predictor fills the residual codebooks of the frame whose first code it has, code2wav
  turns that frame into 1920 samples at once, and the talker, fed the frame and the next text
  token (one text token per frame, as ``generate()`` feeds ``trailing_text_hidden``), picks the
  next frame's first code. The talker needs text token ``j`` for frame ``j``, which the thinker
  made in the same step, so it never waits. The engine picks the step's rows and uploads their
  columns (``s2s.omni.rows``); the device work is ``s2s.omni.decode.DecodeStep``.
- ``cancel(row)`` ends a call at the next step; nothing of it is decoded after that.
- A request with a ``conversation`` key leaves its thinker cache in its slot when it ends
  (``kept``); that conversation's next request takes the slot back and prefills the thinker
  only after the prefix its prompt shares with what the slot holds. A new call takes the
  longest-kept slot when no slot is unused; ``forget(key)`` gives one up.

Calls join and leave between steps. Each owns a slot in the thinker's and the talker's key/value
caches and in code2wav's state; a step runs all stepping calls in one batch per module, and each
call's tokens and audio are what it would get alone (``tests/test_qwen3_omni.py`` checks this,
and that greedy decoding reproduces ``generate()``'s text, codes and audio).

Everything runs on the caller's thread under ``torch.inference_mode()``; nothing does I/O.
"""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import Tensor

from s2s.hosttraffic import download, split, upload, upload_flat
from s2s.omni.code2wav import Code2WavStream
from s2s.omni.decode import DecodeStep
from s2s.omni.graphs import OmniGraphs
from s2s.omni.kept import Kept, reuse_talker, reuse_thinker
from s2s.omni.predictor import CodePredictor
from s2s.omni.prefill import encode, talker_prompt
from s2s.omni.prefilling import Prefilling, prompt_inputs
from s2s.omni.request import Decoding, Request, RowStep
from s2s.omni.rows import Row, StepLayout, speech_columns
from s2s.omni.sampling import Draws
from s2s.omni.slot_owners import SlotOwners
from s2s.omni.slots import SlotCache

log = logging.getLogger(__name__)

#: The slot no call owns: padding rows run on it. It is 0 so that a zero in a slot column
#: means it (padding, and a graph capture's zeroed columns: ``s2s.omni.graphs``).
SCRATCH = 0


class OmniEngine:
    """Streaming, batched Qwen3-Omni over up to ``max_rows`` calls at once."""

    def __init__(
        self, model: Any, max_rows: int = 8, fixed_shapes: bool = False, graphs: bool = False,
        positions: tuple[int, int] | None = None,
    ) -> None:  # fmt: skip
        """``fixed_shapes``: pad each step's batches to a size of
        ``s2s.backends.graphs.BUCKETS`` and its attention spans to
        multiples of ``s2s.omni.rows.SPAN`` (what a captured step needs; the results are the same).
        ``graphs`` (a CUDA device; implies ``fixed_shapes``): replay each step's device work
        from a CUDA graph per shape (``s2s.omni.graphs``). ``positions``: each slot's capacity
        in the thinker's and the talker's caches, allocated now
        (``s2s.omni.request.cache_positions``); None: a small start that grows as calls need."""
        self.model = model
        self.max_rows = max_rows
        self.fixed_shapes = fixed_shapes or graphs
        self.config = model.config
        self.thinker = model.thinker
        self.talker = model.talker
        self.text_model = model.thinker.model.language_model
        self.device = next(model.parameters()).device
        #: Why the steps run eagerly though graphs were asked for, if they do.
        self.graphs_failed = ""
        # Slot SCRATCH is no call's: a batch's padding rows run on it (its state is garbage).
        slots = max_rows + 1
        think, talk = positions or (256, 256)
        self.thinker_cache = SlotCache(self.text_model.layers, slots, think, scratch=SCRATCH)
        self.talker_cache = SlotCache(self.talker.model.layers, slots, talk, scratch=SCRATCH)
        self.code2wav = Code2WavStream(model.code2wav, slots, scratch=SCRATCH)
        self.layout = StepLayout(
            self.thinker_cache, self.talker_cache, self.code2wav, self.fixed_shapes
        )
        self.predictor = CodePredictor(self.talker.code_predictor, self.layout.rows(max_rows))
        self.owners = SlotOwners(slots, SCRATCH, self.thinker_cache)
        #: Prompt positions whose prefill a kept cache spared, in all: the thinker's, the talker's.
        self.reused = 0
        self.talker_reused = 0
        self.rows: dict[int, Row] = {}
        self.prefills: dict[int, Prefilling] = {}
        # The thinker's hidden state that the talker's prompt reads (transformers' index).
        self.accept = int(self.config.talker_config.accept_hidden_layer)
        self._next_id = 0
        self.decode = DecodeStep(
            model, self.thinker_cache, self.talker_cache, self.code2wav, self.predictor, slots
        )
        parts = {"think": self.decode.think, "speak": self.decode.speak}
        self.graphs = OmniGraphs(parts, self.device) if graphs else None
        self.codec_end = self.decode.codec_end
        self.text_end = {self.config.im_end_token_id}

    @property
    def text_end(self) -> set[int]:
        """The text tokens that end a reply (on the host; ``DecodeStep.is_text_end`` marks them
        on the device)."""
        return self._text_end

    @text_end.setter
    def text_end(self, tokens: set[int]) -> None:
        self._text_end = set(tokens)
        self.decode.is_text_end.zero_()
        for token in tokens:
            self.decode.is_text_end[token] = True

    @property
    def free(self) -> list[int]:
        """The slots a new call may take: unused ones, and kept ones (the oldest is given up)."""
        return self.owners.free

    @property
    def kept(self) -> OrderedDict[str, Kept]:
        """Finished conversations' slots, least recently finished first
        (``Request.conversation``)."""
        return self.owners.kept

    def forget(self, conversation: str) -> None:
        """Give up ``conversation``'s kept cache (its call has ended), and keep none of a reply
        of it still under way (one cancelled ends at the next step)."""
        self.owners.forget(conversation)
        for row in self.rows.values():
            if row.request.conversation == conversation:
                row.prompt = row.talker_prompt = None

    @property
    def active(self) -> list[int]:
        """The rows (calls) still generating."""
        return list(self.rows)

    @property
    def prefilling(self) -> list[int]:
        """The rows begun whose prefill is not complete yet (they do not step)."""
        return list(self.prefills)

    def cancel(self, row: int) -> None:
        """End ``row`` at the next step: reported done ("cancelled"), it makes nothing more. A
        row still prefilling has made nothing yet: it goes at once, unreported (what its slot
        holds is kept for its conversation's next turn, as a finished reply's is)."""
        if row in self.prefills:
            self.owners.finish_prefill(self.prefills.pop(row))
            return
        if row not in self.rows:
            raise KeyError(f"no row {row} is generating")
        self.rows[row].cancelled = True

    def abandon(self) -> None:
        """Drop every stepping row at once, unreported, after a step that failed part way: their
        slots are free again and nothing of them is kept (their caches may hold half a step).
        Rows still prefilling, and kept conversations, stay."""
        for row in list(self.rows.values()):
            del self.rows[row.id]
            if row.request.conversation is not None:
                self.forget(row.request.conversation)
            self.owners.release(row.slot)

    @torch.inference_mode()
    def add(self, request: Request) -> int:
        """Prefill one call whole (``begin`` and one unlimited ``prefill``) and return its row
        id; its first text token comes with the next ``step()``. Raises ``RuntimeError`` when
        every slot is taken."""
        row = self.begin(request)
        self.prefill(row)
        return row

    def begin(self, request: Request) -> int:
        """Check one call's request and take a slot for it; returns its row id. Nothing runs
        yet: ``prefill(row, tokens)`` runs its prompt piece by piece, and the row steps with the
        others once that is complete. Raises ``RuntimeError`` when every slot is taken."""
        if not self.free:
            raise RuntimeError(f"all {self.max_rows} slots are generating")
        inputs = prompt_inputs(request, self.config, self.device, self.thinker.dtype)
        slot, kept = self.owners.take(request.conversation)
        self._next_id += 1
        self.prefills[self._next_id] = Prefilling(self._next_id, slot, request, inputs, kept=kept)
        return self._next_id

    @torch.inference_mode()
    def prefill(self, row: int, tokens: int | None = None) -> bool:
        """Run the next piece of ``row``'s prefill: at most ``tokens`` prompt positions (None:
        all that are left) of the thinker's prompt, then of the talker's. The first piece also
        runs the audio and vision encoders, once for the whole prompt. Returns True when the
        prefill is complete: the row then steps with the others from the next ``step()``. On
        an error the call is dropped (its slot freed) and the error raised."""
        state = self.prefills[row]
        try:
            if tokens is not None and tokens < 1:
                raise ValueError("a prefill piece needs at least one token")
            complete = self._prefill(state, tokens or sys.maxsize)
        except BaseException:
            self._drop(state)
            raise
        if complete and state.row is not None:
            del self.prefills[row]
            self.rows[row] = state.row
        return complete

    def _prefill(self, state: Prefilling, budget: int) -> bool:
        if state.thinker is None:
            state.thinker = encode(self.thinker, state.inputs, self.accept, state.request.media)
            reused = 0 if state.kept is None else reuse_thinker(state.thinker, state.kept)
            self.thinker_cache.clear(state.slot, keep=reused)
            self.reused += reused
        prompt = state.thinker
        while state.row is None and budget > 0:
            start, end = prompt.take(budget)
            budget -= end - start
            hidden, kept = self.thinker_cache.extend(
                self.text_model, prompt.embeds[:, start:end], prompt.positions[..., start:end],
                state.slot, prompt.visual(start, end), self.accept,
            )  # fmt: skip
            if kept is not None:
                prompt.hidden[:, start:end] = kept
            if prompt.complete:
                state.row = self._first_token(state, self.thinker.lm_head(hidden[:, -1]))
        row = state.row
        if row is None:
            return False
        if not row.thinking or not row.request.speak:
            # The talker's prompt needs a first text token that is not the last (generate()
            # fails on such a reply too), so a reply of one token is not spoken.
            return True
        if state.talker is None:
            speaker = self.config.talker_config.speaker_id[row.request.speaker.lower()]
            tts = (self.decode.tts_pad, self.decode.tts_bos, self.decode.tts_eos)
            state.talker = talker_prompt(self.model, prompt, row.first_token, speaker, tts)
            row.talker_delta = state.talker.delta
            reused = 0 if state.kept is None else reuse_talker(state.talker, state.kept)
            self.talker_cache.clear(row.slot, keep=reused)
            self.talker_reused += reused
            if row.request.conversation is not None:
                row.talker_prompt = state.talker
        talker = state.talker
        while not talker.complete and budget > 0:
            start, end = talker.take(budget)
            budget -= end - start
            hidden, _ = self.talker_cache.extend(
                self.talker.model, talker.embeds[:, start:end],
                talker.positions[..., start:end], row.slot,
            )  # fmt: skip
            if talker.complete:
                self.decode.start_speech(row.slot)
                self.code2wav.reset(row.slot)
                row.speaking = True
                ints, floats = speech_columns([row], 1)
                sent = upload(self.device, torch.int64, **ints)
                sent |= upload(self.device, torch.float32, **floats)
                sampled = Draws.samples([row.request.decoding.speech])
                code = int(self.decode.next_codes(sent, hidden[:, -1], sampled)[0])
                self._count_frame(row, code)
        return talker.complete

    def _first_token(self, state: Prefilling, logits: Tensor) -> Row:
        """The call's row, from the thinker's logits at the prompt's last position."""
        request = state.request
        draws = Draws.send(self.device, [request.decoding.text], [(request.seed, 0)])
        tokens = self.decode.first_token(state.slot, logits, draws, request.fixed_length)
        token = int(tokens[0])  # a prefill reads its first token back; a step reads nothing
        row = Row(state.id, state.slot, state.request, text=[token], first_token=token)
        row.thinker_delta = state.thinker.delta if state.thinker is not None else 0
        row.made.append(token)
        if request.conversation is not None:
            row.prompt = state.thinker
        self._ends_text(row, token)
        return row

    def _drop(self, state: Prefilling) -> None:
        del self.prefills[state.id]
        self.owners.release(state.slot)

    def _ends_text(self, row: Row, token: int) -> bool:
        """Whether ``token`` is the row's last text token; marks the row when it is."""
        if token in self.text_end or row.tokens >= row.request.max_text_tokens:
            row.thinking = False
            row.cut = row.cut or token not in self.text_end
            return True
        return False

    def _count_frame(self, row: Row, code: int) -> None:
        """The talker picked ``code``, the first code of the row's next frame."""
        row.frames += 1
        if code == self.codec_end:
            row.speaking = False
        elif row.frames >= row.request.max_frames:
            # generate() stops here without the residual codes of this last frame.
            row.speaking, row.cut = False, True

    @torch.inference_mode()
    def step(self) -> list[RowStep]:
        """Advance every call by one text token and one frame of speech; finished and cancelled
        calls are reported ``done`` once and leave.

        A step sends its host values to the device in one upload per dtype and reads its
        results back in one copy, its only host sync (``tests/test_qwen3_omni.py`` counts)."""
        results = {row.id: RowStep(row.id, row.text, None, None) for row in self.rows.values()}
        for row in list(self.rows.values()):
            row.text = []
            if row.cancelled:
                results[row.id].done, results[row.id].reason = True, "cancelled"
                self._release(row)
        thinking = [r for r in self.rows.values() if r.thinking]
        speaking = [r for r in self.rows.values() if r.speaking]
        if thinking or speaking:
            self._step(thinking, speaking, results)
        for row in list(self.rows.values()):
            if not row.thinking and not row.speaking:
                results[row.id].done = True
                results[row.id].reason = "length" if row.cut else "stop"
                self._release(row)
        return list(results.values())

    def _release(self, row: Row) -> None:
        del self.rows[row.id]
        self.owners.finish(row)

    def _step(self, thinking: list[Row], speaking: list[Row], results: dict[int, RowStep]) -> None:
        shape, (ints, floats) = self.layout.plan(thinking, speaking)
        int_flat = upload_flat(self.device, torch.int64, **ints)
        float_flat = upload_flat(self.device, torch.float32, **floats)
        sent = split(int_flat, ints) | split(float_flat, floats)
        out = None
        if self.graphs is not None:
            try:
                out = self.graphs(int_flat, float_flat, ints, floats, shape)
            except RuntimeError as exc:  # a capture that failed moved no call (its warm-up
                # runs on the scratch slot), so the step runs eagerly, now and from now on
                self.graphs, self.graphs_failed = None, f"{type(exc).__name__}: {exc}"
                log.error("CUDA graphs failed (%s); steps run eagerly", self.graphs_failed)
        if out is None:
            out = self.decode.compute(sent, shape)
        first = None
        if speaking:
            first = self.code2wav.first(out[-3], ints, sent)
        host = download(*out, *(first or []))
        computed, firsts = host[: len(out)], host[len(out) :]
        if thinking:
            for row, token in zip(thinking, computed[0].astype(np.int64).tolist(), strict=False):
                row.tokens += 1
                row.made.append(token)
                results[row.id].text.append(token)
                self._ends_text(row, token)
            self.thinker_cache.advance([r.slot for r in thinking])
        if not speaking:
            return
        frames, codes, later = computed[-3:]
        fresh = dict(zip(ints["c2w.fresh.rows"], firsts, strict=True))
        frames = frames.astype(np.int64)
        for index, row in enumerate(speaking):
            results[row.id].codes = torch.from_numpy(frames[index])
            results[row.id].audio = torch.from_numpy(fresh.get(index, later[index]))
        slots = [r.slot for r in speaking]
        self.talker_cache.advance(slots)
        self.code2wav.advance(slots)
        for row, code in zip(speaking, codes.astype(np.int64).tolist(), strict=False):
            self._count_frame(row, code)

    def capture(self, decoding: Decoding) -> int:
        """Capture now every shape of each part of a step (``s2s.omni.graphs``) that calls
        decoding as ``decoding`` can meet, so none is captured while calls wait: every batch
        size up to ``max_rows``, every span of the caches as allocated. Returns how many."""
        if self.graphs is None:
            return 0
        count = 0
        for part, (ints, floats), shape in self.layout.every_shape(self.max_rows, decoding):
            self.graphs.capture(part, ints, floats, shape)
            count += 1
        return count

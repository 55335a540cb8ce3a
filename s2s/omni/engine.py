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
  made in the same step, so it never waits.
- ``cancel(row)`` ends a call at the next step; nothing of it is decoded after that.

Calls join and leave between steps. Each owns a slot in the thinker's and the talker's key/value
caches and in code2wav's state; a step runs all stepping calls in one batch per module, and each
call's tokens and audio are what it would get alone (``tests/test_qwen3_omni.py`` checks this,
and that greedy decoding reproduces ``generate()``'s text, codes and audio).

Everything runs on the caller's thread under ``torch.inference_mode()``; nothing does I/O.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache, Qwen3OmniMoeForConditionalGeneration

from s2s.omni.code2wav import Code2WavStream
from s2s.omni.prefill import Pieces, ThinkerPrompt, encode, talker_prompt
from s2s.omni.request import Request, RowStep
from s2s.omni.sampling import noise_keys, penalize, pick
from s2s.omni.slots import SlotCache

SAMPLE_RATE = 24_000
#: Noise streams (``s2s.noise``) of a call's draws: text tokens, the talker's first codes, and
#: from RESIDUAL_STREAM on, one per code predictor codebook. Each is counted in its own units
#: (text tokens, frames), so no two draws of one call share noise.
TEXT_STREAM, SPEECH_STREAM, RESIDUAL_STREAM = 0, 1, 2


@dataclass(slots=True)
class _Row:
    id: int
    slot: int
    request: Request
    text: list[int]
    last_token: int
    tokens: int = 1
    thinking: bool = True
    speaking: bool = False
    cut: bool = False  # a part stopped at its length limit
    cancelled: bool = False
    thinker_delta: int = 0
    talker_delta: int = 0
    code: int = 0  # the talker's last first code
    frames: int = 0  # first codes picked so far
    past: Tensor | None = None  # the talker's last hidden state (1, hidden)
    pending: list[Tensor] = field(default_factory=list)  # text inputs for the talker


@dataclass(slots=True)
class _Prefill:
    """A call begun whose prompts are being prefilled, piece by piece."""

    id: int
    slot: int
    request: Request
    inputs: dict[str, Tensor]
    thinker: ThinkerPrompt | None = None  # once the encoders have run
    row: _Row | None = None  # once the thinker's prefill is complete
    talker: Pieces | None = None


def load_model(path: str, device: str = "cpu", dtype: torch.dtype | None = None) -> Any:
    """``Qwen3OmniMoeForConditionalGeneration.from_pretrained(path)``, ready for the engine.

    The talker's multimodal RoPE reads ``config.audio_config.n_window`` through the thinker's
    rope-index code, but the talker's config has no audio config (transformers 5.24), so a prompt
    with audio fails in ``generate()`` too; the thinker's is lent to it.
    """
    model: Any = Qwen3OmniMoeForConditionalGeneration.from_pretrained(path, dtype=dtype)
    return prepare_model(model.to(device))


def prepare_model(model: Any) -> Any:
    """What the engine needs of a built model besides its weights (``load_model`` does this; a
    model built another way, say with random weights, calls it itself): eval mode, and the
    thinker's audio config lent to the talker (see ``load_model``)."""
    model = model.eval()
    if not hasattr(model.talker.config, "audio_config"):
        model.talker.config.audio_config = model.config.thinker_config.audio_config
    return model


class OmniEngine:
    """Streaming, batched Qwen3-Omni over up to ``max_rows`` calls at once."""

    def __init__(self, model: Any, max_rows: int = 8) -> None:
        self.model = model
        self.config = model.config
        self.thinker = model.thinker
        self.talker = model.talker
        self.text_model = model.thinker.model.language_model
        self.device = next(model.parameters()).device
        self.thinker_cache = SlotCache(self.text_model.layers, max_rows)
        self.talker_cache = SlotCache(self.talker.model.layers, max_rows)
        self.code2wav = Code2WavStream(model.code2wav, max_rows)
        self.free = list(range(max_rows))
        self.rows: dict[int, _Row] = {}
        self.prefills: dict[int, _Prefill] = {}
        # The thinker's hidden state that the talker's prompt reads (transformers' index).
        self.accept = int(self.config.talker_config.accept_hidden_layer)
        self._next_id = 0
        config = self.config
        talker = config.talker_config
        self.text_end = {config.im_end_token_id}
        self.codec_end = int(talker.codec_eos_token_id)
        vocab = int(talker.text_config.vocab_size)
        # generate() keeps the talker off its top 1024 ids (control codes) but for the end code.
        self.suppressed = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        self.suppressed[max(vocab - 1024, 0) :] = True
        self.suppressed[self.codec_end] = False
        self.seen = torch.zeros(max_rows, vocab, dtype=torch.bool, device=self.device)
        with torch.inference_mode():
            special = torch.tensor(
                [[config.tts_bos_token_id, config.tts_eos_token_id, config.tts_pad_token_id]],
                device=self.device,
            )
            embeds = self.talker.text_projection(self.thinker.get_input_embeddings()(special))
            self.tts_bos, self.tts_eos, self.tts_pad = embeds.chunk(3, dim=1)

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
        row still prefilling has made nothing yet: it goes at once, unreported."""
        if row in self.prefills:
            self._drop(self.prefills[row])
            return
        if row not in self.rows:
            raise KeyError(f"no row {row} is generating")
        self.rows[row].cancelled = True

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
            raise RuntimeError(f"all {len(self.thinker_cache.lengths)} slots are generating")
        if request.speaker.lower() not in self.config.talker_config.speaker_id:
            raise ValueError(f"unknown speaker {request.speaker!r}")
        if request.max_text_tokens < 1 or request.max_frames < 1:
            raise ValueError("max_text_tokens and max_frames must be at least 1")
        # Features and pixels in the weights' dtype (bf16 on a GPU), ids and masks as they are.
        dtype = self.thinker.dtype
        inputs = {
            k: v.to(self.device, dtype=dtype if v.is_floating_point() else v.dtype)
            for k, v in request.inputs.items()
        }
        ids = inputs["input_ids"]
        if ids.shape[0] != 1:
            raise ValueError(f"one call per request, got a batch of {ids.shape[0]}")
        if "attention_mask" in inputs and not bool(inputs["attention_mask"].all()):
            raise ValueError("a padded prompt (attention_mask with zeros) is not supported")
        opening = [self.config.im_start_token_id, self.config.assistant_token_id]
        if ids.shape[1] < 3 or ids[0, -3:-1].tolist() != opening:
            # The talker's prompt starts from these three tokens (as generate() assumes).
            raise ValueError("the prompt must end with the open assistant turn")
        self._next_id += 1
        self.prefills[self._next_id] = _Prefill(self._next_id, self.free.pop(), request, inputs)
        return self._next_id

    @torch.inference_mode()
    def prefill(self, row: int, tokens: int | None = None) -> bool:
        """Run the next piece of ``row``'s prefill: at most ``tokens`` prompt positions (None:
        all that are left) of the thinker's prompt, then of the talker's. The first piece also
        runs the audio and vision encoders, once for the whole prompt. Returns True when the
        prefill is complete: the row then steps with the others from the next ``step()``. On
        an error the call is dropped (its slot freed) and the error raised."""
        state = self.prefills[row]
        if tokens is not None and tokens < 1:
            raise ValueError("a prefill piece needs at least one token")
        try:
            complete = self._prefill(state, tokens or sys.maxsize)
        except BaseException:
            self._drop(state)
            raise
        if complete and state.row is not None:
            del self.prefills[row]
            self.rows[row] = state.row
        return complete

    def _prefill(self, state: _Prefill, budget: int) -> bool:
        if state.thinker is None:
            state.thinker = encode(self.thinker, state.inputs, self.accept)
            self.thinker_cache.clear(state.slot)
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
            tts = (self.tts_pad, self.tts_bos, self.tts_eos)
            state.talker = talker_prompt(self.model, prompt, row.last_token, speaker, tts)
            row.talker_delta = state.talker.delta
            self.talker_cache.clear(row.slot)
        talker = state.talker
        while not talker.complete and budget > 0:
            start, end = talker.take(budget)
            budget -= end - start
            hidden, _ = self.talker_cache.extend(
                self.talker.model, talker.embeds[:, start:end],
                talker.positions[..., start:end], row.slot,
            )  # fmt: skip
            if talker.complete:
                self.seen[row.slot] = False
                self.code2wav.reset(row.slot)
                row.speaking = True
                self._next_code([row], self.talker.codec_head(hidden[:, -1]), hidden[:, -1])
        return talker.complete

    def _first_token(self, state: _Prefill, logits: Tensor) -> _Row:
        """The call's row, from the thinker's logits at the prompt's last position."""
        request = state.request
        seeds, counters = noise_keys(self.device, [(request.seed, 0)])
        logits = self._mask_text_end(logits, [request])
        token = int(pick(logits, [request.decoding.text], seeds, counters, TEXT_STREAM)[0])
        row = _Row(state.id, state.slot, state.request, text=[token], last_token=token)
        row.thinker_delta = state.thinker.delta if state.thinker is not None else 0
        self._ends_text(row, token)
        return row

    def _drop(self, state: _Prefill) -> None:
        del self.prefills[state.id]
        self.free.append(state.slot)

    def _ends_text(self, row: _Row, token: int) -> bool:
        """Whether ``token`` is the row's last text token; marks the row when it is."""
        if token in self.text_end or row.tokens >= row.request.max_text_tokens:
            row.thinking = False
            row.cut = row.cut or token not in self.text_end
            return True
        return False

    def _mask_text_end(self, logits: Tensor, requests: list[Request]) -> Tensor:
        """``logits`` (batch, vocab) with the text end tokens ruled out for fixed-length rows."""
        fixed = [i for i, r in enumerate(requests) if r.fixed_length]
        if not fixed:
            return logits
        rows = torch.tensor(fixed, device=self.device)[:, None]
        ends = torch.tensor(sorted(self.text_end), device=self.device)
        logits = logits.clone()
        logits[rows, ends] = float("-inf")
        return logits

    def _next_code(self, rows: list[_Row], logits: Tensor, hidden: Tensor) -> None:
        """Pick each row's next first code from the talker's ``logits`` (batch, vocab)."""
        slots = torch.tensor([r.slot for r in rows], device=self.device)
        penalty = torch.tensor(
            [r.request.decoding.repetition_penalty for r in rows], device=self.device
        )
        logits = penalize(logits, self.seen[slots], penalty)
        logits = logits.masked_fill(self.suppressed, float("-inf"))
        fixed = [i for i, r in enumerate(rows) if r.request.fixed_length]
        if fixed:
            logits[fixed, self.codec_end] = float("-inf")
        seeds, counters = noise_keys(self.device, [(r.request.seed, r.frames) for r in rows])
        settings = [r.request.decoding.speech for r in rows]
        codes = pick(logits, settings, seeds, counters, SPEECH_STREAM)
        self.seen[slots, codes] = True
        for index, (row, code) in enumerate(zip(rows, codes.tolist(), strict=True)):
            row.code, row.past = code, hidden[index : index + 1]
            row.frames += 1
            if code == self.codec_end:
                row.speaking = False
            elif row.frames >= row.request.max_frames:
                # generate() stops here without the residual codes of this last frame.
                row.speaking, row.cut = False, True

    @torch.inference_mode()
    def step(self) -> list[RowStep]:
        """Advance every call by one text token and one frame of speech; finished and cancelled
        calls are reported ``done`` once and leave."""
        results = {row.id: RowStep(row.id, row.text, None, None) for row in self.rows.values()}
        for row in list(self.rows.values()):
            row.text = []
            if row.cancelled:
                results[row.id].done, results[row.id].reason = True, "cancelled"
                self._release(row)
        thinking = [r for r in self.rows.values() if r.thinking]
        if thinking:
            self._think(thinking, results)
        speaking = [r for r in self.rows.values() if r.speaking]
        if speaking:
            self._speak(speaking, results)
        for row in list(self.rows.values()):
            if not row.thinking and not row.speaking:
                results[row.id].done = True
                results[row.id].reason = "length" if row.cut else "stop"
                self._release(row)
        return list(results.values())

    def _release(self, row: _Row) -> None:
        del self.rows[row.id]
        self.free.append(row.slot)

    def _think(self, rows: list[_Row], results: dict[int, RowStep]) -> None:
        slots = [r.slot for r in rows]
        deltas = torch.tensor([r.thinker_delta for r in rows], device=self.device)
        last = torch.tensor([[r.last_token] for r in rows], device=self.device)
        embeds = self.thinker.get_input_embeddings()(last)
        hidden = self.thinker_cache.decode(self.text_model, embeds, deltas, slots)
        logits = self.thinker.lm_head(hidden[:, -1])
        logits = self._mask_text_end(logits, [r.request for r in rows])
        seeds, counters = noise_keys(self.device, [(r.request.seed, r.tokens) for r in rows])
        settings = [r.request.decoding.text for r in rows]
        tokens = pick(logits, settings, seeds, counters, TEXT_STREAM)
        projected = self.talker.text_projection(
            self.thinker.get_input_embeddings()(tokens[:, None])
        )
        for index, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            row.tokens += 1
            row.last_token = token
            results[row.id].text.append(token)
            ends = self._ends_text(row, token)
            if row.speaking:
                # What the talker reads with the frame after this one: the token, or the end
                # marker in place of the last one (as generate()'s trailing_text_hidden).
                row.pending.append(self.tts_eos if ends else projected[index : index + 1])

    def _speak(self, rows: list[_Row], results: dict[int, RowStep]) -> None:
        talker = self.talker
        predictor = talker.code_predictor
        first = torch.tensor([[r.code] for r in rows], device=self.device)
        first_embeds = talker.get_input_embeddings()(first)
        past = torch.cat([r.past for r in rows if r.past is not None])[:, None]
        cache = DynamicCache(config=predictor.config)
        inputs = torch.cat([past, first_embeds], dim=1)
        codes, embeds = [first[:, 0]], [first_embeds]
        groups = int(self.config.talker_config.num_code_groups)
        settings = [r.request.decoding.residual for r in rows]
        # The frame's index: the talker counted its first code already.
        seeds, counters = noise_keys(self.device, [(r.request.seed, r.frames - 1) for r in rows])
        for group in range(groups - 1):
            hidden = predictor.model(inputs_embeds=inputs, cache=cache, use_cache=True)
            logits = predictor.lm_head[group](hidden.last_hidden_state[:, -1])
            code = pick(logits, settings, seeds, counters, RESIDUAL_STREAM + group)
            codes.append(code)
            inputs = predictor.model.get_input_embeddings()[group](code[:, None])
            embeds.append(inputs)
        frame = torch.stack(codes, dim=1)
        audio = self.code2wav.step(frame, [r.slot for r in rows])
        text = torch.cat([r.pending.pop(0) if r.pending else self.tts_pad for r in rows])
        step_input = torch.cat(embeds, dim=1).sum(1, keepdim=True) + text
        slots = [r.slot for r in rows]
        deltas = torch.tensor([r.talker_delta for r in rows], device=self.device)
        hidden = self.talker_cache.decode(talker.model, step_input, deltas, slots)
        for index, row in enumerate(rows):
            results[row.id].codes = frame[index]
            results[row.id].audio = audio[index].float()
        self._next_code(rows, talker.codec_head(hidden[:, -1]), hidden[:, -1])

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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import Qwen3OmniMoeForConditionalGeneration

from s2s.hosttraffic import download, upload
from s2s.omni.code2wav import Code2WavStream
from s2s.omni.predictor import CodePredictor
from s2s.omni.prefill import Pieces, ThinkerPrompt, encode, talker_prompt
from s2s.omni.request import Request, RowStep
from s2s.omni.sampling import Draws, penalize, pick
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
    text: list[int]  # text tokens made since the last step, reported with it
    first_token: int
    tokens: int = 1
    thinking: bool = True
    speaking: bool = False
    cut: bool = False  # a part stopped at its length limit
    cancelled: bool = False
    thinker_delta: int = 0
    talker_delta: int = 0
    frames: int = 0  # first codes picked so far


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
        self.predictor = CodePredictor(self.talker.code_predictor, max_rows)
        self.free = list(range(max_rows))
        self.rows: dict[int, _Row] = {}
        self.prefills: dict[int, _Prefill] = {}
        # The thinker's hidden state that the talker's prompt reads (transformers' index).
        self.accept = int(self.config.talker_config.accept_hidden_layer)
        self._next_id = 0
        config = self.config
        talker = config.talker_config
        text_vocab = int(self.thinker.lm_head.out_features)
        self.is_text_end = torch.zeros(text_vocab, dtype=torch.bool, device=self.device)
        self.text_end = {config.im_end_token_id}
        self.codec_end = int(talker.codec_eos_token_id)
        vocab = int(talker.text_config.vocab_size)
        # generate() keeps the talker off its top 1024 ids (control codes) but for the end code.
        self.suppressed = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        self.suppressed[max(vocab - 1024, 0) :] = True
        self.suppressed[self.codec_end] = False
        self.seen = torch.zeros(max_rows, vocab, dtype=torch.bool, device=self.device)
        self.is_codec_end = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        self.is_codec_end[self.codec_end] = True
        if max(vocab, text_vocab) > 2**24:
            raise ValueError("token ids must fit float32 exactly (s2s.hosttraffic.download)")
        # What a step reads of the step before, kept per slot on the device so that a step
        # sends no host values but its one upload: each call's last text token, the talker's
        # last first code and its last hidden state.
        self.token = torch.zeros(max_rows, dtype=torch.long, device=self.device)
        self.code = torch.zeros(max_rows, dtype=torch.long, device=self.device)
        head = self.talker.codec_head
        self.past = head.weight.new_zeros(max_rows, head.in_features)
        with torch.inference_mode():
            special = torch.tensor(
                [[config.tts_bos_token_id, config.tts_eos_token_id, config.tts_pad_token_id]],
                device=self.device,
            )
            embeds = self.talker.text_projection(self.thinker.get_input_embeddings()(special))
            self.tts_bos, self.tts_eos, self.tts_pad = embeds.chunk(3, dim=1)

    @property
    def text_end(self) -> set[int]:
        """The text tokens that end a reply (on the host; ``is_text_end`` marks them on the
        device)."""
        return self._text_end

    @text_end.setter
    def text_end(self, tokens: set[int]) -> None:
        self._text_end = set(tokens)
        self.is_text_end.zero_()
        for token in tokens:
            self.is_text_end[token] = True

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
            state.talker = talker_prompt(self.model, prompt, row.first_token, speaker, tts)
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
                ints, floats = self._speech_columns([row])
                sent = self._upload(ints, floats)
                code = int(self._next_codes([row], sent, hidden[:, -1])[0])
                self._count_frame(row, code)
        return talker.complete

    def _first_token(self, state: _Prefill, logits: Tensor) -> _Row:
        """The call's row, from the thinker's logits at the prompt's last position."""
        request = state.request
        draws = Draws.send(self.device, [request.decoding.text], [(request.seed, 0)])
        if request.fixed_length:
            logits = logits.masked_fill(self.is_text_end, float("-inf"))
        tokens = pick(logits, draws, TEXT_STREAM)
        self.token[state.slot] = tokens[0]
        token = int(tokens[0])  # a prefill reads its first token back; a step reads nothing
        row = _Row(state.id, state.slot, state.request, text=[token], first_token=token)
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

    def _count_frame(self, row: _Row, code: int) -> None:
        """The talker picked ``code``, the first code of the row's next frame."""
        row.frames += 1
        if code == self.codec_end:
            row.speaking = False
        elif row.frames >= row.request.max_frames:
            # generate() stops here without the residual codes of this last frame.
            row.speaking, row.cut = False, True

    def _upload(
        self, ints: dict[str, list[int]], floats: dict[str, list[float]]
    ) -> dict[str, Tensor]:
        """A step's host values on the device: one copy of its ints, one of its floats."""
        return upload(self.device, torch.int64, **ints) | upload(
            self.device, torch.float32, **floats
        )

    def _think_columns(
        self, rows: list[_Row]
    ) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
        settings = [r.request.decoding.text for r in rows]
        ints, floats = Draws.columns("text", settings, [(r.request.seed, r.tokens) for r in rows])
        ints |= {
            "think.slot": [r.slot for r in rows],
            "think.delta": [r.thinker_delta for r in rows],
            "think.fixed": [int(r.request.fixed_length) for r in rows],
            # The token this step makes is the last the row may make.
            "think.limit": [int(r.tokens + 1 >= r.request.max_text_tokens) for r in rows],
        }
        return ints, floats

    def _speech_columns(
        self, rows: list[_Row]
    ) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
        """What picking the rows' next first codes reads (``_next_codes``)."""
        settings = [r.request.decoding.speech for r in rows]
        ints, floats = Draws.columns("speech", settings, [(r.request.seed, r.frames) for r in rows])
        ints |= {
            "speak.slot": [r.slot for r in rows],
            "speak.fixed": [int(r.request.fixed_length) for r in rows],
        }
        floats["speak.penalty"] = [r.request.decoding.repetition_penalty for r in rows]
        return ints, floats

    def _next_codes(self, rows: list[_Row], sent: dict[str, Tensor], hidden: Tensor) -> Tensor:
        """Pick each row's next first code from the talker's last ``hidden`` ``(batch, hidden)``
        and keep it, with ``hidden``, in the row's slot for the next step."""
        slots = sent["speak.slot"]
        logits = self.talker.codec_head(hidden)
        logits = penalize(logits, self.seen[slots], sent["speak.penalty"])
        logits = logits.masked_fill(self.suppressed, float("-inf"))
        if any(r.request.fixed_length for r in rows):
            fixed = sent["speak.fixed"].bool()[:, None] & self.is_codec_end
            logits = logits.masked_fill(fixed, float("-inf"))
        settings = [r.request.decoding.speech for r in rows]
        codes = pick(logits, Draws.of("speech", sent, settings), SPEECH_STREAM)
        self.seen[slots, codes] = True
        self.code[slots] = codes
        self.past[slots] = hidden
        return codes

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

    def _release(self, row: _Row) -> None:
        del self.rows[row.id]
        self.free.append(row.slot)

    def _step(
        self, thinking: list[_Row], speaking: list[_Row], results: dict[int, RowStep]
    ) -> None:
        ints, floats = self._think_columns(thinking)
        more_ints, more_floats = self._speech_columns(speaking)
        ints |= more_ints
        floats |= more_floats
        if speaking:
            settings = [r.request.decoding.residual for r in speaking]
            keys = [(r.request.seed, r.frames - 1) for r in speaking]  # the frame's own index
            residual_ints, residual_floats = Draws.columns("residual", settings, keys)
            thinks = {r.id: i for i, r in enumerate(thinking)}
            ints |= residual_ints | self.code2wav.columns([r.slot for r in speaking])
            ints["speak.delta"] = [r.talker_delta for r in speaking]
            ints["speak.thinks"] = [thinks.get(r.id, -1) for r in speaking]
            floats |= residual_floats
        sent = self._upload(ints, floats)
        out: list[Tensor] = []
        text_in = None
        if thinking:
            tokens, text_in = self._think(thinking, sent)
            out.append(tokens)
        parts: list[tuple[list[int], Tensor]] = []
        if speaking:
            frame, parts, codes = self._speak(speaking, sent, text_in)
            out += [frame, codes, *(wav for _, wav in parts)]
        host = download(*out)
        if thinking:
            for row, token in zip(thinking, host.pop(0).astype(np.int64).tolist(), strict=True):
                row.tokens += 1
                results[row.id].text.append(token)
                self._ends_text(row, token)
        if speaking:
            frames, codes_host = host[0].astype(np.int64), host[1].astype(np.int64).tolist()
            for index, row in enumerate(speaking):
                results[row.id].codes = torch.from_numpy(frames[index])
            for (batch_rows, _), wav in zip(parts, host[2:], strict=True):
                for index, position in enumerate(batch_rows):
                    results[speaking[position].id].audio = torch.from_numpy(wav[index])
            for row, code in zip(speaking, codes_host, strict=True):
                self._count_frame(row, code)

    def _think(self, rows: list[_Row], sent: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The rows' next text tokens, and what the talker reads of them (the projected token,
        or the end marker in place of the last one, as generate()'s trailing_text_hidden)."""
        slots = sent["think.slot"]
        embed = self.thinker.get_input_embeddings()
        hidden = self.thinker_cache.decode(
            self.text_model, embed(self.token[slots][:, None]), sent["think.delta"],
            [r.slot for r in rows], slots,
        )  # fmt: skip
        logits = self.thinker.lm_head(hidden[:, -1])
        if any(r.request.fixed_length for r in rows):
            fixed = sent["think.fixed"].bool()[:, None] & self.is_text_end
            logits = logits.masked_fill(fixed, float("-inf"))
        settings = [r.request.decoding.text for r in rows]
        tokens = pick(logits, Draws.of("text", sent, settings), TEXT_STREAM)
        self.token[slots] = tokens
        ends = self.is_text_end[tokens] | sent["think.limit"].bool()
        projected = self.talker.text_projection(embed(tokens[:, None]))
        return tokens, torch.where(ends[:, None, None], self.tts_eos, projected)

    def _speak(
        self, rows: list[_Row], sent: dict[str, Tensor], text_in: Tensor | None
    ) -> tuple[Tensor, list[tuple[list[int], Tensor]], Tensor]:
        """The residual codes of the frame whose first code each row has, that frame's audio
        (in code2wav's parts) and the next frame's first codes."""
        talker = self.talker
        predictor = self.predictor
        slots = sent["speak.slot"]
        first = self.code[slots][:, None]
        first_embeds = talker.get_input_embeddings()(first)
        inputs = torch.cat([self.past[slots][:, None], first_embeds], dim=1)
        codes, embeds = [first[:, 0]], [first_embeds]
        draws = Draws.of("residual", sent, [r.request.decoding.residual for r in rows])
        position = 0
        for group in range(predictor.positions - 1):
            hidden = predictor.run(inputs, position)
            position += inputs.shape[1]
            code = pick(predictor.logits(group, hidden), draws, RESIDUAL_STREAM + group)
            codes.append(code)
            inputs = predictor.embed(group, code)
            embeds.append(inputs)
        frame = torch.stack(codes, dim=1)
        slot_list = [r.slot for r in rows]
        parts = self.code2wav.step_parts(frame, slot_list, sent)
        # A row that thought in this step reads its token; one whose text has ended, the pad.
        if text_in is None:
            text = self.tts_pad
        else:
            thinks = sent["speak.thinks"]
            thought = text_in[thinks.clamp(min=0)]
            text = torch.where((thinks >= 0)[:, None, None], thought, self.tts_pad)
        step_input = torch.cat(embeds, dim=1).sum(1, keepdim=True) + text
        deltas = sent["speak.delta"]
        hidden = self.talker_cache.decode(talker.model, step_input, deltas, slot_list, slots)
        return frame, parts, self._next_codes(rows, sent, hidden[:, -1])

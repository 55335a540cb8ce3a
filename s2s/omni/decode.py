"""The device side of a Qwen3-Omni decode step: what one step computes for a batch of rows.

``OmniEngine`` decides who is in a step and what each row sends (``s2s.omni.rows``);
``DecodeStep.compute(sent, shape)`` does the step's device work for those rows:

- the thinker decodes each thinking row's next text token;
- for each speaking row, the code predictor fills the residual codebooks of the frame whose
  first code the row has, code2wav turns that frame into 1920 samples, and the talker, fed the
  frame and the text token the thinker made in the same step (one text token per frame, as
  ``generate()`` feeds ``trailing_text_hidden``), picks the next frame's first code.

What a step reads of the step before is kept on the device per slot, so that a step sends no
host values but its columns: each call's last text token, the talker's last first code and
hidden state, and the codes the talker has picked (its repetition penalty). The thinker's part
leaves what the talker reads of its token in the slot too, so the step is two parts, ``think``
and ``speak``, each reading only its own columns (``THINK_COLUMNS``; the rest are the speak
part's) and shaped by its own half of the ``StepShape``. Neither reads anything back and every
shape follows from the ``StepShape``, so each part can be captured as a CUDA graph and replayed
(``s2s.omni.graphs``): as many graphs as think shapes plus speak shapes, not their product.
Everything runs under the caller's ``torch.inference_mode()``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from s2s.omni.code2wav import Code2WavStream
from s2s.omni.predictor import CodePredictor
from s2s.omni.rows import StepShape
from s2s.omni.sampling import Draws, penalize, pick
from s2s.omni.slots import SlotCache

#: Noise streams (``s2s.noise``) of a call's draws: text tokens, the talker's first codes, and
#: from RESIDUAL_STREAM on, one per code predictor codebook. Each is counted in its own units
#: (text tokens, frames), so no two draws of one call share noise.
TEXT_STREAM, SPEECH_STREAM, RESIDUAL_STREAM = 0, 1, 2
#: The columns the think part reads, by name's start; the speak part reads the others.
THINK_COLUMNS = ("think.", "text.")


class DecodeStep:
    """A step's device work over the engine's slot caches, and the per-slot values it keeps."""

    def __init__(
        self, model: Any, thinker_cache: SlotCache, talker_cache: SlotCache,
        code2wav: Code2WavStream, predictor: CodePredictor, slots: int,
    ) -> None:  # fmt: skip
        config = model.config
        talker = config.talker_config
        self.thinker = model.thinker
        self.talker = model.talker
        self.text_model = model.thinker.model.language_model
        self.thinker_cache = thinker_cache
        self.talker_cache = talker_cache
        self.code2wav = code2wav
        self.predictor = predictor
        device = next(model.parameters()).device
        text_vocab = int(self.thinker.lm_head.out_features)
        vocab = int(talker.text_config.vocab_size)
        if max(vocab, text_vocab) > 2**24:
            raise ValueError("token ids must fit float32 exactly (s2s.hosttraffic.download)")
        #: The text tokens that end a reply (``OmniEngine.text_end`` sets them).
        self.is_text_end = torch.zeros(text_vocab, dtype=torch.bool, device=device)
        self.codec_end = int(talker.codec_eos_token_id)
        # generate() keeps the talker off its top 1024 ids (control codes) but for the end code.
        self.suppressed = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.suppressed[max(vocab - 1024, 0) :] = True
        self.suppressed[self.codec_end] = False
        self.is_codec_end = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.is_codec_end[self.codec_end] = True
        #: The first codes each slot's talker has picked in its reply (for the penalty).
        self.seen = torch.zeros(slots, vocab, dtype=torch.bool, device=device)
        #: Each slot's last text token, the talker's last first code and last hidden state.
        self.token = torch.zeros(slots, dtype=torch.long, device=device)
        self.code = torch.zeros(slots, dtype=torch.long, device=device)
        head = self.talker.codec_head
        self.past = head.weight.new_zeros(slots, head.in_features)
        #: What the talker reads of the text token each slot's thinker made this step.
        self.text = head.weight.new_zeros(slots, 1, head.in_features)
        with torch.inference_mode():
            special = torch.tensor(
                [[config.tts_bos_token_id, config.tts_eos_token_id, config.tts_pad_token_id]],
                device=device,
            )
            embeds = self.talker.text_projection(self.thinker.get_input_embeddings()(special))
            self.tts_bos, self.tts_eos, self.tts_pad = embeds.chunk(3, dim=1)

    def first_token(self, slot: int, logits: Tensor, draws: Draws,
                    fixed: bool) -> Tensor:  # fmt: skip
        """Pick a reply's first text token from the thinker's last ``logits`` ``(1, vocab)``
        and keep it in ``slot`` for the first step."""
        if fixed:
            logits = logits.masked_fill(self.is_text_end, float("-inf"))
        tokens = pick(logits, draws, TEXT_STREAM)
        self.token[slot] = tokens[0]
        return tokens

    def start_speech(self, slot: int) -> None:
        """A reply's talker starts in ``slot``: no code picked yet."""
        self.seen[slot] = False

    def next_codes(self, sent: dict[str, Tensor], hidden: Tensor, sampled: bool) -> Tensor:
        """Pick each row's next first code from the talker's last ``hidden`` ``(batch, hidden)``
        and keep it, with ``hidden``, in the row's slot for the next step."""
        slots = sent["speak.slot"]
        # In float32, as generate() hands logits to its processors: in bf16 the penalty (1.05)
        # and the penalized logits round, and near-ties come out otherwise.
        logits = self.talker.codec_head(hidden).float()
        logits = penalize(logits, self.seen[slots], sent["speak.penalty"])
        logits = logits.masked_fill(self.suppressed, float("-inf"))
        fixed = sent["speak.fixed"].bool()[:, None] & self.is_codec_end
        logits = logits.masked_fill(fixed, float("-inf"))
        codes = pick(logits, Draws.of("speech", sent, sampled), SPEECH_STREAM)
        self.seen[slots, codes] = True
        self.code[slots] = codes
        self.past[slots] = hidden
        return codes

    def compute(self, sent: dict[str, Tensor], shape: StepShape) -> list[Tensor]:
        """A step's device work, for the rows ``shape`` says: each thinking row's next text
        token, then each speaking row's frame ``(rows, groups)``, its next first code, and the
        frame's audio as a later frame of its call ``(rows, 1920)``. Nothing is read back and
        every shape follows from ``shape``, so it can be captured and replayed."""
        out: list[Tensor] = []
        if shape.think:
            out += self.think(sent, shape)
        if shape.speak:
            out += self.speak(sent, shape)
        return out

    def think(self, sent: dict[str, Tensor], shape: StepShape) -> list[Tensor]:
        """The thinking rows' next text tokens; what the talker reads of each (the projected
        token, or the end marker in place of the last one, as generate()'s
        trailing_text_hidden) is left in the row's slot for the speak part."""
        slots = sent["think.slot"]
        embed = self.thinker.get_input_embeddings()
        hidden = self.thinker_cache.decode(
            self.text_model, embed(self.token[slots][:, None]), sent["think.delta"], slots,
            shape.think_sees,
        )  # fmt: skip
        logits = self.thinker.lm_head(hidden[:, -1])
        fixed = sent["think.fixed"].bool()[:, None] & self.is_text_end
        logits = logits.masked_fill(fixed, float("-inf"))
        tokens = pick(logits, Draws.of("text", sent, shape.think_samples), TEXT_STREAM)
        self.token[slots] = tokens
        ends = self.is_text_end[tokens] | sent["think.limit"].bool()
        projected = self.talker.text_projection(embed(tokens[:, None]))
        self.text[slots] = torch.where(ends[:, None, None], self.tts_eos, projected)
        return [tokens]

    def speak(self, sent: dict[str, Tensor], shape: StepShape) -> list[Tensor]:
        """The residual codes of the frame whose first code each speaking row has (the frame),
        the next frame's first codes, and the frame's audio as a later frame of its call."""
        talker = self.talker
        predictor = self.predictor
        slots = sent["speak.slot"]
        first = self.code[slots][:, None]
        first_embeds = talker.get_input_embeddings()(first)
        inputs = torch.cat([self.past[slots][:, None], first_embeds], dim=1)
        codes, embeds = [first[:, 0]], [first_embeds]
        draws = Draws.of("residual", sent, shape.residual_samples)
        position = 0
        for group in range(predictor.positions - 1):
            hidden = predictor.run(inputs, position)
            position += inputs.shape[1]
            code = pick(predictor.logits(group, hidden), draws, RESIDUAL_STREAM + group)
            codes.append(code)
            inputs = predictor.embed(group, code)
            embeds.append(inputs)
        frame = torch.stack(codes, dim=1)
        audio = self.code2wav.later(frame, sent, shape.c2w_span)
        # A row that thought in this step reads its token; one whose text has ended, the pad.
        thought = sent["speak.thought"].bool()[:, None, None]
        text = torch.where(thought, self.text[slots], self.tts_pad)
        step_input = torch.cat(embeds, dim=1).sum(1, keepdim=True) + text
        hidden = self.talker_cache.decode(
            talker.model, step_input, sent["speak.delta"], slots, shape.speak_sees
        )
        next_codes = self.next_codes(sent, hidden[:, -1], shape.speech_samples)
        return [frame, next_codes, audio]

"""The tests' reference for the Moshi engine: transformers' own forwards, one step at a time.

This was s2s's first batched engine; ``s2s.backends.moshi_engine`` replaced it. It runs
transformers' ``MoshiModel`` decoder (its cache, mask and RoPE) and re-runs the depth decoder
over its growing prefix for each codebook, so it is slow but close to transformers' own code:
the slot engine's greedy tokens are checked against it.

Moshi's per-frame generation for many calls at once: one batched forward per tick.

Each call owns a *row*. All rows share one key/value cache whose time axis is global (one
position per tick); a row only attends to the positions it wrote itself, through a per-row
attention mask, and counts its own positions for the rotary embedding. So:

- a call joins by appending a row whose past is all masked (zeros in the cache), without
  touching any other row;
- a call leaves by dropping its row from the cache tensors;
- a row that has no frame ready at a tick is simply masked for that position;
- a reset (``response.cancel``) masks the row's whole past and restarts its positions.

When the shared time axis exceeds ``context`` positions, the oldest are cut for every row (a
sliding window, as Moshi's own context is bounded).

Per step and row: the caller's 8 Mimi codes (semantic codebook now, acoustic codebooks one step
late: Moshi's acoustic delay), Moshi's own previous text token and audio codes go in; a text token
comes out of the main decoder and the audio codebooks out of the depth decoder, one after the
other. The acoustic delay means a frame of Moshi's audio is complete one step after its semantic
code, so output lags input by one 80 ms frame.

A row's first steps feed what transformers' ``MoshiForConditionalGeneration.generate`` feeds
(``transformers/models/moshi/modeling_moshi.py`` 5.24): its first position is the unconditional
frame, every stream's initial token (``get_unconditional_inputs``, l. 1638-1677, put first at
l. 1143-1147), and ``build_delay_pattern_mask`` (l. 1593-1636) shifts the acoustic codebooks one
position later (l. 1626), so the second position's acoustic codes are that frame's initial
tokens, for Moshi's generated codes as well (the mask applied at l. 1522). So step 0 is all
initial tokens (the caller's first frame is not heard) and step 1 has no acoustic codes, as
kyutai's ``LMGen`` does (``offsets <= delays``). ``test_greedy_steps_equal_transformers_generate``
checks the slot engine against ``generate`` itself.

Everything here runs on the backend's single device thread; nothing here is async.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

#: kyutai's sampling: the likeliest audio codes and text tokens drawn from.
TOP_K, TEXT_TOP_K = 250, 25


@dataclass(eq=False)
class Row:
    """One call's generation state."""

    key: object
    generator: torch.Generator
    steps: int = 0
    text: int = 0
    moshi: torch.Tensor | None = None  # (K,) Moshi's codes fed back at the next step
    user_prev: torch.Tensor | None = None  # (K,) caller codes of the previous step
    pending_semantic: int | None = None  # codebook 0 of the frame waiting for its acoustics
    temperature: float = 0.8
    text_temperature: float = 0.7
    forced_text: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RowOutput:
    text_token: int
    codes: torch.Tensor | None  # (K,) a complete frame of Moshi's codes, or None (first step)


class MoshiEngine:
    def __init__(self, model: Any, *, context: int = 3000) -> None:
        self.model = model
        self.config = model.config
        self.k = int(self.config.num_codebooks)
        self.bos = int(self.config.audio_vocab_size)  # the embeddings' extra id: "no code yet"
        self.context = context
        self.device = next(model.parameters()).device
        self.rows: list[Row] = []
        self._cache: Any = None
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)

    # -- rows --------------------------------------------------------------------------------

    @torch.inference_mode()
    def join(self, key: object, seed: int | None = None) -> Row:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else torch.seed())
        row = Row(key=key, generator=generator, text=self._text_start())
        self._reset_row_codes(row)
        self.rows.append(row)
        if self._cache is not None:
            self._cache_pad_rows(1)
        self._mask = torch.cat([self._mask, self._mask.new_zeros((1, self._mask.shape[1]))])
        return row

    @torch.inference_mode()
    def leave(self, row: Row) -> None:
        index = self.rows.index(row)
        keep = [i for i in range(len(self.rows)) if i != index]
        self.rows.pop(index)
        self._mask = self._mask[keep]
        if self._cache is not None:
            if not self.rows:
                self._cache = None
                self._mask = self._mask[:, :0]
            else:
                self._cache_select(torch.tensor(keep, device=self.device))

    @torch.inference_mode()
    def reset(self, row: Row) -> None:
        """Forget the row's past: its positions are masked from now on and its state restarts."""
        index = self.rows.index(row)
        self._mask[index] = 0
        row.steps = 0
        row.text = self._text_start()
        row.pending_semantic = None
        self._reset_row_codes(row)

    # -- the batched step --------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, user_codes: dict[Row, torch.Tensor]) -> dict[Row, RowOutput]:
        """Advance every row in ``user_codes`` (its caller's (K,) codes for this frame) by one."""
        active = torch.tensor([r in user_codes for r in self.rows], device=self.device)
        b = len(self.rows)
        text_in = torch.tensor([[r.text] for r in self.rows], device=self.device)
        moshi_in = torch.stack([r.moshi for r in self.rows])  # type: ignore[misc]
        user_in = torch.full((b, self.k), self.bos, dtype=torch.long, device=self.device)
        for i, row in enumerate(self.rows):
            if row in user_codes:
                now = user_codes[row].to(self.device)
                prev = (
                    row.user_prev
                    if row.user_prev is not None
                    else now.new_full((self.k,), self.bos)
                )
                # Semantic codes have no delay, acoustic ones one step: initial tokens until
                # the stream has a frame of its own (see the module's docstring).
                user_in[i, 0] = now[0] if row.steps > 0 else self.bos
                user_in[i, 1:] = prev[1:] if row.steps > 1 else self.bos
            if row.steps <= 1:
                moshi_in[i, 1:] = self.bos
        embeds = self.model.decoder.model.embed_tokens(text_in)
        for c in range(self.k):
            embeds = embeds + self.model.embed_tokens[c](moshi_in[:, c : c + 1])
            embeds = embeds + self.model.embed_tokens[self.k + c](user_in[:, c : c + 1])
        hidden, text_logits = self._decode(embeds, active)
        noise = self._gumbel(user_codes)
        text_t = [r.text_temperature for r in self.rows]
        text = self._pick(text_logits, text_t, noise[:, 0], TEXT_TOP_K)
        for i, row in enumerate(self.rows):
            if row in user_codes and row.forced_text:
                text[i] = row.forced_text.pop(0)
        tokens = text[:, None]
        for c in range(self.k):
            depth = self.model.depth_decoder(
                input_ids=tokens, last_hidden_state=hidden.expand(-1, tokens.shape[1], -1)
            )
            logits = depth.logits[:, -1, : self.bos]
            code = self._pick(logits, [r.temperature for r in self.rows], noise[:, c + 1], TOP_K)
            tokens = torch.cat([tokens, code[:, None]], dim=1)
        generated = tokens[:, 1:]  # (B, K): codebook 0 of this frame, 1.. of the previous one
        results: dict[Row, RowOutput] = {}
        for i, row in enumerate(self.rows):
            if row not in user_codes:
                continue
            frame = None
            if row.pending_semantic is not None:
                frame = generated[i].clone()
                frame[0] = row.pending_semantic
            row.pending_semantic = int(generated[i, 0])
            row.moshi = generated[i].clone()
            row.user_prev = user_codes[row].to(self.device)
            row.text = int(text[i])
            row.steps += 1
            results[row] = RowOutput(int(text[i]), frame)
        self._trim()
        return results

    def _decode(
        self, embeds: torch.Tensor, active: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The main decoder on this step's ``(B, 1, D)`` inputs: its ``(B, 1, D)`` last hidden
        state and ``(B, vocab)`` text logits."""
        self._mask = torch.cat([self._mask, active.long()[:, None]], dim=1)
        positions = torch.tensor([[r.steps] for r in self.rows], device=self.device)
        out = self.model.decoder(
            inputs_embeds=embeds, attention_mask=self._mask, position_ids=positions,
            cache=self._cache, use_cache=True,
        )  # fmt: skip
        self._cache = out.cache
        return out.last_hidden_state, out.logits[:, -1]

    # -- helpers -----------------------------------------------------------------------------

    def _text_start(self) -> int:
        return int(self.config.vocab_size)  # the text embeddings' extra id

    def _reset_row_codes(self, row: Row) -> None:
        row.moshi = torch.full((self.k,), self.bos, dtype=torch.long, device=self.device)
        row.user_prev = None

    def _gumbel(self, user_codes: dict[Row, torch.Tensor]) -> torch.Tensor:
        # Each row draws its own noise from its own generator, so what it samples does not
        # depend on which other calls share the batch.
        width = max(int(self.config.vocab_size), self.bos)
        noise = []
        for row in self.rows:
            u = torch.rand((self.k + 1, width), generator=row.generator, device=self.device)
            noise.append(-torch.log(-torch.log(u.clamp_min(1e-20))))
        return torch.stack(noise)

    @staticmethod
    def _pick(
        logits: torch.Tensor, temperatures: list[float], noise: torch.Tensor, top_k: int
    ) -> torch.Tensor:
        t = torch.tensor(temperatures, device=logits.device)[:, None]
        kth = logits.topk(min(top_k, logits.shape[1]), dim=-1).values[:, -1:]
        kept = logits.masked_fill(logits < kth, float("-inf"))
        sampled = (kept / t.clamp_min(1e-6) + noise[:, : logits.shape[1]]).argmax(dim=-1)
        greedy = logits.argmax(dim=-1)
        return torch.where(t[:, 0] > 0, sampled, greedy)

    def _layers(self) -> list[Any]:
        return list(self._cache.layers)

    def _cache_pad_rows(self, n: int) -> None:
        for layer in self._layers():
            for name in ("keys", "values"):
                tensor = getattr(layer, name)
                pad = tensor.new_zeros((n, *tensor.shape[1:]))
                setattr(layer, name, torch.cat([tensor, pad]))

    def _cache_select(self, keep: torch.Tensor) -> None:
        for layer in self._layers():
            for name in ("keys", "values"):
                setattr(layer, name, getattr(layer, name).index_select(0, keep))

    def _trim(self) -> None:
        excess = self._mask.shape[1] - self.context
        if excess <= 0 or self._cache is None:
            return
        self._mask = self._mask[:, excess:]
        for layer in self._layers():
            for name in ("keys", "values"):
                setattr(layer, name, getattr(layer, name)[:, :, excess:])


class WindowedReference(MoshiEngine):
    """One call whose every step runs the main decoder over the whole sequence so far, each
    position attending to the last ``window`` positions, itself included (kyutai's window), by
    an explicit mask, with RoPE at absolute positions: no cache, no ring, so it checks the slot
    engine's ring (its size, and what its positions are after the ring wraps)."""

    def __init__(self, model: Any, *, window: int) -> None:
        super().__init__(model)
        self.window = window
        self._inputs: list[torch.Tensor] = []

    def _decode(
        self, embeds: torch.Tensor, active: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.rows) != 1 or not bool(active.all()):
            raise ValueError("the windowed reference steps one call, every step")
        self._inputs.append(embeds)
        x = torch.cat(self._inputs, dim=1)  # (1, T, D)
        t = torch.arange(x.shape[1], device=self.device)
        behind = t[:, None] - t[None, :]  # query's position minus key's
        seen = (behind >= 0) & (behind < self.window)
        mask = torch.zeros(seen.shape, dtype=x.dtype, device=self.device)
        mask = mask.masked_fill(~seen, torch.finfo(x.dtype).min)[None, None]
        out = self.model.decoder(
            inputs_embeds=x, attention_mask=mask, position_ids=t[None], use_cache=False
        )
        return out.last_hidden_state[:, -1:], out.logits[:, -1]

"""Moshi's per-frame step for many calls at once, over preallocated per-call slots.

The engine runs Moshi's language model (main decoder, then the depth decoder codebook by
codebook) with the checkpoint's own weights, as loaded by ``from_pretrained``, but owns the
state itself:

- **One slot per call** in preallocated tensors: every layer's key/value cache is
  ``(slots, kv_heads, context, head_dim)``, a ring of ``context`` positions per slot. A slot
  writes its next position at ``length % context`` and attends to the positions it has written
  (the last ``context`` of them: Moshi's sliding window). Joining, leaving, resetting and
  calls longer than the context never copy or reallocate a cache, and a step allocates no
  cache memory. Keys are stored already rotated (RoPE at the slot's own absolute position), so
  the ring's order does not matter to attention.
- **Fixed shapes**: a step computes the first ``n`` slots, ``n`` the smallest bucket that
  holds every allocated slot (``s2s.backends.graphs.BUCKETS``). Slots without a frame this
  tick compute too, but their results are dropped and their state does not move (their cache
  write lands on the position they will overwrite first when they do step). A step reads the
  ring only as far as the longest of those calls has written, rounded up to ``SPAN_STEP``
  positions (known on the host without asking the device), so young calls do not pay for the
  whole window. So each (bucket, span) step is one fixed sequence of kernels, replayed from a
  CUDA graph on a GPU (``s2s.backends.graphs``).
- **The depth decoder incrementally**: ``K`` steps, each one codebook, with a ``K``-position
  cache of its own; each codebook's weights are applied as a plain matrix product with that
  codebook's slice (transformers' ``MoshiFlexibleLinear`` broadcasts the weights over the batch).
- **Sampling on the device for every slot at once**: Gumbel noise (``s2s.noise``) hashed from
  (the call's seed, its step, the stream), so a call's samples depend on nothing but its own
  seed and history, whichever other calls share the batch, with no host loop per row.
- **One device-to-host copy per step**: text tokens, frame flags and codes come back packed.

Per step and slot: the caller's 8 Mimi codes (semantic codebook now, acoustic codebooks one
step late: Moshi's acoustic delay), Moshi's own previous text token and audio codes go in; a
text token comes out of the main decoder and the audio codebooks out of the depth decoder. The
acoustic delay means a frame of Moshi's audio is complete one step after its semantic code, so
output lags input by one 80 ms frame. A call's first step feeds initial tokens only, its second
no acoustic codes (the delays, as kyutai's and transformers' generation have them).

Everything here runs on the backend's single device thread; nothing here is async.
"""

from __future__ import annotations

import bisect
import secrets
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from s2s.backends.graphs import StepGraphs, bucket
from s2s.backends.moshi_layers import mlp, rms, rotate
from s2s.backends.moshi_rows import Row, RowOutput, Stepped
from s2s.noise import gumbel, reseeded

#: A step reads the ring up to the longest call's length, rounded up to this many positions.
SPAN_STEP = 256
_MASK32 = 0xFFFFFFFF


class MoshiEngine:
    def __init__(
        self,
        model: Any,
        *,
        context: int = 3000,
        max_calls: int = 64,
        temperature: float = 0.8,
        text_temperature: float = 0.7,
        top_k: int = 250,
        text_top_k: int = 25,
        graphs: bool | None = None,
    ) -> None:
        """Sampling as kyutai's own Moshi server samples: from the ``top_k`` likeliest audio
        codes and ``text_top_k`` likeliest text tokens, at the temperatures. ``graphs``: replay
        the step from CUDA graphs (default: on a CUDA device)."""
        config = model.config
        self.model = model
        self.k = int(config.num_codebooks)
        self.bos = int(config.audio_vocab_size)  # the embeddings' extra id: "no code yet"
        self.text_vocab = int(config.vocab_size)
        self.context = context
        self.max_calls = max_calls
        self.temperature = temperature
        self.text_temperature = text_temperature
        self.top_k, self.text_top_k = top_k, text_top_k
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.rows: dict[int, Row] = {}
        self._free = list(range(max_calls))
        self._main = model.decoder.model
        self._depth = model.depth_decoder
        # Moshi's stream embeddings interleaved as its sum runs: Moshi's codebook c, then the
        # caller's. One gather replaces 2K lookups (a copy of the embedding tables, ~270 MB
        # for moshiko in bf16).
        tables = [model.embed_tokens[i].weight for c in range(self.k) for i in (c, self.k + c)]
        self._audio_table = torch.stack(tables)
        # The text embeddings' extra id, "no text yet" (transformers' unconditional input).
        self._text_start = self.text_vocab
        attn = self._main.layers[0].self_attn
        self._heads, self._kv_heads, self._head_dim = (
            attn.num_heads, attn.num_key_value_heads, attn.head_dim
        )  # fmt: skip
        rope = attn.rotary_emb
        self._inv_freq = rope.inv_freq.to(self.device, torch.float32)
        self._rope_scale = float(rope.attention_scaling)
        depth_attn = self._depth.layers[0].self_attn
        self._d_heads, self._d_kv_heads, self._d_head_dim = (
            depth_attn.num_heads, depth_attn.num_key_value_heads, depth_attn.head_dim
        )  # fmt: skip
        s, dev = max_calls, self.device
        layers = len(self._main.layers)
        shape = (layers, s, self._kv_heads, context, self._head_dim)
        self._keys = torch.zeros(shape, dtype=self.dtype, device=dev)
        self._values = torch.zeros(shape, dtype=self.dtype, device=dev)
        d_shape = (len(self._depth.layers), s, self._d_kv_heads, self.k, self._d_head_dim)
        self._d_keys = torch.zeros(d_shape, dtype=self.dtype, device=dev)
        self._d_values = torch.zeros(d_shape, dtype=self.dtype, device=dev)
        # Per-slot state: positions written since the last (re)start, the tokens fed back.
        self._length = torch.zeros(s, dtype=torch.long, device=dev)
        self._text = torch.full((s,), self._text_start, dtype=torch.long, device=dev)
        self._moshi = torch.full((s, self.k), self.bos, dtype=torch.long, device=dev)
        self._user_prev = torch.full((s, self.k), self.bos, dtype=torch.long, device=dev)
        self._pending = torch.full((s,), -1, dtype=torch.long, device=dev)  # semantic code
        self._seed = torch.zeros(s, dtype=torch.long, device=dev)
        self._temps = torch.zeros((s, 2), dtype=torch.float32, device=dev)  # text, audio
        self._positions = torch.arange(context, device=dev)
        # Each slot's length, mirrored on the host (no sync to read it): how far back the
        # busiest slot looks bounds the part of the ring a step reads.
        self._host_length = np.zeros(s, dtype=np.int64)
        self._slot_index = torch.arange(s, device=dev)
        self._stream_index = torch.arange(2 * self.k, device=dev)
        # Each audio stream's delay in frames, in the interleaved order of ``streams`` in
        # ``compute`` (Moshi's codebook c, then the caller's): semantic 0, acoustic 1.
        delays = [0 if c == 0 else 1 for c in range(self.k) for _ in range(2)]
        self._delays = torch.tensor(delays, device=dev)
        self.graphs: StepGraphs | None = None
        if graphs if graphs is not None else self.device.type == "cuda":
            self.graphs = self.step_graphs()

    def step_graphs(self, rerun: bool = False) -> StepGraphs:
        """The step's graphs, over buffers of its inputs (``rerun``: the CPU's stand-in)."""
        s, dev = self.max_calls, self.device
        buffers = [
            torch.zeros(s, dtype=torch.bool, device=dev),  # ready
            torch.full((s, self.k), self.bos, dtype=torch.long, device=dev),  # user codes
            torch.full((s,), -1, dtype=torch.long, device=dev),  # forced text
        ]
        idle = (False, self.bos, -1)
        return StepGraphs("Moshi step", self.compute, buffers, idle, rerun)

    # -- slots -------------------------------------------------------------------------------

    @torch.inference_mode()
    def join(
        self,
        key: object,
        seed: int | None = None,
        *,
        temperature: float | None = None,
        text_temperature: float | None = None,
    ) -> Row:
        """Give a call the lowest free slot; ``RuntimeError`` when every slot is taken.
        ``seed``: its sampling noise's (default: a fresh random one)."""
        if not self._free:
            raise RuntimeError(f"all {self.max_calls} Moshi slots are in use")
        slot = self._free.pop(0)
        # Not torch.seed(): that would reseed the whole process's generators, CUDA's too.
        seed = (seed if seed is not None else secrets.randbits(32)) & _MASK32
        row = Row(key=key, slot=slot)
        self.rows[slot] = row
        self._seed[slot] = seed
        text_t = self.text_temperature if text_temperature is None else text_temperature
        audio_t = self.temperature if temperature is None else temperature
        self._temps[slot, 0], self._temps[slot, 1] = text_t, audio_t
        self._restart(slot)
        return row

    @torch.inference_mode()
    def leave(self, row: Row) -> None:
        del self.rows[row.slot]
        # An empty slot looks no further than a new one: a long call gone from it no longer
        # widens every step's span over it until the slot is taken again.
        self._restart(row.slot)
        bisect.insort(self._free, row.slot)

    @torch.inference_mode()
    def reset(self, row: Row) -> None:
        """Forget the call's past: its positions restart and nothing it wrote is attended. Its
        noise goes on to a new seed (``reseeded``): from the old one, the counter starting
        over would draw what the call drew from its start, the same words again."""
        row.forced_text.clear()
        self._seed[row.slot] = reseeded(self._seed[row.slot])
        self._restart(row.slot)

    def _restart(self, slot: int) -> None:
        self._length[slot] = 0
        self._host_length[slot] = 0
        self._text[slot] = self._text_start
        self._moshi[slot] = self.bos
        self._user_prev[slot] = self.bos
        self._pending[slot] = -1

    def skip_ahead(self, row: Row, frames: int) -> None:
        """Make the call look ``frames`` steps old (for benchmarks: the cost of a long call's
        full window without running it; what its cache holds is left as it is)."""
        self._length[row.slot] = frames
        self._host_length[row.slot] = frames
        self._pending[row.slot] = 0

    def bucket(self) -> int:
        """How many slots a step computes now."""
        return bucket(max(self.rows, default=0) + 1)

    # -- the step ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, user_codes: dict[Row, torch.Tensor]) -> dict[Row, RowOutput]:
        """Advance every row in ``user_codes`` (its caller's (K,) codes for this frame) by one.

        A convenience over ``step_slots`` (tests, one-off use): it loops over the rows on the
        host, which a worker's tick does not."""
        if not user_codes:
            return {}
        n = self.width()
        user_now = torch.full((n, self.k), self.bos, dtype=torch.long, device=self.device)
        slots = [r.slot for r in user_codes]
        index = torch.tensor(slots, device=self.device)
        codes = torch.stack([c.to(self.device) for c in user_codes.values()]).long()
        user_now.index_copy_(0, index, codes)
        stepped = self.step_slots(slots, user_now)
        return {r: RowOutput(stepped.text(r.slot), stepped.frame(r.slot)) for r in user_codes}

    @torch.inference_mode()
    def step_slots(self, slots: list[int], user_now: torch.Tensor) -> Stepped:
        """Advance the rows in ``slots`` by one frame: ``user_now`` ``(width(), K)`` holds each
        slot's caller codes in its slot's row (rows of other slots are ignored). The host
        work is the same whatever the number of rows: no torch operation per row."""
        n = self.width()
        mask = np.zeros(n, dtype=bool)
        mask[slots] = True
        ready = torch.from_numpy(mask).to(self.device, non_blocking=True)
        forced = None
        if any(self.rows[s].forced_text for s in slots):
            wanted = torch.full((n,), -1, dtype=torch.long)
            for s in slots:
                if self.rows[s].forced_text:
                    wanted[s] = self.rows[s].forced_text.pop(0)
            forced = wanted.to(self.device)
        user_now = user_now.to(self.device, torch.long)
        if self.graphs is None:
            packed = self.compute(n, ready, user_now, forced, self.span(n))
        else:  # the graph's output is overwritten by the next replay: keep a copy
            packed = self.graphs(n, (ready, user_now, forced), self.span(n)).clone()
        self._host_length[mask.nonzero()[0]] += 1
        return Stepped(packed, packed.cpu().numpy())  # the step's one device-to-host copy

    def width(self) -> int:
        """How many slots the next step computes (and ``step_slots`` takes rows for)."""
        return min(self.bucket(), self.max_calls)

    def widths(self) -> list[int]:
        """Every width a step may have: the buckets below ``max_calls``, and ``max_calls``."""
        return sorted({min(bucket(n), self.max_calls) for n in range(1, self.max_calls + 1)})

    def capture_graphs(self) -> None:
        """Capture the step for every bucket and span now (CUDA), not when first needed."""
        if self.graphs is not None:
            context, step = self.context, SPAN_STEP
            spans = sorted({min(context, s) for s in range(step, context + step, step)})
            self.graphs.capture((n, span) for n in self.widths() for span in spans)

    def span(self, n: int) -> int:
        """How much of the ring a step over ``n`` slots reads: every position any of them may
        attend to, rounded up to a multiple of ``SPAN_STEP`` so shapes rarely change."""
        longest = int(self._host_length[:n].max()) + 1
        return min(self.context, -(-longest // SPAN_STEP) * SPAN_STEP)

    def compute(
        self,
        n: int,
        ready: torch.Tensor,
        user_now: torch.Tensor,
        forced: torch.Tensor | None,
        span: int | None = None,
    ) -> torch.Tensor:
        """The step on the first ``n`` slots, device work only (no host sync, no Python loop
        over calls): returns ``(n, 2 + K)`` rows of text token, frame flag and frame codes.
        ``span``: the positions of the ring to read (default all of it; see ``span()``)."""
        length = self._length[:n]
        # Acoustic delay on the caller's stream: codebook 0 of now, 1.. of the previous frame.
        user_in = torch.cat([user_now[:, :1], self._user_prev[:n, 1:]], dim=1)
        streams = torch.stack([self._moshi[:n], user_in], dim=2).reshape(n, 2 * self.k)
        # A stream delayed by d frames has nothing of its own to give while length <= d: it
        # gives its initial token. So a call's first step is all initial tokens (its caller's
        # first frame is not heard), and its second has no acoustic codes yet, Moshi's (those
        # generated at the first step complete no frame) nor the caller's. This is kyutai's
        # LMGen (``offsets <= delays``) and what transformers' generate feeds (its
        # unconditional first frame, then ``build_delay_pattern_mask``).
        streams = torch.where(length[:, None] <= self._delays, self.bos, streams)
        text_in = torch.where(length == 0, self._text_start, self._text[:n])
        audio = self._audio_table[self._stream_index, streams]
        x = self._main.embed_tokens(text_in) + audio.sum(dim=1)
        hidden = self._main_decoder(x, n, length, span or self.context)
        text_logits = self.model.decoder.lm_head(hidden)
        text = self._sample(text_logits, n, 0, self._temps[:n, 0], self.text_top_k)
        if forced is not None:
            text = torch.where(forced >= 0, forced, text)
        generated = self._depth_decoder(hidden, text, n)
        # Codebook 0 generated now completes, with the acoustic codebooks generated now, the
        # frame whose semantic code came one step earlier.
        pending = self._pending[:n]
        frame = torch.cat([pending.clamp_min(0)[:, None], generated[:, 1:]], dim=1)
        packed = torch.cat([text[:, None], (pending >= 0).long()[:, None], frame], dim=1)
        # Only slots with a frame this tick move on.
        self._pending[:n] = torch.where(ready, generated[:, 0], pending)
        self._moshi[:n] = torch.where(ready[:, None], generated, self._moshi[:n])
        self._user_prev[:n] = torch.where(ready[:, None], user_now, self._user_prev[:n])
        self._text[:n] = torch.where(ready, text, self._text[:n])
        self._length[:n] = length + ready.long()
        return packed

    def _main_decoder(
        self, x: torch.Tensor, n: int, length: torch.Tensor, span: int
    ) -> torch.Tensor:
        rows = self._slot_index[:n]
        write = length % self.context
        # Attend to what the slot has written, this position included, within the window.
        limit = torch.clamp(length + 1, max=self.context)[:, None]
        valid = self._positions[None, :span] < limit
        mask = valid[:, None, None, :]
        freqs = length[:, None].float() * self._inv_freq[None, :]
        angles = torch.cat([freqs, freqs], dim=-1)
        cos = (angles.cos() * self._rope_scale).to(self.dtype)[:, None, :]
        sin = (angles.sin() * self._rope_scale).to(self.dtype)[:, None, :]
        for index, layer in enumerate(self._main.layers):
            attn = layer.self_attn
            h = rms(x, layer.input_layernorm)
            q = attn.q_proj.linear(h).view(n, self._heads, self._head_dim)
            k = attn.k_proj.linear(h).view(n, self._kv_heads, self._head_dim)
            v = attn.v_proj.linear(h).view(n, self._kv_heads, self._head_dim)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            keys, values = self._keys[index], self._values[index]
            keys[rows, :, write] = k
            values[rows, :, write] = v
            out = F.scaled_dot_product_attention(
                q[:, :, None, :], keys[:n, :, :span], values[:n, :, :span], attn_mask=mask,
                enable_gqa=self._heads != self._kv_heads,
            )  # fmt: skip
            x = x + attn.o_proj.linear(out.reshape(n, -1))
            x = x + mlp(rms(x, layer.post_attention_layernorm), layer.mlp, None)
        return rms(x, self._main.norm)

    def _depth_decoder(self, hidden: torch.Tensor, text: torch.Tensor, n: int) -> torch.Tensor:
        depth = self._depth
        codes = []
        token = text
        for c in range(self.k):
            table = depth.text_embed_tokens if c == 0 else depth.embed_tokens[c - 1]
            x = table(token) + F.linear(hidden, depth.input_projections.weight[c])
            for index, layer in enumerate(depth.layers):
                attn = layer.self_attn
                h = rms(x, layer.input_layernorm)
                q = F.linear(h, attn.q_proj.linear.weight[c]).view(n, self._d_heads, 1, -1)
                k = F.linear(h, attn.k_proj.linear.weight[c]).view(n, self._d_kv_heads, -1)
                v = F.linear(h, attn.v_proj.linear.weight[c]).view(n, self._d_kv_heads, -1)
                self._d_keys[index, :n, :, c] = k
                self._d_values[index, :n, :, c] = v
                out = F.scaled_dot_product_attention(
                    q, self._d_keys[index, :n, :, : c + 1], self._d_values[index, :n, :, : c + 1],
                    enable_gqa=self._d_heads != self._d_kv_heads,
                )  # fmt: skip
                x = x + F.linear(out.reshape(n, -1), attn.o_proj.linear.weight[c])
                x = x + mlp(rms(x, layer.post_attention_layernorm), layer.mlp, c)
            logits = F.linear(x, depth.lm_heads.weight[c])
            token = self._sample(logits, n, c + 1, self._temps[:n, 1], self.top_k)
            codes.append(token)
        return torch.stack(codes, dim=1)

    def _sample(
        self, logits: torch.Tensor, n: int, stream: int, temperature: torch.Tensor, top_k: int
    ) -> torch.Tensor:
        """Gumbel-max sampling from the ``top_k`` likeliest at each slot's temperature (greedy
        at 0), all slots at once.

        The noise is ``s2s.noise.gumbel`` of (slot's seed, its step, ``stream``): counter-based,
        so it needs no generator state and is the same whichever slots share the batch.
        """
        logits = logits.float()
        noise = gumbel(self._seed[:n], self._length[:n], stream, logits.shape[-1])
        kept = logits
        if top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            kept = logits.masked_fill(logits < kth, float("-inf"))
        scores = kept / temperature.clamp_min(1e-6)[:, None] + noise
        return torch.where(temperature > 0, scores.argmax(dim=-1), logits.argmax(dim=-1))

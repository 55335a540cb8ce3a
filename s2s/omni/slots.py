"""Key/value caches for many calls in one tensor, and the prefill and decode of a Qwen3 decoder
over them.

A ``SlotCache`` holds, for every decoder layer, keys and values ``(slots, kv_heads, capacity,
head_dim)`` and each slot's length. One call owns one slot from its prefill to its end; its
prefill runs into the slot piece by piece (``extend``: each piece attends to the slot's earlier
positions and causally to itself), and each decode step appends one position to each stepping
slot. Slots fill at different lengths, so a step masks every slot's keys past its own length: a
call's output is the same whichever other calls step beside it. A server allocates every slot's
capacity at load (``OmniEngine``'s ``positions``, from the prompt budget and the longest reply),
so no step reallocates; past it, capacity doubles (a copy of every layer, which also drops the
captured steps), as it does from a small start where nothing was set.

``extend`` (a piece of one slot's prompt) and ``decode`` (one new position per stepping slot)
run through the layers of a Qwen3-style decoder (the thinker's text model or the talker's): the
layers' own projections, norms and rotary embedding, attention over the slot cache, and the
feed-forward through ``moe.feed_forward``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional

from s2s.omni.layers import Rotary, causal_rows, grouped_attention, project, rms_norm
from s2s.omni.moe import feed_forward


@dataclass(frozen=True, slots=True)
class Visual:
    """The vision tower's deepstack features for a piece of a prompt: ``mask`` ``(n,)`` marks
    the piece's picture positions, ``features[i]`` ``(mask.sum(), hidden)`` is added to them
    after decoder layer ``i``."""

    mask: Tensor
    features: list[Tensor]


@dataclass(frozen=True, slots=True)
class _Decode:
    """What every layer of one decode step reads: the stepping slots (``index``), their lengths
    before the step, how far into the cache they look and the mask of their positions there,
    and the new positions' rotary angles. With ``queries`` (one row per slot of the cache, zero
    where no call steps), attention runs over every slot of the cache in place, and ``mask`` is
    every slot's."""

    index: Tensor
    lengths: Tensor
    visible: int
    mask: Tensor
    rotary: Rotary
    queries: Tensor | None


class SlotCache:
    """Per-layer keys and values for ``slots`` calls, each slot with its own length."""

    def __init__(
        self, layers: Any, slots: int, capacity: int = 256, scratch: int | None = None
    ) -> None:
        """``scratch``: a slot no call owns, where a batch's padding rows write."""
        attention = layers[0].self_attn
        weight = attention.k_proj.weight
        self.kv_heads = attention.k_proj.out_features // attention.head_dim
        self.head_dim = int(attention.head_dim)
        self.heads_per_kv = attention.q_proj.out_features // attention.head_dim // self.kv_heads
        shape = (slots, self.kv_heads, capacity, self.head_dim)
        self.keys = [weight.new_zeros(shape) for _ in layers]
        self.values = [weight.new_zeros(shape) for _ in layers]
        self.slots = slots
        self.lengths = torch.zeros(slots, dtype=torch.long, device=weight.device)
        # The same on the host, so a step sizes its attention without waiting for the device.
        self.host_lengths = [0] * slots
        self.capacity = capacity
        self.scratch = scratch

    @property
    def nbytes(self) -> int:
        """The keys and values of every slot and layer, in bytes."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def reserve(self, length: int) -> None:
        """Grow every layer so a slot can hold ``length`` positions."""
        if length <= self.capacity:
            return
        capacity = self.capacity
        while capacity < length:
            capacity *= 2
        extra = capacity - self.capacity
        self.keys = [functional.pad(k, (0, 0, 0, extra)) for k in self.keys]
        self.values = [functional.pad(v, (0, 0, 0, extra)) for v in self.values]
        self.capacity = capacity

    def attend(self, layer: int, attention: Any, hidden: Tensor, step: _Decode) -> Tensor:
        """One new position per slot of ``step`` (``hidden`` ``(batch, 1, hidden)``) through
        ``attention``; its key and value are appended to those slots."""
        query, key, value = self._project(attention, hidden, step.rotary)
        self.keys[layer][step.index, :, step.lengths] = key[:, :, 0]
        self.values[layer][step.index, :, step.lengths] = value[:, :, 0]
        if step.queries is not None:
            # The cache read where it lies; each slot's query in its place (padding rows all
            # write the scratch slot's, whose output nobody reads).
            keys = self.keys[layer][:, :, : step.visible]
            values = self.values[layer][:, :, : step.visible]
            queries = step.queries
            queries[step.index] = query
            everyone = grouped_attention(queries, keys, values, attention.scaling, step.mask)
            attended = everyone[step.index]
        else:
            keys = self.keys[layer][step.index, :, : step.visible]
            values = self.values[layer][step.index, :, : step.visible]
            attended = grouped_attention(query, keys, values, attention.scaling, step.mask)
        out: Tensor = attention.o_proj(attended)
        return out

    def _project(self, attention: Any, hidden: Tensor, rotary: Rotary
                 ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """Queries, keys and values ``(batch, heads, positions, head_dim)``, rotated."""
        return project(attention, hidden, rotary, self.head_dim)

    def clear(self, slot: int, keep: int = 0) -> None:
        """Empty slot ``slot`` for a new prefill, but for its first ``keep`` positions."""
        self.lengths[slot] = keep
        self.host_lengths[slot] = keep

    def extend(self, model: Any, hidden: Tensor, positions: Tensor, slot: int,
               visual: Visual | None = None, keep: int | None = None
               ) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        """Run ``hidden`` ``(1, n, hidden)``, the next ``n`` prompt positions of ``slot``, through
        the decoder ``model``: a piece of a prefill, attending to what the slot holds and
        causally to itself, its keys and values appended to the slot. ``positions`` ``(3, 1, n)``
        are the pieces' multimodal RoPE positions; ``visual`` adds the vision tower's deepstack
        features after the first layers, as the thinker's own forward does.

        Returns the normed last hidden ``(1, n, hidden)`` and, with ``keep``, the hidden state
        transformers reports as ``hidden_states[keep]`` (0: the input; k: layer k's output
        before its deepstack addition; the last: the normed output)."""
        count = hidden.shape[1]
        start = self.host_lengths[slot]
        end = start + count
        self.reserve(end + 1)
        rotary = Rotary.of(*model.rotary_emb(hidden, positions))
        mask = causal_rows(start, count, self.heads_per_kv, hidden.device)
        kept = hidden if keep == 0 else None
        for number, layer in enumerate(model.layers):
            attention = layer.self_attn
            query, key, value = self._project(
                attention, rms_norm(layer.input_layernorm, hidden), rotary
            )
            self.keys[number][slot, :, start:end] = key[0]
            self.values[number][slot, :, start:end] = value[0]
            attended = grouped_attention(
                query,
                self.keys[number][slot : slot + 1, :, :end],
                self.values[number][slot : slot + 1, :, :end],
                attention.scaling,
                mask,
            )
            hidden = hidden + attention.o_proj(attended)
            hidden = hidden + feed_forward(
                layer.mlp, rms_norm(layer.post_attention_layernorm, hidden)
            )
            if keep == number + 1:
                kept = hidden
            if visual is not None and number < len(visual.features):
                hidden = hidden.clone()  # not in place: ``kept`` may be this very tensor
                hidden[0, visual.mask] += visual.features[number].to(hidden.dtype)
        self.lengths[slot] = end
        self.host_lengths[slot] = end
        out = rms_norm(model.norm, hidden)
        if keep == len(model.layers):
            kept = out
        return out, kept

    def visible(self, slots: list[int], span: int = 1) -> int:
        """How far into the cache a decode step of ``slots`` looks: the longest slot's length
        plus its new position, rounded up to a multiple of ``span`` (a few fixed sizes, so a
        captured step is reused; positions past a slot's own are masked). Grows the cache to
        hold it."""
        needed = max(self.host_lengths[slot] for slot in slots) + 1
        visible = -(-needed // span) * span
        if needed <= self.capacity:  # the last span is cut at the capacity: one more size
            visible = min(visible, self.capacity)
        self.reserve(visible)
        return visible

    def visible_sizes(self, span: int) -> list[int]:
        """Every size ``visible(slots, span)`` can give within the capacity: each multiple of
        ``span``, the last cut at the capacity (a graph is captured for each)."""
        return [min(end, self.capacity) for end in range(span, self.capacity + span, span)]

    def advance(self, slots: list[int]) -> None:
        """The host's side of a decode step of ``slots``: one more position each."""
        for slot in slots:
            self.host_lengths[slot] += 1

    def decode(self, model: Any, hidden: Tensor, deltas: Tensor, index: Tensor, visible: int
               ) -> Tensor:  # fmt: skip
        """Run ``hidden`` ``(batch, 1, hidden)`` through the decoder ``model`` (its ``layers``,
        ``norm`` and ``rotary_emb``) as the next position of each slot in ``index`` (on the
        device), looking ``visible`` positions in (``visible(slots)``); ``deltas`` ``(batch,)``
        is each call's multimodal RoPE offset. Returns the normed last hidden.

        Only the device moves: the caller calls ``advance(slots)`` for the slots that stepped,
        so a captured decode can be replayed. A slot may appear more than once (padding rows on
        the ``scratch`` slot, whose length is set back to 0 after each step)."""
        lengths = self.lengths[index]
        # Text positions continue from the prompt; all three RoPE axes move together.
        positions = (lengths + deltas)[None, :, None].expand(3, -1, -1)
        rotary = Rotary.of(*model.rotary_emb(hidden, positions))
        # Picking the stepping slots' keys and values out of the cache copies them, so a step
        # would move three times what it reads; over every slot in place it reads each slot
        # once, steps or not: less whenever a third of the slots step (a choice of the batch
        # size alone, so a captured step keeps it).
        queries = None
        if 3 * index.shape[0] >= self.slots:
            heads = self.kv_heads * self.heads_per_kv
            queries = hidden.new_zeros(self.slots, heads, 1, self.head_dim)
        seen = lengths if queries is None else self.lengths
        # Each slot sees its own positions and the new one, whatever the others hold.
        mask = torch.arange(visible, device=hidden.device) <= seen[:, None]
        step = _Decode(index, lengths, visible, mask[:, None, None, :], rotary, queries)
        for number, layer in enumerate(model.layers):
            residual = hidden
            normed = rms_norm(layer.input_layernorm, hidden)
            hidden = residual + self.attend(number, layer.self_attn, normed, step)
            hidden = hidden + feed_forward(
                layer.mlp, rms_norm(layer.post_attention_layernorm, hidden)
            )
        self.lengths[index] = lengths + 1
        if self.scratch is not None:
            self.lengths[self.scratch] = 0
        out = rms_norm(model.norm, hidden)
        return out

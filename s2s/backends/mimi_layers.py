"""The layers of a ``MimiModel`` run chunk by chunk, each with its state for a batch of calls.

The streaming codec (``mimi_stream``) is a list of these. Each wraps one loaded module and calls
its weights (nothing copied or trained) and holds its streaming state, all tensors with one row
per call, batch first:

- causal ``Conv1d`` (``CausalConv``): ``cache`` ``(batch, in_channels, kernel - stride)``, the
  last inputs the next chunk's first outputs still need (dilation counted in the kernel). Zeros
  at the start, as offline left padding; a ``replicate``-padded conv (the encoder's downsample)
  instead copies a row's first input in, flagged by ``fresh`` ``(batch,)``.
- ``ConvTranspose1d`` (``CausalConvTranspose``): ``tail`` ``(batch, out_channels,
  kernel - stride)``, the end of the last output that overlaps the next chunk's start, without
  bias. Offline causal trimming cuts exactly this much off the right end, so holding it back and
  adding it to the next chunk gives the same samples.
- transformer (``StreamingTransformer``): ``positions`` ``(batch,)``, each row's next RoPE
  position, and per layer ``keys``/``values`` ``(batch, kv_heads, capacity, head_dim)`` with
  RoPE applied: a ring per row, step ``p`` in ring position ``p % capacity``, holding the last
  ``sliding_window - 1`` steps. Which step a position holds follows from ``positions`` alone, so
  rows need not step together: a row that skips a tick keeps its keys and position, and a reset
  row (position 0) sees no old keys.

The state is allocated once for a fixed number of rows (one per call slot) and updated in
place. A step runs the first ``n`` rows (``x`` has ``n`` rows) with an optional ``ready`` mask
``(n,)``: every row computes, but only ready rows' state moves on (``None``: every row). So a
step's shapes depend on ``n`` alone and it never reads a value back to the host, which is what
CUDA graph capture needs.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional
from transformers.models.mimi.modeling_mimi import (
    MimiConv1d,
    MimiConvTranspose1d,
    MimiResnetBlock,
    MimiTransformerLayer,
    MimiTransformerModel,
    apply_rotary_pos_emb,
)


class StreamingLayer(Protocol):
    """One layer run chunk by chunk, with whatever state that needs for each row."""

    def __call__(self, x: Tensor, ready: Tensor | None, /) -> Tensor:
        """Run the next chunk ``x`` of the first ``len(x)`` rows; only ``ready`` rows move on."""

    def reset(self, rows: Tensor) -> None:
        """Forget the state of the rows where the boolean ``(batch,)`` mask ``rows`` is set."""


def _update(state: Tensor, new: Tensor, ready: Tensor | None) -> None:
    """Write ``new`` over the first ``len(new)`` rows of ``state``, where ``ready``."""
    old = state[: new.shape[0]]
    if ready is None:
        old.copy_(new)
    else:
        old.copy_(torch.where(ready.view(-1, *[1] * (new.dim() - 1)), new, old))


class _Stateless:
    """A layer that looks at one time step at a time (an activation)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __call__(self, x: Tensor, ready: Tensor | None) -> Tensor:
        out: Tensor = self.layer(x)
        return out

    def reset(self, rows: Tensor) -> None:
        pass


class CausalConv:
    """A causal ``MimiConv1d`` that carries its left context from chunk to chunk."""

    def __init__(self, layer: MimiConv1d, batch: int) -> None:
        if not layer.causal or layer.pad_mode not in ("constant", "replicate"):
            raise ValueError(f"cannot stream a conv with causal={layer.causal} {layer.pad_mode=}")
        self.conv: nn.Conv1d = layer.conv
        self.context = int(layer.padding_total)
        self.replicate = layer.pad_mode == "replicate"
        weight = self.conv.weight
        self.cache = weight.new_zeros(batch, self.conv.in_channels, self.context)
        self.fresh = torch.ones(batch, dtype=torch.bool, device=weight.device)

    def __call__(self, x: Tensor, ready: Tensor | None) -> Tensor:
        n = x.shape[0]
        cache = self.cache[:n]
        if self.replicate:
            # Offline replicate padding repeats the clip's first sample, which a row only
            # sees in its first chunk.
            fresh = self.fresh[:n]
            cache = torch.where(fresh[:, None, None], x[:, :, :1].expand_as(cache), cache)
            _update(self.fresh, torch.zeros_like(fresh), ready)
        full = torch.cat([cache, x], dim=-1)
        # Chunks are whole multiples of the stride, so the next window starts exactly here.
        _update(self.cache, full[..., full.shape[-1] - self.context :], ready)
        out: Tensor = self.conv(full)
        return out

    def reset(self, rows: Tensor) -> None:
        self.cache.masked_fill_(rows[:, None, None], 0.0)
        self.fresh.logical_or_(rows)


class CausalConvTranspose:
    """A causal ``MimiConvTranspose1d`` that overlap-adds each chunk's tail into the next."""

    def __init__(self, layer: MimiConvTranspose1d, batch: int) -> None:
        self.conv: nn.ConvTranspose1d = layer.conv
        kernel, stride = self.conv.kernel_size[0], self.conv.stride[0]
        self.overlap = kernel - stride
        if not layer.causal or int(layer.padding_left) != 0:
            raise ValueError("streaming needs causal transposed convs trimmed on the right only")
        if self.overlap > stride:
            # The tail is added to the next chunk's output, which can be a single step long.
            raise ValueError(f"transposed conv kernel {kernel} overlaps more than stride {stride}")
        self.tail = self.conv.weight.new_zeros(batch, self.conv.out_channels, self.overlap)

    def __call__(self, x: Tensor, ready: Tensor | None) -> Tensor:
        y: Tensor = self.conv(x)
        end = y.shape[-1] - self.overlap
        head = y[..., : self.overlap] + self.tail[: x.shape[0]]
        tail = y[..., end:]
        if self.conv.bias is not None:
            # The next chunk's output carries the bias already.
            tail = tail - self.conv.bias[:, None]
        _update(self.tail, tail, ready)
        return torch.cat([head, y[..., self.overlap : end]], dim=-1)

    def reset(self, rows: Tensor) -> None:
        self.tail.masked_fill_(rows[:, None, None], 0.0)


class _Residual:
    """A ``MimiResnetBlock``: its block and shortcut each streamed."""

    def __init__(self, layer: MimiResnetBlock, batch: int) -> None:
        self.block = [streaming_layer(inner, batch) for inner in layer.block]
        self.shortcut = streaming_layer(layer.shortcut, batch)

    def __call__(self, x: Tensor, ready: Tensor | None) -> Tensor:
        h = x
        for step in self.block:
            h = step(h, ready)
        return self.shortcut(x, ready) + h

    def reset(self, rows: Tensor) -> None:
        for step in (*self.block, self.shortcut):
            step.reset(rows)


def streaming_layer(layer: nn.Module, batch: int) -> StreamingLayer:
    """The streaming form of one SEANet layer; an unknown layer fails rather than drift."""
    match layer:
        case MimiConv1d():
            return CausalConv(layer, batch)
        case MimiConvTranspose1d():
            return CausalConvTranspose(layer, batch)
        case MimiResnetBlock():
            return _Residual(layer, batch)
        case nn.ELU() | nn.Identity():
            return _Stateless(layer)
    raise TypeError(f"no streaming form for {type(layer).__name__}")


class StreamingTransformer:
    """A ``MimiTransformerModel`` with a per-row ring of keys and values over its window."""

    def __init__(self, model: MimiTransformerModel, batch: int) -> None:
        config = model.config
        self.layers = [layer for layer in model.layers if isinstance(layer, MimiTransformerLayer)]
        if len(self.layers) != len(model.layers):
            raise TypeError("a Mimi transformer layer of an unknown kind cannot be streamed")
        self.rotary = model.rotary_emb
        self.window = int(config.sliding_window)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim or config.hidden_size // self.heads
        # The next query is at least one step later, so it sees window - 1 cached steps.
        self.capacity = max(self.window - 1, 1)
        weight = self.layers[0].self_attn.q_proj.weight
        shape = (batch, self.kv_heads, self.capacity, self.head_dim)
        # Written in place, so no two of these may share memory.
        self.keys = [weight.new_zeros(shape) for _ in self.layers]
        self.values = [weight.new_zeros(shape) for _ in self.layers]
        self.positions = torch.zeros(batch, dtype=torch.long, device=weight.device)

    def __call__(self, x: Tensor, ready: Tensor | None) -> Tensor:
        """Run ``x`` ``(n, time, hidden)`` on after everything the first n rows have seen."""
        batch, steps, _ = x.shape
        positions = self.positions[:batch]
        new = positions[:, None] + torch.arange(steps, device=x.device)
        cos, sin = self.rotary(x, new)
        mask = self._mask(positions, new)
        # Only the last ``capacity`` new steps outlive this call; each goes to its own place.
        kept = new[:, -self.capacity :]
        places = (torch.arange(batch, device=x.device)[:, None], kept % self.capacity)
        for index, layer in enumerate(self.layers):
            x = self._layer(index, layer, x, cos, sin, mask, ready, places)
        moved = steps if ready is None else ready.long() * steps
        positions.add_(moved)
        return x

    def _cached_positions(self, positions: Tensor) -> Tensor:
        """The step each slot holds, ``(batch, capacity)``; negative where it holds none.

        Slot ``s`` holds the last step before ``positions`` that is ``s`` modulo the capacity.
        """
        last = positions[:, None] - 1
        slots = torch.arange(self.capacity, device=positions.device)
        return last - (last - slots) % self.capacity

    def _mask(self, positions: Tensor, new: Tensor) -> Tensor:
        """Which cached and new steps each new step attends to: ``(batch, 1, steps, keys)``."""
        keys = torch.cat([self._cached_positions(positions), new], dim=1)
        distance = new[:, :, None] - keys[:, None, :]
        allowed = (keys >= 0)[:, None, :] & (distance >= 0) & (distance < self.window)
        return allowed[:, None]

    def _layer(
        self,
        index: int,
        layer: MimiTransformerLayer,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        ready: Tensor | None,
        places: tuple[Tensor, Tensor],
    ) -> Tensor:
        attention = layer.self_attn
        batch, steps, _ = x.shape
        h = layer.input_layernorm(x)
        shape = (batch, steps, -1, self.head_dim)
        query = attention.q_proj(h).view(shape).transpose(1, 2)
        key = attention.k_proj(h).view(shape).transpose(1, 2)
        value = attention.v_proj(h).view(shape).transpose(1, 2)
        # The library's own rotation, so streaming rotates exactly as offline does.
        query, key = apply_rotary_pos_emb(query, key, cos, sin)  # type: ignore[no-untyped-call]
        keys = torch.cat([self.keys[index][:batch], key], dim=2)
        values = torch.cat([self.values[index][:batch], value], dim=2)
        # In place, and only for the rows that stepped: the rest of the ring stays.
        kept = places[1].shape[1]
        for ring, new in ((self.keys[index], key), (self.values[index], value)):
            written = new[:, :, -kept:].transpose(1, 2)
            if ready is not None:
                written = torch.where(
                    ready[:, None, None, None], written, ring[places[0], :, places[1]]
                )
            ring[places[0], :, places[1]] = written
        if self.kv_heads != self.heads:
            keys = keys.repeat_interleave(self.heads // self.kv_heads, dim=1)
            values = values.repeat_interleave(self.heads // self.kv_heads, dim=1)
        attended = functional.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=attention.scaling
        )
        attended = attended.transpose(1, 2).reshape(batch, steps, -1)
        x = x + layer.self_attn_layer_scale(attention.o_proj(attended))
        out: Tensor = x + layer.mlp_layer_scale(layer.mlp(layer.post_attention_layernorm(x)))
        return out

    def reset(self, rows: Tensor) -> None:
        # Position 0 means the ring holds no step of this row: its old keys are masked out.
        self.positions.masked_fill_(rows, 0)

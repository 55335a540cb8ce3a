"""Streaming Mimi codec: one 80 ms frame in, one frame out, for a batch of calls.

``MimiStreamEncoder.step`` turns ``(batch, channels, 1920)`` float32 audio at 24 kHz into that
frame's codes ``(batch, num_quantizers, 1)``; ``MimiStreamDecoder.step`` turns one frame of codes
back into 1920 samples. Each row of the batch is one call. Fed frame by frame, both give what
``MimiModel.encode`` / ``MimiModel.decode`` give for the whole clip (codes equal, audio within
float rounding), which transformers' own ``decode`` does not: it keeps no convolution state, so
decoding frame by frame clicks at every frame edge.

Both walk the modules of a loaded ``MimiModel`` and call their weights; nothing is copied or
trained. The encoder is transformers' streaming encoder (padding caches plus a transformer KV
cache) rebuilt from the same pieces, so that one row can be reset without touching the others.

State, all tensors with the batch first, kept apart from the (shared, read-only) model:

- causal ``Conv1d`` (``_CausalConv``): ``cache`` ``(batch, in_channels, kernel - stride)``, the
  last inputs the next chunk's first outputs still need (dilation counted in the kernel). Zeros
  at the start, as offline left padding; a ``replicate``-padded conv (the encoder's downsample)
  instead copies a row's first input in, flagged by ``fresh`` ``(batch,)``.
- ``ConvTranspose1d`` (``_CausalConvTranspose``): ``tail`` ``(batch, out_channels,
  kernel - stride)``, the end of the last output that overlaps the next chunk's start, without
  bias. Offline causal trimming cuts exactly this much off the right end, so holding it back and
  adding it to the next chunk gives the same samples.
- transformer (``_Transformer``): per layer ``keys``/``values`` ``(batch, kv_heads, kept,
  head_dim)`` with RoPE applied, at most ``sliding_window - 1`` steps; ``valid`` ``(batch,
  kept)`` marks which cached steps belong to the row's current call, and ``positions``
  ``(batch,)`` its next RoPE position. Rows step in lockstep, so the cache is one shared length;
  a reset row masks its old steps out and counts its positions from 0 again.

Every public method runs under ``torch.inference_mode()``; nothing here does I/O.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional
from transformers import MimiModel
from transformers.models.mimi.modeling_mimi import (
    MimiConv1d,
    MimiConvTranspose1d,
    MimiResnetBlock,
    MimiTransformerLayer,
    MimiTransformerModel,
    apply_rotary_pos_emb,
)


class _Step(Protocol):
    """One layer run chunk by chunk, with whatever state that needs."""

    def __call__(self, x: Tensor, /) -> Tensor: ...

    def reset(self, rows: Tensor) -> None:
        """Forget the state of the rows where the boolean ``(batch,)`` mask ``rows`` is set."""


class _Stateless:
    """A layer that looks at one time step at a time (an activation)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __call__(self, x: Tensor) -> Tensor:
        out: Tensor = self.layer(x)
        return out

    def reset(self, rows: Tensor) -> None:
        pass


class _CausalConv:
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

    def __call__(self, x: Tensor) -> Tensor:
        cache = self.cache
        if self.replicate:
            # Offline replicate padding repeats the clip's first sample, which a row only
            # sees in its first chunk.
            first = x[:, :, :1].expand_as(cache)
            cache = torch.where(self.fresh[:, None, None], first, cache)
            self.fresh = torch.zeros_like(self.fresh)
        full = torch.cat([cache, x], dim=-1)
        # Chunks are whole multiples of the stride, so the next window starts exactly here.
        self.cache = full[..., full.shape[-1] - self.context :]
        out: Tensor = self.conv(full)
        return out

    def reset(self, rows: Tensor) -> None:
        self.cache = self.cache.masked_fill(rows[:, None, None], 0.0)
        self.fresh = self.fresh | rows


class _CausalConvTranspose:
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

    def __call__(self, x: Tensor) -> Tensor:
        y: Tensor = self.conv(x)
        end = y.shape[-1] - self.overlap
        head = y[..., : self.overlap] + self.tail
        tail = y[..., end:]
        if self.conv.bias is not None:
            # The next chunk's output carries the bias already.
            tail = tail - self.conv.bias[:, None]
        self.tail = tail
        return torch.cat([head, y[..., self.overlap : end]], dim=-1)

    def reset(self, rows: Tensor) -> None:
        self.tail = self.tail.masked_fill(rows[:, None, None], 0.0)


class _Residual:
    """A ``MimiResnetBlock``: its block and shortcut each streamed."""

    def __init__(self, layer: MimiResnetBlock, batch: int) -> None:
        self.block = [_stream(inner, batch) for inner in layer.block]
        self.shortcut = _stream(layer.shortcut, batch)

    def __call__(self, x: Tensor) -> Tensor:
        h = x
        for step in self.block:
            h = step(h)
        return self.shortcut(x) + h

    def reset(self, rows: Tensor) -> None:
        for step in (*self.block, self.shortcut):
            step.reset(rows)


def _stream(layer: nn.Module, batch: int) -> _Step:
    """The streaming form of one SEANet layer; an unknown layer fails rather than drift."""
    match layer:
        case MimiConv1d():
            return _CausalConv(layer, batch)
        case MimiConvTranspose1d():
            return _CausalConvTranspose(layer, batch)
        case MimiResnetBlock():
            return _Residual(layer, batch)
        case nn.ELU() | nn.Identity():
            return _Stateless(layer)
    raise TypeError(f"no streaming form for {type(layer).__name__}")


class _Transformer:
    """A ``MimiTransformerModel`` with a per-row KV cache over its sliding window."""

    def __init__(self, model: MimiTransformerModel, batch: int) -> None:
        config = model.config
        self.layers = [layer for layer in model.layers if isinstance(layer, MimiTransformerLayer)]
        if len(self.layers) != len(model.layers):
            raise TypeError("a Mimi transformer layer of an unknown kind cannot be streamed")
        self.rotary = model.rotary_emb
        self.window: int | None = config.sliding_window
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim or config.hidden_size // self.heads
        weight = self.layers[0].self_attn.q_proj.weight
        empty = weight.new_zeros(batch, self.kv_heads, 0, self.head_dim)
        self.keys = [empty] * len(self.layers)
        self.values = [empty] * len(self.layers)
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=weight.device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=weight.device)

    def __call__(self, x: Tensor) -> Tensor:
        """Run ``x`` ``(batch, time, hidden)`` on after everything seen so far."""
        steps = x.shape[1]
        offsets = torch.arange(steps, device=x.device)
        cos, sin = self.rotary(x, self.positions[:, None] + offsets)
        mask = self._mask(steps)
        for index, layer in enumerate(self.layers):
            x = self._layer(index, layer, x, cos, sin, mask)
        self.positions = self.positions + steps
        self.valid = torch.cat([self.valid, self.valid.new_ones(x.shape[0], steps)], dim=1)
        if self.window is not None:
            # The next query is at least one step later, so it sees window - 1 cached steps.
            keep = self.window - 1
            self.keys = [k[:, :, -keep:] for k in self.keys]
            self.values = [v[:, :, -keep:] for v in self.values]
            self.valid = self.valid[:, -keep:]
        return x

    def _mask(self, steps: int) -> Tensor:
        """Which cached and new steps each new step attends to: ``(batch, 1, steps, keys)``."""
        past = self.valid.shape[1]
        query = past + torch.arange(steps, device=self.valid.device)[:, None]
        key = torch.arange(past + steps, device=self.valid.device)[None, :]
        distance = query - key
        allowed = distance >= 0
        if self.window is not None:
            allowed = allowed & (distance < self.window)
        valid = torch.cat([self.valid, self.valid.new_ones(self.valid.shape[0], steps)], dim=1)
        return allowed[None, None] & valid[:, None, None, :]

    def _layer(
        self,
        index: int,
        layer: MimiTransformerLayer,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
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
        key = torch.cat([self.keys[index], key], dim=2)
        value = torch.cat([self.values[index], value], dim=2)
        self.keys[index], self.values[index] = key, value
        if self.kv_heads != self.heads:
            key = key.repeat_interleave(self.heads // self.kv_heads, dim=1)
            value = value.repeat_interleave(self.heads // self.kv_heads, dim=1)
        attended = functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=attention.scaling
        )
        attended = attended.transpose(1, 2).reshape(batch, steps, -1)
        x = x + layer.self_attn_layer_scale(attention.o_proj(attended))
        out: Tensor = x + layer.mlp_layer_scale(layer.mlp(layer.post_attention_layernorm(x)))
        return out

    def reset(self, rows: Tensor) -> None:
        self.valid = self.valid & ~rows[:, None]
        self.positions = self.positions.masked_fill(rows, 0)


class _Codec:
    """What the encoder and decoder share: the model, the batch, and resetting rows."""

    def __init__(self, model: MimiModel, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.frame_samples = int(model.config.frame_size)
        self.num_quantizers = int(model.config.num_quantizers)
        self.channels = int(model.config.audio_channels)
        self.device = next(model.parameters()).device
        self._steps: list[_Step] = []

    def reset(self, row: int | None = None) -> None:
        """Start row ``row`` (one call) afresh, or every row when ``row`` is None."""
        if row is not None and not 0 <= row < self.batch_size:
            raise IndexError(f"row {row} is outside a batch of {self.batch_size}")
        rows = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        rows[slice(None) if row is None else row] = True
        with torch.inference_mode():
            for step in self._steps:
                step.reset(rows)


class MimiStreamEncoder(_Codec):
    """Audio to codes, one or more whole 80 ms frames per call, for ``batch_size`` calls."""

    def __init__(self, model: MimiModel, batch_size: int = 1) -> None:
        super().__init__(model, batch_size)
        encoder = model.encoder
        if encoder is None:
            raise ValueError("this MimiModel was loaded without its encoder")
        with torch.inference_mode():
            self._seanet = [_stream(layer, batch_size) for layer in encoder.encoder_seanet.layers]
            self._transformer = _Transformer(encoder.encoder_transformer, batch_size)
            downsample = encoder.downsample
            self._downsample = None if downsample is None else _CausalConv(downsample, batch_size)
        self._steps = [*self._seanet, self._transformer]
        if self._downsample is not None:
            self._steps.append(self._downsample)

    def step(self, audio: Tensor) -> Tensor:
        """Codes ``(batch, num_quantizers, frames)`` of ``audio`` ``(batch, channels, samples)``.

        ``samples`` is a whole number of frames (``frame_samples`` each, normally one).
        """
        batch, channels, samples = audio.shape
        if (batch, channels) != (self.batch_size, self.channels) or (
            samples == 0 or samples % self.frame_samples
        ):
            raise ValueError(
                f"expected audio (batch={self.batch_size}, channels={self.channels}, "
                f"a multiple of {self.frame_samples} samples), got {tuple(audio.shape)}"
            )
        with torch.inference_mode():
            h = audio
            for layer in self._seanet:
                h = layer(h)
            h = self._transformer(h.transpose(1, 2)).transpose(1, 2)
            if self._downsample is not None:
                h = self._downsample(h)
            codes = self.model.quantizer.encode(h, self.num_quantizers)
            return codes.transpose(0, 1)


class MimiStreamDecoder(_Codec):
    """Codes to audio, one or more frames per call, for ``batch_size`` calls."""

    def __init__(self, model: MimiModel, batch_size: int = 1) -> None:
        super().__init__(model, batch_size)
        decoder = model.decoder
        if decoder is None:
            raise ValueError("this MimiModel was loaded without its decoder")
        with torch.inference_mode():
            upsample = decoder.upsample
            self._upsample = (
                None if upsample is None else _CausalConvTranspose(upsample, batch_size)
            )
            self._transformer = _Transformer(decoder.decoder_transformer, batch_size)
            self._seanet = [_stream(layer, batch_size) for layer in decoder.decoder_seanet.layers]
        self._steps = [self._transformer, *self._seanet]
        if self._upsample is not None:
            self._steps.append(self._upsample)

    def step(self, codes: Tensor) -> Tensor:
        """Audio ``(batch, channels, frames * frame_samples)`` of ``codes`` ``(batch, q, frames)``.

        ``q`` may be fewer than ``num_quantizers`` (the first ``q`` codebooks), as offline.
        """
        batch, quantizers, frames = codes.shape
        if batch != self.batch_size or not 0 < quantizers <= self.num_quantizers or frames == 0:
            raise ValueError(
                f"expected codes (batch={self.batch_size}, at most {self.num_quantizers} "
                f"quantizers, at least one frame), got {tuple(codes.shape)}"
            )
        with torch.inference_mode():
            h = self.model.quantizer.decode(codes)
            if self._upsample is not None:
                h = self._upsample(h)
            h = self._transformer(h.transpose(1, 2)).transpose(1, 2)
            for layer in self._seanet:
                h = layer(h)
            return h

"""Qwen3-Omni's ``code2wav`` run frame by frame for many calls, equal to decoding the whole reply.

``Code2WavStream.step(codes, slots)`` turns one codec frame per call (``(batch, quantizers)``)
into that frame's audio at once. Every part of code2wav is causal: the sliding-window
transformer (a ring of its last ``window - 1`` keys per call, from ``mimi_layers``), causal
convolutions (each keeps its last ``kernel - 1`` inputs per call) and transposed convolutions
(each keeps the tail of its last output, which overlaps the next frame's, as offline causal
trimming cuts exactly that tail off). A transposed conv with ``kernel > stride`` also trims
``kernel - stride`` samples off the start of the whole clip; a call's first frame is run apart
from the others' so only it loses them. So the audio of a call, frame after frame, is what
``code2wav(all codes)`` gives, to float rounding, and what ``generate()`` returns for replies up
to ``chunked_decode``'s 300-frame chunk (longer ones it decodes with 25 frames of left context,
an approximation that streaming does not need).

A call's first frame yields fewer than ``total_upsample`` (1920) samples, by what those
start trims cost; every later frame yields exactly 1920. State is indexed by slot; ``reset(slot)``
starts a slot afresh for a new call.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeCausalConvNet,
    Qwen3OmniMoeCausalTransConvNet,
    Qwen3OmniMoeCode2Wav,
    Qwen3OmniMoeCode2WavDecoderBlock,
    Qwen3OmniMoeCode2WavDecoderResidualUnit,
    Qwen3OmniMoeConvNeXtBlock,
    Qwen3OmniMoeSnakeBeta,
)

from s2s.backends.mimi_layers import StreamingTransformer
from s2s.hosttraffic import upload


class _Conv:
    """A causal conv (stride 1) that keeps its last ``kernel - 1`` inputs per slot."""

    def __init__(self, layer: Qwen3OmniMoeCausalConvNet, slots: int) -> None:
        if layer.stride != 1:
            raise ValueError(f"cannot stream a conv with stride {layer.stride}")
        self.conv = layer.conv
        self.context = int(layer.padding)
        self.cache = layer.conv.weight.new_zeros(slots, layer.conv.in_channels, self.context)

    def __call__(self, x: Tensor, slots: Tensor, fresh: bool) -> Tensor:
        if self.context == 0:
            out: Tensor = self.conv(x)
            return out
        full = torch.cat([self.cache[slots], x], dim=-1)
        self.cache[slots] = full[..., full.shape[-1] - self.context :]
        out = self.conv(full)
        return out

    def reset(self, slot: int) -> None:
        self.cache[slot] = 0.0


class _TransConv:
    """A causal transposed conv that overlap-adds its tail into the next frame's output."""

    def __init__(self, layer: Qwen3OmniMoeCausalTransConvNet, slots: int) -> None:
        self.conv = layer.conv
        kernel, stride = self.conv.kernel_size[0], self.conv.stride[0]
        self.overlap = kernel - stride
        if layer.left_pad != self.overlap or layer.right_pad != self.overlap:
            raise ValueError("expected a transposed conv trimmed by kernel - stride on each side")
        if self.overlap > stride:
            raise ValueError(f"transposed conv kernel {kernel} overlaps more than stride {stride}")
        self.tail = self.conv.weight.new_zeros(slots, self.conv.out_channels, self.overlap)

    def __call__(self, x: Tensor, slots: Tensor, fresh: bool) -> Tensor:
        y: Tensor = self.conv(x)
        if self.overlap == 0:
            return y
        end = y.shape[-1] - self.overlap
        head = y[..., : self.overlap] + self.tail[slots]
        tail = y[..., end:]
        if self.conv.bias is not None:
            tail = tail - self.conv.bias[:, None]  # the next frame's output carries it already
        self.tail[slots] = tail
        out = torch.cat([head, y[..., self.overlap : end]], dim=-1)
        # Offline, the clip's first ``overlap`` samples are trimmed as well.
        return out[..., self.overlap :] if fresh else out

    def reset(self, slot: int) -> None:
        self.tail[slot] = 0.0


class _Stateless:
    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __call__(self, x: Tensor, slots: Tensor, fresh: bool) -> Tensor:
        out: Tensor = self.layer(x)
        return out

    def reset(self, slot: int) -> None:
        pass


class _Chain:
    """Layers one after the other, optionally added to the input (a residual unit)."""

    def __init__(self, layers: list[Any], residual: bool = False) -> None:
        self.layers = layers
        self.residual = residual

    def __call__(self, x: Tensor, slots: Tensor, fresh: bool) -> Tensor:
        h = x
        for layer in self.layers:
            h = layer(h, slots, fresh)
        return x + h if self.residual else h

    def reset(self, slot: int) -> None:
        for layer in self.layers:
            layer.reset(slot)


class _ConvNeXt:
    """A ConvNeXt block: its depthwise causal conv streamed, the pointwise rest as is."""

    def __init__(self, block: Qwen3OmniMoeConvNeXtBlock, slots: int) -> None:
        self.block = block
        self.dwconv = _Conv(block.dwconv, slots)

    def __call__(self, x: Tensor, slots: Tensor, fresh: bool) -> Tensor:
        b = self.block
        h = self.dwconv(x, slots, fresh).permute(0, 2, 1)
        h = b.pwconv2(b.act(b.pwconv1(b.norm(h))))
        out: Tensor = x + (b.gamma * h).permute(0, 2, 1)
        return out

    def reset(self, slot: int) -> None:
        self.dwconv.reset(slot)


def _streaming(layer: nn.Module, slots: int) -> Any:
    """The streaming form of one code2wav layer; an unknown layer fails rather than drift."""
    match layer:
        case Qwen3OmniMoeCausalConvNet():
            return _Conv(layer, slots)
        case Qwen3OmniMoeCausalTransConvNet():
            return _TransConv(layer, slots)
        case Qwen3OmniMoeConvNeXtBlock():
            return _ConvNeXt(layer, slots)
        case Qwen3OmniMoeSnakeBeta():
            return _Stateless(layer)
        case Qwen3OmniMoeCode2WavDecoderBlock():
            return _Chain([_streaming(inner, slots) for inner in layer.block])
        case Qwen3OmniMoeCode2WavDecoderResidualUnit():
            parts = [layer.act1, layer.conv1, layer.act2, layer.conv2]
            return _Chain([_streaming(inner, slots) for inner in parts], residual=True)
    raise TypeError(f"no streaming form for {type(layer).__name__}")


class _Transformer(StreamingTransformer):
    """code2wav's sliding-window ``pre_transformer``: its layers have Mimi's layout (layer
    scales, q/k/v/o projections, RoPE), so Mimi's streaming transformer runs them."""

    def __init__(self, model: Any, slots: int) -> None:
        config = model.config
        self.layers = cast(Any, list(model.layers))
        self.rotary = model.rotary_emb
        self.window = int(config.sliding_window)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.capacity = max(self.window - 1, 1)
        weight = model.layers[0].self_attn.q_proj.weight
        shape = (slots, self.kv_heads, self.capacity, self.head_dim)
        self.keys = [weight.new_zeros(shape) for _ in self.layers]
        self.values = [weight.new_zeros(shape) for _ in self.layers]
        self.positions = torch.zeros(slots, dtype=torch.long, device=weight.device)


class Code2WavStream:
    """``code2wav`` frame by frame for up to ``slots`` calls, each in its own slot.

    ``scratch`` is a slot no call owns (by default one more, past ``slots``): the rows of a
    batch that must not move a call's state (a call's first frame in the part for later frames,
    padding) run on it."""

    def __init__(self, model: Qwen3OmniMoeCode2Wav, slots: int, scratch: int | None = None) -> None:
        self.model = model
        self.quantizers = int(model.config.num_quantizers)
        self.scratch = slots if scratch is None else scratch
        self.slots = max(slots, self.scratch + 1)
        self.transformer = _Transformer(model.pre_transformer, self.slots)
        pairs = cast(Any, model.upsample)  # (transposed conv, ConvNeXt block) per ratio
        self.upsample = [_streaming(block, self.slots) for blocks in pairs for block in blocks]
        self.decoder = [_streaming(block, self.slots) for block in model.decoder]
        self.fresh = [True] * self.slots

    def reset(self, slot: int) -> None:
        """Start slot ``slot`` afresh, for a new call."""
        mask = torch.zeros_like(self.transformer.positions, dtype=torch.bool)
        mask[slot] = True
        self.transformer.reset(mask)
        for layer in (*self.upsample, *self.decoder):
            layer.reset(slot)
        self.fresh[slot] = True

    @torch.inference_mode()
    def step(self, codes: Tensor, slots: list[int]) -> list[Tensor]:
        """One frame ``codes`` ``(batch, quantizers)`` of each call in ``slots``; returns each
        call's new samples (1-D float tensors, in [-1, 1])."""
        if codes.shape != (len(slots), self.quantizers):
            raise ValueError(f"expected codes ({len(slots)}, {self.quantizers}), got {codes.shape}")
        columns = self.columns(slots)
        uploaded = upload(codes.device, torch.int64, **columns)
        later = self.later(codes, uploaded, self.span(columns))
        first = self.first(codes, columns, uploaded)
        self.advance(slots)
        fresh = dict(zip(columns["c2w.fresh.rows"], first or [], strict=False))
        return [fresh[row] if row in fresh else later[row] for row in range(len(slots))]

    def columns(self, slots: list[int], rows: int | None = None) -> dict[str, list[int]]:
        """The host columns ``later`` and ``first`` read for a batch of one frame per slot in
        ``slots`` (a step sends them with its others in one upload): ``c2w.later``, each row's
        slot, the scratch slot where the row is its call's first frame and for padding up to
        ``rows``; ``c2w.fresh.rows`` and ``c2w.fresh.slots``, the rows that are first frames
        (a first frame trims the clip's start, so it runs apart) and their slots."""
        fresh = [i for i, slot in enumerate(slots) if self.fresh[slot]]
        later = [self.scratch if self.fresh[slot] else slot for slot in slots]
        later += [self.scratch] * ((rows or len(slots)) - len(slots))
        return {
            "c2w.later": later,
            "c2w.fresh.rows": fresh,
            "c2w.fresh.slots": [slots[i] for i in fresh],
        }

    def span(self, columns: dict[str, list[int]]) -> int:
        """How many slots ``later`` runs the transformer over for ``columns``: up to the highest
        one in the batch (``slots`` for a step of fixed shape)."""
        return max(columns["c2w.later"]) + 1

    def later(self, codes: Tensor, uploaded: dict[str, Tensor], span: int) -> Tensor:
        """The audio ``(batch, 1920)`` of every row's frame as a later frame of its call, on the
        device; rows that are first frames or padding run on the scratch slot (their audio is
        meaningless). Only device work: a fixed shape per batch size and ``span``."""
        out: Tensor = self._run(codes, uploaded["c2w.later"], span, fresh=False)[:, 0]
        return out

    def first(
        self, codes: Tensor, columns: dict[str, list[int]], uploaded: dict[str, Tensor]
    ) -> list[Tensor] | None:
        """The audio of the rows that are their call's first frame (shorter than 1920 samples,
        by the start trims), in ``c2w.fresh.rows`` order; None when there are none."""
        chosen = columns["c2w.fresh.slots"]
        if not chosen:
            return None
        picked = codes[uploaded["c2w.fresh.rows"]]
        wav = self._run(picked, uploaded["c2w.fresh.slots"], max(chosen) + 1, fresh=True)
        return list(wav[:, 0])

    def advance(self, slots: list[int]) -> None:
        """The host's side of a step of ``slots``: none of them is at its first frame now."""
        for slot in slots:
            self.fresh[slot] = False

    def _run(self, codes: Tensor, slots: Tensor, rows: int, fresh: bool) -> Tensor:
        model = self.model
        hidden = model.code_embedding(codes[:, :, None] + model.code_offset).mean(1)
        # The transformer runs the first ``rows`` slots, the ones not stepping unready.
        spread = hidden.new_zeros(rows, *hidden.shape[1:])
        spread[slots] = hidden
        ready = torch.zeros(rows, dtype=torch.bool, device=hidden.device)
        ready[slots] = True
        hidden = model.pre_transformer.norm(self.transformer(spread, ready)[slots])
        hidden = hidden.permute(0, 2, 1)
        for layer in (*self.upsample, *self.decoder):
            hidden = layer(hidden, slots, fresh)
        out: Tensor = hidden.clamp(min=-1, max=1)
        return out

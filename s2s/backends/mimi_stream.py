"""Streaming Mimi codec: one 80 ms frame in, one frame out, for a batch of calls.

``MimiStreamEncoder.step`` turns ``(batch, channels, 1920)`` float32 audio at 24 kHz into that
frame's codes ``(batch, num_quantizers, 1)``; ``MimiStreamDecoder.step`` turns one frame of codes
back into 1920 samples. Each row of the batch is one call. Fed frame by frame, both give what
``MimiModel.encode`` / ``MimiModel.decode`` give for the whole clip (codes equal, audio within
float rounding), which transformers' own ``decode`` does not: it keeps no convolution state, so
decoding frame by frame clicks at every frame edge.

Both walk the modules of a loaded ``MimiModel`` and call their weights; nothing is copied or
trained. The encoder is transformers' streaming encoder (padding caches plus a transformer KV
cache) rebuilt from the same pieces (``mimi_layers``, which describes the state), so that calls
can share one batch and still come and go on their own. The state has one row per call slot,
allocated once (``slots``), as the Moshi engine's slots:

- ``reset(row)`` starts one slot afresh (a call joining it, or a barge-in);
- ``step(x, ready)`` runs the first ``len(x)`` rows; only the rows where ``ready`` is set (those
  with a frame this tick; ``None``: all) move on, the others' state stays exactly as it was, and
  each ready row's output is what that call alone, fed only its own frames, would give.

A step's shapes depend only on how many rows it runs, it reads nothing back to the host and
it writes the state in place, so it can be captured as a CUDA graph. Every public method runs
under ``torch.inference_mode()``; nothing here does I/O.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import MimiModel

from s2s.backends.mimi_layers import (
    CausalConv,
    CausalConvTranspose,
    StreamingLayer,
    StreamingTransformer,
    streaming_layer,
)


class _Codec:
    """What the encoder and decoder share: the model, the batch, and its rows coming and going."""

    def __init__(self, model: MimiModel, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"a codec needs at least one slot, got {slots}")
        self.model = model
        self.slots = slots
        self.frame_samples = int(model.config.frame_size)
        self.num_quantizers = int(model.config.num_quantizers)
        self.channels = int(model.config.audio_channels)
        self.device = next(model.parameters()).device
        self._layers: list[StreamingLayer] = []

    def reset(self, row: int | None = None) -> None:
        """Start slot ``row`` (one call) afresh, or every slot when ``row`` is None."""
        if row is not None and not 0 <= row < self.slots:
            raise IndexError(f"row {row} is outside a codec of {self.slots} slots")
        rows = torch.zeros(self.slots, dtype=torch.bool, device=self.device)
        rows[slice(None) if row is None else row] = True
        with torch.inference_mode():
            for layer in self._layers:
                layer.reset(rows)

    def _check(self, batch: int, ready: Tensor | None, what: str) -> None:
        if not 0 < batch <= self.slots:
            raise ValueError(f"expected {what} for 1 to {self.slots} slots, got {batch} rows")
        if ready is not None and (ready.shape != (batch,) or ready.dtype != torch.bool):
            raise ValueError(
                f"ready must be a bool mask of shape ({batch},), got {ready.dtype} "
                f"{tuple(ready.shape)}"
            )


class MimiStreamEncoder(_Codec):
    """Audio to codes, one or more whole 80 ms frames per call, for ``batch_size`` calls."""

    def __init__(self, model: MimiModel, slots: int = 1) -> None:
        super().__init__(model, slots)
        encoder = model.encoder
        if encoder is None:
            raise ValueError("this MimiModel was loaded without its encoder")
        with torch.inference_mode():
            self._seanet = [streaming_layer(x, slots) for x in encoder.encoder_seanet.layers]
            self._transformer = StreamingTransformer(encoder.encoder_transformer, slots)
            downsample = encoder.downsample
            self._downsample = None if downsample is None else CausalConv(downsample, slots)
        self._layers = [*self._seanet, self._transformer]
        if self._downsample is not None:
            self._layers.append(self._downsample)

    def step(self, audio: Tensor, ready: Tensor | None = None) -> Tensor:
        """Codes ``(n, num_quantizers, frames)`` of ``audio`` ``(n, channels, samples)``, the
        first ``n`` slots' next audio; only the slots where ``ready`` (``(n,)`` bool) is set
        move on (``None``: all). ``samples`` is a whole number of frames (normally one).
        """
        batch, channels, samples = audio.shape
        self._check(batch, ready, "audio")
        if channels != self.channels or samples == 0 or samples % self.frame_samples:
            raise ValueError(
                f"expected audio (n, channels={self.channels}, a multiple of "
                f"{self.frame_samples} samples), got {tuple(audio.shape)}"
            )
        with torch.inference_mode():
            h = audio
            for layer in self._seanet:
                h = layer(h, ready)
            h = self._transformer(h.transpose(1, 2), ready).transpose(1, 2)
            if self._downsample is not None:
                h = self._downsample(h, ready)
            codes = self.model.quantizer.encode(h, self.num_quantizers)
            return codes.transpose(0, 1)


class MimiStreamDecoder(_Codec):
    """Codes to audio, one or more frames per call, for ``batch_size`` calls."""

    def __init__(self, model: MimiModel, slots: int = 1) -> None:
        super().__init__(model, slots)
        decoder = model.decoder
        if decoder is None:
            raise ValueError("this MimiModel was loaded without its decoder")
        with torch.inference_mode():
            upsample = decoder.upsample
            self._upsample = None if upsample is None else CausalConvTranspose(upsample, slots)
            self._transformer = StreamingTransformer(decoder.decoder_transformer, slots)
            self._seanet = [streaming_layer(x, slots) for x in decoder.decoder_seanet.layers]
        self._layers = [self._transformer, *self._seanet]
        if self._upsample is not None:
            self._layers.append(self._upsample)

    def step(self, codes: Tensor, ready: Tensor | None = None) -> Tensor:
        """Audio ``(n, channels, frames * frame_samples)`` of ``codes`` ``(n, q, frames)``, the
        first ``n`` slots' next codes; ``ready`` as in ``MimiStreamEncoder.step``. ``q`` may be
        fewer than ``num_quantizers`` (the first ``q`` codebooks), as offline.
        """
        batch, quantizers, frames = codes.shape
        self._check(batch, ready, "codes")
        if not 0 < quantizers <= self.num_quantizers or frames == 0:
            raise ValueError(
                f"expected codes (n, at most {self.num_quantizers} quantizers, at least one "
                f"frame), got {tuple(codes.shape)}"
            )
        with torch.inference_mode():
            h = self.model.quantizer.decode(codes)
            if self._upsample is not None:
                h = self._upsample(h, ready)
            h = self._transformer(h.transpose(1, 2), ready).transpose(1, 2)
            for layer in self._seanet:
                h = layer(h, ready)
            return h

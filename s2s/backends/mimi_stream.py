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
can share one batch and still come and go on their own:

- ``add_row()`` appends a fresh call and ``remove_row(row)`` drops one; the rows after it move
  down by one, so whoever maps calls to rows must shift its own indices the same way;
- ``reset(row)`` starts one call afresh;
- ``step(x, rows)`` advances only the calls in ``rows`` (those that have a frame this tick); the
  others' state stays exactly as it was, and each row's output is what that call alone, fed only
  its own frames, would give.

Every public method runs under ``torch.inference_mode()``; nothing here does I/O.
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

    def __init__(self, model: MimiModel, batch_size: int) -> None:
        if batch_size < 0:
            raise ValueError(f"batch_size must not be negative, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.frame_samples = int(model.config.frame_size)
        self.num_quantizers = int(model.config.num_quantizers)
        self.channels = int(model.config.audio_channels)
        self.device = next(model.parameters()).device
        self._layers: list[StreamingLayer] = []

    def reset(self, row: int | None = None) -> None:
        """Start row ``row`` (one call) afresh, or every row when ``row`` is None."""
        if row is not None:
            self._check_row(row)
        rows = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        rows[slice(None) if row is None else row] = True
        with torch.inference_mode():
            for layer in self._layers:
                layer.reset(rows)

    def add_row(self) -> int:
        """Append a row for a new call, as a stream just made, and return its index."""
        with torch.inference_mode():
            for layer in self._layers:
                layer.add_row()
        self.batch_size += 1
        return self.batch_size - 1

    def remove_row(self, row: int) -> None:
        """Drop row ``row`` (a call that ended): every row after it moves down by one."""
        self._check_row(row)
        with torch.inference_mode():
            for layer in self._layers:
                layer.remove_row(row)
        self.batch_size -= 1

    def _check_row(self, row: int) -> None:
        if not 0 <= row < self.batch_size:
            raise IndexError(f"row {row} is outside a batch of {self.batch_size}")

    def _stepping(self, rows: Tensor | None) -> tuple[int, Tensor | None]:
        """How many rows step, and which (on the model's device; None when all of them)."""
        if rows is None:
            return self.batch_size, None
        # A handful of indices, checked on the host (pass them there: on a GPU, tolist waits).
        well_typed = rows.dim() == 1 and rows.dtype == torch.long
        index = rows.tolist() if well_typed else []
        in_batch = not index or (index[0] >= 0 and index[-1] < self.batch_size)
        if not (well_typed and index == sorted(set(index)) and in_batch):
            raise ValueError(
                f"rows must be sorted distinct long indices into a batch of {self.batch_size}, "
                f"got {rows}"
            )
        # Every row in order is the common tick; it needs no gathering.
        return len(index), None if len(index) == self.batch_size else rows.to(self.device)


class MimiStreamEncoder(_Codec):
    """Audio to codes, one or more whole 80 ms frames per call, for ``batch_size`` calls."""

    def __init__(self, model: MimiModel, batch_size: int = 1) -> None:
        super().__init__(model, batch_size)
        encoder = model.encoder
        if encoder is None:
            raise ValueError("this MimiModel was loaded without its encoder")
        with torch.inference_mode():
            self._seanet = [streaming_layer(x, batch_size) for x in encoder.encoder_seanet.layers]
            self._transformer = StreamingTransformer(encoder.encoder_transformer, batch_size)
            downsample = encoder.downsample
            self._downsample = None if downsample is None else CausalConv(downsample, batch_size)
        self._layers = [*self._seanet, self._transformer]
        if self._downsample is not None:
            self._layers.append(self._downsample)

    def step(self, audio: Tensor, rows: Tensor | None = None) -> Tensor:
        """Codes ``(batch, num_quantizers, frames)`` of ``audio`` ``(batch, channels, samples)``.

        ``samples`` is a whole number of frames (``frame_samples`` each, normally one). With
        ``rows`` (sorted distinct row indices, a 1-D long tensor), ``audio`` holds those rows
        only, in that order, and only they advance; otherwise it holds every row.
        """
        stepping, rows = self._stepping(rows)
        batch, channels, samples = audio.shape
        if (batch, channels) != (stepping, self.channels) or (
            samples == 0 or samples % self.frame_samples
        ):
            raise ValueError(
                f"expected audio (batch={stepping}, channels={self.channels}, "
                f"a multiple of {self.frame_samples} samples), got {tuple(audio.shape)}"
            )
        if not stepping:
            # A tick where no call has a frame; the layers need at least one row.
            frames = samples // self.frame_samples
            return torch.zeros(0, self.num_quantizers, frames, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            h = audio
            for layer in self._seanet:
                h = layer(h, rows)
            h = self._transformer(h.transpose(1, 2), rows).transpose(1, 2)
            if self._downsample is not None:
                h = self._downsample(h, rows)
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
            self._upsample = None if upsample is None else CausalConvTranspose(upsample, batch_size)
            self._transformer = StreamingTransformer(decoder.decoder_transformer, batch_size)
            self._seanet = [streaming_layer(x, batch_size) for x in decoder.decoder_seanet.layers]
        self._layers = [self._transformer, *self._seanet]
        if self._upsample is not None:
            self._layers.append(self._upsample)

    def step(self, codes: Tensor, rows: Tensor | None = None) -> Tensor:
        """Audio ``(batch, channels, frames * frame_samples)`` of ``codes`` ``(batch, q, frames)``.

        ``q`` may be fewer than ``num_quantizers`` (the first ``q`` codebooks), as offline.
        ``rows`` picks the rows that step, as in ``MimiStreamEncoder.step``.
        """
        stepping, rows = self._stepping(rows)
        batch, quantizers, frames = codes.shape
        if batch != stepping or not 0 < quantizers <= self.num_quantizers or frames == 0:
            raise ValueError(
                f"expected codes (batch={stepping}, at most {self.num_quantizers} "
                f"quantizers, at least one frame), got {tuple(codes.shape)}"
            )
        if not stepping:
            samples = frames * self.frame_samples
            return torch.zeros(
                0, self.channels, samples, dtype=self.model.dtype, device=self.device
            )
        with torch.inference_mode():
            h = self.model.quantizer.decode(codes)
            if self._upsample is not None:
                h = self._upsample(h, rows)
            h = self._transformer(h.transpose(1, 2), rows).transpose(1, 2)
            for layer in self._seanet:
                h = layer(h, rows)
            return h

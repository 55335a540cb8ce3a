"""Moshi on its device: the worker side of ``moshi:PATH_OR_HUB_ID``.

``MoshiWorker.handle`` runs one tick for every call at once: one batched Mimi streaming encode,
one step of the slot engine (``s2s.backends.moshi_engine``) and one batched Mimi streaming
decode (``s2s.backends.mimi_stream``), and turns Moshi's text tokens into word pieces with the
checkpoint's tokenizer. What those mean for a call's events (responses, transcripts) is the
server's business (``s2s.backends.moshi``).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

import numpy as np
import torch

from s2s.backends.graphs import StepGraphs
from s2s.backends.mimi_stream import MimiStreamDecoder, MimiStreamEncoder
from s2s.backends.moshi_engine import MoshiEngine
from s2s.backends.moshi_rows import Row
from s2s.worker.messages import CallOutput, Change, Hello, Tick, TickResult
from s2s.worker.process import give_up_if_lost, pick_device_and_dtype

log = logging.getLogger(__name__)

#: kyutai's text padding ids: 3 pads Moshi's text stream between words, 0 ends a run of padding
#: (kyutai's servers drop ``text_token in (0, 3)``). Moshi emits them on most frames.
KYUTAI_TEXT_PADDING = frozenset({0, 3})


def text_padding_ids(config: Any) -> frozenset[int]:
    """The text ids that are padding, not words: the checkpoint's ``pad_token_id`` when its
    config names one (in transformers' ``MoshiConfig`` it is the text embeddings' padding id,
    and no other field names text padding), else kyutai's. By number, as a tokenizer need not
    name them as special tokens (hf-moshiko's names only its unk token)."""
    named = getattr(config, "pad_token_id", None)
    if isinstance(named, int):
        return frozenset({named})
    return KYUTAI_TEXT_PADDING


def load_moshi(location: str, device: str | None) -> tuple[Any, Any | None, str]:
    """The checkpoint's model (bf16 on CUDA, fp32 on the CPU) and tokenizer, if it has one."""
    from transformers import AutoTokenizer, MoshiForConditionalGeneration

    chosen, dtype = pick_device_and_dtype(device)
    model: Any = MoshiForConditionalGeneration.from_pretrained(location, dtype=dtype)
    model = model.to(chosen).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError):
        log.info("no tokenizer at %s: Moshi's text stream will not be transcribed", location)
        tokenizer = None
    return model, tokenizer, chosen


def codec_graphs(
    encoder: MimiStreamEncoder, decoder: MimiStreamDecoder, codebooks: int
) -> tuple[StepGraphs, StepGraphs]:
    """The codec's encode and decode steps as CUDA graphs (captured when first used)."""
    slots, device, dtype = encoder.slots, encoder.device, encoder.model.dtype
    ready = torch.zeros(slots, dtype=torch.bool, device=device)
    audio = torch.zeros((slots, 1, encoder.frame_samples), dtype=dtype, device=device)
    codes = torch.zeros((slots, codebooks, 1), dtype=torch.long, device=device)
    encode = StepGraphs(
        "Mimi encode", lambda n, x, mask: encoder.step(x, mask), [audio, ready], (0.0, False)
    )
    decode = StepGraphs(
        "Mimi decode", lambda n, x, mask: decoder.step(x, mask), [codes, ready.clone()], (0, False)
    )
    return encode, decode


class MoshiWorker:
    """Every call's Moshi state on one device, stepped together once per 80 ms frame."""

    def __init__(
        self, model: Any, tokenizer: Any | None, device: str, max_calls: int,
        graphs: bool | None = None,
    ) -> None:  # fmt: skip
        """``graphs``: replay the steps from CUDA graphs (None: on a CUDA device). If setting
        them up fails, the worker says why in its log and runs eagerly (slower, but serving)."""
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self._sentencepiece = tokenizer is not None and any(
            piece.startswith("▁") for piece in tokenizer.get_vocab()
        )
        config = model.config
        # Ids that never become transcript text; padding comes on most frames, and as text
        # it would keep a call's response from ever going quiet (MoshiStream.finish).
        self._not_words = text_padding_ids(config)
        if tokenizer is not None:
            self._not_words |= frozenset(tokenizer.all_special_ids)
        self.rate = int(config.sampling_rate)
        self.frame_samples = int(self.rate / config.audio_encoder_config.frame_rate)
        # Moshi's own window (3000 frames, 4 minutes): longer calls go on over its last 3000.
        context = int(getattr(config, "sliding_window", None) or 3000)
        #: Why the steps run eagerly though graphs were asked for, if they do.
        self.graphs_failed = ""
        try:
            self._build(model, context, max_calls, graphs)
        except (RuntimeError, ValueError) as exc:  # torch's CUDA errors are RuntimeErrors
            if graphs is False:
                raise
            self.graphs_failed = f"{type(exc).__name__}: {exc}"
        if self.graphs_failed:
            # Out of the handler, whose traceback holds the failed engine, and with every
            # reference to it dropped and its cycles (graphs hold its bound step) collected:
            # its caches (1.5 GiB a slot at moshiko's size) are freed before new ones are made.
            log.error("CUDA graphs failed (%s); the steps run eagerly, slower", self.graphs_failed)
            for part in ("engine", "encoder", "decoder", "_encode", "_decode"):
                if hasattr(self, part):
                    delattr(self, part)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self._build(model, context, max_calls, graphs=False)
        self.calls: dict[str, Row] = {}
        #: Calls whose join was refused (every slot in use), and why, until they leave.
        self.refused: dict[str, str] = {}

    def _build(self, model: Any, context: int, max_calls: int, graphs: bool | None) -> None:
        self.engine = MoshiEngine(model, context=context, max_calls=max_calls, graphs=graphs)
        # The codec's rows are the engine's slots: a call's codec state is in its slot's row.
        self.encoder = MimiStreamEncoder(model.audio_encoder, slots=max_calls)
        self.decoder = MimiStreamDecoder(model.audio_encoder, slots=max_calls)
        self._encode: StepGraphs | None = None
        self._decode: StepGraphs | None = None
        if self.engine.graphs is not None:
            self._capture_codec_graphs(model)

    def _capture_codec_graphs(self, model: Any) -> None:
        """CUDA graphs of the codec's steps, and every shape of them and of the engine's step
        captured now, so that no call waits for a capture mid-conversation."""
        self._encode, self._decode = codec_graphs(self.encoder, self.decoder, self.engine.k)
        widths = [(n,) for n in self.engine.widths()]
        self._encode.capture(widths)
        self._decode.capture(widths)
        self.engine.capture_graphs()

    @classmethod
    def load(
        cls, location: str, device: str | None, max_calls: int, graphs: bool | None = None
    ) -> MoshiWorker:
        model, tokenizer, chosen = load_moshi(location, device)
        return cls(model, tokenizer, chosen, max_calls, graphs)

    def hello(self, spec: str) -> Hello:
        return Hello(
            model=spec, device=self.device, input_rate=self.rate, output_rate=self.rate,
            frame_samples=self.frame_samples, slots=self.engine.max_calls,
        )  # fmt: skip

    def handle(self, tick: Tick) -> TickResult:
        started = time.perf_counter()
        for change in tick.changes:
            self._apply(change)
        size = 2 * self.frame_samples
        ready = [c for c, frame in tick.frames.items() if c in self.calls and len(frame) == size]
        outputs = self._step(ready, tick.frames) if ready else {}
        for call, frame in tick.frames.items():
            if call in self.refused:
                outputs[call] = CallOutput(error=self.refused[call])
            elif call in self.calls and len(frame) != size:  # this frame only: skip it
                outputs[call] = CallOutput(error=f"a frame of {len(frame)} bytes, not {size}")
        return TickResult(outputs, step_ms=1000 * (time.perf_counter() - started))

    @torch.inference_mode()
    def _step(self, ready: list[str], frames: dict[str, bytes]) -> dict[str, CallOutput]:
        """One tick for the calls in ``ready``: the same tensor work whatever their number
        (slots are codec rows; no torch operation per call), then per call only bytes."""
        model, engine = self.model, self.engine
        # Every step covers the engine's first n slots, those without a frame unready.
        n = engine.width()
        slots = [self.calls[call].slot for call in ready]
        pcm = np.zeros((n, self.frame_samples), np.float32)
        pcm[slots] = np.stack([np.frombuffer(frames[call], np.int16) for call in ready]) / 32768
        audio = torch.from_numpy(pcm).to(model.device, model.dtype)[:, None, :]
        mask = np.zeros(n, bool)
        mask[slots] = True
        ready_mask = torch.from_numpy(mask).to(model.device)
        if self._encode is None:
            codes = self.encoder.step(audio, ready_mask)
        else:
            codes = self._encode(n, (audio, ready_mask))
        stepped = engine.step_slots(slots, codes[:, : engine.k, 0])
        results = {call: CallOutput(text=self._text(stepped.text(slot)))
                   for call, slot in zip(ready, slots, strict=True)}  # fmt: skip
        talking = mask & stepped.has_frame
        if talking.any():
            talking_mask = torch.from_numpy(talking).to(model.device)
            frames_in = stepped.frames[:, :, None]
            if self._decode is None:
                decoded = self.decoder.step(frames_in, talking_mask)
            else:
                decoded = self._decode(n, (frames_in, talking_mask))
            samples = (decoded.float().clamp(-1, 1) * 32767).reshape(n, -1)
            pcm_out = samples.cpu().numpy().astype(np.int16)
            for call, slot in zip(ready, slots, strict=True):
                if talking[slot]:
                    results[call].audio = pcm_out[slot].tobytes()
        return results

    def _apply(self, change: Change) -> None:
        """A join, leave, reset or steer, between steps."""
        call = change.call
        if change.kind == "join" and call not in self.calls:
            try:
                self.calls[call] = joined = self.engine.join(call)
            except RuntimeError as exc:  # every slot is in use
                give_up_if_lost(self.device, exc)  # or a CUDA error: not a full worker
                self.refused[call] = str(exc)
                return
            self.refused.pop(call, None)  # refused before, joined now
            self.encoder.reset(joined.slot)
            self.decoder.reset(joined.slot)
            return
        row = self.calls.get(call)
        if row is None:
            if change.kind == "leave":
                self.refused.pop(call, None)
            return
        if change.kind == "leave":
            self.engine.leave(self.calls.pop(call))
        elif change.kind == "reset":
            self.engine.reset(row)
            self.encoder.reset(row.slot)
            self.decoder.reset(row.slot)
        elif change.kind == "steer" and self.tokenizer is not None:
            row.forced_text = list(self.tokenizer.encode(change.text, add_special_tokens=False))

    def _text(self, token: int) -> str:
        if self.tokenizer is None or token in self._not_words:
            return ""
        piece: str = self.tokenizer.convert_ids_to_tokens(token)
        # SentencePiece marks a word's start with "▁"; a word-level vocabulary has whole words.
        return piece.replace("▁", " ") if self._sentencepiece else " " + piece

"""Moshi on its device: the worker side of ``moshi:PATH_OR_HUB_ID``.

``MoshiWorker.handle`` runs one tick for every call at once: one batched Mimi streaming encode,
one step of the slot engine (``s2s.backends.moshi_engine``) and one batched Mimi streaming
decode (``s2s.backends.mimi_stream``), and turns Moshi's text tokens into word pieces with the
checkpoint's tokenizer. What those mean for a call's events (responses, transcripts) is the
server's business (``s2s.backends.moshi``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from s2s.backends.mimi_stream import MimiStreamDecoder, MimiStreamEncoder
from s2s.backends.moshi_engine import MoshiEngine, Row
from s2s.worker.messages import CallOutput, Change, Hello, Tick, TickResult

log = logging.getLogger(__name__)


def pick_device_and_dtype(device: str | None) -> tuple[str, Any]:
    chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if chosen.startswith("cuda") else torch.float32
    return chosen, dtype


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


class MoshiWorker:
    """Every call's Moshi state on one device, stepped together once per 80 ms frame."""

    def __init__(self, model: Any, tokenizer: Any | None, device: str, max_calls: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self._sentencepiece = tokenizer is not None and any(
            piece.startswith("▁") for piece in tokenizer.get_vocab()
        )
        self._special = set(tokenizer.all_special_ids) if tokenizer is not None else set()
        config = model.config
        self.rate = int(config.sampling_rate)
        self.frame_samples = int(self.rate / config.audio_encoder_config.frame_rate)
        # Moshi's own window (3000 frames, 4 minutes): longer calls go on over its last 3000.
        context = int(getattr(config, "sliding_window", None) or 3000)
        self.engine = MoshiEngine(model, context=context, max_calls=max_calls)
        if self.engine.graphs is not None:
            # Every shape now, so that no call waits for a capture mid-conversation.
            self.engine.graphs.capture_all()
        # One codec batch for every call: row i of the encoder and decoder is codec_rows[i].
        self.encoder = MimiStreamEncoder(model.audio_encoder, batch_size=0)
        self.decoder = MimiStreamDecoder(model.audio_encoder, batch_size=0)
        self.codec_rows: list[str] = []
        self.calls: dict[str, Row] = {}
        #: Calls whose join was refused (every slot in use), and why, until they leave.
        self.refused: dict[str, str] = {}

    @classmethod
    def load(cls, location: str, device: str | None, max_calls: int) -> MoshiWorker:
        model, tokenizer, chosen = load_moshi(location, device)
        return cls(model, tokenizer, chosen, max_calls)

    def hello(self, spec: str) -> Hello:
        return Hello(
            model=spec, device=self.device, input_rate=self.rate, output_rate=self.rate,
            frame_samples=self.frame_samples, slots=self.engine.max_calls,
        )  # fmt: skip

    def handle(self, tick: Tick) -> TickResult:
        started = time.perf_counter()
        for change in tick.changes:
            self._apply(change)
        ready = sorted(
            (call for call in tick.frames if call in self.calls), key=self.codec_rows.index
        )
        outputs = self._step(ready, tick.frames) if ready else {}
        for call in tick.frames:
            if call in self.refused:
                outputs[call] = CallOutput(error=self.refused[call])
        return TickResult(outputs, step_ms=1000 * (time.perf_counter() - started))

    @torch.inference_mode()
    def _step(self, ready: list[str], frames: dict[str, bytes]) -> dict[str, CallOutput]:
        model = self.model
        pcm = np.stack([np.frombuffer(frames[call], np.int16) for call in ready])
        audio = torch.from_numpy(pcm.astype(np.float32) / 32768)
        audio = audio.to(model.device, model.dtype)[:, None, :]
        rows = torch.tensor([self.codec_rows.index(call) for call in ready])
        codes = self.encoder.step(audio, rows)[:, : self.engine.k, 0]
        stepped = self.engine.step({self.calls[call]: codes[i] for i, call in enumerate(ready)})
        results = {call: CallOutput(text=self._text(stepped[self.calls[call]].text_token))
                   for call in ready}  # fmt: skip
        speaking = [
            (call, c) for call in ready if (c := stepped[self.calls[call]].codes) is not None
        ]
        if speaking:
            frames_in = torch.stack([c for _, c in speaking])[:, :, None]
            codec_rows = torch.tensor([self.codec_rows.index(call) for call, _ in speaking])
            decoded = self.decoder.step(frames_in, codec_rows).float().clamp(-1, 1) * 32767
            samples = decoded.reshape(len(speaking), -1).cpu().numpy().astype(np.int16)
            for i, (call, _) in enumerate(speaking):
                results[call].audio = samples[i].tobytes()
        return results

    def _apply(self, change: Change) -> None:
        """A join, leave, reset or steer, between steps."""
        call = change.call
        if change.kind == "join" and call not in self.calls:
            try:
                self.calls[call] = self.engine.join(call)
            except RuntimeError as exc:  # every slot is in use
                self.refused[call] = str(exc)
                return
            self.codec_rows.append(call)
            self.encoder.add_row()
            self.decoder.add_row()
            return
        row = self.calls.get(call)
        if row is None:
            if change.kind == "leave":
                self.refused.pop(call, None)
            return
        index = self.codec_rows.index(call)
        if change.kind == "leave":
            self.engine.leave(self.calls.pop(call))
            self.codec_rows.pop(index)  # the codec's later rows move down by one, as this list
            self.encoder.remove_row(index)
            self.decoder.remove_row(index)
        elif change.kind == "reset":
            self.engine.reset(row)
            self.encoder.reset(index)
            self.decoder.reset(index)
        elif change.kind == "steer" and self.tokenizer is not None:
            row.forced_text = list(self.tokenizer.encode(change.text, add_special_tokens=False))

    def _text(self, token: int) -> str:
        if self.tokenizer is None or token in self._special:
            return ""
        piece: str = self.tokenizer.convert_ids_to_tokens(token)
        # SentencePiece marks a word's start with "▁"; a word-level vocabulary has whole words.
        return piece.replace("▁", " ") if self._sentencepiece else " " + piece

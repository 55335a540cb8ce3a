"""Server VAD: silero-vad (its weights ship in the wheel) turned into speech start/stop events.

One ``VadService`` per process loads silero once, keeps a pool of per-call model instances
(each carries its own recurrent state) and runs every inference on one dedicated thread, so
VAD never computes on the event loop and never fights the model's executor for cores.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from s2s.protocol.session_config import SemanticVad, ServerVad, TurnDetection

VAD_RATE = 16_000
CHUNK = 512  # silero's window at 16 kHz: 32 ms
_CHUNK_MS = CHUNK * 1000 // VAD_RATE
# Speech ends when the probability falls this far below the start threshold (hysteresis).
_STOP_MARGIN = 0.15
# semantic_vad has no semantic model behind it here: eagerness picks how long a pause ends a turn.
_EAGERNESS_SILENCE_MS = {"low": 1200, "medium": 700, "auto": 700, "high": 350}


#: The VAD's parameters are server_vad's own fields.
VadSettings = ServerVad


def vad_settings(config: TurnDetection) -> VadSettings:
    """The VAD parameters a turn-detection config stands for."""
    match config:
        case ServerVad():
            return config
        case SemanticVad():
            return ServerVad(
                silence_duration_ms=_EAGERNESS_SILENCE_MS[config.eagerness],
                create_response=config.create_response,
                interrupt_response=config.interrupt_response,
            )


@dataclass(frozen=True, slots=True)
class VadEvent:
    kind: Literal["start", "stop"]
    #: Milliseconds of caller audio since the call began (start includes the prefix padding).
    audio_ms: int


class SpeechDetector:
    """One call's VAD state. ``feed`` must run on the service's thread."""

    def __init__(self, model: Any, settings: VadSettings) -> None:
        self.model = model
        self.settings = settings
        self.speaking = False
        self._pending = np.zeros(0, np.float32)
        self._chunks = 0
        self._quiet_ms = 0

    def feed(self, pcm: np.ndarray) -> list[VadEvent]:
        """Run 16 kHz mono ``int16`` audio through silero; return the turns' edges it found."""
        import torch

        samples = np.concatenate([self._pending, pcm.astype(np.float32) / 32768])
        whole = samples.size // CHUNK * CHUNK
        self._pending = samples[whole:]
        events = []
        with torch.inference_mode():
            for start in range(0, whole, CHUNK):
                chunk = torch.from_numpy(samples[start : start + CHUNK])
                probability = float(self.model(chunk, VAD_RATE))
                self._chunks += 1
                events += self._update(probability)
        return events

    def _update(self, probability: float) -> list[VadEvent]:
        now_ms = self._chunks * _CHUNK_MS
        s = self.settings
        if not self.speaking:
            if probability >= s.threshold:
                self.speaking = True
                self._quiet_ms = 0
                onset = now_ms - _CHUNK_MS
                return [VadEvent("start", max(0, onset - s.prefix_padding_ms))]
            return []
        if probability < s.threshold - _STOP_MARGIN:
            self._quiet_ms += _CHUNK_MS
            if self._quiet_ms >= s.silence_duration_ms:
                self.speaking = False
                return [VadEvent("stop", now_ms)]
        else:
            self._quiet_ms = 0
        return []


class VadService:
    """Loads silero once per process and runs every call's VAD on one thread."""

    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vad")
        self._idle: list[Any] = []

    async def start(self) -> None:
        await self._run(_configure_torch)
        self._idle.append(await self._run(_load_model))

    async def detector(self, settings: VadSettings) -> SpeechDetector:
        model = self._idle.pop() if self._idle else await self._run(_load_model)
        return SpeechDetector(model, settings)

    def release(self, detector: SpeechDetector) -> None:
        """Return a call's model to the pool (its state is reset before reuse)."""
        self._executor.submit(detector.model.reset_states)
        self._idle.append(detector.model)

    async def feed(self, detector: SpeechDetector, pcm: np.ndarray) -> list[VadEvent]:
        events: list[VadEvent] = await self._run(detector.feed, pcm)
        return events

    async def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


def _configure_torch() -> None:
    import torch

    # Small per-frame models gain nothing from intra-op threads and would fight the event loop
    # and aiortc's codec threads for the same cores.
    torch.set_num_threads(1)


def _load_model() -> Any:
    from silero_vad import load_silero_vad

    # silero ships a TorchScript file; torch 2.13 warns that torch.jit.load is deprecated.
    # Nothing to do about it here until silero ships another format.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return load_silero_vad()

"""Speech recognition with pocketsphinx and the en-us model its wheel ships.

A decoder holds ~90 MB (acoustic model, language model, dictionary) and carries normalisation
state from one utterance to the next, so each call gets its own from a process-wide pool and
gives it back when it ends; decoders are built on demand and reused, never freed.
"""

from __future__ import annotations

import threading

import numpy as np

ASR_RATE = 16_000


class Recognizer:
    """One pocketsphinx decoder. Not thread-safe: one call's jobs run one at a time."""

    def __init__(self) -> None:
        from pocketsphinx import Decoder

        self._decoder = Decoder(samprate=ASR_RATE, loglevel="FATAL")
        self._in_utterance = False

    def start(self) -> None:
        if self._in_utterance:
            self._decoder.end_utt()
        self._decoder.start_utt()
        self._in_utterance = True

    def feed(self, pcm: np.ndarray) -> None:
        if not pcm.size:
            return
        if not self._in_utterance:
            self.start()
        self._decoder.process_raw(np.ascontiguousarray(pcm, np.int16).tobytes(), False, False)

    def finish(self) -> str:
        """End the utterance and return its transcript ('' if nothing was recognised)."""
        if not self._in_utterance:
            return ""
        self._decoder.end_utt()
        self._in_utterance = False
        hypothesis = self._decoder.hyp()
        return hypothesis.hypstr.strip() if hypothesis is not None else ""


class RecognizerPool:
    def __init__(self) -> None:
        self._idle: list[Recognizer] = []
        self._lock = threading.Lock()

    def acquire(self) -> Recognizer:
        """Take an idle recognizer or build one (~0.3 s). Call from a worker thread."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return Recognizer()

    def release(self, recognizer: Recognizer) -> None:
        recognizer.finish()
        with self._lock:
            self._idle.append(recognizer)


def dither(pcm: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add +/-2 LSB of noise: pocketsphinx's feature extraction misbehaves on exact silence."""
    noise = rng.integers(-2, 3, pcm.size, dtype=np.int16)
    return (pcm.astype(np.int32) + noise).clip(-32768, 32767).astype(np.int16)

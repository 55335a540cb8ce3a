"""Speech recognition with pocketsphinx and the en-us model its wheel ships.

A decoder holds ~90 MB (acoustic model, language model, dictionary) and carries normalisation
state from one utterance to the next, so each call gets its own from a pool in its ASR worker
process and gives it back when it ends; decoders are built on demand and reused, never freed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
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
        """Take an idle recognizer or build one (~0.3 s)."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return Recognizer()

    def release(self, recognizer: Recognizer) -> None:
        recognizer.finish()
        with self._lock:
            self._idle.append(recognizer)


class AsrWorkers:
    """Recognition in worker processes, each call pinned to one of them.

    pocketsphinx holds the GIL while it decodes (tens of milliseconds per call), which would
    stall the event loop and serialise every call's recognition; in separate processes it runs
    beside the loop on the other core. A call's recognizer lives in its worker process, so all
    of one call's jobs go to the same worker and run there in order.
    """

    def __init__(self, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._workers = [
            concurrent.futures.ProcessPoolExecutor(1, mp_context=context) for _ in range(processes)
        ]
        self._next = 0

    def assign(self) -> concurrent.futures.Executor:
        worker = self._workers[self._next % len(self._workers)]
        self._next += 1
        return worker

    async def start(self) -> None:
        # Build one recognizer in each worker up front so the first calls do not wait for it.
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(w, _warm) for w in self._workers))

    def close(self) -> None:
        for worker in self._workers:
            worker.shutdown(wait=True, cancel_futures=True)


# -- what runs inside a worker process ------------------------------------------------------------

_pool = RecognizerPool()
_calls: dict[str, Recognizer] = {}


def _warm() -> None:
    _pool.release(_pool.acquire())


def _recognizer(call_id: str) -> Recognizer:
    if call_id not in _calls:
        _calls[call_id] = _pool.acquire()
    return _calls[call_id]


def worker_start(call_id: str, pcm: np.ndarray) -> None:
    recognizer = _recognizer(call_id)
    recognizer.start()
    recognizer.feed(pcm)


def worker_feed(call_id: str, pcm: np.ndarray) -> None:
    _recognizer(call_id).feed(pcm)


def worker_finish(call_id: str, pcm: np.ndarray) -> str:
    recognizer = _recognizer(call_id)
    recognizer.feed(pcm)
    return recognizer.finish()


def worker_release(call_id: str) -> None:
    recognizer = _calls.pop(call_id, None)
    if recognizer is not None:
        _pool.release(recognizer)


def dither(pcm: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add +/-2 LSB of noise: pocketsphinx's feature extraction misbehaves on exact silence."""
    noise = rng.integers(-2, 3, pcm.size, dtype=np.int16)
    return (pcm.astype(np.int32) + noise).clip(-32768, 32767).astype(np.int16)

"""The caller's audio on its way to a model or the VAD: bounded, and never waited on for ever.

A model or VAD that falls behind must not make the caller's audio pile up in memory, so the
oldest frames are dropped (and counted); a caller that sends nothing at all (its track removed,
its uplink gone) must not freeze a reply a turn-based model is still giving, so past a gap such
a model is handed silence, frame by frame, until the caller's audio comes again.
"""

from __future__ import annotations

import asyncio

import numpy as np

#: How late the caller's next frame may be before silence is handed out instead.
GAP_S = 0.1


class Feed:
    """Frames of ``frame_samples`` int16 samples, at most ``backlog`` waiting."""

    def __init__(self, frame_samples: int, rate: int, backlog: int = 50) -> None:
        self._queue: asyncio.Queue[np.ndarray] = asyncio.Queue(backlog)
        self._frame_s = frame_samples / rate
        self._silence = np.zeros(frame_samples, np.int16)
        self._wait = self._frame_s + GAP_S

    def put(self, frame: np.ndarray) -> int:
        """Queue ``frame``, dropping the oldest if the backlog is full; the number dropped."""
        dropped = 0
        if self._queue.full():
            self._queue.get_nowait()
            dropped = 1
        self._queue.put_nowait(frame)
        return dropped

    async def get(self) -> np.ndarray:
        """The next frame, waiting as long as it takes."""
        return await self._queue.get()

    async def next_or_silence(self) -> np.ndarray:
        """The next frame; silence if none came within a frame and ``GAP_S``, and then one
        frame period after another while none comes."""
        try:
            async with asyncio.timeout(self._wait):
                frame = await self._queue.get()
        except TimeoutError:
            self._wait = self._frame_s
            return self._silence
        self._wait = self._frame_s + GAP_S
        return frame

"""``echo``: returns the caller's audio unchanged, for transport tests and latency measurement.

There is no model compute, so steps run inline on the event loop: a thread hop per 20 ms frame
would cost more than the copy and would hide the transport's own latency. It is continuous, not
turn-based: it never responds, so ``response.create`` is answered with an error.
"""

from __future__ import annotations

import numpy as np

from s2s.backends.base import ContinuousStream, Steering, StepResult


class EchoStream(ContinuousStream):
    def __init__(self) -> None:
        self.closed = False

    async def step(self, pcm: np.ndarray) -> StepResult:
        return StepResult(audio=pcm)

    async def steer(self, steering: Steering) -> None:
        return None

    async def reset(self) -> None:
        return None

    async def close(self) -> None:
        self.closed = True


class EchoBackend:
    name = "echo"
    turn_based = False
    steers = False
    # WebRTC's own rate and packet size: the echo adds no resampling and no framing delay, so
    # what it measures is the transport.
    input_rate = 48_000
    output_rate = 48_000
    frame_samples = 960

    async def open_stream(self, call_id: str) -> EchoStream:
        return EchoStream()

    async def close(self) -> None:
        return None

"""The streaming model interface every backend implements.

A backend is loaded once per process and opens one ``ModelStream`` per call. The session feeds a
stream exactly one input frame at a time (``Backend.frame_samples`` mono ``int16`` samples at
``Backend.input_rate``) and gets back whatever audio and text the model produced for that frame.
A step never covers more than one frame of model work, so a cancel or reset is never stuck behind
a long computation. Backends that compute (torch) run it on their device's executor, never on the
event loop; batching backends may gather steps from many streams into one forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

EMPTY_PCM = np.zeros(0, np.int16)


@dataclass(slots=True)
class StepResult:
    """What one step produced: mono ``int16`` audio at ``Backend.output_rate`` and text."""

    audio: np.ndarray = field(default_factory=lambda: EMPTY_PCM)
    text: str = ""


class ModelStream(Protocol):
    """One call's streaming state on a model."""

    async def step(self, pcm: np.ndarray) -> StepResult:
        """Feed one input frame; return what the model produced for it."""
        ...

    async def reset(self) -> None:
        """Forget pending output and in-flight work (barge-in, ``response.cancel``)."""
        ...

    async def close(self) -> None:
        """Release the call's state. The stream is not used again."""
        ...


class Backend(Protocol):
    """A loaded model that serves many calls."""

    name: str
    input_rate: int
    output_rate: int
    frame_samples: int

    async def open_stream(self, call_id: str) -> ModelStream:
        """Create the per-call state for a new call."""
        ...

    async def close(self) -> None:
        """Unload the model and stop its executor."""
        ...

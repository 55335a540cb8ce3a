"""What the Moshi engine (``s2s.backends.moshi_engine``) keeps per call on the host, and what
one step gives back: a call's ``Row``, its ``RowOutput``, the batch's ``Stepped``."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(eq=False)
class Row:
    """One call: its slot and the host-side part of its state."""

    #: Whose row it is (the caller's label, for logs and debugging).
    key: object
    slot: int
    #: Text tokens to force into Moshi's text stream, one per step (steering).
    forced_text: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RowOutput:
    text_token: int
    #: (K,) a complete frame of Moshi's codes on the engine's device, or None (first step).
    codes: torch.Tensor | None


@dataclass(frozen=True, slots=True)
class Stepped:
    """One step's output for the first ``n`` slots: ``packed`` ``(n, 2 + K)`` on the device
    (text token, frame flag, the frame's K codes) and its host copy ``host``."""

    packed: torch.Tensor
    host: np.ndarray

    def text(self, slot: int) -> int:
        return int(self.host[slot, 0])

    def frame(self, slot: int) -> torch.Tensor | None:
        """The slot's complete frame of codes (K,) on the device, or None (first step)."""
        return self.packed[slot, 2:] if self.host[slot, 1] else None

    @property
    def frames(self) -> torch.Tensor:
        """``(n, K)`` every slot's codes, meaningful where ``has_frame``."""
        return self.packed[:, 2:]

    @property
    def has_frame(self) -> np.ndarray:
        return self.host[:, 1].astype(bool)

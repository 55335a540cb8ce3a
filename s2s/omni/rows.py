"""The host side of a Qwen3-Omni step: each answering call's state (``Row``), the columns of
values a step uploads for its rows, padded to a bucket on the scratch slot, and the step's shape
(``StepShape``: what its device work depends on besides those columns, one CUDA graph each)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from s2s.omni.prefill import Pieces, ThinkerPrompt
from s2s.omni.request import Request
from s2s.omni.sampling import Draws


@dataclass(slots=True)
class Row:
    """One call answering: its request, where it is in its reply and its per-step values."""

    id: int
    slot: int
    request: Request
    text: list[int]  # text tokens made since the last step, reported with it
    first_token: int
    tokens: int = 1
    thinking: bool = True
    speaking: bool = False
    cut: bool = False  # a part stopped at its length limit
    cancelled: bool = False
    thinker_delta: int = 0
    talker_delta: int = 0
    frames: int = 0  # first codes picked so far
    prompt: ThinkerPrompt | None = None  # kept for the conversation's next turn
    talker_prompt: Pieces | None = None  # likewise
    made: list[int] = field(default_factory=list)  # every text token made


#: A step's columns: its ints and its floats, each a list per name.
Columns = tuple[dict[str, list[int]], dict[str, list[float]]]


def think_columns(rows: list[Row], count: int) -> Columns:
    """What thinking the rows' next text tokens reads, padded to ``count`` rows."""
    settings = [r.request.decoding.text for r in rows]
    ints, floats = Draws.columns("text", settings, [(r.request.seed, r.tokens) for r in rows])
    ints |= {
        "think.slot": [r.slot for r in rows],
        "think.delta": [r.thinker_delta for r in rows],
        "think.fixed": [int(r.request.fixed_length) for r in rows],
        # The token this step makes is the last the row may make.
        "think.limit": [int(r.tokens + 1 >= r.request.max_text_tokens) for r in rows],
    }
    return padded(ints, count), padded(floats, count)


def speech_columns(rows: list[Row], count: int) -> Columns:
    """What picking the rows' next first codes reads (``DecodeStep.next_codes``), padded to
    ``count`` rows."""
    settings = [r.request.decoding.speech for r in rows]
    ints, floats = Draws.columns("speech", settings, [(r.request.seed, r.frames) for r in rows])
    ints |= {
        "speak.slot": [r.slot for r in rows],
        "speak.fixed": [int(r.request.fixed_length) for r in rows],
    }
    floats["speak.penalty"] = [r.request.decoding.repetition_penalty for r in rows]
    return padded(ints, count), padded(floats, count)


#: With fixed shapes, attention looks this many positions further at a time.
SPAN = 1024

#: Padding rows' values, by column name's end: greedy, neutral settings, no text this step.
PADDING = {"greedy": 1, "temperature": 1.0, "top_p": 1.0, "penalty": 1.0}


def pad(column: list[Any], count: int, value: Any) -> list[Any]:
    return column + [value] * (count - len(column))


def padded(columns: dict[str, list[Any]], count: int) -> dict[str, list[Any]]:
    """``columns`` padded to ``count`` rows: on the scratch slot (0), with ``PADDING``."""
    return {
        name: pad(column, count, PADDING.get(name.rsplit(".", 1)[-1], 0))
        for name, column in columns.items()
    }


@dataclass(slots=True)
class StepShape:
    """What a step's device work depends on besides its uploaded columns: its batch sizes,
    how far each decoder's attention looks, which draws sample, how many code2wav slots its
    transformer spans, and the caches' capacities (a captured step is valid for exactly one
    shape)."""

    think: int
    speak: int
    think_sees: int = 0
    speak_sees: int = 0
    think_samples: bool = False
    speech_samples: bool = False
    residual_samples: bool = False
    c2w_span: int = 0
    capacities: tuple[int, int] = (0, 0)

    @property
    def think_key(self) -> tuple[Any, ...]:
        """What the think part's device work depends on (``DecodeStep.think``)."""
        return self.think, self.think_sees, self.think_samples, self.capacities[0]

    @property
    def speak_key(self) -> tuple[Any, ...]:
        """What the speak part's device work depends on (``DecodeStep.speak``)."""
        return (self.speak, self.speak_sees, self.speech_samples, self.residual_samples,
                self.c2w_span, self.capacities[1])  # fmt: skip

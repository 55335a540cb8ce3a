"""The host side of a Qwen3-Omni step: each answering call's state (``Row``), the columns of
values a step uploads for its rows, padded to a bucket on the scratch slot, and the step's shape
(``StepShape``: what its device work depends on besides those columns, one CUDA graph each),
which ``StepLayout`` works out from the rows and the caches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from s2s.backends.graphs import bucket
from s2s.omni.code2wav import Code2WavStream
from s2s.omni.prefill import Pieces, ThinkerPrompt
from s2s.omni.request import Decoding, Request
from s2s.omni.sampling import Draws
from s2s.omni.slots import SlotCache


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


@dataclass(slots=True)
class StepLayout:
    """How a step of given rows is laid out: its shape and its host columns, padded to a bucket
    with ``fixed_shapes`` (what a captured step needs; the results are the same)."""

    thinker_cache: SlotCache
    talker_cache: SlotCache
    code2wav: Code2WavStream
    fixed_shapes: bool

    def rows(self, count: int) -> int:
        """How many rows a batch of ``count`` calls runs as (a bucket with fixed shapes)."""
        return bucket(count) if self.fixed_shapes else count

    def plan(self, thinking: list[Row], speaking: list[Row]) -> tuple[StepShape, Columns]:
        """A step's shape, and its host columns (what ``DecodeStep.compute`` reads, then the
        columns of code2wav's first frames, which run apart)."""
        span = SPAN if self.fixed_shapes else 1
        think = self.rows(len(thinking)) if thinking else 0
        speak = self.rows(len(speaking)) if speaking else 0
        ints, floats = self.columns(thinking, speaking, think, speak)
        shape = StepShape(think=think, speak=speak)
        if thinking:
            settings = [r.request.decoding.text for r in thinking]
            shape.think_sees = self.thinker_cache.visible([r.slot for r in thinking], span)
            shape.think_samples = Draws.samples(settings)
        if speaking:
            slots = [r.slot for r in speaking]
            shape.speak_sees = self.talker_cache.visible(slots, span)
            shape.speech_samples = Draws.samples([r.request.decoding.speech for r in speaking])
            shape.residual_samples = Draws.samples([r.request.decoding.residual for r in speaking])
            fixed = self.fixed_shapes
            shape.c2w_span = self.code2wav.slots if fixed else self.code2wav.span(ints)
        shape.capacities = self._capacities  # after visible(), which may grow the caches
        return shape, (ints, floats)

    def columns(self, thinking: list[Row], speaking: list[Row], think: int, speak: int) -> Columns:
        """The host columns of a step of these rows, padded to ``think`` and ``speak`` rows:
        the think part's, the speak part's (if ``speak``), code2wav's first frames'."""
        ints, floats = think_columns(thinking, think)
        more_ints, more_floats = speech_columns(speaking, speak)
        ints |= more_ints
        floats |= more_floats
        if speak:
            settings = [r.request.decoding.residual for r in speaking]
            keys = [(r.request.seed, r.frames - 1) for r in speaking]  # the frame's own index
            residual_ints, residual_floats = Draws.columns("residual", settings, keys)
            thinks = {r.id for r in thinking}
            ints |= padded(residual_ints, speak)
            floats |= padded(residual_floats, speak)
            ints["speak.delta"] = pad([r.talker_delta for r in speaking], speak, 0)
            ints["speak.thought"] = pad([int(r.id in thinks) for r in speaking], speak, 0)
            # Last: code2wav's first frames run apart, after the fixed-shape parts.
            ints |= self.code2wav.columns([r.slot for r in speaking], speak)
        return ints, floats

    def every_shape(
        self, max_rows: int, decoding: Decoding
    ) -> Iterator[tuple[str, Columns, StepShape]]:
        """Every shape of each part of a step that calls decoding as ``decoding`` can meet (with
        fixed shapes): every batch size up to ``max_rows``, every span of the caches as
        allocated; as ``(part, columns, shape)``."""
        for rows in sorted({self.rows(n) for n in range(1, max_rows + 1)}):
            columns = self.columns([], [], rows, rows)
            for sees in self.thinker_cache.visible_sizes(SPAN):
                shape = StepShape(rows, 0, think_sees=sees, capacities=self._capacities,
                                  think_samples=decoding.text is not None)  # fmt: skip
                yield "think", columns, shape
            for sees in self.talker_cache.visible_sizes(SPAN):
                shape = StepShape(
                    0, rows, speak_sees=sees, c2w_span=self.code2wav.slots,
                    capacities=self._capacities, speech_samples=decoding.speech is not None,
                    residual_samples=decoding.residual is not None,
                )  # fmt: skip
                yield "speak", columns, shape

    @property
    def _capacities(self) -> tuple[int, int]:
        return self.thinker_cache.capacity, self.talker_cache.capacity

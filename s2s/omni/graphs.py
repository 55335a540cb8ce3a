"""The Qwen3-Omni decode step replayed from CUDA graphs: each of its two parts, one graph per
shape of that part.

Eager, a decode step at Qwen3-Omni's real depth dispatches about 9,400 operators (48 thinker
layers, 15 code predictor passes of 5 layers, 20 talker layers, code2wav): at a few µs of host
time each, more than half of an 80 ms frame before the GPU has done anything. With fixed shapes
(``OmniEngine(fixed_shapes=True)``: batches padded to a size of ``s2s.backends.graphs.BUCKETS``
on a scratch slot, attention spans rounded up to ``SPAN``) each part of the step's device work
(``DecodeStep.think``, ``DecodeStep.speak``) is one fixed sequence of kernels per shape of that
part (``StepShape.think_key``, ``StepShape.speak_key``) that reads nothing back, so it is
captured once per shape and replayed with one launch. The parts meet only through per-slot
state, so a step of any think shape and any speak shape replays two graphs: as many graphs as
think shapes plus speak shapes (40 + 52 at 8 calls of 8,192 positions), few enough to
capture them all when the worker loads (``OmniEngine.capture``) instead of stalling every call
when a new one is met.

- Inputs: each part's uploaded columns (``THINK_COLUMNS``; the rest but code2wav's first
  frames are the speak part's), copied into the graph's own buffers (one copy per dtype on the
  device) before each replay. The columns of code2wav's first frames come last and are
  nobody's: a call's first frame trims the clip's start, so it runs eagerly after the replay,
  once per call.
- Outputs: the graph's own tensors, valid until the next replay of a graph of the same part
  (each part has its own memory pool, so replaying the speak part keeps the think part's
  tokens); the engine reads them back at once.
- Warm-up and capture run the real part on the real state with the buffers at zero, which puts
  every row on the scratch slot (slot 0, padding's slot), so no call's state moves.
- A cache that grows (``SlotCache.reserve``) moves its tensors: the capacities are part of the
  shapes, and graphs of old capacities are dropped (a worker allocates its caches at load, so
  they do not grow).

Not measured on a GPU yet: ``tests/omni_graphs_check.py`` compares replay with the eager step
there (``scripts/bench_omni.py --check-graphs``). On a CPU, ``rerun=True`` stands in for the
graphs: a "replay" runs the part again on the same buffers and copies its results into the
tensors the capture returned, so everything here but CUDA itself (buffers, layouts, warm-up,
one graph per shape, outputs read after the replay) is tested without a GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sized
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from s2s.hosttraffic import split
from s2s.omni.decode import THINK_COLUMNS

log = logging.getLogger(__name__)

_WARMUP_RUNS = 2
#: A part's device work: its uploaded columns and the step's shape in, its outputs out.
Part = Callable[[dict[str, Tensor], Any], list[Tensor]]
#: The columns of code2wav's first frames: no graph's (they run eagerly after the replay).
_FRESH = "c2w.fresh."


def zeroed(
    int_columns: Mapping[str, Sized], float_columns: Mapping[str, Sized], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Buffers for the columns, all zero: every row on the scratch slot, so a step run on them
    (a capture's warm-up and capture) moves no call's state (``tests/test_omni_graphs.py``)."""
    count = sum(len(v) for v in int_columns.values())
    floats = sum(len(v) for v in float_columns.values())
    return (
        torch.zeros(count, dtype=torch.int64, device=device),
        torch.zeros(floats, dtype=torch.float32, device=device),
    )


def _part(name: str) -> str | None:
    """Which part reads the column ``name``: "think", "speak", or none (code2wav's first)."""
    if name.startswith(THINK_COLUMNS):
        return "think"
    return None if name.startswith(_FRESH) else "speak"


def part_columns(part: str, columns: Mapping[str, Sized]) -> tuple[dict[str, Sized], int]:
    """The columns of ``part`` ("think" or "speak") among a step's ``columns``, and where they
    start in its upload (each part's are consecutive, the think part's first)."""
    mine: dict[str, Sized] = {}
    start = offset = 0
    ended = False
    for name, column in columns.items():
        if _part(name) == part:
            if ended:
                raise ValueError(f"the {part} part's columns are not consecutive")
            start = start if mine else offset
            mine[name] = column
        elif mine:
            ended = True
        offset += len(column)
    return mine, start


@dataclass(frozen=True, slots=True)
class _Graph:
    graph: torch.cuda.CUDAGraph | None  # None: rerun
    ints: Tensor
    floats: Tensor
    layout: tuple[tuple[str, int], ...]
    out: list[Tensor]
    run: Callable[[], list[Tensor]]

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        for captured, fresh in zip(self.out, self.run(), strict=True):
            captured.copy_(fresh)


class OmniGraphs:
    """A step's ``think`` and ``speak`` parts, each replayed from a CUDA graph per shape of it."""

    def __init__(
        self, parts: Mapping[str, Part], device: torch.device, rerun: bool = False
    ) -> None:
        """``parts``: "think" and "speak", each ``part(sent, shape)``. ``rerun``: no CUDA
        graphs, each replay runs the part again (tests on a CPU)."""
        if device.type != "cuda" and not rerun:
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self._parts = dict(parts)
        self._device = device
        self._rerun = rerun
        self._graphs: dict[tuple[Any, ...], _Graph] = {}
        self._capacities: Any = None
        if not rerun:
            self._pools = {name: torch.cuda.graph_pool_handle() for name in parts}
            self._stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def __call__(
        self,
        ints: Tensor,
        floats: Tensor,
        int_columns: Mapping[str, Sized],
        float_columns: Mapping[str, Sized],
        shape: Any,
    ) -> list[Tensor]:
        """Replay the parts of the step of ``shape`` on the uploaded ``ints`` and ``floats``
        (laid out as ``int_columns`` and ``float_columns``): the think part's outputs, then the
        speak part's, as ``DecodeStep.compute`` returns them."""
        # Every part's graph first: a capture that fails then leaves the step undone, so that
        # the engine can run all of it eagerly (a think part replayed already would run twice).
        graphs = []
        for part in self.parts_of(shape):
            mine, int_start = part_columns(part, int_columns)
            floating, float_start = part_columns(part, float_columns)
            graphs.append((self._graph(part, mine, floating, shape), int_start, float_start))
        out: list[Tensor] = []
        for found, int_start, float_start in graphs:
            found.ints.copy_(ints[int_start : int_start + found.ints.numel()])
            found.floats.copy_(floats[float_start : float_start + found.floats.numel()])
            found.replay()
            out += found.out
        return out

    @staticmethod
    def parts_of(shape: Any) -> list[str]:
        """The parts a step of ``shape`` runs, in order."""
        return [part for part, rows in (("think", shape.think), ("speak", shape.speak)) if rows]

    def capture(
        self, part: str, int_columns: Mapping[str, Sized], float_columns: Mapping[str, Sized],
        shape: Any,
    ) -> None:  # fmt: skip
        """Capture ``part`` for ``shape`` now, if it is not yet (a worker's load)."""
        self._graph(part, part_columns(part, int_columns)[0],
                    part_columns(part, float_columns)[0], shape)  # fmt: skip

    def _graph(
        self, part: str, int_columns: Mapping[str, Sized], float_columns: Mapping[str, Sized],
        shape: Any,
    ) -> _Graph:  # fmt: skip
        layout = tuple((k, len(v)) for k, v in (*int_columns.items(), *float_columns.items()))
        key = (part, *(shape.think_key if part == "think" else shape.speak_key))
        found = self._graphs.get(key)
        if found is None:
            found = self._capture(part, int_columns, float_columns, layout, shape, key)
        elif found.layout != layout:
            raise RuntimeError(f"a {part} shape met with a different column layout")
        return found

    @torch.inference_mode()
    def _capture(
        self,
        part: str,
        int_columns: Mapping[str, Sized],
        float_columns: Mapping[str, Sized],
        layout: tuple[tuple[str, int], ...],
        shape: Any,
        key: tuple[Any, ...],
    ) -> _Graph:
        if shape.capacities != self._capacities:
            self._graphs.clear()  # their caches were reallocated
            self._capacities = shape.capacities
        started = time.perf_counter()
        ints, floats = zeroed(int_columns, float_columns, self._device)
        sent = split(ints, int_columns) | split(floats, float_columns)
        compute = self._parts[part]

        def run() -> list[Tensor]:
            return compute(sent, shape)

        if self._rerun:
            for _ in range(_WARMUP_RUNS):
                run()
            found = _Graph(None, ints, floats, layout, run(), run)
        else:
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                for _ in range(_WARMUP_RUNS):
                    run()
            torch.cuda.current_stream().wait_stream(self._stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pools[part], stream=self._stream):
                out = run()
            found = _Graph(graph, ints, floats, layout, out, run)
        self._graphs[key] = found
        log.info("captured the Qwen3-Omni %s part for %s in %.0f ms (%d graphs)", part, key[1:],
                 1000 * (time.perf_counter() - started), len(self._graphs))  # fmt: skip
        return found

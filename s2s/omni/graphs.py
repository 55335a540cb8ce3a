"""The Qwen3-Omni decode step replayed from CUDA graphs, one graph per step shape.

Eager, a decode step at Qwen3-Omni's real depth dispatches about 9,400 operators (48 thinker
layers, 15 code predictor passes of 5 layers, 20 talker layers, code2wav): at a few µs of host
time each, more than half of an 80 ms frame before the GPU has done anything. With fixed shapes
(``OmniEngine(fixed_shapes=True)``: batches padded to a size of ``s2s.backends.graphs.BUCKETS``
on a scratch slot, attention spans rounded up to ``SPAN``) the step's device work
(``DecodeStep.compute``) is one fixed sequence of kernels per ``StepShape`` that reads nothing
back, so it is captured once per shape and replayed with one launch.

- Inputs: the step's uploaded columns, copied into the graph's own buffers (one copy per dtype
  on the device) before each replay. The columns of code2wav's first frames come last and are
  not the graph's: a call's first frame trims the clip's start, so it runs eagerly after the
  replay, once per call.
- Outputs: the graph's own tensors, valid until the next replay of any graph here (they share
  one memory pool); the engine reads them back at once.
- Warm-up and capture run the real step on the real state with the buffers at zero, which puts
  every row on the scratch slot (slot 0, padding's slot), so no call's state moves.
- A cache that grows (``SlotCache.reserve``) moves its tensors: the capacities are part of the
  shape, and graphs of old capacities are dropped.
- Shapes are captured when first met (each costs one capture, some tens of ms, in that step).

Not measured on a GPU yet: ``tests/omni_graphs_check.py`` compares replay with the eager step
there (``scripts/bench_omni.py --check-graphs``). On a CPU, ``rerun=True`` stands in for the
graphs: a "replay" runs the step again on the same buffers and copies its results into the
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

log = logging.getLogger(__name__)

_WARMUP_RUNS = 2


def zeroed(
    int_columns: Mapping[str, Sized], float_columns: Mapping[str, Sized], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Buffers for the columns, all zero: every row on the scratch slot, so a step run on them
    (a capture's warm-up and capture) moves no call's state (``tests/test_qwen3_omni.py``)."""
    count = sum(len(v) for v in int_columns.values())
    floats = sum(len(v) for v in float_columns.values())
    return (
        torch.zeros(count, dtype=torch.int64, device=device),
        torch.zeros(floats, dtype=torch.float32, device=device),
    )


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
    """``compute(sent, shape)`` replayed from a CUDA graph per ``shape.key``."""

    def __init__(
        self, compute: Callable[[dict[str, Tensor], Any], list[Tensor]], device: torch.device,
        rerun: bool = False,
    ) -> None:  # fmt: skip
        """``rerun``: no CUDA graphs, each replay runs ``compute`` again (tests on a CPU)."""
        if device.type != "cuda" and not rerun:
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self._compute = compute
        self._device = device
        self._rerun = rerun
        self._graphs: dict[tuple[Any, ...], _Graph] = {}
        self._capacities: Any = None
        if not rerun:
            self._pool = torch.cuda.graph_pool_handle()
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
        """Replay the step of ``shape`` on the uploaded ``ints`` and ``floats`` (laid out as
        ``int_columns`` and ``float_columns``, ``c2w.fresh.*`` last and not read here)."""
        mine = {k: v for k, v in int_columns.items() if not k.startswith("c2w.fresh.")}
        layout = tuple((k, len(v)) for k, v in (*mine.items(), *float_columns.items()))
        found = self._graphs.get(shape.key)
        if found is None:
            found = self._capture(mine, float_columns, layout, shape)
        elif found.layout != layout:
            raise RuntimeError("a step shape met with a different column layout")
        found.ints.copy_(ints[: found.ints.numel()])
        found.floats.copy_(floats[: found.floats.numel()])
        found.replay()
        return found.out

    @torch.inference_mode()
    def _capture(
        self,
        int_columns: Mapping[str, Sized],
        float_columns: Mapping[str, Sized],
        layout: tuple[tuple[str, int], ...],
        shape: Any,
    ) -> _Graph:
        if shape.capacities != self._capacities:
            self._graphs.clear()  # their caches were reallocated
            self._capacities = shape.capacities
        started = time.perf_counter()
        ints, floats = zeroed(int_columns, float_columns, self._device)
        sent = split(ints, int_columns) | split(floats, float_columns)

        def run() -> list[Tensor]:
            return self._compute(sent, shape)

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
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
                out = run()
            found = _Graph(graph, ints, floats, layout, out, run)
        self._graphs[shape.key] = found
        log.info("captured the Qwen3-Omni step for %s in %.0f ms (%d graphs)", shape.key,
                 1000 * (time.perf_counter() - started), len(self._graphs))  # fmt: skip
        return found

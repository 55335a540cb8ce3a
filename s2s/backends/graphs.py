"""A step function replayed from CUDA graphs, one graph per shape.

A Moshi tick is thousands of small kernels (32 main layers, then 8 codebooks x 6 depth layers,
and the codec's convolutions and transformers); launched one by one from Python, their launch
cost alone is above the GPU work for a handful of calls. The engine's step and the codec's
steps have fixed shapes per number of slots (and, for the engine, the span of the ring it
reads) and never read a value back to the host, so each shape is captured once and replayed
with one launch. The eager step stays the reference (``tests/moshi_graphs_check.py``).

What makes capture safe:
- Inputs go through static buffers owned here, one row per slot; each call copies its inputs
  into their first ``n`` rows before the replay. Outputs are the graph's own tensors, valid
  until the next replay of any graph here (they share one memory pool): copy them out first.
- Capture needs warm-up runs, and a warm-up runs the real step on the real state. It runs with
  the buffers at their ``idle`` values, which mean "no slot is ready": every step here then
  leaves every slot's state as it was (the engine's and codec's steps only move ready slots;
  ``tests/test_moshi.py`` and ``tests/test_mimi_stream.py`` check this on the CPU).
- Shapes are captured when first needed, or up front with ``capture()`` (the model worker does
  it at load), so no call waits for a capture mid-conversation.

On a CPU, ``rerun=True`` stands in for CUDA: a "replay" runs the step again on the buffers and
copies its result into the tensor the capture returned, so the bookkeeping (buffers, idle
values, one graph per shape, outputs read after the replay) is tested without a GPU
(``tests/test_moshi.py``).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_WARMUP_RUNS = 2

#: Batch sizes a captured step runs as: the smallest that holds the batch (past the last, a
#: multiple of ``BUCKET_PAST_LAST``, so a server of many slots has a few dozen shapes to
#: capture, not one per batch size).
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 128, 192, 256)
BUCKET_PAST_LAST = 64


def bucket(count: int) -> int:
    """The batch size a batch of ``count`` rows runs as."""
    if count <= BUCKETS[-1]:
        return BUCKETS[bisect.bisect_left(BUCKETS, count)]
    return -(-count // BUCKET_PAST_LAST) * BUCKET_PAST_LAST


class StepGraphs:
    """``step(n, *buffers[:n], *key)`` replayed from a CUDA graph per ``(n, *key)``."""

    def __init__(
        self,
        name: str,
        step: Callable[..., Tensor],
        buffers: Sequence[Tensor],
        idle: Sequence[float | int | bool],
        rerun: bool = False,
    ) -> None:
        """``rerun``: no CUDA graphs, each replay runs ``step`` again (tests on a CPU)."""
        device = buffers[0].device
        if device.type != "cuda" and not rerun:
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.name = name
        self._step = step
        self._buffers = list(buffers)
        self._idle = list(idle)
        self._rerun = rerun
        self._graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph | None, Tensor]] = {}
        if not rerun:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]

    def __call__(self, n: int, inputs: Sequence[Tensor | None], *key: int) -> Tensor:
        """Run the step for the first ``n`` slots; an input of None is its idle value."""
        graph, out = self._graphs.get((n, *key)) or self._capture(n, key)
        for buffer, value, fill in zip(self._buffers, inputs, self._idle, strict=True):
            if value is None:
                buffer[:n].fill_(fill)
            else:
                buffer[:n].copy_(value)
        if graph is None:
            with torch.inference_mode():
                out.copy_(self._step(n, *(b[:n] for b in self._buffers), *key))
        else:
            graph.replay()
        return out

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def capture(self, shapes: Iterable[tuple[int, ...]]) -> None:
        """Capture every ``(n, *key)`` in ``shapes`` not captured yet."""
        started, before = time.perf_counter(), len(self._graphs)
        for n, *key in shapes:
            if (n, *key) not in self._graphs:
                self._capture(n, tuple(key))
        log.info("captured %d %s graphs in %.1f s", len(self._graphs) - before, self.name,
                 time.perf_counter() - started)  # fmt: skip

    @torch.inference_mode()
    def _capture(self, n: int, key: tuple[int, ...]) -> tuple[torch.cuda.CUDAGraph | None, Tensor]:
        for buffer, fill in zip(self._buffers, self._idle, strict=True):
            buffer.fill_(fill)  # the warm-up moves no slot's state (see the module's doc)
        args = [buffer[:n] for buffer in self._buffers]
        if self._rerun:
            for _ in range(_WARMUP_RUNS):
                self._step(n, *args, *key)
            self._graphs[(n, *key)] = None, self._step(n, *args, *key)
            return self._graphs[(n, *key)]
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            for _ in range(_WARMUP_RUNS):
                self._step(n, *args, *key)
        torch.cuda.current_stream().wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
            out = self._step(n, *args, *key)
        self._graphs[(n, *key)] = (graph, out)
        log.debug("captured the %s step for %d slots %s", self.name, n, key)
        return graph, out

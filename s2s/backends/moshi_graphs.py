"""``MoshiEngine.compute`` replayed from CUDA graphs, one graph per (slots, span) shape.

A Moshi step is a few thousand small kernels (32 main layers, then 8 codebooks x 6 depth
layers); launched one by one from Python, their launch cost alone is above the GPU work for
a handful of calls. The engine's step has fixed shapes per (bucket, span) and no host sync,
so each shape is captured once and replayed with one launch.

What makes capture safe:
- Inputs go through static buffers owned here (``ready``, the caller's codes, forced text);
  the step copies into them before each replay. Outputs are the graph's own tensors, copied
  out by the caller before the next replay (graphs share one memory pool).
- Capture needs a warm-up run, and a warm-up runs the real step on the engine's state. It runs
  with no slot ready, which leaves every slot's state as it was: nothing moves, and the only
  writes (each slot's next cache position and the depth decoder's scratch cache) land where
  the slot's next real step overwrites them first (``tests/test_moshi.py`` checks this on the
  CPU, where graphs do not exist).
- Graphs are captured when a shape is first needed (a call joining past a bucket, a call
  growing past a span), or all at once by ``capture_all()`` at load, so no call hits a capture
  mid-conversation.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

log = logging.getLogger(__name__)

_WARMUP_RUNS = 2


class GraphedCompute:
    """Drop-in for ``engine.compute`` on CUDA; eager (``engine.compute``) stays the reference."""

    def __init__(self, engine: Any) -> None:
        if engine.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {engine.device}")
        self.engine = engine
        s, k, dev = engine.max_calls, engine.k, engine.device
        self._ready = torch.zeros(s, dtype=torch.bool, device=dev)
        self._user_now = torch.full((s, k), engine.bos, dtype=torch.long, device=dev)
        self._forced = torch.full((s,), -1, dtype=torch.long, device=dev)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self._stream = torch.cuda.Stream(device=dev)  # type: ignore[no-untyped-call]

    def __call__(
        self,
        n: int,
        ready: torch.Tensor,
        user_now: torch.Tensor,
        forced: torch.Tensor | None,
        span: int | None = None,
    ) -> torch.Tensor:
        span = span or self.engine.context
        graph, packed = self._graphs.get((n, span)) or self._capture(n, span)
        self._ready[:n].copy_(ready)
        self._user_now[:n].copy_(user_now)
        if forced is None:
            self._forced[:n].fill_(-1)
        else:
            self._forced[:n].copy_(forced)
        graph.replay()
        return packed

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def capture_all(self, max_span: int | None = None) -> None:
        """Capture every bucket up to ``max_calls`` at every span up to ``max_span``."""
        from s2s.backends.moshi_engine import BUCKETS, SPAN_STEP

        engine = self.engine
        started = time.perf_counter()
        context = engine.context
        spans = sorted({min(context, s) for s in range(SPAN_STEP, context + SPAN_STEP, SPAN_STEP)})
        spans = [s for s in spans if max_span is None or s <= max_span]
        for n in (b for b in BUCKETS if b <= engine.max_calls):
            for span in spans:
                if (n, span) not in self._graphs:
                    self._capture(n, span)
        log.info("captured %d Moshi step graphs in %.1f s", len(self._graphs),
                 time.perf_counter() - started)  # fmt: skip

    @torch.inference_mode()
    def _capture(self, n: int, span: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        engine = self.engine
        args = (n, self._ready[:n], self._user_now[:n], self._forced[:n], span)
        self._ready.fill_(False)  # the warm-up moves no slot's state (see the module's doc)
        self._forced.fill_(-1)
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            for _ in range(_WARMUP_RUNS):
                engine.compute(*args)
        torch.cuda.current_stream().wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
            packed = engine.compute(*args)
        self._graphs[(n, span)] = (graph, packed)
        log.debug("captured the Moshi step for %d slots, span %d", n, span)
        return graph, packed

"""Qwen3-Omni graph replay against the eager step on a GPU, shared by
``tests/test_omni_graphs.py`` (``-m gpu``) and ``scripts/bench_omni.py --check-graphs`` (the
device machine has no pytest)."""

from __future__ import annotations

from typing import Any

import torch

from s2s.omni.engine import OmniEngine
from s2s.omni.request import GREEDY, Decoding, Request, RowStep
from s2s.omni.sampling import Sampling


def mixed_requests(inputs: dict[str, torch.Tensor], frames: int = 12) -> list[Request]:
    """Three calls that take every branch of a step: greedy, sampled (text, first and residual
    codes) with a short text that ends while its speech goes on, and a fixed length."""
    sampled = Decoding(
        text=Sampling(temperature=1.0, top_k=20, top_p=0.9), speech=Sampling(top_k=10),
        residual=Sampling(temperature=0.9),
    )  # fmt: skip
    return [
        Request(inputs, max_text_tokens=6, max_frames=frames, decoding=GREEDY),
        Request(inputs, max_text_tokens=3, max_frames=frames, decoding=sampled, seed=3),
        Request(inputs, max_text_tokens=6, max_frames=frames, decoding=GREEDY, fixed_length=True),
    ]


def run_mixed(engine: OmniEngine, requests: list[Request], limit: int = 300) -> list[list[RowStep]]:
    """The calls of ``requests`` joining at steps 0, 2 and 4 (first frames beside later ones,
    batches of 1 to 3); every call's outputs, in order, until all are done."""
    rows: dict[int, list[RowStep]] = {}
    for step in range(limit):
        if step // 2 < len(requests) and step % 2 == 0:
            rows[engine.add(requests[step // 2])] = []
        if not engine.active:
            return list(rows.values())
        for out in engine.step():
            rows[out.row].append(out)
    raise AssertionError(f"still generating after {limit} steps")


def graphs_equal_eager(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[bool, float, int]:
    """Two engines on ``model`` (a CUDA one), one replaying graphs and one eager with the same
    fixed shapes, through the mixed calls; returns (text and codes identical, the largest audio
    difference, graphs captured)."""
    requests = mixed_requests(inputs)
    graphed = OmniEngine(model, max_rows=4, graphs=True)
    eager = OmniEngine(model, max_rows=4, fixed_shapes=True)
    same, worst, audio = True, 0.0, 0
    for a, b in zip(run_mixed(graphed, requests), run_mixed(eager, requests), strict=True):
        same &= [x.text for x in a] == [y.text for y in b]
        for x, y in zip(a, b, strict=True):
            same &= (x.codes is None) == (y.codes is None)
            if x.codes is not None and y.codes is not None:
                same &= torch.equal(x.codes, y.codes)
            same &= (x.audio is None) == (y.audio is None)
            if x.audio is not None and y.audio is not None:
                worst = max(worst, float((x.audio - y.audio).abs().max()))
                audio += 1
    same &= audio > 0  # no audio compared would prove nothing
    assert graphed.graphs is not None
    return bool(same), worst, graphed.graphs.captured

"""The Qwen3-Omni step's fixed shapes and CUDA graphs (``s2s.omni.graphs``), on the CPU.

Padding a batch to its bucket and rounding attention spans (what a captured step runs) changes
no call's reply; a capture's warm-up moves no call; ``OmniGraphs(rerun=True)`` stands in for
CUDA, so replay per part and shape, and the capture of every shape at load, are checked against
the eager step here; on a GPU ``pytest -m gpu`` checks real graphs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from s2s.hosttraffic import split
from s2s.omni.engine import OmniEngine
from s2s.omni.graphs import OmniGraphs, zeroed
from s2s.omni.model import load_model
from s2s.omni.request import GREEDY, Request, cache_positions
from s2s.omni.rows import SPAN
from tests.omni_graphs_check import mixed_requests, run_mixed
from tests.omni_replies import (
    Reply,
    make_inputs,
    make_request,
    run_alone,
    run_engine,
    same_reply,
)


def _same_steps(runs: list[list[Any]], others: list[list[Any]]) -> None:
    """Every call's steps alike in two runs: text, codes and audio, exactly (and some audio)."""
    audio = 0
    for a, b in zip(runs, others, strict=True):
        assert [x.text for x in a] == [y.text for y in b]
        for x, y in zip(a, b, strict=True):
            assert (x.codes is None) == (y.codes is None)
            assert x.codes is None or y.codes is None or torch.equal(x.codes, y.codes)
            assert (x.audio is None) == (y.audio is None)
            if x.audio is not None and y.audio is not None:
                assert torch.equal(x.audio, y.audio)
                audio += 1
    assert audio >= 3, "too few steps had audio to compare"


def test_fixed_shapes_give_the_replies_of_exact_shapes(model: Any, pieces: Any) -> None:
    """Batches padded to their bucket on the scratch slot and attention spans rounded up (what a
    captured step runs) change no call's text, codes or audio: three calls joining one by one,
    greedy, sampled and fixed-length, so batches of 3 run as 4."""
    requests = mixed_requests(make_inputs(pieces, "media"))
    exact = run_mixed(OmniEngine(model, max_rows=4), requests)
    fixed = run_mixed(OmniEngine(model, max_rows=4, fixed_shapes=True), requests)
    # Caches allocated for just these replies, less than a span: the span is cut there.
    prompt = int(requests[0].inputs["input_ids"].shape[1])
    positions = cache_positions(prompt, 6, 12)
    allocated = OmniEngine(model, max_rows=4, fixed_shapes=True, positions=positions)
    assert max(positions) < SPAN
    held = run_mixed(allocated, requests)
    assert (allocated.thinker_cache.capacity, allocated.talker_cache.capacity) == positions
    assert all(out.done for out in (exact[0][-1], exact[1][-1], exact[2][-1]))
    for a, b in [*zip(exact, fixed, strict=True), *zip(exact, held, strict=True)]:
        assert [x.text for x in a] == [y.text for y in b]
        codes = [(x.codes, y.codes) for x, y in zip(a, b, strict=True) if x.codes is not None]
        assert len(codes) >= 5 and all(y is not None and torch.equal(x, y) for x, y in codes)
        pairs = [(x.audio, y.audio) for x, y in zip(a, b, strict=True)]
        assert all((x is None) == (y is None) for x, y in pairs)
        heard = [(x, y) for x, y in pairs if x is not None and y is not None]
        assert heard and all((x - y).abs().max() < 1e-5 for x, y in heard)


class _WarmedEveryStep(OmniEngine):
    """Before each step, what capturing that step's shape runs: the step twice on zeroed
    columns (``OmniGraphs._capture``'s warm-up; the capture itself runs it once more)."""

    def _step(self, thinking: Any, speaking: Any, results: Any) -> None:
        shape, (ints, floats) = self.layout.plan(thinking, speaking)
        int_zeros, float_zeros = zeroed(ints, floats, self.device)
        sent = split(int_zeros, ints) | split(float_zeros, floats)
        for _ in range(3):
            self.decode.compute(sent, shape)
        super()._step(thinking, speaking, results)


class _FailingCapture:
    """What a CUDA graph capture that fails looks like to the engine (there is none on a CPU)."""

    def __call__(self, *args: Any) -> list[Tensor]:
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")


def test_a_step_whose_capture_fails_runs_eagerly_from_then_on(model: Any, pieces: Any) -> None:
    """A capture that fails mid-reply costs no call anything: that step and the ones after run
    eagerly, and the reply is the one an engine without graphs gives."""
    request = make_request(make_inputs(pieces, "audio"))
    engine = OmniEngine(model, max_rows=2, fixed_shapes=True)
    engine.graphs = _FailingCapture()  # type: ignore[assignment]
    reply = Reply()
    run_engine(engine, {engine.add(request): reply})
    assert engine.graphs is None and "capturing" in engine.graphs_failed
    same_reply(reply, run_alone(model, request))


def test_a_capture_warm_up_moves_no_call(model: Any, pieces: Any) -> None:
    """A graph's warm-up and capture run the real step on the real state (a CPU cannot capture,
    but it can run that): with zeroed columns every row is on the scratch slot, so running it
    before every step changes no call's text, codes or audio."""
    requests = mixed_requests(make_inputs(pieces, "media"))
    # Three slots for three calls: every slot but the scratch one is some call's.
    plain = run_mixed(OmniEngine(model, max_rows=3, fixed_shapes=True), requests)
    warmed = run_mixed(_WarmedEveryStep(model, max_rows=3, fixed_shapes=True), requests)
    _same_steps(plain, warmed)


def test_steps_replayed_per_shape_give_the_eager_steps(model: Any, pieces: Any) -> None:
    """The graphs' bookkeeping without CUDA (``OmniGraphs(rerun=True)``: a replay runs the
    step again on the captured buffers and copies into the captured outputs): each step's
    columns reach its shape's buffers and the outputs are read back right, through joins,
    leaves, first frames beside later ones and text that ends before speech."""
    requests = mixed_requests(make_inputs(pieces, "media"))
    plain = run_mixed(OmniEngine(model, max_rows=3, fixed_shapes=True), requests)
    engine = OmniEngine(model, max_rows=3, fixed_shapes=True)
    parts = {"think": engine.decode.think, "speak": engine.decode.speak}
    graphs = engine.graphs = OmniGraphs(parts, engine.device, rerun=True)
    replayed = run_mixed(engine, requests)
    assert engine.graphs is graphs and graphs.captured >= 4  # batches of 1, 2 and 4; text ends
    _same_steps(plain, replayed)


class _SpeakCaptureFails(OmniGraphs):
    """Graphs whose speak part fails to capture once one of each part is captured."""

    def _capture(self, part: str, *args: Any) -> Any:
        if part == "speak" and self.captured >= 2:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return super()._capture(part, *args)


def test_a_part_that_fails_to_capture_leaves_the_step_to_run_eagerly_once(
    model: Any, pieces: Any
) -> None:
    """When a second call joins, the think part of the new batch size captures and the speak
    part fails: nothing of that step has been replayed, so running it eagerly runs each part
    once, and every reply is the eager engine's."""
    requests = mixed_requests(make_inputs(pieces, "media"))
    plain = run_mixed(OmniEngine(model, max_rows=3, fixed_shapes=True), requests)
    engine = OmniEngine(model, max_rows=3, fixed_shapes=True)
    parts = {"think": engine.decode.think, "speak": engine.decode.speak}
    engine.graphs = _SpeakCaptureFails(parts, engine.device, rerun=True)
    failing = run_mixed(engine, requests)
    assert engine.graphs is None and "capturing" in engine.graphs_failed
    _same_steps(plain, failing)


def test_every_shape_is_captured_before_the_calls_come(model: Any, pieces: Any) -> None:
    """``OmniEngine.capture`` captures each part for every batch size and span of the caches
    as allocated (a worker's load): calls decoding that way then meet no new shape, and their
    replies are the eager ones."""
    inputs = make_inputs(pieces, "media")
    requests = [
        Request(inputs, max_text_tokens=6, max_frames=12, decoding=GREEDY),
        Request(inputs, max_text_tokens=3, max_frames=12, decoding=GREEDY),
        Request(inputs, max_text_tokens=6, max_frames=12, decoding=GREEDY, fixed_length=True),
    ]
    positions = (SPAN + 100, 2 * SPAN + 100)
    eager = run_mixed(OmniEngine(model, 3, fixed_shapes=True, positions=positions), requests)
    engine = OmniEngine(model, max_rows=3, fixed_shapes=True, positions=positions)
    parts = {"think": engine.decode.think, "speak": engine.decode.speak}
    graphs = engine.graphs = OmniGraphs(parts, engine.device, rerun=True)
    # Batches of 1, 2 and 4 rows; the thinker's spans 1024 and 1124, the talker's three.
    assert engine.capture(GREEDY) == graphs.captured == 3 * (2 + 3)
    replayed = run_mixed(engine, requests)
    assert graphs.captured == 15
    _same_steps(eager, replayed)


@pytest.mark.gpu
def test_graph_replay_equals_the_eager_step(tiny_models: Path, pieces: Any) -> None:
    """On a GPU (``pytest -m gpu``; CI has no GPU and deselects it): the step replayed from CUDA
    graphs gives the eager step's text and codes, and its audio within bf16 rounding."""
    from tests.omni_graphs_check import graphs_equal_eager

    cuda = load_model(str(tiny_models / "tiny-qwen3-omni"), "cuda", torch.bfloat16)
    same, worst, captured = graphs_equal_eager(cuda, make_inputs(pieces, "media"))
    assert same and worst < 1e-2 and captured > 1

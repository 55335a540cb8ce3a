"""The Moshi engine on the tiny random checkpoint: its batched steps against transformers' own
forward and ``generate``, its slots, sampling and CUDA graphs. Its worker, the worker process and
calls through the real server are in ``tests/test_moshi_calls.py``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import MoshiForConditionalGeneration

from s2s.backends.moshi_engine import SPAN_STEP, MoshiEngine
from s2s.backends.moshi_rows import RowOutput
from s2s.hosttraffic import HostTraffic
from s2s.noise import reseeded
from tests.moshi_graphs_check import codec_graphs_equal_eager, graphs_equal_eager
from tests.moshi_reference import MoshiEngine as ReferenceEngine
from tests.moshi_reference import WindowedReference


@pytest.fixture(scope="module")
def tiny_moshi(tiny_models: Path) -> MoshiForConditionalGeneration:
    model: MoshiForConditionalGeneration = MoshiForConditionalGeneration.from_pretrained(
        tiny_models / "tiny-moshi", local_files_only=True
    )
    return model.eval()


def _same(a: list[RowOutput], b: list[Any]) -> bool:
    return all(
        x.text_token == y.text_token
        and ((x.codes is None and y.codes is None) or torch.equal(x.codes, y.codes))  # type: ignore[arg-type]
        for x, y in zip(a, b, strict=True)
    )


def _codes(n: int, seed: int = 0) -> list[torch.Tensor]:
    return [
        torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(seed + i))
        for i in range(n)
    ]


def test_greedy_steps_equal_transformers_own_forward(
    tiny_moshi: MoshiForConditionalGeneration,
) -> None:
    """50 frames, greedy: the slot engine's text and audio tokens are the reference's, which
    runs transformers' own decoder and depth decoder forwards (``tests/moshi_reference.py``)."""
    codes = _codes(50)
    engine = MoshiEngine(tiny_moshi, max_calls=4)
    neighbour = engine.join("other", seed=3)  # slot 0, stepping on other frames
    row = engine.join("a", seed=1, temperature=0.0, text_temperature=0.0)
    reference = ReferenceEngine(tiny_moshi)
    ref_row = reference.join("a", seed=1)
    ref_row.temperature = ref_row.text_temperature = 0.0
    ours, theirs = [], []
    for t in range(50):
        feed = {row: codes[t]} | ({neighbour: codes[49 - t]} if t % 3 else {})
        ours.append(engine.step(feed)[row])
        theirs.append(reference.step({ref_row: codes[t]})[ref_row])
    assert _same(ours, theirs)
    # Moshi's text and codes actually vary over the run (a stuck engine would also agree).
    assert len({o.text_token for o in ours}) > 1
    assert len({tuple(o.codes.tolist()) for o in ours if o.codes is not None}) > 10


def test_greedy_steps_equal_transformers_generate(
    tiny_moshi: MoshiForConditionalGeneration,
) -> None:
    """The engine's first frames are fed as transformers' own ``generate`` feeds them (all
    initial tokens first, then no acoustic codes: ``tests/moshi_reference.py``). ``generate``
    is offline, so it is prompted with what the engine made over 12 frames of varied caller
    codes, and must then continue, greedy, with the engine's tokens for 30 frames more (the
    caller silent, as ``generate`` has it: Mimi's codes for a frame of zeros)."""
    model, prompt, more = tiny_moshi, 12, 30
    frame = int(model.config.sampling_rate / model.config.audio_encoder_config.frame_rate)
    with torch.inference_mode():
        silence = model.audio_encoder.encode(torch.zeros(1, 1, frame), num_quantizers=8)
    caller = _codes(prompt + 1) + [silence.audio_codes[0, :, 0]] * (more - 1)
    engine = MoshiEngine(model, max_calls=1)
    row = engine.join("a", temperature=0.0, text_temperature=0.0)
    ours = [engine.step({row: codes})[row] for codes in caller]
    # generate's prompt positions follow its unconditional first one: position t + 1 takes
    # the text of step t, the caller's frame of step t + 1 (the first frame is not heard), and
    # Moshi's frame t (complete at step t + 1).
    out = model.generate(
        input_ids=torch.tensor([[o.text_token for o in ours[:prompt]]]),
        user_audio_codes=torch.stack(caller[1 : prompt + 1], dim=1)[None],
        moshi_audio_codes=torch.stack([o.codes for o in ours[1 : prompt + 1]], dim=1)[None],  # type: ignore[misc]
        do_sample=False, depth_decoder_do_sample=False, max_new_tokens=more,
        return_audio_codes=True, return_audio_waveforms=False,
    )  # fmt: skip
    assert out.sequences[0, 1:].tolist() == [o.text_token for o in ours]
    frames = torch.stack([o.codes for o in ours[1:]], dim=1)  # type: ignore[misc]
    assert torch.equal(out.audio_codes[0], frames)


def _windowed(
    model: MoshiForConditionalGeneration, codes: list[torch.Tensor], window: int
) -> list[Any]:
    reference = WindowedReference(model, window=window)
    row = reference.join("a")
    row.temperature = row.text_temperature = 0.0
    return [reference.step({row: frame})[row] for frame in codes]


def test_a_call_longer_than_the_context_slides_its_window(
    tiny_moshi: MoshiForConditionalGeneration,
) -> None:
    """A 12-frame ring, greedy, for more than three times its length: each step's tokens are
    those of the whole sequence recomputed through transformers' decoder with an explicit
    window of the last 12 positions, the current one included, and RoPE at absolute positions;
    the ring is never reallocated."""
    codes = _codes(40)
    short = MoshiEngine(tiny_moshi, context=12, max_calls=1)
    a = short.join("a", seed=1, temperature=0.0, text_temperature=0.0)
    cache = short._keys.data_ptr()
    ring = [short.step({a: codes[t]})[a] for t in range(40)]
    assert _same(ring, _windowed(tiny_moshi, codes, 12))
    assert short._keys.data_ptr() == cache and short._keys.shape[3] == 12
    # The comparison can tell: a window one position longer or shorter, or none, differs.
    for other in (11, 13, 40):
        assert not _same(ring, _windowed(tiny_moshi, codes, other)), other


def test_a_calls_output_does_not_change_when_others_join_or_leave(
    tiny_moshi: MoshiForConditionalGeneration,
) -> None:
    codes = _codes(30)
    shared = MoshiEngine(tiny_moshi, max_calls=8)
    row = shared.join("a", seed=1)
    others = []
    outputs = []
    for t in range(30):
        if t in (3, 7):
            others.append(shared.join(f"b{t}", seed=t))
        if t == 15:
            shared.leave(others.pop(0))
        feed = {row: codes[t]} | {o: codes[(t * 7) % 30] for o in others if t % 4}
        outputs.append(shared.step(feed)[row])
    alone = MoshiEngine(tiny_moshi, max_calls=1)
    solo = alone.join("a", seed=1)
    assert _same(outputs, [alone.step({solo: codes[t]})[solo] for t in range(30)])
    assert outputs[0].codes is None and all(o.codes is not None for o in outputs[1:])


def test_reset_makes_a_row_start_afresh(tiny_moshi: MoshiForConditionalGeneration) -> None:
    codes = _codes(10)
    engine = MoshiEngine(tiny_moshi, max_calls=2)
    row, other = engine.join("a", seed=5), engine.join("b", seed=6)
    for t in range(6):
        engine.step({row: codes[t], other: codes[t]})
    engine.reset(row)
    after = [engine.step({row: codes[t], other: codes[t]})[row] for t in range(10)]
    # As a call joining afresh, its noise going on from a new seed (not its first draws again).
    fresh = MoshiEngine(tiny_moshi, max_calls=1)
    new = fresh.join("a", seed=int(reseeded(5)))
    assert _same(after, [fresh.step({new: codes[t]})[new] for t in range(10)])
    replay = MoshiEngine(tiny_moshi, max_calls=1)
    first = replay.join("a", seed=5)
    assert not _same(after, [replay.step({first: codes[t]})[first] for t in range(10)])


def test_slots_are_reused_and_a_full_engine_says_so(
    tiny_moshi: MoshiForConditionalGeneration,
) -> None:
    engine = MoshiEngine(tiny_moshi, max_calls=3)
    rows = [engine.join(i) for i in range(3)]
    assert [r.slot for r in rows] == [0, 1, 2] and engine.bucket() == 4
    with pytest.raises(RuntimeError, match="all 3 Moshi slots"):
        engine.join("one too many")
    engine.leave(rows[0])
    assert engine.join("again").slot == 0
    # A long call that leaves no longer widens the steps over its slot.
    codes = _codes(SPAN_STEP + 1)
    for t in range(SPAN_STEP + 1):
        engine.step({rows[1]: codes[t]})
    assert engine.span(3) == 2 * SPAN_STEP
    engine.leave(rows[1])
    assert engine.span(3) == SPAN_STEP


def test_the_step_has_no_host_sync_and_allocates_no_cache(
    tiny_moshi: MoshiForConditionalGeneration,
) -> None:
    """Device work only in ``compute``: no op that reads a value back to the host."""
    engine = MoshiEngine(tiny_moshi, max_calls=8)
    rows = [engine.join(i, seed=i) for i in range(5)]
    for t, codes in enumerate(_codes(3)):
        engine.step({r: codes for r in rows[: 3 + t]})
    cache = engine._keys.data_ptr()
    n = engine.bucket()
    ready = torch.ones(n, dtype=torch.bool)
    user = torch.zeros((n, 8), dtype=torch.long)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        engine.compute(n, ready, user, None)
    names = [e.name for e in prof.events()]
    assert "aten::_local_scalar_dense" not in names and "aten::item" not in names
    assert not any("nonzero" in name for name in names)  # a data-dependent shape syncs too
    assert engine._keys.data_ptr() == cache
    # The whole step as a worker's tick runs it: its one read-back, no tensor of host values.
    user = torch.zeros((engine.width(), 8), dtype=torch.long)
    with torch.inference_mode(), HostTraffic() as traffic:
        engine.step_slots([r.slot for r in rows], user)
    assert traffic.reads.total() == 1 and not traffic.uploads, (traffic.reads, traffic.uploads)


def test_a_step_with_no_slot_ready_changes_nothing(
    tiny_moshi: MoshiForConditionalGeneration,
) -> None:
    """What CUDA graph capture relies on (``s2s.backends.graphs``): its warm-up runs the
    real step with no slot ready, mid-call, and every call's output goes on unchanged."""
    codes = _codes(12)
    warmed, plain = MoshiEngine(tiny_moshi, max_calls=4), MoshiEngine(tiny_moshi, max_calls=4)
    pairs = [(warmed.join(i, seed=i), plain.join(i, seed=i)) for i in range(3)]
    first, second = [], []
    for t in range(12):
        if t in (4, 9):
            n = warmed.bucket()
            nobody = torch.zeros(n, dtype=torch.bool)
            user = torch.randint(0, 64, (n, 8))
            with torch.inference_mode():
                warmed.compute(n, nobody, user, torch.full((n,), 3), warmed.span(n))
        out_w = warmed.step({a: codes[(t + i) % 12] for i, (a, _) in enumerate(pairs)})
        out_p = plain.step({b: codes[(t + i) % 12] for i, (_, b) in enumerate(pairs)})
        first += [out_w[a] for a, _ in pairs]
        second += [out_p[b] for _, b in pairs]
    assert _same(first, second)


def test_every_width_a_step_takes_is_captured_up_front(
    tiny_moshi: MoshiForConditionalGeneration,
) -> None:
    """A step computes a bucket of slots, capped at ``max_calls``: every width it takes as
    calls join is one ``capture_graphs`` captures at load (30 slots once stepped 30 wide, a
    shape captured mid-call), and no other."""
    for max_calls in (1, 3, 30, 32, 400):
        engine = MoshiEngine(tiny_moshi, max_calls=max_calls, context=64)
        taken = set()
        for call in range(max_calls):
            engine.join(call)
            taken.add(engine.width())
        assert taken == set(engine.widths()), max_calls
    assert engine.widths()[-4:] == [256, 320, 384, 400], "past 256 slots, widths go in steps of 64"


def test_a_call_joining_without_a_seed_leaves_torchs_generators_alone(
    tiny_moshi: MoshiForConditionalGeneration,
) -> None:
    """A call's seed is drawn without reseeding torch's global generators (``torch.seed()``
    reseeded the process's CPU and CUDA generators on every join)."""
    engine = MoshiEngine(tiny_moshi, max_calls=2)
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    engine.join("a")
    assert torch.equal(torch.rand(1), expected)


def test_sampling_draws_from_the_likeliest_only(
    tiny_moshi: MoshiForConditionalGeneration,
) -> None:
    """As kyutai's server samples: however hot, a text token comes from the 25 likeliest and an
    audio code from the 250 likeliest (all of the vocabulary was drawn from before)."""
    engine = MoshiEngine(tiny_moshi, max_calls=4)
    logits = torch.randn(4, 2048, generator=torch.Generator().manual_seed(0))
    hot = torch.full((4,), 50.0)
    drawn = set()
    for step in range(30):
        engine._length[:4] = step
        for k in (engine.text_top_k, engine.top_k):
            picked = engine._sample(logits, 4, 0, hot, k)
            top = logits.topk(k, dim=-1).indices
            assert all(int(p) in top[i].tolist() for i, p in enumerate(picked))
            drawn.update(int(p) for p in picked)
    assert len(drawn) > engine.text_top_k  # it samples, not just the top token
    greedy = engine._sample(logits, 4, 0, torch.zeros(4), engine.text_top_k)
    assert torch.equal(greedy, logits.argmax(-1))


def test_steps_replayed_per_shape_give_the_eager_steps(
    tiny_moshi: MoshiForConditionalGeneration,
) -> None:
    """The graphs' bookkeeping without CUDA (``StepGraphs(rerun=True)``: a replay runs the step
    again on the graph's buffers and copies into its captured output): the engine's and the
    codec's outputs are the eager ones across joins, a leave, a reset and a span change."""
    same, captured = graphs_equal_eager(tiny_moshi, steps=120, context=40, rerun=True)
    assert same and captured >= 3
    assert codec_graphs_equal_eager(tiny_moshi.audio_encoder, rerun=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.gpu
def test_graph_replay_equals_the_eager_step(tiny_moshi: MoshiForConditionalGeneration) -> None:
    """On a GPU: the graphed engine's outputs are the eager engine's, across joins, a leave,
    a reset and a span change (``pytest -m gpu``; CI has no GPU and deselects it)."""
    model = copy.deepcopy(tiny_moshi).to("cuda")
    same, captured = graphs_equal_eager(model)
    assert same and captured >= 3
    assert codec_graphs_equal_eager(model.audio_encoder)

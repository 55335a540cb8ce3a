"""The Moshi backend on the tiny random checkpoint: batching, and calls through the real server."""

from __future__ import annotations

import asyncio
import copy
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import MoshiForConditionalGeneration

from s2s.backends import ModelUnavailable, StepResult
from s2s.backends.moshi import MoshiBackend
from s2s.backends.moshi_engine import SPAN_STEP, MoshiEngine
from s2s.backends.moshi_rows import RowOutput
from s2s.hosttraffic import HostTraffic
from s2s.noise import reseeded
from s2s.signaling.state import BACKEND
from s2s.worker.messages import Change
from s2s.worker.process import WorkerError, WorkerOptions, WorkerProcess
from tests.conftest import StartServer
from tests.moshi_graphs_check import codec_graphs_equal_eager, graphs_equal_eager
from tests.moshi_reference import MoshiEngine as ReferenceEngine
from tests.moshi_reference import WindowedReference
from tests.peer import MicTrack, Peer
from tests.signals import rms, tone


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


def test_a_worker_whose_graphs_fail_serves_eagerly(
    tiny_moshi: MoshiForConditionalGeneration,
) -> None:
    """Graphs that cannot be set up (here: asked for on a CPU, where there are none) leave a
    worker that says why and steps its calls eagerly, not one that fails to load."""
    from s2s.worker.messages import Change, Tick
    from s2s.worker.moshi import MoshiWorker

    worker = MoshiWorker(tiny_moshi, None, "cpu", max_calls=2, graphs=True)
    assert worker.engine.graphs is None and "CUDA" in worker.graphs_failed
    frame = np.zeros(worker.frame_samples, np.int16).tobytes()
    outputs = [worker.handle(Tick([Change("join", "a")], {"a": frame})).outputs["a"]]
    outputs += [worker.handle(Tick([], {"a": frame})).outputs["a"] for _ in range(5)]
    assert not any(o.error for o in outputs) and any(o.audio for o in outputs)
    with pytest.raises(ValueError, match="CUDA"):  # nothing to fall back from without graphs
        MoshiEngine(tiny_moshi, max_calls=2, graphs=True)


def test_text_padding_never_becomes_transcript_text(
    tiny_moshi: MoshiForConditionalGeneration, tiny_models: Path
) -> None:
    """Moshi pads its text stream on most frames with ids 0 and 3 (kyutai's), which a
    tokenizer need not name as special (hf-moshiko names only its unk token): dropped by
    number, or every frame would carry text and a call's response would never end. A
    checkpoint naming its own pad id is taken at its word."""
    from transformers import AutoTokenizer, MoshiConfig

    from s2s.worker.moshi import MoshiWorker, text_padding_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "tiny-moshi")
    worker = MoshiWorker(tiny_moshi, tokenizer, "cpu", max_calls=1, graphs=False)
    assert 3 not in tokenizer.all_special_ids  # a word in the tiny vocabulary, padding to Moshi
    assert [worker._text(t) for t in (0, 3, 4)] == ["", "", " there"]
    assert text_padding_ids(tiny_moshi.config) == {0, 3}
    assert text_padding_ids(MoshiConfig(pad_token_id=7)) == {7}


def test_a_call_refused_for_want_of_a_slot_is_served_once_it_joins(
    tiny_moshi: MoshiForConditionalGeneration,
) -> None:
    from s2s.worker.messages import Change, Tick
    from s2s.worker.moshi import MoshiWorker

    worker = MoshiWorker(tiny_moshi, None, "cpu", max_calls=1)
    frame = np.zeros(worker.frame_samples, np.int16).tobytes()
    full = worker.handle(Tick([Change("join", "a"), Change("join", "b")], {"a": frame, "b": frame}))
    assert "slots" in full.outputs["b"].error and not full.outputs["a"].error
    again = worker.handle(Tick([Change("leave", "a"), Change("join", "b")], {"b": frame}))
    assert not again.outputs["b"].error and set(worker.calls) == {"b"}


class _Announcing:
    """A worker handle: the real worker process, each tick announced as it is sent."""

    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker
        self.sent = asyncio.Event()

    @property
    def hello(self) -> Any:
        return self.worker.hello

    async def tick(self, tick: Any) -> Any:
        self.sent.set()
        return await self.worker.tick(tick)

    async def replacement(self, calls: list[str]) -> Any:
        return await self.worker.replacement(calls)

    async def close(self) -> None:
        await self.worker.close()


async def test_a_step_under_way_when_the_call_is_reset_brings_nothing_of_it(
    tiny_models: Path,
) -> None:
    """A cancel or barge-in resets the call while its frame's tick is at the worker: what that
    tick made belongs to the response just ended, so it is dropped (it came back as the start
    of a new response, its audio played after the flush)."""
    spec = f"moshi:{tiny_models / 'tiny-moshi'}"
    handle = _Announcing(await WorkerProcess.start(WorkerOptions(spec, "cpu", 1)))
    backend = MoshiBackend(handle)
    try:
        stream = await backend.open_stream("call")
        frame = tone(440, 0.08, rate=backend.input_rate)
        async with asyncio.timeout(60):
            before = [await stream.step(frame) for _ in range(3)]
            handle.sent.clear()
            under_way = asyncio.create_task(stream.step(frame))
            await handle.sent.wait()
            await stream.reset()
            dropped = await under_way
            after = [await stream.step(frame) for _ in range(3)]
        assert before[-1].audio.size  # Moshi speaks from its second frame
        assert dropped.audio.size == 0 and not dropped.text and dropped.response_id is None
        assert all(step.audio.size for step in after)
    finally:
        await backend.close()


def test_a_frame_of_the_wrong_size_fails_that_call_alone(
    tiny_moshi: MoshiForConditionalGeneration,
) -> None:
    """A frame the worker cannot step (here: too short) is that call's error for that tick;
    the call beside it steps, and both go on with the frames after."""
    from s2s.worker.messages import Change, Tick
    from s2s.worker.moshi import MoshiWorker

    worker = MoshiWorker(tiny_moshi, None, "cpu", max_calls=2, graphs=False)
    frame = (np.sin(np.arange(worker.frame_samples) / 3) * 3000).astype(np.int16).tobytes()
    joins = [Change("join", "a"), Change("join", "b")]
    first = worker.handle(Tick(joins, {"a": frame[:-2], "b": frame})).outputs
    assert "bytes" in first["a"].error and not first["b"].error
    later = [worker.handle(Tick([], {"a": frame, "b": frame})).outputs for _ in range(5)]
    assert not any(out[call].error for out in later for call in "ab")
    assert all(any(out[call].audio for out in later) for call in "ab")


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


async def test_calls_through_the_server_get_moshi_audio_on_time(
    start_server: StartServer, tiny_models: Path
) -> None:
    server = await start_server(model=f"moshi:{tiny_models / 'tiny-moshi'}")
    peers = [Peer(server.url, MicTrack(tone(300 + 100 * i, 6))) for i in range(3)]
    try:
        await asyncio.gather(*(p.connect() for p in peers))
        # The server sends silence until Moshi's audio comes (the worker loads meanwhile; on a
        # loaded machine that can take seconds): time the stream from Moshi's first sound on.
        sounds = await asyncio.gather(*(p.wait_sound(timeout=30) for p in peers))
        start = max(sounds)
        await asyncio.gather(*(p.wait_audio(2.0, since=start, timeout=10) for p in peers))
        for peer in peers:
            heard = [(t, pcm) for t, pcm in peer.frames if t >= start]
            span = heard[-1][0] - heard[0][0]
            # 20 ms packets arrive at the pace they are played, with no gap building up.
            assert len(heard) >= span / 0.02 * 0.95
            assert rms(np.concatenate([pcm for _, pcm in heard])) > 0.01
    finally:
        for peer in peers:
            await peer.close()


async def test_moshi_text_becomes_transcript_events_and_cancel_resets(
    start_server: StartServer, tiny_models: Path
) -> None:
    server = await start_server(model=f"moshi:{tiny_models / 'tiny-moshi'}")
    peer = Peer(server.url, MicTrack(tone(440, 6)))
    try:
        await peer.connect()
        created = await peer.next_event("response.created", timeout=10)
        delta = await peer.next_event("response.output_audio_transcript.delta", timeout=10)
        assert delta["response_id"] == created["response"]["id"] and delta["delta"].strip()
        mark = len(peer.events)
        peer.send({"type": "response.cancel"})
        done = await peer.next_event("response.done", after=mark, timeout=10)
        assert done["response"]["status"] == "cancelled"
        assert done["response"]["status_details"]["reason"] == "client_cancelled"
        # Moshi starts afresh and goes on speaking (a new response) after the reset.
        again = await peer.next_event("response.created", after=mark, timeout=10)
        assert again["response"]["id"] != created["response"]["id"]
    finally:
        await peer.close()


async def test_the_model_runs_in_a_worker_process_that_is_replaced_when_it_dies(
    tiny_models: Path,
) -> None:
    backend = await MoshiBackend.load(str(tiny_models / "tiny-moshi"), "cpu", max_calls=1)
    try:
        assert backend.worker.process.pid != os.getpid()
        stream = await backend.open_stream("call")
        extra = await backend.open_stream("one too many")
        frame = tone(440, 0.08, rate=backend.input_rate)
        async with asyncio.timeout(30):
            first, refused = await asyncio.gather(
                stream.step(frame), extra.step(frame), return_exceptions=True
            )
            second = await stream.step(frame)
        # A call the worker has no slot for fails alone; the others are served.
        assert isinstance(refused, WorkerError) and "slots" in str(refused)
        assert isinstance(first, StepResult)
        assert first.audio.size == second.audio.size == backend.frame_samples
        assert rms(second.audio) > 0  # Moshi's own audio, from its second frame on
        # The worker dies: another starts, the call goes on with fresh model state and hears why.
        dead = backend.worker.process.pid
        backend.worker.process.kill()
        async with asyncio.timeout(120):
            after = await stream.step(frame)
            again = [await stream.step(frame) for _ in range(2)]
        assert any(isinstance(e, ModelUnavailable) for e in after.events), after.events
        assert backend.worker.process.pid not in (dead, os.getpid())
        assert rms(again[-1].audio) > 0
        # A worker that hangs (stopped here) is killed once a tick waits past its limit; the
        # call hears why at once and goes on with the next worker.
        assert isinstance(backend.worker, WorkerProcess)
        hung = backend.worker.process
        backend.worker.hung_after_s = 1.0
        os.kill(hung.pid, signal.SIGSTOP)
        async with asyncio.timeout(120):
            after = await stream.step(frame)
            assert any(isinstance(e, ModelUnavailable) for e in after.events), after.events
            again = [await stream.step(frame) for _ in range(2)]
        assert not hung.is_alive() and backend.worker.process.pid != hung.pid
        assert rms(again[-1].audio) > 0
    finally:
        await backend.close()


async def test_a_call_the_worker_let_go_joins_it_again(tiny_models: Path) -> None:
    """A shared worker lets go of a call no tick named for a while (its edge seemed gone); when
    the call's frames come again, it joins again with fresh model state and hears why, instead
    of getting silence from then on."""
    backend = await MoshiBackend.load(str(tiny_models / "tiny-moshi"), "cpu", max_calls=2)
    try:
        stream = await backend.open_stream("call")
        frame = tone(440, 0.08, rate=backend.input_rate)
        async with asyncio.timeout(60):
            for _ in range(2):
                await stream.step(frame)
            backend.change(Change("leave", "call"))  # what the worker's eviction does
            let_go = await stream.step(frame)
            after = [await stream.step(frame) for _ in range(3)]
        assert any(isinstance(e, ModelUnavailable) for e in let_go.events), let_go.events
        assert rms(after[-1].audio) > 0
    finally:
        await backend.close()


async def test_a_checkpoint_that_does_not_load_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WorkerError, match="failed to load"):
        await WorkerProcess.start(WorkerOptions(f"moshi:{tmp_path / 'nothing-here'}", "cpu", 2))


async def test_a_call_outlives_its_model_worker(
    start_server: StartServer, tiny_models: Path
) -> None:
    server = await start_server(model=f"moshi:{tiny_models / 'tiny-moshi'}")
    backend = server.app[BACKEND]
    assert isinstance(backend, MoshiBackend)
    peer = Peer(server.url, MicTrack(tone(440, 30)))
    try:
        await peer.connect()
        await peer.wait_audio(0.5, timeout=20)
        backend.worker.process.kill()
        error = await peer.next_event("error", timeout=60)
        assert error["error"]["code"] == "model_unavailable"
        # The WebRTC call stayed up, and Moshi's audio comes again from the new worker.
        assert peer.pc.connectionState == "connected"
        # Its replacement loads first (seconds on a busy machine): the call is silent till then.
        since = await peer.wait_sound(
            level=0.001, since=asyncio.get_running_loop().time(), timeout=60
        )
        await peer.wait_audio(1.0, since=since, timeout=20)
        assert rms(peer.audio(since=since)) > 0.001
    finally:
        await peer.close()

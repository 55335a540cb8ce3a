"""The Moshi worker on the tiny random checkpoint, its worker process and calls through the real
server. The engine's own steps (against transformers, slots, sampling, graphs) are in
``tests/test_moshi.py``."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import MoshiForConditionalGeneration

from s2s.backends import ModelUnavailable, StepResult
from s2s.backends.moshi import MoshiBackend
from s2s.backends.moshi_engine import MoshiEngine
from s2s.signaling.state import BACKEND
from s2s.worker.messages import Change
from s2s.worker.process import WorkerError, WorkerOptions, WorkerProcess
from tests.conftest import StartServer
from tests.peer import MicTrack, Peer
from tests.signals import rms, tone


@pytest.fixture(scope="module")
def tiny_moshi(tiny_models: Path) -> MoshiForConditionalGeneration:
    model: MoshiForConditionalGeneration = MoshiForConditionalGeneration.from_pretrained(
        tiny_models / "tiny-moshi", local_files_only=True
    )
    return model.eval()


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

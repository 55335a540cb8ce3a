"""The Moshi backend on the tiny random checkpoint: batching, and calls through the real server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import MoshiForConditionalGeneration

from s2s.backends.moshi_engine import MoshiEngine, RowOutput
from tests.conftest import StartServer
from tests.peer import MicTrack, Peer
from tests.signals import rms, tone


@pytest.fixture(scope="module")
def tiny_moshi(tiny_models: Path) -> MoshiForConditionalGeneration:
    model: MoshiForConditionalGeneration = MoshiForConditionalGeneration.from_pretrained(
        tiny_models / "tiny-moshi", local_files_only=True
    )
    return model.eval()


def _same(a: list[RowOutput], b: list[RowOutput]) -> bool:
    return all(
        x.text_token == y.text_token
        and ((x.codes is None and y.codes is None) or torch.equal(x.codes, y.codes))  # type: ignore[arg-type]
        for x, y in zip(a, b, strict=True)
    )


def test_a_calls_output_does_not_change_when_others_join_or_leave(
    tiny_moshi: MoshiForConditionalGeneration,
) -> None:
    codes = [
        torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(i)) for i in range(30)
    ]
    shared = MoshiEngine(tiny_moshi)
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
    alone = MoshiEngine(tiny_moshi)
    solo = alone.join("a", seed=1)
    assert _same(outputs, [alone.step({solo: codes[t]})[solo] for t in range(30)])
    assert outputs[0].codes is None and all(o.codes is not None for o in outputs[1:])


def test_reset_makes_a_row_start_afresh(tiny_moshi: MoshiForConditionalGeneration) -> None:
    codes = [
        torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(i)) for i in range(10)
    ]
    engine = MoshiEngine(tiny_moshi)
    row, other = engine.join("a", seed=5), engine.join("b", seed=6)
    for t in range(6):
        engine.step({row: codes[t], other: codes[t]})
    engine.reset(row)
    row.generator.manual_seed(5)
    after = [engine.step({row: codes[t], other: codes[t]})[row] for t in range(10)]
    fresh = MoshiEngine(tiny_moshi)
    new = fresh.join("a", seed=5)
    assert _same(after, [fresh.step({new: codes[t]})[new] for t in range(10)])


async def test_calls_through_the_server_get_moshi_audio_on_time(
    start_server: StartServer, tiny_models: Path
) -> None:
    server = await start_server(model=f"moshi:{tiny_models / 'tiny-moshi'}")
    peers = [Peer(server.url, MicTrack(tone(300 + 100 * i, 6))) for i in range(3)]
    try:
        await asyncio.gather(*(p.connect() for p in peers))
        start = asyncio.get_running_loop().time() + 0.5
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

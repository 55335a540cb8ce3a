"""The contract every model backend meets, run against each one."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from s2s.backends import ResponseFinished, ResponseRequest, UnknownModelError, load_backend
from s2s.protocol.items import InputText, MessageItem
from tests.signals import tone

BACKENDS = ["echo", "local", "moshi", "qwen-omni"]


@pytest.mark.parametrize("name", BACKENDS)
async def test_stream_contract(name: str, tiny_models: Path) -> None:
    checkpoints = {"moshi": "tiny-moshi", "qwen-omni": "tiny-qwen-omni"}
    spec = f"{name}:{tiny_models / checkpoints[name]}" if name in checkpoints else name
    backend = await load_backend(spec)
    assert backend.input_rate in (16_000, 24_000, 48_000)
    assert backend.frame_samples > 0
    streams = [await backend.open_stream(f"call{i}") for i in range(2)]
    try:
        if backend.turn_based:
            # A turn-based model speaks when asked; ask it to say something.
            say = MessageItem(role="user", content=[InputText("please say hello there")])
            await streams[0].respond(
                ResponseRequest("resp_1", "", "alloy", 1.0, ["audio"], [say], "client")
            )
        source = tone(440, 1.0, rate=backend.input_rate)
        silence = np.zeros(backend.frame_samples, np.int16)
        frames = [
            source[start : start + backend.frame_samples]
            for start in range(0, source.size - backend.frame_samples + 1, backend.frame_samples)
        ]
        produced, events, others = [], [], []

        async def step(frame: np.ndarray) -> None:
            result = await streams[0].step(frame)
            assert result.audio.dtype == np.int16 and result.audio.ndim == 1
            assert isinstance(result.text, str)
            produced.append(result.audio)
            events.extend(result.events)
            # Another call's stream is independent of this one: asked nothing, it answers
            # nothing (a turn-based model), and nothing of this call's reply reaches it.
            other = await streams[1].step(silence)
            assert other.audio.dtype == np.int16
            others.append(other)
            # Frames come at the caller's pace; background work (synthesis) runs in between.
            await asyncio.sleep(backend.frame_samples / backend.input_rate)

        for frame in frames:
            await step(frame)
        if backend.turn_based:
            # The reply takes as long as this machine needs to generate it: the caller goes on
            # sending (silence) until it is done.
            async with asyncio.timeout(60):
                while ResponseFinished("resp_1") not in events:
                    await step(silence)
        assert sum(a.size for a in produced) > 0
        assert not any(e for o in others for e in o.events)
        if backend.turn_based:
            assert not any(o.audio.size or o.text for o in others)
        await streams[0].reset()
        after = await streams[0].step(np.zeros(backend.frame_samples, np.int16))
        assert after.audio.dtype == np.int16
    finally:
        for stream in streams:
            await stream.close()
        await backend.close()


async def test_unknown_model_is_refused_by_name() -> None:
    with pytest.raises(UnknownModelError, match="nope"):
        await load_backend("nope:somewhere")

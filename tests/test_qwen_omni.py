"""The ``qwen-omni`` backend on a tiny random Qwen2.5-Omni (scripts/make_tiny_models.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from s2s.backends import ResponseFinished, ResponseRequest, StepResult
from s2s.backends.qwen_omni import (
    OUTPUT_RATE,
    QwenOmniBackend,
    QwenOmniStream,
    build_inputs,
)
from s2s.images import Picture
from s2s.protocol.items import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputAudio,
    InputText,
    MessageItem,
)
from s2s.protocol.session_config import FunctionTool
from tests.conftest import StartServer
from tests.peer import MicTrack, Peer
from tests.signals import rms
from tests.speech import speak

SILENCE = np.zeros(320, np.int16)


@pytest.fixture(scope="module")
def backend(tiny_models: Path) -> Iterator[QwenOmniBackend]:
    loaded = QwenOmniBackend._load(str(tiny_models / "tiny-qwen-omni"), "cpu")
    # The checkpoint's generation_config.json keeps a random reply to ~1 s of speech.
    assert (loaded.thinker_max_new_tokens, loaded.talker_max_new_tokens) == (8, 50)
    yield loaded
    loaded.executor.shutdown(wait=True)


def _noise(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 3000, int(16_000 * seconds)).clip(-32768, 32767).astype(np.int16)


def _jpeg(size: tuple[int, int] = (96, 64)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, "JPEG")
    return out.getvalue()


def _request(item: MessageItem, pictures: list[Picture] | None = None) -> ResponseRequest:
    return ResponseRequest(
        response_id="resp_1", instructions="Be brief.", voice="alloy", speed=1.0,
        modalities=["audio", "text"], conversation=[item], pictures=pictures or [],
    )  # fmt: skip


async def _speak_turn(stream: QwenOmniStream, item_id: str, seconds: float) -> None:
    pcm = _noise(seconds)
    for start in range(0, pcm.size, 320):
        await stream.step(pcm[start : start + 320])
    await stream.commit(item_id)


async def _drain(stream: QwenOmniStream, timeout: float) -> list[StepResult]:
    results: list[StepResult] = []
    async with asyncio.timeout(timeout):
        while not any(isinstance(e, ResponseFinished) for r in results for e in r.events):
            result = await stream.step(SILENCE)
            if result.audio.size or result.text or result.events:
                results.append(result)
            else:
                await asyncio.sleep(0.02)
    return results


async def test_a_committed_spoken_turn_gets_audio_chunks_and_finishes(
    backend: QwenOmniBackend,
) -> None:
    stream = await backend.open_stream("call_1")
    await _speak_turn(stream, "item_1", 1.0)
    item = MessageItem(role="user", content=[InputAudio()], id="item_1")
    await stream.respond(_request(item))

    results = await _drain(stream, timeout=30)
    await stream.close()

    audio = [r.audio for r in results if r.audio.size]
    assert audio, "no audio came out"
    assert all(a.size <= OUTPUT_RATE // 5 for a in audio)  # handed out in 200 ms chunks
    assert int(np.abs(np.concatenate(audio)).max()) > 100  # sound, not digital silence
    assert all(r.response_id == "resp_1" for r in results)
    assert results[-1].events == [ResponseFinished("resp_1")]


async def test_the_turn_carries_the_committed_audio_the_text_and_the_latest_picture(
    backend: QwenOmniBackend,
) -> None:
    stream = await backend.open_stream("call_2")
    await _speak_turn(stream, "item_1", 0.5)
    item = MessageItem(role="user", content=[InputAudio(), InputText("what is this?")], id="item_1")
    old = Picture(_jpeg((32, 32)), 32, 32, "old")
    new = Picture(_jpeg(), 96, 64, "a red square")
    turn = stream.turn_for(_request(item, pictures=[old, new]))
    await stream.close()
    assert turn.jpeg == new.jpeg
    assert turn.audio is not None and turn.audio.size == 8000
    assert turn.text == "what is this?"
    assert turn.system.endswith("Be brief.")

    inputs = build_inputs(backend.tokenizer, backend.features, backend.images, turn)
    ids = inputs["input_ids"][0].tolist()
    grid = inputs["image_grid_thw"]
    image_token = backend.model.config.thinker_config.image_token_index
    audio_token = backend.model.config.thinker_config.audio_token_index
    assert inputs["thinker_pixel_values"].shape[0] == int(grid.prod())
    assert ids.count(image_token) == int(grid.prod()) // 4  # 2x2 patches merge into one token
    assert ids.count(audio_token) == 12  # 50 feature frames -> 25 (conv) -> 12 (pool)
    assert int(inputs["feature_attention_mask"].sum()) == 50
    assert "what is this?" in backend.tokenizer.decode(ids)


async def test_tools_go_into_the_prompt_and_a_tool_output_is_the_next_turn(
    backend: QwenOmniBackend,
) -> None:
    weather = FunctionTool(name="get_weather", parameters={"type": "object"})
    user = MessageItem(role="user", content=[InputText("weather in Paris?")], id="item_1")
    stream = await backend.open_stream("call_t")
    asked = stream.turn_for(dataclasses.replace(_request(user), tools=[weather]))
    call = FunctionCallItem(id="item_2", call_id="call_1", name="get_weather", arguments="{}")
    output = FunctionCallOutputItem(id="item_3", call_id="call_1", output="sunny, 21 degrees")
    answered = stream.turn_for(
        dataclasses.replace(_request(user), conversation=[user, call, output], tools=[weather])
    )
    await stream.close()
    assert '"name": "get_weather"' in asked.system and asked.text == "weather in Paris?"
    assert answered.text == "<tool_response>\nsunny, 21 degrees\n</tool_response>"
    inputs = build_inputs(backend.tokenizer, backend.features, backend.images, answered)
    prompt = backend.tokenizer.decode(inputs["input_ids"][0])
    assert "<tool_call>" in prompt and "sunny, 21 degrees" in prompt


async def test_reset_during_generation_discards_the_late_result(
    backend: QwenOmniBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = await backend.open_stream("call_3")
    await _speak_turn(stream, "item_1", 0.5)
    loop, generating = asyncio.get_running_loop(), asyncio.Event()
    generate = backend.generate

    def announced(*args: Any) -> Any:
        loop.call_soon_threadsafe(generating.set)
        return generate(*args)

    monkeypatch.setattr(backend, "generate", announced)
    await stream.respond(_request(MessageItem(role="user", content=[InputAudio()], id="item_1")))
    async with asyncio.timeout(30):
        await generating.wait()  # the generation is on the device thread: reset under it
    await stream.reset()
    # The device thread runs one job at a time: once this returns, the generation is done.
    await loop.run_in_executor(backend.executor, lambda: None)

    later = [await stream.step(SILENCE) for _ in range(20)]
    await stream.close()
    assert all(r.audio.size == 0 and not r.text and not r.events for r in later)


async def test_a_text_only_response_has_text_and_no_audio(backend: QwenOmniBackend) -> None:
    stream = await backend.open_stream("call_4")
    item = MessageItem(role="user", content=[InputText("hello there")], id="item_1")
    request = _request(item)
    await stream.respond(
        ResponseRequest(
            request.response_id, request.instructions, request.voice, request.speed,
            modalities=["text"], conversation=request.conversation,
        )
    )  # fmt: skip
    results = await _drain(stream, timeout=30)
    await stream.close()
    assert all(r.audio.size == 0 for r in results)
    assert "".join(r.text for r in results)
    assert results[-1].events == [ResponseFinished("resp_1")]


async def test_a_spoken_turn_through_the_server_gets_a_spoken_reply(
    start_server: StartServer, tiny_models: Path
) -> None:
    server = await start_server(model=f"qwen-omni:{tiny_models / 'tiny-qwen-omni'}")
    peer = Peer(server.url, MicTrack())
    loop = asyncio.get_running_loop()
    try:
        await peer.connect()
        await peer.next_event("session.created", timeout=10)
        peer.mic.play(speak("hello there how are you today"))
        await peer.next_event("input_audio_buffer.committed", timeout=20)
        began = loop.time()
        done = await peer.next_event("response.done", timeout=30)
        assert done["response"]["status"] == "completed"
        await peer.wait_audio(0.5, since=began, timeout=10)
        assert rms(peer.audio(since=began)) > 0.01
    finally:
        await peer.close()

"""``qwen3-omni:`` through the real server, its model worker and real aiortc peers, on the tiny
random checkpoint (``scripts/make_tiny_models.py``; 8 text tokens and up to 5 s of speech per
reply). The model's own streaming and equivalence are in ``tests/test_qwen3_omni.py``."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from s2s.backends.qwen3_omni import Qwen3OmniBackend
from s2s.signaling.state import BACKEND
from tests.conftest import StartServer
from tests.peer import MicTrack, Peer
from tests.signals import rms
from tests.speech import speak


class _Recorder:
    """Where a ``Qwen3OmniStream``'s changes for its worker go, in tests of the stream alone:
    the backend's settings it reads, and every change it makes."""

    def __init__(self, prompt_tokens: int = 8192) -> None:
        self.prompt_tokens, self.prefill_tokens, self.input_rate = prompt_tokens, 0, 16_000
        self.output_rate = 24_000
        self.changes: list[Any] = []

    def change(self, change: Any) -> None:
        self.changes.append(change)


def _picture_item() -> dict[str, Any]:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(out, "JPEG")
    url = "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user",
                     "content": [{"type": "input_image", "image_url": url}]}}  # fmt: skip


def _first(events: list[dict[str, Any]], kind: str, after: int = 0) -> int:
    return next(i for i, e in enumerate(events) if i >= after and e["type"] == kind)


async def test_spoken_turns_with_a_picture_are_answered_in_speech_by_calls_at_once(
    start_server: StartServer, tiny_models: Path
) -> None:
    server = await start_server(model=f"qwen3-omni:{tiny_models / 'tiny-qwen3-omni'}")
    peers = [Peer(server.url, MicTrack()) for _ in range(2)]
    loop = asyncio.get_running_loop()
    try:
        for peer in peers:
            await peer.connect()
            await peer.next_event("session.created", timeout=10)
        peers[0].send(_picture_item())
        await peers[0].next_event("conversation.item.added", timeout=10)
        spoken = [speak(text) for text in ("what am I looking at", "say something nice")]
        quiet = np.zeros(2 * 48_000, np.int16)  # before the turn: none of it is the turn's
        for peer, clip in zip(peers, spoken, strict=True):
            peer.mic.play(np.concatenate([quiet, clip]))
        began = loop.time() + quiet.size / 48_000  # the turn, not the quiet before it
        backend = server.app[BACKEND]
        assert isinstance(backend, Qwen3OmniBackend)
        for peer, clip in zip(peers, spoken, strict=True):
            # The spoken turn's response is each call's first.
            done = await peer.next_event("response.done", timeout=60)
            assert done["response"]["status"] == "completed"
            # The turn is the speech, the VAD's padding before it and silence after it.
            (turn,) = backend._streams[peer.call_id]._committed.values()
            seconds = turn.size / backend.input_rate
            assert clip.size / 48_000 - 0.3 < seconds < clip.size / 48_000 + 1.2, seconds
            # Its reply is loud from its first sound on (measured from the turn, the wait
            # for the reply diluted it: 0.0037 once against 0.005).
            sounded = await peer.wait_sound(level=0.002, since=began, timeout=15)
            await peer.wait_audio(1.0, since=sounded, timeout=15)
            assert rms(peer.audio(since=sounded)) > 0.005
            # In order: the response opens, its transcript streams, then it is done.
            created = _first(peer.events, "response.created")
            delta = _first(peer.events, "response.output_audio_transcript.delta", created)
            assert created < delta < _first(peer.events, "response.done", created)
    finally:
        for peer in peers:
            await peer.close()


async def test_cancel_stops_the_reply_and_the_call_answers_again(
    start_server: StartServer, tiny_models: Path
) -> None:
    server = await start_server(model=f"qwen3-omni:{tiny_models / 'tiny-qwen3-omni'}")
    peer = Peer(server.url, MicTrack(), session={"audio": {"input": {"turn_detection": None}}})
    loop = asyncio.get_running_loop()
    try:
        await peer.connect()
        await peer.next_event("session.created", timeout=10)
        text = {"type": "input_text", "text": "hello"}
        item = {"type": "message", "role": "user", "content": [text]}
        peer.send({"type": "conversation.item.create", "item": item})
        peer.send({"type": "response.create"})
        await peer.next_event("output_audio_buffer.started", timeout=30)
        # Its prompt is fixed once prefilled: steering it is refused, not confirmed.
        mark = len(peer.events)
        peer.send({"type": "s2s.response.steer", "instructions": "be brief"})
        refused = await peer.next_event("error", after=mark, timeout=5)
        assert refused["error"]["code"] == "steering_not_supported"
        again = len(peer.events)
        peer.send({"type": "response.create"})
        refused = await peer.next_event("error", after=again, timeout=5)
        assert refused["error"]["code"] == "conversation_already_has_active_response"
        assert "s2s.response.steered" not in [e["type"] for e in peer.events[mark:]]
        mark = len(peer.events)
        peer.send({"type": "response.cancel"})
        done = await peer.next_event("response.done", after=mark, timeout=10)
        assert done["response"]["status"] == "cancelled"
        await peer.next_event("output_audio_buffer.cleared", after=mark, timeout=5)
        # The tiny reply is up to 5 s long; from 0.3 s after the clear on, it is silent.
        quiet_from = loop.time() + 0.3
        await peer.wait_audio(1.5, since=quiet_from, timeout=5)
        assert rms(peer.audio(since=quiet_from)) < 0.002
        # The call goes on: the next response is answered in full.
        mark = len(peer.events)
        peer.send({"type": "response.create"})
        again = await peer.next_event("response.done", after=mark, timeout=60)
        assert again["response"]["status"] == "completed"
    finally:
        await peer.close()


def test_the_worker_prompts_with_every_turn_its_audio_and_the_picture(tiny_models: Path) -> None:
    """In process (the worker's side alone): a respond's turns become the engine's prompt, a
    second respond replaces the first, and the reply streams until it is done."""
    import numpy as np

    from s2s.worker.messages import Change, Respond, Tick, Turn
    from s2s.worker.omni import OmniWorker, response_seed

    worker = OmniWorker.load(str(tiny_models / "tiny-qwen3-omni"), "cpu", max_calls=2)
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 48), (20, 200, 30)).save(jpeg, "JPEG")
    speech = (np.sin(np.arange(16_000) / 5) * 8000).astype(np.int16).tobytes()
    turns = [
        Turn("system", "Be brief."),
        Turn("user", "hi"),
        Turn("assistant", "hello"),
        Turn("user", "what is this", speech, [jpeg.getvalue()]),
    ]
    first = worker.handle(Tick([Change("join", "a"), Change("respond", "a",
                               respond=Respond("r1", turns[:2]))]))  # fmt: skip
    assert first.outputs["a"].response_id == "r1" and not first.outputs["a"].done
    (row,) = worker.engine.rows.values()
    # Each response samples with its own seed, a hash of the call and its count of responses
    # that every process computes alike (a salted hash() would not give this number).
    assert row.request.seed == response_seed("a", 0) == 4539640581616191226
    replaced = worker.handle(
        Tick([Change("respond", "a", respond=Respond("r2", turns, voice="Ethan"))])
    )
    assert "a" not in replaced.outputs  # r1 ends in this tick's step, unreported
    # r2 begins with the next tick, in the slot r1 left (and its kept cache).
    assert worker.handle(Tick()).outputs["a"].response_id == "r2"
    (row,) = worker.engine.rows.values()
    inputs = row.request.inputs
    assert "image_grid_thw" in inputs and "feature_attention_mask" in inputs
    assert row.request.speaker == "ethan"
    assert row.request.seed == response_seed("a", 1) != response_seed("a", 0)
    outputs = []
    for _ in range(100):
        output = worker.handle(Tick()).outputs["a"]
        assert output.response_id == "r2"  # nothing more of r1
        outputs.append(output)
        if output.done:
            break
    assert outputs[-1].done in ("stop", "length")
    assert sum(len(o.audio) for o in outputs) > 2 * 1920
    assert not worker.engine.rows and worker.handle(Tick()).outputs == {}


def test_the_worker_allocates_its_caches_at_load_and_never_grows_them(tiny_models: Path) -> None:
    """Every slot's caches hold the worker's prompt budget and the longest reply from load on,
    so no step reallocates them (which would also drop captured steps); an edge that asks for
    a larger budget is cut to the worker's, here by leaving out the oldest turns."""
    from s2s.omni.prompt import Message
    from s2s.omni.request import cache_positions
    from s2s.worker.messages import Change, Respond, Tick, Turn
    from s2s.worker.omni import OmniWorker

    budget = 60
    worker = OmniWorker.load(
        str(tiny_models / "tiny-qwen3-omni"), "cpu", max_calls=2, prompt_tokens=budget
    )
    engine = worker.engine
    thinker, talker = cache_positions(budget, worker.max_text_tokens, worker.max_frames)
    assert (engine.thinker_cache.capacity, engine.talker_cache.capacity) == (thinker, talker)
    caches = (engine.thinker_cache.keys[0], engine.talker_cache.keys[0])
    talk = [Turn("user", f"tell me about the number {n} please") for n in range(12)]
    turns = [Turn("system", "Be brief."), *talk]
    respond = Respond("r", turns, prompt_tokens=8192)
    outputs = [worker.handle(Tick([Change("join", "a"), Change("respond", "a", respond=respond)]))]
    (row,) = worker.engine.rows.values()
    whole = worker.prompter.fit([Message(t.role, t.text, [], []) for t in turns], 8192)[0]
    assert row.request.inputs["input_ids"].shape[1] <= budget < whole["input_ids"].shape[1]
    while "a" not in outputs[-1].outputs or not outputs[-1].outputs["a"].done:
        assert len(outputs) < 200
        outputs.append(worker.handle(Tick()))
    assert outputs[-1].outputs["a"].done in ("stop", "length")
    assert sum(len(o.outputs["a"].audio) for o in outputs if "a" in o.outputs) > 0
    # The same tensors, never reallocated.
    assert engine.thinker_cache.keys[0] is caches[0] and engine.talker_cache.keys[0] is caches[1]


def test_turns_are_prefilled_one_per_step_and_wait_for_a_free_slot(tiny_models: Path) -> None:
    from s2s.worker.messages import Change, Respond, Tick, Turn
    from s2s.worker.omni import OmniWorker

    worker = OmniWorker.load(str(tiny_models / "tiny-qwen3-omni"), "cpu", max_calls=2)
    # A voice the model does not have ("alloy") gets generate()'s default, not the first listed.
    assert worker.default_speaker == "ethan" != next(iter(worker.speakers))
    ask = [Turn("user", "hello there")]
    calls = ["a", "b", "c"]
    tick = Tick([Change("join", c) for c in calls]
                + [Change("respond", c, respond=Respond(f"r{c}", ask)) for c in calls])  # fmt: skip
    answered = set(worker.handle(tick).outputs)
    assert answered == {"a"} and list(worker.waiting) == ["b", "c"]
    assert set(worker.handle(Tick()).outputs) == {"a", "b"}
    # Both slots answer now; "c" waits until one of them is done, then is admitted.
    done: list[str] = []
    for _ in range(200):
        outputs = worker.handle(Tick()).outputs
        done += [call for call, output in outputs.items() if output.done]
        if "c" in done:
            break
        assert "c" not in outputs or done
    assert done[0] in ("a", "b") and "c" in done


async def test_a_streamed_tool_call_is_held_back_and_becomes_a_call(tiny_models: Path) -> None:
    """The stream's side alone, fed what a worker sends: a reply whose text is a
    ``<tool_call>`` (split over tokens as the tiny checkpoint's tokenizer splits it) becomes a
    ``ToolCalled`` and none of its speech plays; a malformed one is spoken as it was."""
    import json

    import numpy as np
    from transformers import AutoTokenizer

    from s2s.backends import ResponseFinished, ResponseRequest, ToolCalled
    from s2s.backends.qwen3_omni import Qwen3OmniStream
    from s2s.protocol.session_config import FunctionTool
    from s2s.worker.messages import CallOutput

    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "tiny-qwen3-omni")
    city = {"city": {"type": "string"}}
    schema = {"type": "object", "properties": city, "required": ["city"]}
    weather = FunctionTool(name="get_weather", parameters=schema)
    frame = (np.ones(1920, np.int16) * 1000).tobytes()

    async def reply(text: str, audio: bytes = frame) -> list[Any]:
        recorder = _Recorder()
        changes = recorder.changes
        stream = Qwen3OmniStream(recorder, "call")  # type: ignore[arg-type]
        await stream.respond(ResponseRequest(
            response_id="r", instructions="", voice="", speed=1.0, modalities=["audio"],
            conversation=[], tools=[weather]))  # fmt: skip
        assert "get_weather" in changes[0].respond.turns[0].text  # offered in the prompt
        pieces = [tokenizer.decode([t]) for t in tokenizer.encode(text)]
        for piece in pieces:
            stream.receive(CallOutput(text=piece, audio=audio, response_id="r"))
        stream.receive(CallOutput(response_id="r", done="stop"))
        return list(stream._out)

    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    steps = await reply(call)
    events = [e for s in steps for e in s.events]
    assert events == [ToolCalled("r", "get_weather", json.dumps({"city": "Paris"})),
                      ResponseFinished("r")]  # fmt: skip
    assert not any(s.audio.size for s in steps)
    # Done before any frame came (the talker ended at once): still a call, not read out.
    events = [e for s in await reply(call, audio=b"") for e in s.events]
    assert [type(e) for e in events] == [ToolCalled, ResponseFinished]
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>'
    steps = await reply(broken)
    assert "".join(s.text for s in steps) == broken and sum(s.audio.size for s in steps) > 0
    plain = await reply("hello there")
    assert plain[0].audio.size  # not held: spoken as it comes (its text paced with it)
    assert "".join(s.text for s in plain) == "hello there"


async def test_a_tool_call_after_words_plays_the_words_and_makes_the_call() -> None:
    """A reply that says something, then calls a tool: its words play with the speech that
    comes until they are handed over, nothing after (that speech reads the call out); at the
    end the call is made and words after it come as text. Malformed, it all plays, in order;
    a ``<`` that turns out not to start a call holds nothing back for good."""
    import json

    import numpy as np

    from s2s.backends import ResponseFinished, ResponseRequest, ToolCalled
    from s2s.backends.qwen3_omni import Qwen3OmniStream
    from s2s.backends.qwen3_reply import Reply
    from s2s.protocol.session_config import FunctionTool
    from s2s.worker.messages import CallOutput

    weather = FunctionTool(name="get_weather", parameters={"type": "object"})
    frame = (np.ones(1920, np.int16) * 1000).tobytes()  # 80 ms at 24 kHz

    async def reply(pieces: list[str], frames: int) -> list[Any]:
        stream = Qwen3OmniStream(_Recorder(), "call")  # type: ignore[arg-type]
        await stream.respond(ResponseRequest(
            response_id="r", instructions="", voice="", speed=1.0, modalities=["audio"],
            conversation=[], tools=[weather]))  # fmt: skip
        for i in range(frames):  # a piece of text and a frame a tick, then frames alone
            text = pieces[i] if i < len(pieces) else ""
            stream.receive(CallOutput(text=text, audio=frame, response_id="r"))
        stream.receive(CallOutput(response_id="r", done="stop"))
        return list(stream._out)

    args = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    words = [" Let", " me", " check."]
    steps = await reply([*words, "<tool_call>", args, "</tool_call>", " Done"], 12)
    # " check." is handed over with the ninth frame (a token per three): nine frames play.
    assert "".join(s.text for s in steps[:-2]) == " Let me check."
    assert sum(s.audio.size for s in steps) == 9 * 1920
    assert (steps[-2].text, steps[-2].audio.size) == ("Done", 0)
    assert steps[-1].events == [
        ToolCalled("r", "get_weather", json.dumps({"city": "Paris"})), ResponseFinished("r"),
    ]  # fmt: skip
    broken = [*words, "<tool_call>", '{"name": ', "</tool_call>"]
    steps = await reply(broken, 12)
    assert "".join(s.text for s in steps) == "".join(broken)
    assert sum(s.audio.size for s in steps) == 12 * 1920
    assert [type(e) for s in steps for e in s.events] == [ResponseFinished]
    # "<" may start a call until "x" says it does not: held meanwhile, then all of it plays.
    held = Reply("r", [weather], speaks=True, frame_samples=1920)
    audio = np.frombuffer(frame, np.int16)
    taken = [held.take(text, audio) for text in [" a", "", "", "<", "t", "x"]]
    assert [len(t) for t in taken] == [1, 1, 1, 0, 0, 3]
    assert "".join(s.text for t in taken for s in t) == " a<"  # paced: "<" with tick six
    steps = [s for t in taken for s in t] + held.finish()
    assert "".join(s.text for s in steps) == " a<tx"
    assert sum(s.audio.size for s in steps) == 6 * 1920


async def test_turns_keep_their_pictures_and_their_audio_crosses_once() -> None:
    """The stream's side: a picture goes with the user turn it is first shown with and stays
    there as the conversation goes on (a newer one joins the newer turn), so a call's prompts
    share their start; a turn's audio crosses to the worker with the first respond that holds
    it and is named after (``heard``), until a response fails; the oldest turns' audio is let
    go only past what a prompt of the budget could hold."""
    import numpy as np

    from s2s.backends import ResponseRequest
    from s2s.backends.qwen3_omni import Qwen3OmniStream
    from s2s.images import Picture
    from s2s.protocol.items import InputAudio, MessageItem, OutputAudio
    from s2s.worker.messages import CallOutput

    recorder = _Recorder(prompt_tokens=120)
    changes = recorder.changes
    stream = Qwen3OmniStream(recorder, "call")  # type: ignore[arg-type]
    items: list[Any] = []
    seen = [Picture(bytes([i]) * 100, 64, 48, "a picture") for i in range(2)]

    async def turn(
        item: str, seconds: float, pictures: list[Picture], done: str = "stop"
    ) -> list[Any]:
        await stream.step(np.ones(int(16_000 * seconds), np.int16))
        await stream.commit(item)
        items.append(MessageItem(role="user", content=[InputAudio()], id=item))
        await stream.respond(ResponseRequest(
            response_id=f"r-{item}", instructions="Be brief.", voice="", speed=1.0,
            modalities=["audio"], conversation=list(items), pictures=pictures))  # fmt: skip
        items.append(MessageItem(role="assistant", content=[OutputAudio("ok")], id=f"a-{item}"))
        stream.receive(CallOutput(response_id=f"r-{item}", done=done))
        (*_, asked) = (c for c in changes if c.kind == "respond")  # a failure adds a reset
        return [t for t in asked.respond.turns if t.role == "user"]

    (first,) = await turn("u1", 1, seen[:1])
    assert first.audio and not first.heard and (first.pictures, first.seen) == ([seen[0].jpeg], 0)
    # The same picture: it stays with the turn it was shown with, and neither it nor that
    # turn's audio is sent again.
    one, two = await turn("u2", 1, seen[:1])
    assert (one.audio, one.heard, one.pictures, one.seen) == (b"", True, [], 1)
    assert two.audio and not two.heard and (two.pictures, two.seen) == ([], 0)
    # A new one goes with the new turn; that response fails.
    one, two, three = await turn("u3", 1, seen, "failed: the model's step failed")
    assert (one.seen, three.pictures, three.seen) == (1, [seen[1].jpeg], 0)
    assert [t.heard for t in (one, two, three)] == [True, True, False]
    users = await turn("u4", 1, seen)  # after a failure, everything is sent again
    assert all(t.audio and not t.heard and not t.seen for t in users) and len(users) == 4
    assert (users[0].pictures, users[2].pictures) == ([seen[0].jpeg], [seen[1].jpeg])
    # The turn a picture went with is deleted: shown again, with the next turn.
    del items[4]  # u3
    users = await turn("u5", 1, seen)
    assert [t.item for t in users] == ["u1", "u2", "u4", "u5"]
    assert users[-1].pictures == [seen[1].jpeg]
    # A 120-token budget holds at most 10 s of audio: u1 is let go once the newer turns' audio
    # alone is past that, and not before.
    await turn("u6", 5, [])
    assert list(stream._committed) == ["u1", "u2", "u3", "u4", "u5", "u6"]
    await turn("u7", 1, [])
    assert list(stream._committed) == ["u2", "u3", "u4", "u5", "u6", "u7"]


async def test_a_deleted_turn_and_its_picture_are_not_in_the_next_prompt() -> None:
    """``conversation.item.delete`` changes what the model reads next: a deleted spoken turn's
    audio and a deleted picture item's picture are gone from the prompt (the audio came back as
    a turn of its own when no user item was left; the picture went with the last user turn)."""
    import numpy as np

    from s2s.backends import ResponseRequest
    from s2s.backends.qwen3_omni import Qwen3OmniStream
    from s2s.images import ImageLimits, Picture
    from s2s.protocol.items import InputAudio, InputImage, InputText, MessageItem
    from s2s.realtime.conversation import Conversation

    recorder = _Recorder()
    stream = Qwen3OmniStream(recorder, "call")  # type: ignore[arg-type]
    conversation = Conversation(ImageLimits(), 4, 1 << 20)
    spoken = MessageItem(role="user", content=[InputAudio()], id="a1")
    shown = MessageItem(role="user", content=[InputImage(image_url="data:")], id="img1")
    conversation.add(spoken)
    await stream.step(np.ones(16_000, np.int16))
    await stream.commit("a1")
    conversation.add(shown)
    conversation.remember(shown, Picture(b"JPEG", 64, 48, "a picture"))
    for item in ("a1", "img1"):
        conversation.delete(item)
    conversation.add(MessageItem(role="user", content=[InputText("hello")], id="u1"))
    await stream.respond(ResponseRequest(
        response_id="r", instructions="", voice="", speed=1.0, modalities=["audio"],
        conversation=conversation.items(), pictures=conversation.pictures()))  # fmt: skip
    turns = recorder.changes[-1].respond.turns
    assert [(t.item, t.audio, t.pictures) for t in turns] == [("u1", b"", [])]
    conversation.delete("u1")
    await stream.respond(ResponseRequest(
        response_id="r2", instructions="", voice="", speed=1.0, modalities=["audio"],
        conversation=conversation.items(), pictures=conversation.pictures()))  # fmt: skip
    assert recorder.changes[-1].respond.turns == []


async def test_system_items_are_read_and_a_failed_reply_frees_its_worker_slot() -> None:
    """A system message added mid-conversation is in the prompt, in its place (it was left
    out); a response the stream gives up as failed is reset at the worker too (its row went on
    generating there, holding the slot); a request that cannot be built leaves no response
    for the scheduler to tick for."""
    from s2s.backends import ResponseRequest
    from s2s.backends.qwen3_omni import Qwen3OmniStream
    from s2s.protocol.items import InputText, MessageItem
    from s2s.worker.messages import CallOutput

    recorder = _Recorder()
    stream = Qwen3OmniStream(recorder, "call")  # type: ignore[arg-type]
    conversation = [
        MessageItem(role="user", content=[InputText("hello")], id="u1"),
        MessageItem(role="system", content=[InputText("Answer in French.")], id="s1"),
        MessageItem(role="user", content=[InputText("how are you")], id="u2"),
    ]
    await stream.respond(ResponseRequest(
        response_id="r", instructions="Be brief.", voice="", speed=1.0, modalities=["audio"],
        conversation=conversation))  # fmt: skip
    turns = recorder.changes[-1].respond.turns
    assert [(t.role, t.text) for t in turns] == [
        ("system", "Be brief."),
        ("user", "hello"),
        ("system", "Answer in French."),
        ("user", "how are you"),
    ]
    stream.receive(CallOutput(response_id="r", text="Bon", audio=b"\0\0" * 1920))
    stream.receive(CallOutput(response_id="r", done="failed: its output could not be read"))
    assert (recorder.changes[-1].kind, recorder.changes[-1].call) == ("reset", "call")
    assert stream.answering is None
    broken = ResponseRequest(
        response_id="r2",
        instructions="",
        voice="",
        speed=1.0,
        modalities=["audio"],
        conversation=[object()],
        pictures=[object()],
    )  # type: ignore[list-item]
    with pytest.raises(AttributeError):
        await stream.respond(broken)
    assert stream.answering is None


async def test_a_call_its_worker_let_go_is_answered_after_one_failed_response(
    tiny_models: Path,
) -> None:
    """A worker that no longer holds a call (a shared worker let it go when its ticks were
    late; one restarted between ticks) fails its next response; the call joins again then, so
    the response after that is answered (every later one failed: "has not joined")."""
    from s2s.backends import ResponseFailed, ResponseFinished, ResponseRequest
    from s2s.backends.qwen3_omni import Qwen3OmniStream
    from s2s.protocol.items import InputText, MessageItem
    from s2s.worker.messages import Change, Tick
    from s2s.worker.omni import OmniWorker

    worker = OmniWorker.load(str(tiny_models / "tiny-qwen3-omni"), "cpu", max_calls=1)
    recorder = _Recorder()
    stream = Qwen3OmniStream(recorder, "a")  # type: ignore[arg-type]
    ask = [MessageItem(role="user", content=[InputText("hello there")], id="u1")]

    def tick() -> None:  # what the scheduler does: this side's changes there, the output back
        changes, recorder.changes = recorder.changes, []
        output = worker.handle(Tick(changes)).outputs.get("a")
        if output is not None:
            stream.receive(output)

    async def respond(response_id: str) -> list[Any]:
        await stream.respond(ResponseRequest(
            response_id=response_id, instructions="", voice="", speed=1.0,
            modalities=["audio"], conversation=ask))  # fmt: skip
        for _ in range(200):
            tick()
            if stream.answering is None:
                break
        events = [e for step in stream._out for e in step.events]
        stream._out.clear()
        return events

    worker.handle(Tick([Change("join", "a")]))
    worker.handle(Tick([Change("leave", "a")]))  # the worker lets it go
    (failed,) = await respond("r1")
    assert isinstance(failed, ResponseFailed) and "has not joined" in failed.message
    assert await respond("r2") == [ResponseFinished("r2")]


async def test_text_goes_with_the_speech_that_says_it_not_with_the_step_that_wrote_it() -> None:
    """The thinker writes a token a step while a token takes about three frames to say: text
    is handed over a token per three frames of speech (so a barge-in keeps about what was
    heard), the rest when the reply ends; a text-only reply's text goes at once; a reset drops
    what was not handed over."""
    from s2s.backends import ResponseFinished, ResponseRequest
    from s2s.backends.qwen3_omni import Qwen3OmniStream
    from s2s.backends.qwen3_reply import FRAMES_PER_TOKEN
    from s2s.worker.messages import CallOutput

    assert FRAMES_PER_TOKEN == 3.0
    stream = Qwen3OmniStream(_Recorder(), "call")  # type: ignore[arg-type]
    frame = b"\1\0" * 1920  # 80 ms at 24 kHz
    words = [f" w{i}" for i in range(6)]

    async def reply(rid: str, modality: str, steps: int, done: str | None) -> list[Any]:
        await stream.respond(ResponseRequest(
            response_id=rid, instructions="", voice="", speed=1.0, modalities=[modality],
            conversation=[]))  # fmt: skip
        audio = frame if modality == "audio" else b""
        for word in words[:steps]:
            stream.receive(CallOutput(response_id=rid, text=word, audio=audio))
        if done is not None:
            stream.receive(CallOutput(response_id=rid, done=done))
        out = list(stream._out)
        stream._out.clear()
        return out

    spoken = await reply("r1", "audio", 6, "stop")
    assert [r.text for r in spoken] == ["", "", " w0", "", "", " w1", " w2 w3 w4 w5", ""]
    assert sum(r.audio.size for r in spoken) == 6 * 1920
    assert spoken[-1].events == [ResponseFinished("r1")]
    written = await reply("r2", "text", 3, "stop")
    assert [r.text for r in written] == [" w0", " w1", " w2", ""]
    cut = await reply("r3", "audio", 4, None)
    assert "".join(r.text for r in cut) == " w0"
    await stream.reset()
    stream.receive(CallOutput(response_id="r3", done="stop"))  # late: dropped with the reply
    assert not stream._out


async def test_a_long_call_keeps_bounded_bookkeeping() -> None:
    """However many turns a call has, the stream keeps at most 500 committed turns (short ones
    were never let go) and forgets what it sent for items the conversation no longer has."""
    import numpy as np

    from s2s.backends import ResponseRequest
    from s2s.backends.qwen3_omni import Qwen3OmniStream
    from s2s.protocol.items import InputAudio, MessageItem

    stream = Qwen3OmniStream(_Recorder(), "call")  # type: ignore[arg-type]
    for i in range(600):
        await stream.commit(f"quiet{i}")
    assert len(stream._committed) == 500 and "quiet599" in stream._committed
    await stream.step(np.ones(1600, np.int16))
    await stream.commit("u1")
    spoken = MessageItem(role="user", content=[InputAudio()], id="u1")
    for conversation in ([spoken], []):
        await stream.respond(ResponseRequest(
            response_id="r", instructions="", voice="", speed=1.0, modalities=["audio"],
            conversation=conversation))  # fmt: skip
        await stream.reset()
    assert not stream._sent and not stream._sent_pictures


async def test_an_uploaded_picture_leaves_with_its_item_a_camera_frame_stays() -> None:
    """A picture shown with a later turn goes from the prompt when its own item is deleted (it
    stayed, with the turn it was first shown with); a camera frame, which no item holds, stays
    with the turn it was seen in when a newer frame comes."""
    import numpy as np

    from s2s.backends import ResponseRequest
    from s2s.backends.qwen3_omni import Qwen3OmniStream
    from s2s.images import ImageLimits, Picture
    from s2s.protocol.items import InputAudio, InputImage, MessageItem
    from s2s.realtime.conversation import Conversation

    recorder = _Recorder()
    stream = Qwen3OmniStream(recorder, "call")  # type: ignore[arg-type]
    conversation = Conversation(ImageLimits(), 4, 1 << 20)
    photo = MessageItem(role="user", content=[InputImage(image_url="data:")], id="img1")
    conversation.add(photo)
    conversation.remember(photo, Picture(b"PHOTO", 64, 48, "a photo"))

    async def turn(item: str) -> list[Any]:
        await stream.step(np.ones(16_000, np.int16))
        await stream.commit(item)
        conversation.add(MessageItem(role="user", content=[InputAudio()], id=item))
        await stream.respond(ResponseRequest(
            response_id=f"r-{item}", instructions="", voice="", speed=1.0,
            modalities=["audio"], conversation=conversation.items(),
            pictures=conversation.pictures(), camera=conversation.camera_seen))  # fmt: skip
        (*_, asked) = (c for c in recorder.changes if c.kind == "respond")
        await stream.reset()
        stream.worker_lost()  # every turn's pictures in full, to read them here
        return [(t.item, t.pictures) for t in asked.respond.turns]

    assert await turn("u1") == [("img1", []), ("u1", [b"PHOTO"])]
    conversation.delete("img1")
    conversation.see(Picture(b"FRAME1", 64, 48, "a camera frame"))
    assert await turn("u2") == [("u1", []), ("u2", [b"FRAME1"])]
    conversation.see(Picture(b"FRAME2", 64, 48, "a camera frame"))
    assert await turn("u3") == [("u1", []), ("u2", [b"FRAME1"]), ("u3", [b"FRAME2"])]


async def test_the_sessions_truncation_reaches_the_worker() -> None:
    """``auto``: the worker's own cut; ``disabled``: none (over the budget is an error); a
    retention ratio with token limits: its share and its budget after the instructions."""
    from s2s.backends import ResponseRequest
    from s2s.backends.qwen3_omni import Qwen3OmniStream
    from s2s.protocol.session_config import RetentionRatio, TokenLimits

    recorder = _Recorder()
    changes = recorder.changes
    stream = Qwen3OmniStream(recorder, "call")  # type: ignore[arg-type]
    ratio = RetentionRatio(0.5, TokenLimits(post_instructions=1000))
    for truncation in ("auto", "disabled", ratio):
        await stream.respond(ResponseRequest(
            response_id="r", instructions="Be brief.", voice="", speed=1.0,
            modalities=["audio"], conversation=[], truncation=truncation))  # fmt: skip
    sent = [(c.respond.truncate, c.respond.retain, c.respond.post_instructions) for c in changes]
    assert sent == [(True, None, 0), (False, None, 0), (True, 0.5, 1000)]


def test_the_prompt_budget_leaves_out_the_oldest_turns(tiny_models: Path) -> None:
    from s2s.omni.prompt import Message
    from s2s.worker.messages import Change, Respond, Tick, Turn
    from s2s.worker.omni import OmniWorker

    worker = OmniWorker.load(str(tiny_models / "tiny-qwen3-omni"), "cpu", max_calls=1)
    old = [Turn("user" if i % 2 == 0 else "assistant", f"turn number {i} " * 5) for i in range(9)]

    def prompt(budget: int, **truncation: Any) -> Any:
        turns = [Turn("system", "Be brief."), *old]
        respond = Respond("r", turns, prompt_tokens=budget, **truncation)
        result = worker.handle(Tick([Change("join", "a"), Change("respond", "a", respond=respond)]))
        for _ in range(5):  # a long prompt is prefilled over a few ticks
            if "a" in result.outputs:
                break
            result = worker.handle(Tick())
        rows = list(worker.engine.rows.values())
        worker.handle(Tick([Change("leave", "a")]))  # each prompt from a fresh call
        return result.outputs["a"], rows

    def length(row: Any) -> int:
        return int(row.request.inputs["input_ids"].shape[1])

    _, (whole,) = prompt(10_000)
    _, (cut,) = prompt(80)
    assert length(cut) <= 80 and length(cut) < length(whole)
    # The session's truncation (each turn here is about 60 tokens): down to 80% of the budget
    # by default, to a retention ratio's share, or within a budget after the instructions.
    _, (kept,) = prompt(300)
    _, (deeper,) = prompt(300, retain=0.5)
    assert length(deeper) <= 150 < length(kept) <= 240
    instructions = worker.prompter.build([Message("system", "Be brief.")])["input_ids"].shape[1]
    _, (after,) = prompt(10_000, post_instructions=130)
    assert instructions + 60 < length(after) <= instructions + 130 < length(whole)
    output, rows = prompt(300, truncate=False)  # disabled: over the budget is an error
    assert not rows and "truncation is disabled" in output.done
    output, rows = prompt(5)  # not even the last turn fits: that response fails, clearly
    assert not rows and output.done.startswith("failed") and "budget" in output.done


def test_a_cut_prompt_keeps_its_start_turn_when_older_ones_are_no_longer_sent(
    tiny_models: Path,
) -> None:
    """Over budget, a call's prompt starts at a later turn, and its next prompts start at that
    turn again (found by its item id: the server may stop sending the oldest turns), so they
    share all but the new turns with the last one."""
    from s2s.worker.messages import Change, Respond, Tick, Turn
    from s2s.worker.omni import OmniWorker

    worker = OmniWorker.load(str(tiny_models / "tiny-qwen3-omni"), "cpu", max_calls=1)
    turns = [Turn("user" if i % 2 == 0 else "assistant", f"turn number {i}", item=f"i{i}")
             for i in range(15)]  # fmt: skip

    def prompt(sent: list[Turn]) -> list[int]:
        respond = Respond("r", [Turn("system", "Be brief."), *sent], prompt_tokens=200)
        worker.handle(Tick([Change("join", "a"), Change("respond", "a", respond=respond)]))
        while worker.engine.prefilling:
            worker.handle(Tick())
        (row,) = worker.engine.rows.values()
        worker.handle(Tick([Change("reset", "a")]))
        ids: list[int] = row.request.inputs["input_ids"][0].tolist()
        return ids

    first = prompt(turns[:13])
    start = worker.calls["a"].start[0]
    assert start not in ("", "i0") and len(first) <= 160
    then = prompt(turns[2:])  # the two oldest are no longer sent, and two more are
    assert worker.calls["a"].start[0] == start and then[: len(first) - 3] == first[:-3]


async def test_a_turn_over_the_prompt_budget_fails_clearly_and_the_call_goes_on(
    start_server: StartServer, tiny_models: Path
) -> None:
    server = await start_server(
        model=f"qwen3-omni:{tiny_models / 'tiny-qwen3-omni'}", prompt_tokens=12
    )
    peer = Peer(server.url, MicTrack(), session={"audio": {"input": {"turn_detection": None}}})
    try:
        await peer.connect()
        await peer.next_event("session.created", timeout=10)
        words = {"type": "input_text", "text": "a question far longer than twelve tokens " * 3}
        item = {"type": "message", "role": "user", "content": [words]}
        peer.send({"type": "conversation.item.create", "item": item})
        mark = len(peer.events)
        peer.send({"type": "response.create"})
        done = await peer.next_event("response.done", after=mark, timeout=30)
        assert done["response"]["status"] == "failed"
        error = await peer.next_event("error", after=mark, timeout=5)
        assert error["error"]["code"] == "model_error" and "budget" in error["error"]["message"]
        peer.send({"type": "session.update", "session": {"instructions": "Be brief."}})
        await peer.next_event("session.updated", after=mark, timeout=5)
    finally:
        await peer.close()


def test_a_long_turn_is_admitted_over_several_ticks_while_another_call_speaks(
    tiny_models: Path,
) -> None:
    from s2s.worker.messages import Change, Respond, Tick, Turn
    from s2s.worker.omni import OmniWorker

    worker = OmniWorker.load(
        str(tiny_models / "tiny-qwen3-omni"), "cpu", max_calls=2, prefill_tokens=32
    )
    history = [Turn("user" if i % 2 == 0 else "assistant", f"turn {i}: tell me more about it")
               for i in range(12)]  # fmt: skip
    hello = Respond("ra", [Turn("user", "hello there")])
    tick = Tick([Change("join", "a"), Change("join", "b"), Change("respond", "a", respond=hello)])
    assert set(worker.handle(tick).outputs) == {"a"}  # a short turn: one tick
    worker.handle(Tick([Change("respond", "b", respond=Respond("rb", history))]))
    ticks = 1
    while worker.engine.prefilling:
        outputs = worker.handle(Tick()).outputs
        ticks += 1
        if worker.engine.prefilling:  # "b" is not answering yet; "a" goes on speaking
            assert set(outputs) == {"a"} and len(outputs["a"].audio) == 2 * 1920
    assert ticks >= 5
    # Then "b" answers: its outputs carry its response, to the end.
    answered = []
    for _ in range(100):
        out = worker.handle(Tick()).outputs.get("b")
        if out is not None:
            answered.append(out)
            if out.done:
                break
    assert answered and answered[-1].done, "b answered to the end"
    assert {o.response_id for o in answered} == {"rb"} and any(o.text for o in answered)


def test_a_turn_can_ask_for_its_own_prefill_piece(tiny_models: Path) -> None:
    """``--prefill-tokens`` travels with each turn: the same long turn takes one tick with a
    piece larger than its prompt and many with a small one, on a worker whose own is 32."""
    from s2s.worker.messages import Change, Respond, Tick, Turn
    from s2s.worker.omni import OmniWorker

    worker = OmniWorker.load(
        str(tiny_models / "tiny-qwen3-omni"), "cpu", max_calls=1, prefill_tokens=32
    )
    history = [Turn("user" if i % 2 == 0 else "assistant", f"turn {i}: tell me more about it")
               for i in range(12)]  # fmt: skip
    ticks = {}
    # Two calls: a call's second turn would reuse its first one's cache.
    for piece, call in ((100_000, "a"), (16, "b")):
        worker.handle(Tick([Change("join", call)]))
        respond = Respond(f"r{piece}", history, prefill_tokens=piece)
        worker.handle(Tick([Change("respond", call, respond=respond)]))
        ticks[piece] = 1
        while worker.engine.prefilling:
            worker.handle(Tick())
            ticks[piece] += 1
        worker.handle(Tick([Change("leave", call)]))
    assert ticks[100_000] == 1 and ticks[16] > 10, ticks


def test_a_calls_next_turn_reuses_its_cache_until_it_leaves(tiny_models: Path) -> None:
    """Through the worker: a barge-in (reset) keeps the call's cache, its next turn prefills
    only what is new (and encodes only its own audio: the earlier turn's and the picture are
    the call's already), and leaving gives the cache up."""
    import msgspec
    import numpy as np

    from s2s.worker.messages import Change, Respond, Tick, Turn
    from s2s.worker.omni import OmniWorker

    worker = OmniWorker.load(str(tiny_models / "tiny-qwen3-omni"), "cpu", max_calls=2)
    history = [Turn("user" if i % 2 == 0 else "assistant", f"turn {i}: tell me more about it",
                    item=f"i{i}") for i in range(5)]  # fmt: skip
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 48), (20, 200, 30)).save(jpeg, "JPEG")
    speech = (np.sin(np.arange(16_000) / 5) * 8000).astype(np.int16)
    history[-1] = Turn("user", "what is this", speech.tobytes(), [jpeg.getvalue()], item="i4")
    worker.handle(Tick([Change("join", "a")]))
    worker.handle(Tick([Change("respond", "a", respond=Respond("r1", history))]))
    for _ in range(20):
        if not worker.engine.prefilling:
            break
        worker.handle(Tick())
    worker.handle(Tick([Change("reset", "a")]))  # barge-in
    assert list(worker.engine.kept) == ["a"]
    media = worker.calls["a"].media
    assert (media.prepared, media.encoded) == (2, 2)
    # The spoken turn's audio was sent with r1: r2 names it, and a respond that replaced r2
    # before its prefill would too.
    history[-1] = msgspec.structs.replace(history[-1], audio=b"", heard=True, pictures=[], seen=1)
    more = [*history, Turn("assistant", "well", item="i5"),
            Turn("user", "and then?", speech[::2].tobytes(), item="i6")]  # fmt: skip
    worker.handle(Tick([Change("respond", "a", respond=Respond("r2", more))]))
    assert worker.engine.reused > 50  # the first turn's prompt
    assert (media.prepared, media.encoded) == (3, 3)
    worker.handle(Tick([Change("leave", "a")]))
    assert not worker.engine.kept and len(worker.engine.free) == 2 and not worker.calls
    # Audio this worker was never sent (the call was on another) fails the response, clearly.
    again = Change("respond", "a", respond=Respond("r3", more))
    result = worker.handle(Tick([Change("join", "a"), again]))
    assert "another worker" in result.outputs["a"].done


def test_graphs_that_fail_leave_a_worker_that_steps_eagerly(tiny_models: Path) -> None:
    """``--cuda-graphs on`` where graphs cannot be set up (here: a CPU) leaves a worker that
    says why and answers with eager steps (here a prompt of instructions alone, which once
    crashed the worker's tick), not one that fails to load; a value that is no setting is
    refused."""
    from s2s.worker.messages import Change, Respond, Tick, Turn
    from s2s.worker.process import WorkerOptions, load_worker

    spec = f"qwen3-omni:{tiny_models / 'tiny-qwen3-omni'}"
    worker: Any = load_worker(WorkerOptions(spec, "cpu", 1, "on"))
    assert worker.engine.graphs is None and "CUDA" in worker.engine.graphs_failed
    # Instructions alone (a response.create on an empty conversation) are a prompt too.
    respond = Respond("r", [Turn("system", "Say hello.")])
    outputs = [worker.handle(Tick([Change("join", "a"), Change("respond", "a", respond=respond)]))]
    while "a" not in outputs[-1].outputs or not outputs[-1].outputs["a"].done:
        assert len(outputs) < 200
        outputs.append(worker.handle(Tick()))
    assert outputs[-1].outputs["a"].done in ("stop", "length")
    with pytest.raises(ValueError, match="cuda_graphs"):
        WorkerOptions(spec, "cpu", 1, "yes")


def test_a_step_that_fails_ends_its_responses_and_the_worker_goes_on(tiny_models: Path) -> None:
    """A step that raises (out of GPU memory, say) ends the responses it was making with the
    reason, frees their slots and keeps nothing half-stepped; the tick itself does not fail,
    and the calls' next turns are answered in full."""
    from s2s.worker.messages import Change, Respond, Tick, Turn
    from s2s.worker.omni import OmniWorker

    worker = OmniWorker.load(str(tiny_models / "tiny-qwen3-omni"), "cpu", max_calls=2)
    ask = [Turn("user", "hello there", item="u1")]
    joined = [Change("join", c) for c in "ab"]
    asked = [Change("respond", c, respond=Respond(f"r{c}", ask)) for c in "ab"]
    worker.handle(Tick(joined + asked))
    worker.handle(Tick())
    assert len(worker.engine.rows) == 2
    compute = worker.engine.decode.compute
    failures = []

    def fails_once(*args: Any) -> Any:
        if not failures:
            failures.append(1)
            raise RuntimeError("CUDA out of memory (forced)")
        return compute(*args)

    worker.engine.decode.compute = fails_once  # type: ignore[method-assign]
    failed = worker.handle(Tick())
    assert not failed.error
    for call in "ab":
        output = failed.outputs[call]
        assert output.response_id == f"r{call}" and output.done == (
            "failed: CUDA out of memory (forced)"
        )
    assert not worker.engine.rows and not worker.engine.kept and len(worker.engine.free) == 2
    assert worker.handle(Tick()).outputs == {}  # nothing of them afterwards
    again = Respond("again", [*ask, Turn("user", "and now?", item="u2")])
    outputs = [worker.handle(Tick([Change("respond", "a", respond=again)]))]
    while "a" not in outputs[-1].outputs or not outputs[-1].outputs["a"].done:
        assert len(outputs) < 200
        outputs.append(worker.handle(Tick()))
    assert outputs[-1].outputs["a"].done in ("stop", "length")
    assert all(o.outputs["a"].response_id == "again" for o in outputs if "a" in o.outputs)
    assert sum(len(o.outputs["a"].audio) for o in outputs if "a" in o.outputs) > 0


def test_a_turn_the_worker_cannot_read_fails_alone(tiny_models: Path) -> None:
    """A turn whose audio is no 16-bit samples (or whose prompt cannot be built) fails that
    call's response with the reason; the call beside it is answered."""
    from s2s.worker.messages import Change, Respond, Tick, Turn
    from s2s.worker.omni import OmniWorker

    worker = OmniWorker.load(str(tiny_models / "tiny-qwen3-omni"), "cpu", max_calls=2)
    bad = Respond("bad", [Turn("user", "hi", b"\x01\x02\x03", item="u1")])
    good = Respond("good", [Turn("user", "hi", item="u1")])
    changes = [Change("join", "a"), Change("join", "b"), Change("respond", "a", respond=bad),
               Change("respond", "b", respond=good)]  # fmt: skip
    outputs = [worker.handle(Tick(changes))]
    while "b" not in outputs[-1].outputs or not outputs[-1].outputs["b"].done:
        assert len(outputs) < 200
        outputs.append(worker.handle(Tick()))
    failed = [o.outputs["a"] for o in outputs if "a" in o.outputs]
    assert len(failed) == 1 and "16-bit" in failed[0].done and failed[0].response_id == "bad"
    assert outputs[-1].outputs["b"].done in ("stop", "length")


def test_a_prefill_that_raises_anything_fails_its_turn_alone(tiny_models: Path) -> None:
    """A prefill that raises an error of any type (here an ``IndexError``, as torch raises for
    an embedding out of range) fails that call's response; the tick does not fail, the call's
    later changes and the other calls' changes in the same tick all apply, and a respond for a
    call the worker does not hold fails clearly instead of waiting forever."""
    from s2s.worker.messages import Change, Respond, Tick, Turn
    from s2s.worker.omni import OmniWorker

    worker = OmniWorker.load(str(tiny_models / "tiny-qwen3-omni"), "cpu", max_calls=2)
    extend = worker.engine.thinker_cache.extend
    failures = []

    def fails_once(*args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append(1)
            raise IndexError("index out of range in self (forced)")
        return extend(*args, **kwargs)

    worker.engine.thinker_cache.extend = fails_once  # type: ignore[method-assign]
    ask = [Turn("user", "hello there", item="u1")]
    joined = [Change("join", "a"), Change("join", "b")]
    first = worker.handle(Tick([*joined, Change("respond", "a", respond=Respond("r1", ask))]))
    assert not first.error
    assert first.outputs["a"].done == "failed: index out of range in self (forced)"
    later = [
        Change("reset", "a"), Change("respond", "a", respond=Respond("again", ask)),
        Change("leave", "b"), Change("join", "c"),
        Change("respond", "nobody", respond=Respond("lost", ask)),
    ]  # fmt: skip
    outputs = [worker.handle(Tick(later))]
    assert not outputs[0].error and set(worker.calls) == {"a", "c"}
    lost = outputs[0].outputs["nobody"]
    assert lost.response_id == "lost" and "has not joined" in lost.done
    while "a" not in outputs[-1].outputs or not outputs[-1].outputs["a"].done:
        assert len(outputs) < 200
        outputs.append(worker.handle(Tick()))
    assert outputs[-1].outputs["a"].done in ("stop", "length")
    assert all(o.outputs["a"].response_id == "again" for o in outputs if "a" in o.outputs)


def test_a_turn_that_replaces_a_reply_takes_its_kept_cache(tiny_models: Path) -> None:
    """A respond while the call's reply is under way cancels it; the new turn begins after the
    step that ends that reply, so it takes the call's slot and reuses its cache (it began in the
    same tick, in a second slot, and prefilled everything again)."""
    from s2s.worker.messages import Change, Respond, Tick, Turn
    from s2s.worker.omni import OmniWorker

    worker = OmniWorker.load(str(tiny_models / "tiny-qwen3-omni"), "cpu", max_calls=2)
    ask = [Turn("user", "hello there, what can you see", item="u1")]
    worker.handle(Tick([Change("join", "a"), Change("respond", "a", respond=Respond("r1", ask))]))
    worker.handle(Tick())
    (slot,) = [row.slot for row in worker.engine.rows.values()]
    reused = worker.engine.reused
    again = Respond("r2", [*ask, Turn("user", "and now?", item="u2")])
    outputs = [worker.handle(Tick([Change("respond", "a", respond=again)]))]
    while "a" not in outputs[-1].outputs or not outputs[-1].outputs["a"].done:
        assert len(outputs) < 200
        outputs.append(worker.handle(Tick()))
    assert outputs[-1].outputs["a"].response_id == "r2"
    assert worker.engine.reused > reused
    assert worker.engine.kept["a"].slot == slot and len(worker.engine.free) == 2


def test_a_prefill_piece_of_no_tokens_is_refused_and_frees_the_slot(
    model: Any, pieces: Any
) -> None:
    from s2s.omni.engine import OmniEngine
    from tests.omni_replies import make_inputs, make_request

    engine = OmniEngine(model, max_rows=1)
    row = engine.begin(make_request(make_inputs(pieces, "audio")))
    with pytest.raises(ValueError, match="at least one token"):
        engine.prefill(row, 0)
    assert not engine.prefilling and len(engine.free) == 1


async def test_a_worker_that_dies_mid_reply_fails_it_at_once_and_the_next_is_answered(
    tiny_models: Path,
) -> None:
    """The worker process dies while a reply streams: the reply fails, and the call hears
    ``model_unavailable``, before another worker has loaded (not after); a turn asked for
    while it loads is answered by it."""
    import numpy as np

    from s2s.backends import ModelUnavailable, ResponseFailed, ResponseFinished, ResponseRequest
    from s2s.backends.qwen3_omni import Qwen3OmniBackend
    from s2s.protocol.items import InputText, MessageItem

    backend = await Qwen3OmniBackend.load(str(tiny_models / "tiny-qwen3-omni"), "cpu",
                                          max_calls=1)  # fmt: skip
    user = MessageItem(role="user", content=[InputText("hello there")], id="item_1")

    def request(rid: str) -> ResponseRequest:
        return ResponseRequest(response_id=rid, instructions="", voice="", speed=1.0,
                               modalities=["audio"], conversation=[user])  # fmt: skip

    silence = np.zeros(backend.frame_samples, np.int16)
    events: list[Any] = []

    async def step_until(done: Any) -> None:
        """Step the call at its pace (a frame, then the others' turn) until ``done(step)``."""
        while not done(step := await stream.step(silence)):
            events.extend(step.events)
            await asyncio.sleep(0.02)  # a mic's frames come at this pace
        events.extend(step.events)

    try:
        stream = await backend.open_stream("call")
        await stream.respond(request("r1"))
        async with asyncio.timeout(60):
            await step_until(lambda step: step.audio.size > 0)
            worker = backend.worker
            worker.process.kill()  # type: ignore[attr-defined]
            await step_until(lambda step: any(isinstance(e, ResponseFailed) for e in step.events))
        assert backend.worker is worker, "the reply failed only once another worker had loaded"
        assert any(isinstance(e, ModelUnavailable) for e in events)
        await stream.respond(request("r2"))
        async with asyncio.timeout(120):
            await step_until(lambda step: any(isinstance(e, ResponseFinished) for e in step.events))
        assert backend.worker is not worker
    finally:
        await backend.close()


def test_replies_decode_as_the_checkpoints_generation_config_says() -> None:
    from s2s.omni.request import Decoding
    from s2s.omni.sampling import Sampling
    from s2s.worker.omni import decoding_from

    assert decoding_from({}) == Decoding()  # generate()'s own defaults
    tuned = decoding_from(
        {"talker_temperature": 0.7, "talker_top_k": 10, "talker_repetition_penalty": 1.2}
    )
    assert tuned.speech == Sampling(temperature=0.7, top_k=10, top_p=1.0)
    assert tuned.repetition_penalty == 1.2
    # A greedy talker's code predictor is greedy too, as generate() has it.
    assert decoding_from({"talker_do_sample": False}) == Decoding(speech=None, residual=None)


def test_a_device_left_unusable_ends_the_worker_whatever_failed(
    tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CUDA error that stays (every later synchronisation fails) is a RuntimeError like a
    prompt over budget: where it left the device unusable, the worker ends (DeviceLost, and
    its server starts another) instead of failing each turn for good. Here the device is
    declared broken, as ``torch.cuda.synchronize`` would find it."""
    from s2s.worker import omni, process
    from s2s.worker.messages import Change, Respond, Tick, Turn
    from s2s.worker.process import DeviceLost

    worker = omni.OmniWorker.load(str(tiny_models / "tiny-qwen3-omni"), "cpu", max_calls=1)
    ask = Respond("r", [Turn("user", "hello there", item="u1")])

    def fails(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(worker.engine, "begin", fails)
    # A RuntimeError on a device that still works fails the turn alone.
    out = worker.handle(Tick([Change("join", "a"), Change("respond", "a", respond=ask)]))
    assert out.outputs["a"].done.startswith("failed")
    monkeypatch.setattr(process, "device_broken", lambda device: True)
    with pytest.raises(DeviceLost):
        worker.handle(Tick([Change("respond", "a", respond=ask)]))


class _HeldWorker:
    """An in-process Qwen3-Omni worker as the scheduler's handle, whose next tick can be held
    and then fail whole (as a tick the worker process could not run does)."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.hold: asyncio.Event | None = None
        self.holding = asyncio.Event()

    @property
    def hello(self) -> Any:
        return self.worker.hello("qwen3-omni:tiny")

    async def tick(self, tick: Any) -> Any:
        from s2s.worker.messages import TickResult

        result = self.worker.handle(tick)
        if self.hold is None:
            return result
        held, self.hold = self.hold, None
        self.holding.set()
        await held.wait()
        return TickResult(error="RuntimeError('forced')")

    async def replacement(self, calls: list[str]) -> Any:
        raise AssertionError("not replaced in this test")

    async def close(self) -> None:
        return None


async def test_a_failed_tick_fails_only_the_responses_it_was_for(tiny_models: Path) -> None:
    """A response asked for while a tick is on its way is not that tick's: when the tick fails
    whole, the responses it carried fail and the new one is answered (it failed too)."""
    from s2s.backends import ResponseFailed, ResponseFinished, ResponseRequest
    from s2s.protocol.items import InputText, MessageItem
    from s2s.worker.omni import OmniWorker

    worker = _HeldWorker(OmniWorker.load(str(tiny_models / "tiny-qwen3-omni"), "cpu", max_calls=2))
    backend = Qwen3OmniBackend(worker)  # type: ignore[arg-type]
    try:
        a, b = await backend.open_stream("a"), await backend.open_stream("b")
        ask = [MessageItem(role="user", content=[InputText("hello there")], id="u1")]

        def request(response_id: str) -> ResponseRequest:
            return ResponseRequest(response_id=response_id, instructions="", voice="", speed=1.0,
                                   modalities=["audio"], conversation=ask)  # fmt: skip

        async with asyncio.timeout(30):  # both have joined
            while set(worker.worker.calls) != {"a", "b"}:  # noqa: ASYNC110 - no event for it
                await asyncio.sleep(0.01)
        gate = worker.hold = asyncio.Event()  # the tick that carries "a"'s turn is held
        await a.respond(request("ra"))
        async with asyncio.timeout(30):
            await worker.holding.wait()
        await b.respond(request("rb"))  # while the held tick is on its way
        gate.set()  # it fails whole
        events: dict[str, list[Any]] = {"a": [], "b": []}
        async with asyncio.timeout(60):
            while not any(isinstance(e, ResponseFinished | ResponseFailed) for e in events["b"]):
                for name, stream in (("a", a), ("b", b)):
                    while stream._out:
                        events[name] += stream._out.popleft().events
                await asyncio.sleep(0.01)
        assert [type(e) for e in events["a"]] == [ResponseFailed]
        assert events["b"] == [ResponseFinished("rb")]
    finally:
        await backend.close()

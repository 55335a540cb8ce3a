"""The Realtime events over a real call: turns, responses, barge-in, items, steering.

The server runs the default ``local`` model; the caller speaks espeak-ng sentences into a real
aiortc peer.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import Server, StartServer
from tests.peer import FRAME, RATE, MicTrack, Peer
from tests.signals import loud_spans, rms
from tests.speech import local_reply_fits, speak
from tests.stock_client import stock_client_parses_every_event, watch  # noqa: F401

VOICE = "en-us+f2"  # the espeak voice pocketsphinx hears best
LONG = (
    "please say this is a long answer. it goes on for a while. it has many sentences. "
    "the caller will talk over it. it should stop at once. nobody should hear the rest."
)


@pytest.fixture
async def local(start_server: StartServer) -> Server:
    return await start_server(model="local")


pytestmark = pytest.mark.usefixtures("stock_client_parses_every_event")


async def call(server: Server, **session: Any) -> Peer:
    peer = Peer(
        server.url, MicTrack(), session={"type": "realtime", **session} if session else None
    )
    watch(peer)
    await peer.connect()
    await peer.next_event("session.created")
    return peer


def types(peer: Peer, after: int = 0) -> list[str]:
    return [e["type"] for e in peer.events[after:]]


def say_text(peer: Peer, text: str, **response: Any) -> int:
    mark = len(peer.events)
    peer.send({"type": "conversation.item.create",
               "item": {"type": "message", "role": "user",
                        "content": [{"type": "input_text", "text": text}]}})  # fmt: skip
    peer.send({"type": "response.create", "response": response})
    return mark


async def test_a_spoken_turn_is_transcribed_and_answered_in_order(local: Server) -> None:
    peer = await call(local)
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        peer.mic.play(speak("hello there how are you today", voice=VOICE))
        done = await peer.next_event("response.done", timeout=30)
        order = types(peer)
        await peer.next_event("output_audio_buffer.stopped", timeout=5)
        order = types(peer)
        expected = [
            "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed", "conversation.item.added", "response.created",
            "response.content_part.added", "output_audio_buffer.started",
            "response.output_audio_transcript.delta", "response.output_audio.done",
            "response.output_audio_transcript.done", "response.content_part.done",
            "response.done", "output_audio_buffer.stopped",
        ]  # fmt: skip
        positions = [order.index(t) for t in expected]
        assert positions == sorted(positions), order
        heard = await peer.next_event("conversation.item.input_audio_transcription.completed")
        assert heard["transcript"]
        assert heard["usage"]["type"] == "duration" and 1.0 < heard["usage"]["seconds"] < 4.0
        assert done["response"]["status"] == "completed"
        transcript = done["response"]["output"][0]["content"][0]["transcript"]
        deltas = "".join(e["delta"] for e in peer.events if e["type"].endswith("transcript.delta"))
        assert transcript == deltas and local_reply_fits(heard["transcript"], transcript)
        started = await peer.next_event("input_audio_buffer.speech_started")
        stopped = await peer.next_event("input_audio_buffer.speech_stopped")
        assert 0 <= started["audio_start_ms"] < stopped["audio_end_ms"]
        # The reply was heard: loud audio arrived after the caller's turn.
        assert loud_spans(peer.audio(since=start + 2.5))
    finally:
        await peer.close()


async def test_caller_talking_over_a_reply_stops_it(local: Server) -> None:
    peer = await call(local)
    try:
        mark = say_text(peer, LONG)
        started = await peer.next_event("output_audio_buffer.started", after=mark, timeout=20)
        await peer.wait_audio(1.0, since=asyncio.get_running_loop().time())
        onset = peer.mic.play(speak("stop stop stop", voice=VOICE)) + int(0.3 * RATE)
        done = await peer.next_event("response.done", after=mark, timeout=20)
        assert done["response"]["status"] == "cancelled"
        assert done["response"]["status_details"]["reason"] == "turn_detected"
        assert "output_audio_buffer.cleared" in types(peer, mark)
        spoken = done["response"]["output"][0]["content"][0]["transcript"]
        assert spoken and len(spoken) < len(LONG) // 2
        # Silence follows the caller's onset quickly: find the last loud reply frame.
        onset_at = peer.mic.frame_times[onset // FRAME]
        after = [t for t, pcm in peer.frames if t > onset_at and rms(pcm) > 0.02]
        cut = (after[-1] - onset_at) if after else 0.0
        # The echo of the caller's own speech never comes back (not an echo model), so any
        # loud frame after the onset is reply audio still playing out.
        assert cut < 0.5, f"reply audio went on {cut:.3f} s after the caller started talking"
        assert started["response_id"] == done["response"]["id"]
    finally:
        await peer.close()


async def test_response_cancel_and_output_clear_from_the_client(local: Server) -> None:
    peer = await call(local, audio={"input": {"turn_detection": None}})
    try:
        mark = say_text(peer, LONG)
        created = await peer.next_event("response.created", after=mark, timeout=20)
        await peer.next_event("output_audio_buffer.started", after=mark, timeout=20)
        peer.send({"type": "response.cancel", "event_id": "c1"})
        peer.send({"type": "output_audio_buffer.clear"})
        done = await peer.next_event("response.done", after=mark, timeout=10)
        assert done["response"]["id"] == created["response"]["id"]
        assert done["response"]["status_details"]["reason"] == "client_cancelled"
        await peer.next_event("output_audio_buffer.cleared", after=mark)
        mark = len(peer.events)
        peer.send({"type": "response.cancel", "event_id": "c2"})
        error = (await peer.next_event("error", after=mark))["error"]
        assert error["code"] == "response_cancel_not_active" and error["event_id"] == "c2"
        quiet_from = asyncio.get_running_loop().time() + 0.3
        await peer.wait_audio(0.5, since=quiet_from)
        assert rms(peer.audio(since=quiet_from)) < 0.005
    finally:
        await peer.close()


async def test_items_create_retrieve_delete_and_their_errors(local: Server) -> None:
    peer = await call(local, audio={"input": {"turn_detection": None}})
    try:

        def create(item: dict, **extra: Any) -> None:
            peer.send({"type": "conversation.item.create", "item": item, **extra})

        text = {"type": "input_text", "text": "hi"}
        create({"type": "message", "role": "user", "id": "item_a", "content": [text]})
        added = await peer.next_event("conversation.item.added")
        assert added["item"]["id"] == "item_a"
        create({"type": "message", "role": "user", "id": "item_b", "content": [text]},
               previous_item_id="root")  # fmt: skip
        mark = len(peer.events)
        peer.send({"type": "conversation.item.retrieve", "item_id": "item_b"})
        got = await peer.next_event("conversation.item.retrieved", after=mark)
        assert got["item"]["content"] == [text]
        bad = [
            ({"type": "conversation.item.retrieve", "item_id": "nope"}, "item_not_found"),
            ({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
              "id": "item_a", "content": [text]}}, "duplicate_item_id"),
            ({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
              "content": [{"type": "output_text", "text": "x"}]}}, "invalid_content"),
            ({"type": "conversation.item.create", "previous_item_id": "ghost", "item": {
              "type": "message", "role": "user", "content": [text]}}, "item_not_found"),
            ({"type": "input_audio_buffer.append", "audio": "AAAA"}, "unsupported_over_webrtc"),
            ({"type": "s2s.response.steer", "voice": "ash"}, "no_active_response"),
            ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
              "type": "server_vad", "threshold": 7}}}}}, "invalid_event"),
        ]  # fmt: skip
        for event, code in bad:
            mark = len(peer.events)
            peer.send(event)
            assert (await peer.next_event("error", after=mark))["error"]["code"] == code, event
        mark = len(peer.events)
        peer.send({"type": "conversation.item.delete", "item_id": "item_a"})
        assert (await peer.next_event("conversation.item.deleted", after=mark))[
            "item_id"
        ] == "item_a"
    finally:
        await peer.close()


async def test_push_to_talk_commit_and_clear(local: Server) -> None:
    peer = await call(local, audio={"input": {"turn_detection": None}})
    try:
        mark = len(peer.events)
        peer.send({"type": "input_audio_buffer.clear"})
        await peer.next_event("input_audio_buffer.cleared", after=mark)
        peer.send({"type": "input_audio_buffer.commit"})
        error = await peer.next_event("error", after=mark)
        assert error["error"]["code"] == "input_audio_buffer_commit_empty"
        peer.mic.play(speak("the weather is nice today", voice=VOICE))
        await peer.wait_audio(2.5, since=asyncio.get_running_loop().time())
        mark = len(peer.events)
        peer.send({"type": "input_audio_buffer.commit"})
        committed = await peer.next_event("input_audio_buffer.committed", after=mark)
        heard = await peer.next_event(
            "conversation.item.input_audio_transcription.completed", after=mark, timeout=15
        )
        # pocketsphinx's generic model gets many words wrong; the path is what is checked here.
        assert heard["item_id"] == committed["item_id"] and heard["transcript"]
        assert "response.created" not in types(peer, mark)  # no VAD: the client asks for replies
        assert "input_audio_buffer.speech_started" not in types(peer)
        # Server VAD turned on mid-call: a turn's usage is its own length, not the call's
        # (the VAD's clock starts when it is turned on, seconds into the call).
        await peer.wait_audio(3.0, since=asyncio.get_running_loop().time())
        mark = len(peer.events)
        peer.send({"type": "session.update", "session": {"audio": {"input": {
            "turn_detection": {"type": "server_vad"}}}}})  # fmt: skip
        await peer.next_event("session.updated", after=mark)
        sentence = speak("my name is john", voice=VOICE)
        peer.mic.play(sentence)
        heard = await peer.next_event(
            "conversation.item.input_audio_transcription.completed", after=mark, timeout=20
        )
        said = sentence.size / 48_000
        assert said - 0.5 < heard["usage"]["seconds"] < said + 1.5, heard["usage"]
    finally:
        await peer.close()


async def test_truncate_keeps_only_what_was_heard(local: Server) -> None:
    peer = await call(local, audio={"input": {"turn_detection": None}})
    try:
        mark = say_text(peer, "please say one two three four five six seven eight nine ten")
        done = await peer.next_event("response.done", after=mark, timeout=20)
        item = done["response"]["output"][0]
        full = item["content"][0]["transcript"]
        assert full == "one two three four five six seven eight nine ten"
        mark = len(peer.events)
        peer.send({"type": "conversation.item.truncate", "item_id": item["id"],
                   "content_index": 0, "audio_end_ms": 1200})  # fmt: skip
        truncated = await peer.next_event("conversation.item.truncated", after=mark)
        assert truncated["audio_end_ms"] == 1200
        peer.send({"type": "conversation.item.retrieve", "item_id": item["id"]})
        kept = (await peer.next_event("conversation.item.retrieved", after=mark))["item"]
        words = kept["content"][0]["transcript"].split()
        assert 0 < len(words) < 10 and full.startswith(" ".join(words))
    finally:
        await peer.close()


async def test_truncate_cuts_audio_and_refuses_text(local: Server) -> None:
    """Truncate cuts assistant audio, also while it plays; text has no playback to cut to, so
    truncating it, or a part that is not there, is refused and the item kept (it was replaced
    by an empty transcript)."""
    peer = await call(local, audio={"input": {"turn_detection": None}})
    try:
        said = {"type": "output_text", "text": "kept as written"}
        peer.send({"type": "conversation.item.create", "item": {"type": "message",
                   "role": "assistant", "id": "item_said", "content": [said]}})  # fmt: skip
        mark = say_text(peer, "please say one two three", output_modalities=["text"])
        done = await peer.next_event("response.done", after=mark, timeout=20)
        written = done["response"]["output"][0]
        assert written["content"][0]["type"] == "output_text"
        playing = say_text(peer, LONG)
        await peer.next_event("output_audio_buffer.started", after=playing, timeout=20)
        spoken = (await peer.next_event("response.output_item.added", after=playing))["item"]

        def truncate(event_id: str, item_id: str, index: int) -> int:
            mark = len(peer.events)
            peer.send({"type": "conversation.item.truncate", "event_id": event_id,
                       "item_id": item_id, "content_index": index,
                       "audio_end_ms": 300})  # fmt: skip
            return mark

        refused = [("item_said", 0), (written["id"], 0), (spoken["id"], 1)]
        for n, (item_id, index) in enumerate(refused):
            mark = truncate(f"evt_cut{n}", item_id, index)
            error = (await peer.next_event("error", after=mark))["error"]
            assert error["code"] == "unsupported_content_type", error
            assert (error["event_id"], error["param"]) == (f"evt_cut{n}", "content_index")
        assert "response.done" not in types(peer, playing)  # refused, the reply plays on
        mark = truncate("evt_cut", spoken["id"], 0)
        truncated = await peer.next_event("conversation.item.truncated", after=mark)
        assert truncated["item_id"] == spoken["id"]
        done = await peer.next_event("response.done", after=mark)
        assert done["response"]["status"] == "cancelled"
        for item_id, content in [("item_said", [said]), (written["id"], written["content"])]:
            mark = len(peer.events)
            peer.send({"type": "conversation.item.retrieve", "item_id": item_id})
            kept = (await peer.next_event("conversation.item.retrieved", after=mark))["item"]
            assert kept["content"] == content
    finally:
        await peer.close()


async def test_steering_mid_response_and_per_response_instructions(local: Server) -> None:
    peer = await call(local, audio={"input": {"turn_detection": None}})
    try:
        mark = say_text(peer, LONG)
        created = await peer.next_event("response.created", after=mark, timeout=20)
        await peer.next_event("output_audio_buffer.started", after=mark, timeout=20)
        peer.send({"type": "session.update", "session": {"audio": {"output": {"speed": 1.5}}}})
        steered = await peer.next_event("s2s.response.steered", after=mark)
        assert steered["response_id"] == created["response"]["id"] and steered["speed"] == 1.5
        steer_mark = len(peer.events)
        peer.send({"type": "s2s.response.steer", "voice": "ash"})
        steered = await peer.next_event("s2s.response.steered", after=steer_mark)
        assert steered["voice"] == "ash"
        done = await peer.next_event("response.done", after=mark, timeout=30)
        assert done["response"]["status"] == "completed"
        mark = len(peer.events)
        peer.send({"type": "response.create",
                   "response": {"instructions": 'Say "good night moon"'}})  # fmt: skip
        done = await peer.next_event("response.done", after=mark, timeout=20)
        assert done["response"]["output"][0]["content"][0]["transcript"] == "good night moon"
        mark = len(peer.events)
        peer.send({"type": "response.create", "response": {"output_modalities": ["text"]}})
        done = await peer.next_event("response.done", after=mark, timeout=20)
        assert done["response"]["output"][0]["content"][0]["type"] == "output_text"
        assert "response.output_text.delta" in types(peer, mark)
        # An out-of-band response (outside the conversation) is refused, not spoken.
        mark = len(peer.events)
        peer.send({"type": "response.create", "response": {"conversation": "none", "input": []}})
        error = await peer.next_event("error", after=mark)
        assert error["error"]["code"] == "out_of_band_not_supported"
        assert "response.created" not in types(peer, mark)
    finally:
        await peer.close()


class HeldMic(MicTrack):
    """A microphone that stops sending at ``hold()``: no packets at all, as when a client
    removes its track (``replaceTrack(null)``) or its uplink is gone."""

    def __init__(self) -> None:
        super().__init__()
        self.sending = asyncio.Event()
        self.sending.set()

    async def recv(self) -> Any:
        await self.sending.wait()
        return await super().recv()


async def test_a_reply_plays_on_while_the_caller_sends_nothing(local: Server) -> None:
    mic = HeldMic()
    peer = Peer(local.url, mic)
    watch(peer)
    try:
        await peer.connect()
        await peer.next_event("session.created")
        mic.sending.clear()
        mark = say_text(peer, "please say good night moon")
        done = await peer.next_event("response.done", after=mark, timeout=20)
        assert done["response"]["output"][0]["content"][0]["transcript"] == "good night moon"
        assert loud_spans(peer.audio())  # it was heard, not just reported
    finally:
        await peer.close()


async def test_idle_timeout_asks_if_the_caller_is_there(local: Server) -> None:
    vad = {"type": "server_vad", "idle_timeout_ms": 1500}
    peer = await call(local, audio={"input": {"turn_detection": vad}})
    try:
        fired = await peer.next_event("input_audio_buffer.timeout_triggered", timeout=10)
        # The silent audio is committed as the item the event names, as OpenAI does.
        committed = await peer.next_event("input_audio_buffer.committed", timeout=5)
        assert committed["item_id"] == fired["item_id"]
        added = await peer.next_event("conversation.item.added", timeout=5)
        assert added["item"]["id"] == fired["item_id"] and added["item"]["role"] == "user"
        done = await peer.next_event("response.done", timeout=15)
        assert done["response"]["output"][0]["content"][0]["transcript"] == "Are you still there?"
    finally:
        await peer.close()


async def test_semantic_vad_is_accepted(local: Server) -> None:
    peer = await call(local)
    try:
        peer.send({"type": "session.update", "session": {"audio": {"input": {
            "turn_detection": {"type": "semantic_vad", "eagerness": "high"}}}}})  # fmt: skip
        updated = await peer.next_event("session.updated")
        detection = updated["session"]["audio"]["input"]["turn_detection"]
        assert detection["type"] == "semantic_vad" and detection["eagerness"] == "high"
    finally:
        await peer.close()


async def test_echo_model_refuses_to_respond(server: Server) -> None:
    peer = await call(server)
    try:
        peer.send({"type": "response.create", "event_id": "r1"})
        error = (await peer.next_event("error"))["error"]
        assert error["code"] == "model_does_not_respond" and error["event_id"] == "r1"
        peer.send({"type": "session.update", "session": {"instructions": "x"}})
        await peer.next_event("session.updated")  # it came after any reply to r1 would have
        assert not [e for e in peer.events if e["type"].startswith("response.")]
    finally:
        await peer.close()

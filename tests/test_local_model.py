"""The default ``local`` model end to end with real speech: heard, answered, intelligible."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import Server, StartServer
from tests.peer import MicTrack, Peer
from tests.speech import speak, transcribe, word_error_rate

VOICE = "en-us+f2"
SENTENCES = [
    "hello there how are you today",
    "the weather is nice today",
    "I would like a cup of coffee",
    "my name is john",
    "please say the quick brown fox jumps over the lazy dog",
]


@pytest.fixture
async def local(start_server: StartServer) -> Server:
    return await start_server(model="local")


async def test_spoken_turns_get_spoken_replies_that_transcribe_back(local: Server) -> None:
    peer = Peer(local.url, MicTrack())
    loop = asyncio.get_running_loop()
    rates = []
    try:
        await peer.connect()
        await peer.next_event("session.created")
        for sentence in SENTENCES:
            mark = len(peer.events)
            peer.mic.play(speak(sentence, voice=VOICE))
            heard = await peer.next_event(
                "conversation.item.input_audio_transcription.completed", after=mark, timeout=30
            )
            await peer.next_event("output_audio_buffer.started", after=mark, timeout=30)
            began = loop.time() - 0.2
            done = await peer.next_event("response.done", after=mark, timeout=30)
            await peer.wait_audio(0.3, since=loop.time())
            reply = done["response"]["output"][0]["content"][0]["transcript"]
            assert done["response"]["status"] == "completed"
            assert heard["transcript"] in reply or reply.startswith("Hello!")
            rates.append(word_error_rate(reply, transcribe(peer.audio(since=began))))
        print(f"reply word error rates: {rates}")
        # pocketsphinx's generic model scores ~0.2-0.4 on this espeak voice; 0.5 is the bar.
        assert sum(rates) / len(rates) < 0.5, rates
    finally:
        await peer.close()

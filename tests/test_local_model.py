"""The default ``local`` model end to end with real speech: heard, answered, intelligible."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import Server, StartServer
from tests.peer import MicTrack, Peer
from tests.speech import (
    local_reply_fits,
    speak,
    transcribe,
    transcribe_with_grammar,
    word_error_rate,
)

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
    rates, grammar_rates = [], []
    try:
        await peer.connect()
        await peer.next_event("session.created")
        for sentence in SENTENCES:
            mark = len(peer.events)
            spoken = speak(sentence, voice=VOICE)
            peer.mic.play(spoken)
            heard = await peer.next_event(
                "conversation.item.input_audio_transcription.completed", after=mark, timeout=30
            )
            # The turn's own length: not the reply and the quiet since the last turn.
            said = spoken.size / 48_000
            assert said - 0.5 < heard["usage"]["seconds"] < said + 1.5, heard["usage"]
            await peer.next_event("output_audio_buffer.started", after=mark, timeout=30)
            began = loop.time() - 0.2
            done = await peer.next_event("response.done", after=mark, timeout=30)
            await peer.wait_audio(0.3, since=loop.time())
            reply = done["response"]["output"][0]["content"][0]["transcript"]
            assert done["response"]["status"] == "completed"
            assert local_reply_fits(heard["transcript"], reply), (heard, reply)
            audio = peer.audio(since=began)
            rates.append(word_error_rate(reply, transcribe(audio)))
            constrained = transcribe_with_grammar(audio, reply)
            print(f"{reply!r} -> {constrained!r}")
            grammar_rates.append(word_error_rate(reply, constrained))
        print(f"reply word error rates: generic {rates}, grammar {grammar_rates}")
        # With a grammar of the phrase the policy said (its words in order, each optional),
        # intelligible replies come back near exactly; garbled audio loses words.
        # pocketsphinx's generic model scores ~0.3-0.5 on espeak-ng speech whose words are
        # themselves misrecognitions; it only has to show the audio is speech, not noise.
        assert sum(grammar_rates) / len(grammar_rates) < 0.1, grammar_rates
        assert sum(rates) / len(rates) < 0.75, rates
    finally:
        await peer.close()

"""A call's responses (``s2s.realtime.responses``) against a real speaker track and a real model
stream, with the events they send recorded: what a response that fails part way leaves
behind."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from s2s.audio import SpeakerTrack
from s2s.backends import StepResult
from s2s.backends.echo import EchoBackend
from s2s.images import ImageLimits
from s2s.protocol.client_events import ResponseParams
from s2s.protocol.server_events import (
    OutputAudioBufferCleared,
    OutputAudioBufferStarted,
    OutputAudioBufferStopped,
    ResponseDone,
    TranscriptDelta,
    TranscriptDone,
)
from s2s.protocol.session_config import SessionConfig
from s2s.realtime.conversation import Conversation
from s2s.realtime.responses import Responses

FRAME = 960  # one 20 ms packet at 48 kHz


async def _responses(speaker: SpeakerTrack, sent: list[Any]) -> Responses:
    """A call's responses on ``speaker`` with a continuous model (echo), its events into
    ``sent``."""
    backend = EchoBackend()
    return Responses(
        SessionConfig(id="sess_1", model="m"), backend, await backend.open_stream("call"),
        speaker, sent.append, Conversation(ImageLimits(), 4, 1 << 20), lambda item: None,
        lambda: None, asyncio.Event(), None,
    )  # fmt: skip


async def test_a_failed_response_drops_its_unplayed_audio_and_keeps_what_was_heard() -> None:
    """A response the model fails part way stops at once: what had not played is dropped (the
    client hears ``output_audio_buffer.cleared``; barge-in could no longer stop it), and its
    transcript keeps just the pieces that began before the cut, not one that begins on it."""
    sent: list[Any] = []
    speaker = SpeakerTrack(encode=False)
    responses = await _responses(speaker, sent)
    responses.open(ResponseParams(), "r1")
    chunk = np.full(5 * FRAME, 1000, np.int16)
    for text in ("heard", " cut", " never"):
        responses.play(StepResult(chunk, text, "r1"), chunk)
    async with asyncio.timeout(5):  # the first chunk plays; the second begins where it stops
        while speaker.played_samples < 5 * FRAME:
            await speaker.recv()
    assert speaker.played_samples == 5 * FRAME
    responses.failed("r1", "the model's worker died")
    assert speaker.queued_samples == 0 and responses.active is None
    kinds = [type(e) for e in sent]
    assert OutputAudioBufferCleared in kinds
    assert kinds.index(OutputAudioBufferCleared) < kinds.index(ResponseDone)
    assert [e.delta for e in sent if isinstance(e, TranscriptDelta)] == ["heard"]
    (done,) = [e for e in sent if isinstance(e, TranscriptDone)]
    assert done.transcript == "heard"
    (finished,) = [e for e in sent if isinstance(e, ResponseDone)]
    assert finished.response.status == "failed"
    details = finished.response.status_details  # GA's shape: the failure in error, no reason
    assert details is not None and details.reason is None and details.error is not None
    assert (details.error.type, details.error.code) == ("server_error", "model_error")


async def test_a_full_duplex_reply_right_after_the_last_is_heard_whole() -> None:
    """A continuous model (Moshi) may speak again while its last reply, generated whole, still
    plays out: that reply completes then, and the new one opens with all its audio queued
    behind (its first steps were dropped: a lost word, a gap)."""
    sent: list[Any] = []
    speaker = SpeakerTrack(encode=False)
    responses = await _responses(speaker, sent)
    chunk = np.full(5 * FRAME, 1000, np.int16)
    responses.play(StepResult(chunk, "first", "r1"), chunk)
    async with asyncio.timeout(5):  # r1 starts playing
        while speaker.played_samples < 2 * FRAME:
            await speaker.recv()
            responses.follow_playout(responses.active)
    responses.finished("r1", silent=False)
    responses.play(StepResult(chunk, "second", "r2"), chunk)
    assert speaker.queued_samples == 3 * FRAME + chunk.size
    (done,) = [e for e in sent if isinstance(e, ResponseDone)]
    assert (done.response.id, done.response.status) == ("r1", "completed")
    assert responses.active is not None and responses.active.id == "r2"
    # r1's buffer stops once its audio has played, not when it completed; then r2's starts.
    assert not [e for e in sent if isinstance(e, OutputAudioBufferStopped)]
    async with asyncio.timeout(5):
        while speaker.played_samples <= 5 * FRAME:
            await speaker.recv()
            responses.follow_playout(responses.active)
    buffer = [(type(e).__name__, e.response_id) for e in sent
              if isinstance(e, OutputAudioBufferStarted | OutputAudioBufferStopped)]  # fmt: skip
    assert buffer == [("OutputAudioBufferStarted", "r1"), ("OutputAudioBufferStopped", "r1"),
                      ("OutputAudioBufferStarted", "r2")]  # fmt: skip

"""The responses of one call: at most one in progress, streamed as the OpenAI Realtime API does.

Response audio is queued on the speaker with text markers at the playback position where each
piece of text starts; transcript deltas go out when playback reaches them, so the transcript a
client sees (and the one kept after a barge-in) is what the caller actually heard. A response is
done once the model has finished it and its last sample has been played.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import numpy as np
from msgspec import UnsetType

from s2s.audio import WEBRTC_RATE, SpeakerTrack
from s2s.backends import Backend, ModelStream, ResponseRequest, Steering, StepResult
from s2s.metrics import CallMetrics
from s2s.protocol.client_events import ConversationItemTruncate, ResponseParams
from s2s.protocol.ids import new_id
from s2s.protocol.items import Item, MessageItem, OutputAudio
from s2s.protocol.server_events import (
    ConversationItemTruncated,
    Error,
    ErrorDetail,
    OutputAudioBufferCleared,
    OutputAudioBufferStarted,
    OutputAudioBufferStopped,
    ResponseCreated,
    ResponseDone,
    ResponseSteered,
    ServerEvent,
    StatusError,
)
from s2s.protocol.session_config import SessionConfig
from s2s.realtime.active_response import ActiveResponse
from s2s.realtime.conversation import Conversation, RequestError
from s2s.tools import ToolError, allowed_tools, take_tools

log = logging.getLogger(__name__)

_SAMPLES_PER_MS = WEBRTC_RATE // 1000
#: Replies whose word timings are kept for conversation.item.truncate (a conversation holds 500
#: items).
_TIMELINES = 500


class Responses:
    """Starts, streams, steers, cancels and finishes the call's responses.

    ``add_item`` adds an item to the conversation and announces it; ``touch`` is called whenever
    a response ends (the idle timeout counts from there); ``watching`` is set while playout
    needs following.
    """

    def __init__(
        self,
        config: SessionConfig,
        backend: Backend,
        stream: ModelStream,
        speaker: SpeakerTrack,
        send: Callable[[ServerEvent], None],
        conversation: Conversation,
        add_item: Callable[[Item], str | None],
        touch: Callable[[], None],
        watching: asyncio.Event,
        metrics: CallMetrics | None,
    ) -> None:
        self.config = config
        self._backend = backend
        self._stream = stream
        self._speaker = speaker
        self._send = send
        self._conversation = conversation
        self._add_item = add_item
        self._touch = touch
        self._watching = watching
        self._metrics = metrics
        self._timelines: dict[str, tuple[list[tuple[int, str]], int]] = {}
        self.active: ActiveResponse | None = None
        #: The latest response's id: what an output_audio_buffer.clear with none active names.
        self.last_id: str | None = None
        #: A full-duplex reply completed while its audio still plays (another began): its id
        #: and where its audio ends, for its ``output_audio_buffer.stopped``.
        self._draining: tuple[str, int] | None = None

    # -- model output ------------------------------------------------------------------------

    def finished(self, response_id: str, silent: bool) -> None:
        """The model has generated all of ``response_id``; ``silent``: this step had no output."""
        if self.active is not None and self.active.id == response_id:
            self.active.generated = True
            self._watching.set()
            if self.active.item is None and silent:
                # Nothing to play (only tool calls): done now, before anyone can
                # act on the calls, so their answer's response.create finds it over.
                self._finish("completed")

    def tool_called(self, response_id: str, name: str, arguments: str) -> None:
        if self.active is not None and self.active.id == response_id:
            self.active.call_tool(name, arguments, self._send, self._add_item)

    def failed(self, response_id: str, message: str) -> None:
        """The model could not go on with ``response_id``: what of it has not played yet is
        dropped (a failed response is over, and barge-in could no longer stop its tail)."""
        if (r := self.active) is not None and r.id == response_id:
            self._send(Error(error=ErrorDetail(
                code="model_error", type="server_error", message=message,
            )))  # fmt: skip
            self._cut(r)
            self._finish("failed", error=StatusError("server_error", "model_error", message))

    def play(self, result: StepResult, audio: np.ndarray) -> None:
        """Queue one step's audio (already at 48 kHz) and mark where its text starts."""
        if result.response_id is None:
            if audio.size:
                self._speaker.write(audio)
            return
        r = self.active
        continuous = not self._backend.turn_based
        if continuous and r is not None and r.generated and r.id != result.response_id:
            # A full-duplex model speaks again while its last reply still plays out: that reply
            # is over now (the rest of it plays on, its buffer stops when it has), and this one
            # opens, its audio queued behind (it was dropped: a word lost, a gap heard).
            self._complete(r, drained=False)
            r = None
        if r is None and continuous:
            # A continuous (full-duplex) model starts speaking on its own: open a response.
            r = self.open(ResponseParams(), result.response_id)
        if r is None or r.id != result.response_id:
            return  # output of a response that was cancelled while this step ran
        if r.item is None and (audio.size or result.text):
            r.open_message(self._send, self._add_item)
        pos = self._speaker.played_samples + self._speaker.queued_samples
        if r.start_pos is None and (audio.size or result.text):
            r.start_pos = pos
        if result.text and "audio" not in r.modalities:
            r.emit_text(result.text, self._send)
        elif result.text:
            r.markers.append((pos, result.text))
            start = pos if r.start_pos is None else r.start_pos
            r.timeline.append(((pos - start) // _SAMPLES_PER_MS, result.text))
        if audio.size:
            self._speaker.write(audio)
            r.end_pos = pos + audio.size

    def follow_playout(self, r: ActiveResponse | None) -> None:
        """Transcript deltas, output buffer start/stop and completion of ``r`` (the active
        response, if any) as it plays."""
        played = self._speaker.played_samples
        if self._draining is not None and played >= self._draining[1]:
            self._stop_draining()
        if r is None:
            return
        if not r.playing and r.start_pos is not None and played > r.start_pos:
            r.playing = True
            if r.requested_at is not None and self._metrics is not None:
                self._metrics.turn(asyncio.get_running_loop().time() - r.requested_at)
            self._send(OutputAudioBufferStarted(response_id=r.id))
        # A piece of text goes out once the first sample it belongs to has been played.
        while r.markers and r.markers[0][0] < played:
            r.emit_text(r.markers.popleft()[1], self._send)
        if r.generated and played >= r.end_pos:
            self._complete(r)

    def _complete(self, r: ActiveResponse, drained: bool = True) -> None:
        """``r``, generated whole, is done: the rest of its text, then ``response.done``, then
        (once its audio has played: ``drained``) ``output_audio_buffer.stopped``."""
        while r.markers:
            r.emit_text(r.markers.popleft()[1], self._send)
        self._finish("completed")
        if not r.playing:
            return
        if drained:  # after response.done, as OpenAI's WebRTC calls send it
            self._send(OutputAudioBufferStopped(response_id=r.id))
        else:
            self._draining = (r.id, r.end_pos)

    @property
    def draining(self) -> bool:
        """Whether a completed reply's audio still plays (its buffer's stop is due)."""
        return self._draining is not None

    def _stop_draining(self) -> None:
        if self._draining is not None:
            self._send(OutputAudioBufferStopped(response_id=self._draining[0]))
            self._draining = None

    # -- requests ----------------------------------------------------------------------------

    async def start(
        self, trigger: str, params: ResponseParams, *, requested_at: float | None = None
    ) -> None:
        if not self._backend.turn_based:
            raise RequestError(
                "model_does_not_respond", f"the {self._backend.name} model does not respond"
            )
        if self.active is not None:
            raise RequestError(
                "conversation_already_has_active_response", "a response is in progress"
            )
        voice, speed = voice_speed(params)
        instructions = params.instructions
        if not isinstance(instructions, str):
            instructions = self.config.instructions
        current = (self.config.tools, self.config.tool_choice)
        try:
            tools, choice = take_tools(params.tools, params.tool_choice, current, "response")
        except ToolError as exc:
            raise RequestError(exc.code, str(exc), exc.param) from None
        callable_tools, required = allowed_tools(tools, choice)
        # A response that may call a tool starts its message only when it speaks, so a response
        # that only calls a tool holds just the call, as OpenAI's do.
        r = self.open(params, None, message=not callable_tools)
        r.requested_at = requested_at
        request = ResponseRequest(
            response_id=r.id, instructions=instructions, voice=voice or self.config.voice,
            speed=speed or self.config.speed, modalities=list(r.modalities),
            conversation=self._conversation.items(), trigger=trigger,  # type: ignore[arg-type]
            pictures=self._conversation.pictures(), camera=self._conversation.camera_seen,
            tools=callable_tools, tool_required=required,
            truncation=self.config.truncation,
        )  # fmt: skip
        try:
            await self._stream.respond(request)
        except Exception:
            log.exception("model failed to start a response")
            error = StatusError("server_error", "model_error", "the model could not start it")
            self._finish("failed", error=error)

    def open(
        self, params: ResponseParams, response_id: str | None, *, message: bool = True
    ) -> ActiveResponse:
        """Announce a new response and make it the active one; with ``message``, open its
        assistant message at once (else at its first text or audio)."""
        modalities = params.output_modalities
        if not isinstance(modalities, list):
            modalities = list(self.config.output_modalities)
        r = ActiveResponse(id=response_id or new_id("resp"), metadata=params.metadata,
                           modalities=list(modalities))  # fmt: skip
        self.active, self.last_id = r, r.id
        self._send(ResponseCreated(response=r.response("in_progress")))
        if message:
            r.open_message(self._send, self._add_item)
        self._watching.set()
        return r

    async def cancel(self, reason: str) -> None:
        """Stop the response in progress at once: flush its audio, reset the model stream."""
        r = self.active
        if r is None:
            return
        await self._stream.reset()
        self._cut(r)
        self._finish("cancelled", reason)

    def _cut(self, r: ActiveResponse) -> None:
        """Drop what of ``r``'s audio has not played; its text up to there is kept."""
        dropped = self._speaker.flush()
        self._stop_draining()  # the tail of the reply before it went with it
        played = self._speaker.played_samples
        r.end_pos = min(r.end_pos, played)
        # A piece whose first sample is at ``played`` was flushed unheard.
        while r.markers and r.markers[0][0] < played:
            r.emit_text(r.markers.popleft()[1], self._send)
        r.markers.clear()
        if r.playing or dropped:
            self._send(OutputAudioBufferCleared(response_id=r.id))

    async def steer(self, steering: Steering) -> None:
        r = self.active
        if r is None:
            return
        await self._stream.steer(steering)
        self._send(ResponseSteered(
            response_id=r.id, instructions=steering.instructions, voice=steering.voice,
            speed=steering.speed,
        ))  # fmt: skip

    async def truncate(self, event: ConversationItemTruncate) -> None:
        """Cut an assistant message (and its transcript) to the audio the caller heard."""
        item = self._conversation.get(event.item_id)
        item_id = event.item_id
        if not isinstance(item, MessageItem) or item.role != "assistant":
            raise RequestError("invalid_item", "only assistant audio can be truncated", "item_id")
        r = self.active if self.active is not None and self.active.item is item else None
        # A reply being made gets its content once it ends: its audio, if it is spoken.
        parts = item.content if r is None else [OutputAudio()] if "audio" in r.modalities else []
        index = event.content_index
        if not (0 <= index < len(parts) and isinstance(parts[index], OutputAudio)):
            raise RequestError(  # text has no playback to cut to; "truncating" it erased it
                "unsupported_content_type", f"content {index} of item {item_id} is not audio",
                "content_index",
            )  # fmt: skip
        if r is not None:
            await self.cancel("client_cancelled")
        timeline, audio_ms = self._timelines.get(item_id, ([], 0))
        end = min(event.audio_end_ms, audio_ms)
        item.content = [OutputAudio(transcript="".join(t for ms, t in timeline if ms < end))]
        self._timelines[item_id] = ([(ms, t) for ms, t in timeline if ms < end], end)
        self._send(
            ConversationItemTruncated(item_id=item_id, content_index=index, audio_end_ms=end)
        )

    # -- the end of a response ---------------------------------------------------------------

    def _finish(
        self, status: str, reason: str | None = None, error: StatusError | None = None
    ) -> None:
        r = self.active
        assert r is not None
        self.active = None
        self._touch()
        if (item := r.item) is not None:
            assert item.id is not None
            r.finish_message(item, status, self._send)
            start = r.start_pos if r.start_pos is not None else r.end_pos
            self._timelines[item.id] = (r.timeline, max(0, r.end_pos - start) // _SAMPLES_PER_MS)
            while len(self._timelines) > _TIMELINES:  # the oldest replies' items have left by now
                del self._timelines[next(iter(self._timelines))]
        self._send(ResponseDone(response=r.response(status, reason, error)))


def voice_speed(params: ResponseParams) -> tuple[str | None, float | None]:
    """The voice and speed a ``response.create`` asks for, None where it leaves them out."""
    audio = params.audio
    if isinstance(audio, UnsetType) or isinstance(audio.output, UnsetType):
        return None, None
    voice = audio.output.voice if isinstance(audio.output.voice, str) else None
    speed = audio.output.speed if isinstance(audio.output.speed, float | int) else None
    return voice, speed

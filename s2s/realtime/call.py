"""``Realtime``: the conversation of one call, driven by client events, VAD edges and the model.

It turns them into the server events of the OpenAI Realtime API, and never touches the network
itself: it sends through ``send`` and plays through the call's ``SpeakerTrack``. Items live in
``Conversation``, responses in ``Responses``; here are the caller's turns (the input audio
buffer, VAD, the idle timeout) and the dispatch of every client event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import numpy as np
from msgspec import UNSET

from s2s.audio import SpeakerTrack
from s2s.backends import (
    Backend,
    InputTranscribed,
    ModelStream,
    ModelUnavailable,
    ResponseFailed,
    ResponseFinished,
    Steering,
    StepResult,
    ToolCalled,
)
from s2s.images import ImageLimits, Picture
from s2s.log import CallLogger
from s2s.metrics import CallMetrics
from s2s.protocol.client_events import (
    AnyClientEvent,
    ConversationItemCreate,
    ConversationItemDelete,
    ConversationItemRetrieve,
    ConversationItemTruncate,
    ImageChunk,
    ImageCommit,
    InputAudioBufferAppend,
    InputAudioBufferClear,
    InputAudioBufferCommit,
    OutputAudioBufferClear,
    ResponseCancel,
    ResponseCreate,
    ResponseParams,
    ResponseSteer,
    SessionUpdate,
)
from s2s.protocol.ids import new_id
from s2s.protocol.items import InputAudio, Item, MessageItem
from s2s.protocol.server_events import (
    ConversationItemAdded,
    ConversationItemDeleted,
    ConversationItemDone,
    ConversationItemRetrieved,
    Error,
    ErrorDetail,
    ImageReceived,
    InputAudioBufferCleared,
    InputAudioBufferCommitted,
    InputAudioBufferTimeoutTriggered,
    InputAudioTranscriptionCompleted,
    OutputAudioBufferCleared,
    ServerEvent,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    TranscriptionUsage,
)
from s2s.protocol.session_config import SessionConfig, SessionPatch
from s2s.realtime.conversation import Conversation, RequestError, wire
from s2s.realtime.responses import Responses, voice_speed
from s2s.tools import ToolError, take_tools
from s2s.vad import VadEvent, VadSettings, vad_settings

log = logging.getLogger(__name__)

_MIN_COMMIT_MS = 100
#: Committed turns whose length is kept for their transcription's usage (one or two in flight).
_TRANSCRIBING = 16


class Realtime:
    """The Realtime conversation of one call (see the module docstring)."""

    def __init__(
        self,
        config: SessionConfig,
        backend: Backend,
        stream: ModelStream,
        speaker: SpeakerTrack,
        send: Callable[[ServerEvent], None],
        *,
        image_limits: ImageLimits | None = None,
        image_history: int = 4,
        upload_bytes: int = 16 * 1024 * 1024,
        metrics: CallMetrics | None = None,
    ) -> None:
        self.config = config
        self._log = CallLogger(log, config.id)
        self._backend = backend
        self._stream = stream
        self._speaker = speaker
        self._send = send
        self._user_item: str | None = None
        self._input_ms = 0  # caller audio heard since the call began
        self._buffer_start_ms = 0  # where the uncommitted input audio buffer starts
        self._onset_ms: int | None = None  # where the VAD heard the turn begin (its own clock)
        self._turn_seconds: dict[str, float] = {}  # committed turns' lengths, till transcribed
        self._idle_since = asyncio.get_running_loop().time()
        self._idle_fired = False
        self.image_limits = image_limits or ImageLimits()
        self._conversation = Conversation(self.image_limits, image_history, upload_bytes)
        self.watching = asyncio.Event()  # set while playout needs following
        self._vad_source: object = None
        self._vad: VadSettings | None = None
        self._metrics = metrics
        self._responses = Responses(
            config, backend, stream, speaker, send, self._conversation,
            self._add_item, self._touch, self.watching, metrics,
        )  # fmt: skip

    # -- inputs from the session -------------------------------------------------------------

    @property
    def vad(self) -> VadSettings | None:
        """The VAD settings in force, or None when turn detection is off."""
        td = self.config.turn_detection
        if td is not self._vad_source:
            self._vad_source = td
            self._vad = None if td is None else vad_settings(td)
        return self._vad

    def heard(self, ms: int) -> None:
        self._input_ms += ms

    async def handle(self, event: AnyClientEvent) -> None:
        """Act on one client event; errors are answered with an ``error`` event."""
        try:
            await self._handle(event)
        except RequestError as exc:
            detail = ErrorDetail(
                message=str(exc), code=exc.code, param=exc.param, event_id=event.event_id
            )
            self._send(Error(error=detail))
        except Exception as exc:
            # A fault of ours in one event: that event fails, the call goes on (raised, it
            # would end the call and its caller would never hear why).
            kind = type(event).__struct_config__.tag
            self._log.exception("%s failed", kind)
            self._send(Error(error=ErrorDetail(
                message=f"the server could not handle {kind}: {type(exc).__name__}",
                code="internal_error", type="server_error", event_id=event.event_id,
            )))  # fmt: skip

    async def on_vad(self, event: VadEvent) -> None:
        settings = self.vad
        if settings is None:
            return
        self._touch()
        now = asyncio.get_running_loop().time()
        if event.kind == "start":
            self._user_item = self._user_item or new_id("item")
            self._send(SpeechStarted(audio_start_ms=event.audio_ms, item_id=self._user_item))
            # The VAD's clock counts the audio it was fed; it may lag the caller's (a VAD turned
            # on mid-call, a backlog dropped), which only keeps more of the turn.
            since_ms = max(0, self._input_ms - event.audio_ms)
            if self._onset_ms is None:
                self._onset_ms = event.audio_ms
            await self._stream.speech_started(self._user_item, since_ms)
            if self._responses.active is not None and settings.interrupt_response:
                await self._responses.cancel("turn_detected")
                if self._metrics is not None:
                    self._metrics.barge_in(asyncio.get_running_loop().time() - now)
            return
        item_id = self._user_item or new_id("item")
        self._send(SpeechStopped(audio_end_ms=event.audio_ms, item_id=item_id))
        # The turn's length on the VAD's own clock (it counts only what it was fed, from when
        # it was turned on, so it does not tell where in the call's audio the turn lies).
        onset = self._onset_ms  # _commit forgets it
        await self._commit(item_id, None if onset is None else event.audio_ms - onset)
        if settings.create_response and self._backend.turn_based and self._responses.active is None:
            await self._responses.start("turn", ResponseParams(), requested_at=now)

    def on_step(self, result: StepResult, audio: np.ndarray) -> None:
        """Take one model step's output (``audio`` already at 48 kHz)."""
        for event in result.events:
            match event:
                case InputTranscribed(item_id=item_id, transcript=text):
                    item = self._conversation.find(item_id)
                    if isinstance(item, MessageItem):
                        item.content = [InputAudio(transcript=text)]
                    seconds = self._turn_seconds.pop(item_id, 0.0)
                    self._send(InputAudioTranscriptionCompleted(
                        item_id=item_id, content_index=0, transcript=text,
                        usage=TranscriptionUsage(seconds=seconds),
                    ))  # fmt: skip
                case ResponseFinished(response_id=rid):
                    self._responses.finished(rid, silent=not (audio.size or result.text))
                case ToolCalled(response_id=rid, name=name, arguments=arguments):
                    self._responses.tool_called(rid, name, arguments)
                case ResponseFailed(response_id=rid, message=message):
                    self._responses.failed(rid, message)
                case ModelUnavailable(message=message):
                    self._send(Error(error=ErrorDetail(
                        code="model_unavailable", type="server_error", message=message,
                    )))  # fmt: skip
        self._responses.play(result, audio)

    async def on_playout(self) -> None:
        """Follow playback: transcript deltas, output buffer start/stop, response completion."""
        r = self._responses.active
        self._responses.follow_playout(r)
        if r is None:
            await self._check_idle()

    def needs_playout(self) -> bool:
        vad = self.vad
        responses = self._responses
        return (
            responses.active is not None or responses.draining or bool(vad and vad.idle_timeout_ms)
        )

    # -- client events -----------------------------------------------------------------------

    async def _handle(self, event: AnyClientEvent) -> None:
        match event:
            case SessionUpdate(session=patch):
                self._check_session_tools(patch, event.event_id)
                before = (self.config.instructions, self.config.voice, self.config.speed)
                self.config.apply(patch)
                self.watching.set()
                self._send(SessionUpdated(session=self.config.to_wire()))
                after = (self.config.instructions, self.config.voice, self.config.speed)
                if self._responses.active is not None and after != before and self._backend.steers:
                    changed = [b if a != b else None for a, b in zip(before, after, strict=True)]
                    await self._responses.steer(Steering(*changed))  # type: ignore[arg-type]
            case InputAudioBufferAppend():
                raise RequestError(
                    "unsupported_over_webrtc",
                    "over WebRTC the caller's audio comes on the media track, not in events",
                )
            case InputAudioBufferCommit():
                if self._input_ms - self._buffer_start_ms < _MIN_COMMIT_MS:
                    raise RequestError(
                        "input_audio_buffer_commit_empty",
                        f"the input audio buffer holds less than {_MIN_COMMIT_MS} ms of audio",
                    )
                await self._commit(self._user_item or new_id("item"))
            case InputAudioBufferClear():
                await self._stream.clear_input()
                self._user_item, self._onset_ms = None, None
                self._buffer_start_ms = self._input_ms
                self._send(InputAudioBufferCleared())
            case ConversationItemCreate(item=item, previous_item_id=previous):
                await self._create_item(item, previous)
            case ImageChunk(upload_id=upload_id, index=index, total=total, data=data):
                self._conversation.chunk(upload_id, index, total, data)
            case ImageCommit(upload_id=upload_id, previous_item_id=previous):
                item, picture, size = await self._conversation.upload(upload_id)
                await self._create_item(item, previous, {0: picture})
                assert item.id is not None
                self._send(ImageReceived(
                    upload_id=upload_id, item_id=item.id, width=picture.width,
                    height=picture.height, bytes=size,
                ))  # fmt: skip
            case ConversationItemRetrieve(item_id=item_id):
                self._send(ConversationItemRetrieved(item=wire(self._conversation.get(item_id))))
            case ConversationItemDelete(item_id=item_id):
                self._conversation.get(item_id)
                active = self._responses.active
                if active is not None and any(o.id == item_id for o in active.outputs):
                    raise RequestError("item_in_use", "the item is being generated; cancel first")
                self._conversation.delete(item_id)
                self._send(ConversationItemDeleted(item_id=item_id))
            case ConversationItemTruncate():
                await self._responses.truncate(event)
            case ResponseCreate(response=params):
                if params.conversation not in (UNSET, "auto") or params.input is not UNSET:
                    raise RequestError(
                        "out_of_band_not_supported",
                        "responses outside the conversation (conversation: none, input) are not "
                        "supported",
                        "response.conversation",
                    )  # fmt: skip
                if self._responses.active is not None and not self._backend.steers:
                    raise RequestError(
                        "conversation_already_has_active_response",
                        f"a response is in progress, and the {self._backend.name} model cannot "
                        "change it: cancel it first",
                    )  # fmt: skip
                if self._responses.active is not None:
                    # Mid-turn steering: the response in progress takes the new settings.
                    voice, speed = voice_speed(params)
                    instructions = (
                        params.instructions if isinstance(params.instructions, str) else None
                    )
                    await self._responses.steer(Steering(instructions, voice, speed))
                else:
                    now = asyncio.get_running_loop().time()
                    await self._responses.start("client", params, requested_at=now)
            case ResponseCancel(response_id=rid):
                active = self._responses.active
                if active is None or (rid is not None and rid != active.id):
                    raise RequestError(
                        "response_cancel_not_active", "there is no such response in progress"
                    )
                await self._responses.cancel("client_cancelled")
            case OutputAudioBufferClear():
                if self._responses.active is not None:
                    await self._responses.cancel("client_cancelled")
                else:  # cleared again (a client's interrupt cancels, then clears): say so
                    self._speaker.flush()
                    if (rid := self._responses.last_id) is not None:
                        self._send(OutputAudioBufferCleared(response_id=rid))
            case ResponseSteer(instructions=instructions, voice=voice, speed=speed):
                if self._responses.active is None:
                    raise RequestError("no_active_response", "there is no response to steer")
                if not self._backend.steers:
                    raise RequestError(
                        "steering_not_supported",
                        f"the {self._backend.name} model cannot change a response it is making",
                    )
                await self._responses.steer(Steering(instructions, voice, speed))

    async def _create_item(
        self, item: Item, previous: str | None, pictures: dict[int, Picture] | None = None
    ) -> None:
        pictures = await self._conversation.check(item, previous, pictures or {})
        reported = self._add_item(item, previous)
        self._send(ConversationItemDone(item=wire(item), previous_item_id=reported))
        for picture in pictures.values():
            self._conversation.remember(item, picture)

    def see(self, picture: Picture) -> None:
        """A frame sampled from the caller's camera: the newest picture the model looks at."""
        self._conversation.see(picture)

    def _add_item(self, item: Item, previous: str | None = None) -> str | None:
        reported = self._conversation.add(item, previous)
        self._send(ConversationItemAdded(item=wire(item), previous_item_id=reported))
        return reported

    async def _commit(self, item_id: str, turn_ms: int | None = None) -> None:
        item = MessageItem(id=item_id, role="user", content=[InputAudio()])
        # As OpenAI's: the commit names the item, then the item is added.
        previous = self._conversation.last()
        self._send(InputAudioBufferCommitted(item_id=item_id, previous_item_id=previous))
        self._add_item(item)
        self._send(ConversationItemDone(item=item, previous_item_id=previous))
        # The turn's length: the VAD's (the buffer also holds the pause before the turn and the
        # model's own reply coming back), else the whole buffer (push to talk).
        if turn_ms is None:
            turn_ms = self._input_ms - self._buffer_start_ms
        self._turn_seconds[item_id] = max(0, turn_ms) / 1000
        self._onset_ms = None
        while len(self._turn_seconds) > _TRANSCRIBING:  # a model that transcribes none
            del self._turn_seconds[next(iter(self._turn_seconds))]
        self._user_item = None
        self._buffer_start_ms = self._input_ms
        await self._stream.commit(item_id)

    # -- idle timeout ------------------------------------------------------------------------

    def _touch(self) -> None:
        self._idle_since = asyncio.get_running_loop().time()
        self._idle_fired = False

    async def _check_idle(self) -> None:
        vad = self.vad
        if vad is None or not vad.idle_timeout_ms or self._idle_fired or self._user_item:
            return
        if asyncio.get_running_loop().time() - self._idle_since < vad.idle_timeout_ms / 1000:
            return
        self._idle_fired = True
        item_id = new_id("item")
        self._send(InputAudioBufferTimeoutTriggered(
            audio_start_ms=self._buffer_start_ms, audio_end_ms=self._input_ms, item_id=item_id
        ))  # fmt: skip
        await self._commit(item_id)  # the silence, as OpenAI commits it: the item named above
        if vad.create_response and self._backend.turn_based:
            await self._responses.start("idle", ResponseParams())

    def _check_session_tools(self, patch: SessionPatch, event_id: str | None) -> None:
        """Refuse (``RequestError``) a patch with unusable tools; on a model that cannot call
        tools, drop its tools with an ``error`` saying so, and take the rest of the patch."""
        if isinstance(patch.tools, list) and patch.tools and not self._backend.turn_based:
            # Continuous models (echo, moshi) speak when they choose and have no way to call.
            self._send(Error(error=ErrorDetail(
                code="tools_not_supported", param="session.tools", event_id=event_id,
                message=f"the {self._backend.name} model cannot call tools; "
                "this session keeps none",
            )))  # fmt: skip
            patch.tools = UNSET
            patch.tool_choice = UNSET
        current = (self.config.tools, self.config.tool_choice)
        try:
            take_tools(patch.tools, patch.tool_choice, current, "session")
        except ToolError as exc:
            raise RequestError(exc.code, str(exc), exc.param) from None

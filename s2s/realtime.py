"""The Realtime conversation of one call: items, turns, responses, barge-in and steering.

``Realtime`` turns client events, VAD edges and model output into the server events of the
OpenAI Realtime API. It never touches the network itself: it sends through ``send`` and plays
through the call's ``SpeakerTrack``.

Response audio is queued on the speaker with text markers at the playback position where each
piece of text starts; transcript deltas go out when playback reaches them, so the transcript a
client sees (and the one kept after a barge-in) is what the caller actually heard. A response is
done once the model has finished it and its last sample has been played.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from msgspec import UNSET, UnsetType

from s2s.audio import WEBRTC_RATE, SpeakerTrack
from s2s.backends import (
    Backend,
    InputTranscribed,
    ModelStream,
    ModelUnavailable,
    ResponseFailed,
    ResponseFinished,
    ResponseRequest,
    Steering,
    StepResult,
    ToolCalled,
)
from s2s.conversation import Conversation, RequestError, wire
from s2s.images import ImageLimits, Picture
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
from s2s.protocol.items import (
    FunctionCallItem,
    InputAudio,
    Item,
    MessageItem,
    OutputAudio,
    OutputText,
)
from s2s.protocol.server_events import (
    ConversationItemAdded,
    ConversationItemDeleted,
    ConversationItemDone,
    ConversationItemRetrieved,
    ConversationItemTruncated,
    Error,
    ErrorDetail,
    FunctionCallArgumentsDelta,
    FunctionCallArgumentsDone,
    ImageReceived,
    InputAudioBufferCleared,
    InputAudioBufferCommitted,
    InputAudioBufferTimeoutTriggered,
    InputAudioTranscriptionCompleted,
    OutputAudioBufferCleared,
    OutputAudioBufferStarted,
    OutputAudioBufferStopped,
    OutputTextDelta,
    OutputTextDone,
    Response,
    ResponseContentPartAdded,
    ResponseContentPartDone,
    ResponseCreated,
    ResponseDone,
    ResponseOutputItemAdded,
    ResponseOutputItemDone,
    ResponseSteered,
    ServerEvent,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    StatusDetails,
    TranscriptDelta,
    TranscriptDone,
)
from s2s.protocol.session_config import SessionConfig, SessionPatch
from s2s.tools import ToolError, allowed_tools, take_tools
from s2s.vad import VadEvent, VadSettings, vad_settings

log = logging.getLogger(__name__)

_MIN_COMMIT_MS = 100
_SAMPLES_PER_MS = WEBRTC_RATE // 1000


@dataclass(eq=False)
class _Response:
    id: str
    metadata: dict[str, object] | None
    modalities: list[str]
    item: MessageItem | None = None  # the spoken (or text) message, once it has begun
    outputs: list[Item] = field(default_factory=list)  # in output_index order
    start_pos: int | None = None  # playback position of its first sample
    end_pos: int = 0  # playback position after its last queued sample
    markers: collections.deque[tuple[int, str]] = field(default_factory=collections.deque)
    timeline: list[tuple[int, str]] = field(default_factory=list)  # (ms into the item, text)
    spoken: list[str] = field(default_factory=list)
    generated: bool = False
    playing: bool = False
    requested_at: float | None = None  # loop time the caller's turn ended, for turn latency


class Realtime:
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
        self._backend = backend
        self._stream = stream
        self._speaker = speaker
        self._send = send
        self._timelines: dict[str, tuple[list[tuple[int, str]], int]] = {}
        self._active: _Response | None = None
        self._user_item: str | None = None
        self._input_ms = 0  # caller audio heard since the call began
        self._buffer_start_ms = 0  # where the uncommitted input audio buffer starts
        self._idle_since = asyncio.get_running_loop().time()
        self._idle_fired = False
        self.image_limits = image_limits or ImageLimits()
        self._conversation = Conversation(self.image_limits, image_history, upload_bytes)
        self.watching = asyncio.Event()  # set while playout needs following
        self._vad_source: object = None
        self._vad: VadSettings | None = None
        self._metrics = metrics

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

    async def on_vad(self, event: VadEvent) -> None:
        settings = self.vad
        if settings is None:
            return
        self._touch()
        now = asyncio.get_running_loop().time()
        if event.kind == "start":
            self._user_item = self._user_item or new_id("item")
            self._send(SpeechStarted(audio_start_ms=event.audio_ms, item_id=self._user_item))
            await self._stream.speech_started(self._user_item)
            if self._active is not None and settings.interrupt_response:
                await self.cancel("turn_detected")
                if self._metrics is not None:
                    self._metrics.barge_in(asyncio.get_running_loop().time() - now)
            return
        item_id = self._user_item or new_id("item")
        self._send(SpeechStopped(audio_end_ms=event.audio_ms, item_id=item_id))
        await self._commit(item_id)
        if settings.create_response and self._backend.turn_based and self._active is None:
            await self._start_response("turn", ResponseParams(), requested_at=now)

    def on_step(self, result: StepResult, audio: np.ndarray) -> None:
        """Take one model step's output (``audio`` already at 48 kHz)."""
        for event in result.events:
            match event:
                case InputTranscribed(item_id=item_id, transcript=text):
                    item = self._conversation.find(item_id)
                    if isinstance(item, MessageItem):
                        item.content = [InputAudio(transcript=text)]
                    self._send(
                        InputAudioTranscriptionCompleted(
                            item_id=item_id, content_index=0, transcript=text
                        )
                    )
                case ResponseFinished(response_id=rid):
                    if self._active is not None and self._active.id == rid:
                        self._active.generated = True
                        self.watching.set()
                        if self._active.item is None and not (audio.size or result.text):
                            # Nothing to play (only tool calls): done now, before anyone can
                            # act on the calls, so their answer's response.create finds it over.
                            self._finish("completed")
                case ToolCalled(response_id=rid, name=name, arguments=arguments):
                    if self._active is not None and self._active.id == rid:
                        self._call_tool(self._active, name, arguments)
                case ResponseFailed(response_id=rid, message=message):
                    if self._active is not None and self._active.id == rid:
                        self._send(Error(error=ErrorDetail(
                            code="model_error", type="server_error", message=message,
                        )))  # fmt: skip
                        self._finish("failed", "model_error")
                case ModelUnavailable(message=message):
                    self._send(Error(error=ErrorDetail(
                        code="model_unavailable", type="server_error", message=message,
                    )))  # fmt: skip
        if result.response_id is None:
            if audio.size:
                self._speaker.write(audio)
            return
        r = self._active
        if r is None and not self._backend.turn_based:
            # A continuous (full-duplex) model starts speaking on its own: open a response.
            r = self._open_response(ResponseParams(), result.response_id)
        if r is None or r.id != result.response_id:
            return  # output of a response that was cancelled while this step ran
        if r.item is None and (audio.size or result.text):
            self._open_message(r)
        pos = self._speaker.played_samples + self._speaker.queued_samples
        if r.start_pos is None and (audio.size or result.text):
            r.start_pos = pos
        if result.text and "audio" not in r.modalities:
            self._emit_text(r, result.text)
        elif result.text:
            r.markers.append((pos, result.text))
            start = pos if r.start_pos is None else r.start_pos
            r.timeline.append(((pos - start) // _SAMPLES_PER_MS, result.text))
        if audio.size:
            self._speaker.write(audio)
            r.end_pos = pos + audio.size

    async def on_playout(self) -> None:
        """Follow playback: transcript deltas, output buffer start/stop, response completion."""
        r = self._active
        if r is None:
            await self._check_idle()
            return
        played = self._speaker.played_samples
        if not r.playing and r.start_pos is not None and played > r.start_pos:
            r.playing = True
            if r.requested_at is not None and self._metrics is not None:
                self._metrics.turn(asyncio.get_running_loop().time() - r.requested_at)
            self._send(OutputAudioBufferStarted(response_id=r.id))
        # A piece of text goes out once the first sample it belongs to has been played.
        while r.markers and r.markers[0][0] < played:
            self._emit_text(r, r.markers.popleft()[1])
        if r.generated and played >= r.end_pos:
            while r.markers:
                self._emit_text(r, r.markers.popleft()[1])
            if r.playing:
                self._send(OutputAudioBufferStopped(response_id=r.id))
            self._finish("completed")

    def needs_playout(self) -> bool:
        vad = self.vad
        return self._active is not None or bool(vad and vad.idle_timeout_ms)

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
                if self._active is not None and after != before:
                    changed = [b if a != b else None for a, b in zip(before, after, strict=True)]
                    await self._steer(Steering(*changed))  # type: ignore[arg-type]
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
                self._user_item = None
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
                if self._active is not None and any(o.id == item_id for o in self._active.outputs):
                    raise RequestError("item_in_use", "the item is being generated; cancel first")
                self._conversation.delete(item_id)
                self._send(ConversationItemDeleted(item_id=item_id))
            case ConversationItemTruncate():
                await self._truncate(event)
            case ResponseCreate(response=params):
                if self._active is not None:
                    # Mid-turn steering: the response in progress takes the new settings.
                    voice, speed = _voice_speed(params)
                    instructions = (
                        params.instructions if isinstance(params.instructions, str) else None
                    )
                    await self._steer(Steering(instructions, voice, speed))
                else:
                    now = asyncio.get_running_loop().time()
                    await self._start_response("client", params, requested_at=now)
            case ResponseCancel(response_id=rid):
                if self._active is None or (rid is not None and rid != self._active.id):
                    raise RequestError(
                        "response_cancel_not_active", "there is no such response in progress"
                    )
                await self.cancel("client_cancelled")
            case OutputAudioBufferClear():
                rid = self._active.id if self._active is not None else None
                if self._active is not None:
                    await self.cancel("client_cancelled")
                else:
                    self._speaker.flush()
                    self._send(OutputAudioBufferCleared(response_id=rid))
            case ResponseSteer(instructions=instructions, voice=voice, speed=speed):
                if self._active is None:
                    raise RequestError("no_active_response", "there is no response to steer")
                await self._steer(Steering(instructions, voice, speed))

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

    async def _commit(self, item_id: str) -> None:
        item = MessageItem(id=item_id, role="user", content=[InputAudio()])
        previous = self._add_item(item)
        self._send(InputAudioBufferCommitted(item_id=item_id, previous_item_id=previous))
        self._send(ConversationItemDone(item=item, previous_item_id=previous))
        self._user_item = None
        self._buffer_start_ms = self._input_ms
        await self._stream.commit(item_id)

    async def _truncate(self, event: ConversationItemTruncate) -> None:
        item = self._conversation.get(event.item_id)
        item_id = event.item_id
        if not isinstance(item, MessageItem) or item.role != "assistant":
            raise RequestError("invalid_item", "only assistant audio can be truncated", "item_id")
        if self._active is not None and self._active.item is item:
            await self.cancel("client_cancelled")
        timeline, audio_ms = self._timelines.get(item_id, ([], 0))
        end = min(event.audio_end_ms, audio_ms)
        item.content = [OutputAudio(transcript="".join(t for ms, t in timeline if ms < end))]
        self._timelines[item_id] = ([(ms, t) for ms, t in timeline if ms < end], end)
        self._send(
            ConversationItemTruncated(
                item_id=item_id, content_index=event.content_index, audio_end_ms=end
            )
        )

    # -- responses ---------------------------------------------------------------------------

    async def _start_response(
        self, trigger: str, params: ResponseParams, *, requested_at: float | None = None
    ) -> None:
        if not self._backend.turn_based:
            raise RequestError(
                "model_does_not_respond", f"the {self._backend.name} model does not respond"
            )
        if self._active is not None:
            raise RequestError(
                "conversation_already_has_active_response", "a response is in progress"
            )
        voice, speed = _voice_speed(params)
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
        r = self._open_response(params, None, message=not callable_tools)
        r.requested_at = requested_at
        request = ResponseRequest(
            response_id=r.id, instructions=instructions, voice=voice or self.config.voice,
            speed=speed or self.config.speed, modalities=list(r.modalities),
            conversation=self._conversation.items(), trigger=trigger,  # type: ignore[arg-type]
            pictures=self._conversation.pictures(), tools=callable_tools, tool_required=required,
        )  # fmt: skip
        try:
            await self._stream.respond(request)
        except Exception:
            log.exception("model failed to start a response")
            self._finish("failed", "model_error")

    def _open_response(
        self, params: ResponseParams, response_id: str | None, *, message: bool = True
    ) -> _Response:
        """Announce a new response and make it the active one; with ``message``, open its
        assistant message at once (else at its first text or audio)."""
        modalities = params.output_modalities
        if not isinstance(modalities, list):
            modalities = list(self.config.output_modalities)
        r = _Response(id=response_id or new_id("resp"), metadata=params.metadata,
                      modalities=list(modalities))  # fmt: skip
        self._active = r
        self._send(ResponseCreated(response=self._response(r, "in_progress")))
        if message:
            self._open_message(r)
        self.watching.set()
        return r

    def _open_message(self, r: _Response) -> None:
        text_only = "audio" not in r.modalities
        part: OutputAudio | OutputText = OutputText(text="") if text_only else OutputAudio()
        item = MessageItem(id=new_id("item"), role="assistant", status="in_progress", content=[])
        assert item.id is not None
        r.item = item
        index = len(r.outputs)
        r.outputs.append(item)
        self._send(ResponseOutputItemAdded(response_id=r.id, output_index=index, item=item))
        self._add_item(item)
        self._send(ResponseContentPartAdded(
            response_id=r.id, item_id=item.id, output_index=index, content_index=0, part=part
        ))  # fmt: skip

    def _call_tool(self, r: _Response, name: str, arguments: str) -> None:
        """Add the model's call of ``name`` to the response, as OpenAI streams one."""
        item = FunctionCallItem(
            id=new_id("item"), call_id=new_id("call"), name=name, status="in_progress"
        )
        assert item.id is not None
        index = len(r.outputs)
        r.outputs.append(item)
        self._send(ResponseOutputItemAdded(response_id=r.id, output_index=index, item=item))
        self._add_item(item)  # sent as it is now: the stored item is completed below
        ids = {"response_id": r.id, "item_id": item.id, "output_index": index,
               "call_id": item.call_id}  # fmt: skip
        self._send(FunctionCallArgumentsDelta(delta=arguments, **ids))  # type: ignore[arg-type]
        self._send(FunctionCallArgumentsDone(name=name, arguments=arguments, **ids))  # type: ignore[arg-type]
        item.arguments, item.status = arguments, "completed"
        self._send(ResponseOutputItemDone(response_id=r.id, output_index=index, item=item))
        self._send(ConversationItemDone(item=item))

    async def cancel(self, reason: str) -> None:
        """Stop the response in progress at once: flush its audio, reset the model stream."""
        r = self._active
        if r is None:
            return
        await self._stream.reset()
        dropped = self._speaker.flush()
        played = self._speaker.played_samples
        r.end_pos = min(r.end_pos, played)
        while r.markers and r.markers[0][0] <= played:
            self._emit_text(r, r.markers.popleft()[1])
        r.markers.clear()
        if r.playing or dropped:
            self._send(OutputAudioBufferCleared(response_id=r.id))
        self._finish("cancelled", reason)

    async def _steer(self, steering: Steering) -> None:
        r = self._active
        if r is None:
            return
        await self._stream.steer(steering)
        self._send(ResponseSteered(
            response_id=r.id, instructions=steering.instructions, voice=steering.voice,
            speed=steering.speed,
        ))  # fmt: skip

    def _emit_text(self, r: _Response, text: str) -> None:
        r.spoken.append(text)
        assert r.item is not None and r.item.id is not None
        ids = {"response_id": r.id, "item_id": r.item.id,
               "output_index": r.outputs.index(r.item), "content_index": 0}  # fmt: skip
        delta = TranscriptDelta if "audio" in r.modalities else OutputTextDelta
        self._send(delta(delta=text, **ids))  # type: ignore[arg-type]

    def _finish(self, status: str, reason: str | None = None) -> None:
        r = self._active
        assert r is not None
        self._active = None
        self._touch()
        if r.item is not None:
            self._finish_message(r, r.item, status)
        self._send(ResponseDone(response=self._response(r, status, reason)))

    def _finish_message(self, r: _Response, item: MessageItem, status: str) -> None:
        assert item.id is not None
        transcript = "".join(r.spoken)
        part: OutputAudio | OutputText = (
            OutputAudio(transcript=transcript) if "audio" in r.modalities
            else OutputText(text=transcript)
        )  # fmt: skip
        item.content = [part]
        item.status = "completed" if status == "completed" else "incomplete"
        index = r.outputs.index(item)
        ids = {"response_id": r.id, "item_id": item.id, "output_index": index, "content_index": 0}
        if isinstance(part, OutputAudio):
            self._send(TranscriptDone(transcript=transcript, **ids))  # type: ignore[arg-type]
        else:
            self._send(OutputTextDone(text=transcript, **ids))  # type: ignore[arg-type]
        self._send(ResponseContentPartDone(part=part, **ids))  # type: ignore[arg-type]
        self._send(ResponseOutputItemDone(response_id=r.id, output_index=index, item=item))
        self._send(ConversationItemDone(item=item))
        start = r.start_pos if r.start_pos is not None else r.end_pos
        self._timelines[item.id] = (r.timeline, max(0, r.end_pos - start) // _SAMPLES_PER_MS)

    def _response(self, r: _Response, status: str, reason: str | None = None) -> Response:
        details = None
        if status in ("cancelled", "failed", "incomplete"):
            details = StatusDetails(type=status, reason=reason)
        return Response(
            id=r.id, status=status, status_details=details,  # type: ignore[arg-type]
            output=list(r.outputs) if status != "in_progress" else [],
            output_modalities=r.modalities,  # type: ignore[arg-type]
            metadata=r.metadata,
        )  # fmt: skip

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
        if vad.create_response and self._backend.turn_based:
            await self._start_response("idle", ResponseParams())

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


def _voice_speed(params: ResponseParams) -> tuple[str | None, float | None]:
    audio = params.audio
    if isinstance(audio, UnsetType) or isinstance(audio.output, UnsetType):
        return None, None
    voice = audio.output.voice if isinstance(audio.output.voice, str) else None
    speed = audio.output.speed if isinstance(audio.output.speed, float | int) else None
    return voice, speed

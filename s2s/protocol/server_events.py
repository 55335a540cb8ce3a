"""Events the server sends on the data channel (``AnyServerEvent``), s2s extensions included."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from s2s.protocol.ids import new_id
from s2s.protocol.items import Item, OutputAudio, OutputText
from s2s.protocol.session_config import Modalities


class ServerEvent(msgspec.Struct, tag_field="type", kw_only=True):
    event_id: str = msgspec.field(default_factory=lambda: new_id("event"))


class SessionCreated(ServerEvent, tag="session.created"):
    session: dict[str, Any]


class SessionUpdated(ServerEvent, tag="session.updated"):
    session: dict[str, Any]


class ConversationItemAdded(ServerEvent, tag="conversation.item.added"):
    item: Item
    previous_item_id: str | None = None


class ConversationItemDone(ServerEvent, tag="conversation.item.done"):
    item: Item
    previous_item_id: str | None = None


class ConversationItemRetrieved(ServerEvent, tag="conversation.item.retrieved"):
    item: Item


class ConversationItemDeleted(ServerEvent, tag="conversation.item.deleted"):
    item_id: str


class ConversationItemTruncated(ServerEvent, tag="conversation.item.truncated"):
    item_id: str
    content_index: int
    audio_end_ms: int


class TranscriptionUsage(msgspec.Struct, kw_only=True):
    """What transcribing a turn used: its audio's length (GA's ``duration`` usage)."""

    type: Literal["duration"] = "duration"
    seconds: float


class InputAudioTranscriptionCompleted(
    ServerEvent, tag="conversation.item.input_audio_transcription.completed"
):
    item_id: str
    content_index: int
    transcript: str
    usage: TranscriptionUsage


class SpeechStarted(ServerEvent, tag="input_audio_buffer.speech_started"):
    audio_start_ms: int
    item_id: str


class SpeechStopped(ServerEvent, tag="input_audio_buffer.speech_stopped"):
    audio_end_ms: int
    item_id: str


class InputAudioBufferCommitted(ServerEvent, tag="input_audio_buffer.committed"):
    item_id: str
    previous_item_id: str | None = None


class InputAudioBufferCleared(ServerEvent, tag="input_audio_buffer.cleared"):
    pass


class InputAudioBufferTimeoutTriggered(ServerEvent, tag="input_audio_buffer.timeout_triggered"):
    audio_start_ms: int
    audio_end_ms: int
    item_id: str


class OutputAudioBufferStarted(ServerEvent, tag="output_audio_buffer.started"):
    response_id: str


class OutputAudioBufferStopped(ServerEvent, tag="output_audio_buffer.stopped"):
    response_id: str


class OutputAudioBufferCleared(ServerEvent, tag="output_audio_buffer.cleared"):
    response_id: str


class StatusError(msgspec.Struct):
    """Why a response failed (``status_details.error``)."""

    type: str
    code: str | None = None
    message: str | None = None


class StatusDetails(msgspec.Struct, omit_defaults=True):
    """How a response ended when it did not complete: ``reason`` for a cancelled one
    (``turn_detected``, ``client_cancelled``), ``error`` for a failed one."""

    type: str
    reason: str | None = None
    error: StatusError | None = None


class Response(msgspec.Struct, kw_only=True):
    id: str
    object: str = "realtime.response"
    status: Literal["in_progress", "completed", "cancelled", "incomplete", "failed"]
    status_details: StatusDetails | None = None
    output: list[Item] = msgspec.field(default_factory=list)
    output_modalities: Modalities = msgspec.field(default_factory=lambda: ["audio"])
    conversation_id: str | None = None
    metadata: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None


class ResponseCreated(ServerEvent, tag="response.created"):
    response: Response


class ResponseDone(ServerEvent, tag="response.done"):
    response: Response


class ResponseOutputItemAdded(ServerEvent, tag="response.output_item.added"):
    response_id: str
    output_index: int
    item: Item


class ResponseOutputItemDone(ServerEvent, tag="response.output_item.done"):
    response_id: str
    output_index: int
    item: Item


class ResponsePart(msgspec.Struct, omit_defaults=True):
    """A content part as the ``response.content_part.*`` events carry it: typed ``audio`` or
    ``text`` (not the item's ``output_audio``/``output_text``), as the GA API has it."""

    type: Literal["audio", "text"]
    transcript: str | None = None
    text: str | None = None

    @classmethod
    def of(cls, part: OutputAudio | OutputText) -> ResponsePart:
        if isinstance(part, OutputAudio):
            return cls("audio", transcript=part.transcript)
        return cls("text", text=part.text)


class ResponseContentPartAdded(ServerEvent, tag="response.content_part.added"):
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    part: ResponsePart


class ResponseContentPartDone(ServerEvent, tag="response.content_part.done"):
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    part: ResponsePart


class OutputAudioDone(ServerEvent, tag="response.output_audio.done"):
    """The response's audio is complete (on WebRTC it went out on the media track)."""

    response_id: str
    item_id: str
    output_index: int
    content_index: int


class TranscriptDelta(ServerEvent, tag="response.output_audio_transcript.delta"):
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    delta: str


class TranscriptDone(ServerEvent, tag="response.output_audio_transcript.done"):
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    transcript: str


class OutputTextDelta(ServerEvent, tag="response.output_text.delta"):
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    delta: str


class OutputTextDone(ServerEvent, tag="response.output_text.done"):
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    text: str


class FunctionCallArgumentsDelta(ServerEvent, tag="response.function_call_arguments.delta"):
    response_id: str
    item_id: str
    output_index: int
    call_id: str
    delta: str


class FunctionCallArgumentsDone(ServerEvent, tag="response.function_call_arguments.done"):
    response_id: str
    item_id: str
    output_index: int
    call_id: str
    name: str
    arguments: str


class ResponseSteered(ServerEvent, tag="s2s.response.steered"):
    """s2s extension: the response in progress now follows the new instructions or voice."""

    response_id: str
    instructions: str | None = None
    voice: str | None = None
    speed: float | None = None


class ImageReceived(ServerEvent, tag="s2s.image.received"):
    """s2s extension: an uploaded image was checked, downscaled and added as ``item_id``."""

    upload_id: str
    item_id: str
    width: int
    height: int
    bytes: int


class ServerShutdown(ServerEvent, tag="s2s.server.shutdown"):
    """s2s extension: the server is stopping; the call will be closed within ``grace_s``."""

    grace_s: float


class SessionStats(ServerEvent, tag="s2s.session.stats"):
    """s2s extension: the call's link and latency figures, every ``--stats-interval`` seconds.

    ``in`` is the caller's audio as the server receives it, ``out`` the server's audio as the
    caller receives it (from the caller's RTCP receiver reports). A figure not known yet is null.
    ``frames_late`` counts outbound frames sent more than 20 ms after their slot, over the call.
    The latencies are the call's latest (see the README's Metrics section for where they start
    and end). ``audio_in`` holds the receive pipeline's running counts (concealed frames, FEC,
    NACKs...), keyed by name; it is empty where the server counts none.
    """

    call_seconds: float
    rtt_ms: float | None = None
    jitter_in_ms: float | None = None
    jitter_out_ms: float | None = None
    packets_lost_in: int | None = None
    packets_lost_out: int | None = None
    fraction_lost_in: float | None = None
    fraction_lost_out: float | None = None
    bitrate_in_bps: int | None = None
    bitrate_out_bps: int | None = None
    frames_late: int | None = None
    turn_latency_ms: float | None = None
    barge_in_latency_ms: float | None = None
    audio_in: dict[str, float] = msgspec.field(default_factory=dict)


class ErrorDetail(msgspec.Struct):
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    event_id: str | None = None


class Error(ServerEvent, tag="error"):
    error: ErrorDetail


AnyServerEvent = (
    SessionCreated | SessionUpdated | ConversationItemAdded | ConversationItemDone
    | ConversationItemRetrieved | ConversationItemDeleted | ConversationItemTruncated
    | InputAudioTranscriptionCompleted | SpeechStarted | SpeechStopped
    | InputAudioBufferCommitted | InputAudioBufferCleared | InputAudioBufferTimeoutTriggered
    | OutputAudioBufferStarted | OutputAudioBufferStopped | OutputAudioBufferCleared
    | ResponseCreated | ResponseDone | ResponseOutputItemAdded | ResponseOutputItemDone
    | ResponseContentPartAdded | ResponseContentPartDone | OutputAudioDone
    | TranscriptDelta | TranscriptDone
    | OutputTextDelta | OutputTextDone | FunctionCallArgumentsDelta | FunctionCallArgumentsDone
    | ResponseSteered | ImageReceived | ServerShutdown
    | SessionStats | Error
)  # fmt: skip

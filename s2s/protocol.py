"""Data-channel events, shaped as the OpenAI Realtime API (GA) defines them, plus s2s extensions.

Every event is a msgspec ``Struct`` tagged by its ``type``; a client message decodes in one call
(``decode_client_event``) and every server event encodes with ``encode_event``. Pure: no I/O.
Fields that stock clients send but s2s does not use (``tracing``, ``include``, audio ``format``
objects...) are accepted and ignored, since msgspec skips unknown fields. Function ``tools`` are
taken (``s2s.tools`` checks them); other tool types (``mcp``) are refused by name.
Our own events are namespaced ``s2s.*``. ``python -m s2s.protocol`` prints the JSON schema.
"""

from __future__ import annotations

import inspect
import json
import re
import secrets
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

Speed = Annotated[float, Meta(ge=0.25, le=1.5)]
Threshold = Annotated[float, Meta(ge=0.0, le=1.0)]
Millis = Annotated[int, Meta(ge=0, le=600_000)]
Modalities = list[Literal["audio", "text"]]


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


# -- session configuration ---------------------------------------------------------------------


class ServerVad(msgspec.Struct, tag="server_vad", tag_field="type", kw_only=True):
    threshold: Threshold = 0.5
    prefix_padding_ms: Millis = 300
    silence_duration_ms: Millis = 500
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: Millis | None = None


class SemanticVad(msgspec.Struct, tag="semantic_vad", tag_field="type", kw_only=True):
    """Accepted as OpenAI defines it; s2s maps ``eagerness`` to VAD silence durations."""

    eagerness: Literal["low", "medium", "high", "auto"] = "auto"
    create_response: bool = True
    interrupt_response: bool = True


TurnDetection = ServerVad | SemanticVad


class AudioInput(msgspec.Struct, omit_defaults=True):
    turn_detection: TurnDetection | UnsetType | None = UNSET


class AudioOutput(msgspec.Struct, omit_defaults=True):
    voice: str | UnsetType = UNSET
    speed: Speed | UnsetType = UNSET


class AudioConfig(msgspec.Struct, omit_defaults=True):
    input: AudioInput | UnsetType = UNSET
    output: AudioOutput | UnsetType = UNSET


# -- tools -------------------------------------------------------------------------------------


class FunctionTool(msgspec.Struct, tag="function", tag_field="type", kw_only=True):
    """A function the model may call; ``parameters`` is a JSON schema of type ``object``."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


class ToolChoiceFunction(msgspec.Struct, tag="function", tag_field="type"):
    """Force a call of the function ``name``."""

    name: str


ToolChoice = Literal["auto", "none", "required"] | ToolChoiceFunction


class SessionPatch(msgspec.Struct, omit_defaults=True):
    """A partial session, as ``session.update`` (or the call's ``session`` form field) sends."""

    type: str | UnsetType = UNSET
    model: str | UnsetType = UNSET
    instructions: str | UnsetType = UNSET
    output_modalities: Modalities | UnsetType = UNSET
    audio: AudioConfig | UnsetType = UNSET
    tools: list[FunctionTool] | UnsetType = UNSET
    tool_choice: ToolChoice | UnsetType = UNSET


class SessionConfig(msgspec.Struct):
    """The effective configuration of one call."""

    id: str
    model: str
    instructions: str = ""
    output_modalities: Modalities = msgspec.field(default_factory=lambda: ["audio"])
    voice: str = "alloy"
    speed: float = 1.0
    turn_detection: TurnDetection | None = msgspec.field(default_factory=ServerVad)
    tools: list[FunctionTool] = msgspec.field(default_factory=list)
    tool_choice: ToolChoice = "auto"

    def apply(self, patch: SessionPatch) -> None:
        """Take every field ``patch`` sets; leave the rest as they are."""
        if not isinstance(patch.instructions, UnsetType):
            self.instructions = patch.instructions
        if not isinstance(patch.output_modalities, UnsetType):
            self.output_modalities = patch.output_modalities
        if not isinstance(patch.tools, UnsetType):
            self.tools = patch.tools
        if not isinstance(patch.tool_choice, UnsetType):
            self.tool_choice = patch.tool_choice
        audio = patch.audio
        if isinstance(audio, UnsetType):
            return
        if not isinstance(audio.output, UnsetType):
            if not isinstance(audio.output.voice, UnsetType):
                self.voice = audio.output.voice
            if not isinstance(audio.output.speed, UnsetType):
                self.speed = audio.output.speed
        if not isinstance(audio.input, UnsetType) and not isinstance(
            audio.input.turn_detection, UnsetType
        ):
            self.turn_detection = audio.input.turn_detection

    def to_wire(self) -> dict[str, Any]:
        """The session object in the GA shape (nested ``audio``) that clients read."""
        pcm = {"type": "audio/pcm", "rate": 24_000}
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self.id,
            "model": self.model,
            "instructions": self.instructions,
            "output_modalities": self.output_modalities,
            "audio": {
                "input": {
                    "format": pcm,
                    "turn_detection": msgspec.to_builtins(self.turn_detection),
                },
                "output": {"format": pcm, "voice": self.voice, "speed": self.speed},
            },
            "tools": msgspec.to_builtins(self.tools),
            "tool_choice": msgspec.to_builtins(self.tool_choice),
        }


# -- conversation items ------------------------------------------------------------------------


class InputText(msgspec.Struct, tag="input_text", tag_field="type"):
    text: str


class InputAudio(msgspec.Struct, tag="input_audio", tag_field="type"):
    transcript: str | None = None


class InputImage(msgspec.Struct, tag="input_image", tag_field="type"):
    image_url: str
    detail: str = "auto"


class OutputText(msgspec.Struct, tag="output_text", tag_field="type"):
    text: str


class OutputAudio(msgspec.Struct, tag="output_audio", tag_field="type"):
    transcript: str = ""


ContentPart = InputText | InputAudio | InputImage | OutputText | OutputAudio


class MessageItem(msgspec.Struct, tag="message", tag_field="type", kw_only=True):
    role: Literal["user", "assistant", "system"]
    content: list[ContentPart]
    id: str | None = None
    object: str = "realtime.item"
    status: Literal["completed", "in_progress", "incomplete"] = "completed"


class FunctionCallItem(msgspec.Struct, tag="function_call", tag_field="type", kw_only=True):
    """The model's call of a tool; ``arguments`` is a JSON object as a string."""

    call_id: str
    name: str
    arguments: str = ""
    id: str | None = None
    object: str = "realtime.item"
    status: Literal["completed", "in_progress", "incomplete"] = "completed"


class FunctionCallOutputItem(
    msgspec.Struct, tag="function_call_output", tag_field="type", kw_only=True
):
    """What the tool call ``call_id`` returned, from the client or an app backend."""

    call_id: str
    output: str
    id: str | None = None
    object: str = "realtime.item"
    status: Literal["completed", "in_progress", "incomplete"] = "completed"


Item = MessageItem | FunctionCallItem | FunctionCallOutputItem


# -- client events -------------------------------------------------------------------------------


class ClientEvent(msgspec.Struct, tag_field="type", kw_only=True):
    event_id: str | None = None


class SessionUpdate(ClientEvent, tag="session.update"):
    session: SessionPatch = msgspec.field(default_factory=SessionPatch)


class InputAudioBufferAppend(ClientEvent, tag="input_audio_buffer.append"):
    audio: str = ""


class InputAudioBufferCommit(ClientEvent, tag="input_audio_buffer.commit"):
    pass


class InputAudioBufferClear(ClientEvent, tag="input_audio_buffer.clear"):
    pass


class ConversationItemCreate(ClientEvent, tag="conversation.item.create"):
    item: Item
    previous_item_id: str | None = None


class ConversationItemRetrieve(ClientEvent, tag="conversation.item.retrieve"):
    item_id: str


class ConversationItemDelete(ClientEvent, tag="conversation.item.delete"):
    item_id: str


class ConversationItemTruncate(ClientEvent, tag="conversation.item.truncate"):
    item_id: str
    audio_end_ms: Annotated[int, Meta(ge=0)]
    content_index: int = 0


class ResponseParams(msgspec.Struct, omit_defaults=True):
    instructions: str | UnsetType = UNSET
    output_modalities: Modalities | UnsetType = UNSET
    audio: AudioConfig | UnsetType = UNSET
    conversation: str | UnsetType = UNSET
    metadata: dict[str, Any] | None = None
    tools: list[FunctionTool] | UnsetType = UNSET
    tool_choice: ToolChoice | UnsetType = UNSET


class ResponseCreate(ClientEvent, tag="response.create"):
    response: ResponseParams = msgspec.field(default_factory=ResponseParams)


class ResponseCancel(ClientEvent, tag="response.cancel"):
    response_id: str | None = None


class OutputAudioBufferClear(ClientEvent, tag="output_audio_buffer.clear"):
    pass


class ResponseSteer(ClientEvent, tag="s2s.response.steer"):
    """s2s extension: change the response being spoken without cancelling it or the session.

    Fields left out keep their value; nothing here is written back to the session config.
    """

    instructions: str | None = None
    voice: str | None = None
    speed: Speed | None = None


class ImageChunk(ClientEvent, tag="s2s.image.chunk"):
    """s2s extension: one piece of an image too large for one data-channel message.

    ``data`` is base64 (of the raw image bytes, split anywhere); chunks of one ``upload_id`` are
    numbered from 0 and must arrive in order; ``total`` is the number of chunks.
    """

    upload_id: Annotated[str, Meta(min_length=1, max_length=64)]
    index: Annotated[int, Meta(ge=0)]
    total: Annotated[int, Meta(ge=1, le=10_000)]
    data: str


class ImageCommit(ClientEvent, tag="s2s.image.commit"):
    """s2s extension: all chunks are sent; add the image to the conversation as a user item."""

    upload_id: Annotated[str, Meta(min_length=1, max_length=64)]
    previous_item_id: str | None = None


AnyClientEvent = (
    SessionUpdate
    | InputAudioBufferAppend
    | InputAudioBufferCommit
    | InputAudioBufferClear
    | ConversationItemCreate
    | ConversationItemRetrieve
    | ConversationItemDelete
    | ConversationItemTruncate
    | ResponseCreate
    | ResponseCancel
    | OutputAudioBufferClear
    | ResponseSteer
    | ImageChunk
    | ImageCommit
)

# -- server events -------------------------------------------------------------------------------


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


class InputAudioTranscriptionCompleted(
    ServerEvent, tag="conversation.item.input_audio_transcription.completed"
):
    item_id: str
    content_index: int
    transcript: str


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
    response_id: str | None = None


class OutputAudioBufferStopped(ServerEvent, tag="output_audio_buffer.stopped"):
    response_id: str | None = None


class OutputAudioBufferCleared(ServerEvent, tag="output_audio_buffer.cleared"):
    response_id: str | None = None


class StatusDetails(msgspec.Struct):
    type: str
    reason: str | None = None


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


class ResponseContentPartAdded(ServerEvent, tag="response.content_part.added"):
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    part: OutputAudio | OutputText


class ResponseContentPartDone(ServerEvent, tag="response.content_part.done"):
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    part: OutputAudio | OutputText


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
    | ResponseContentPartAdded | ResponseContentPartDone | TranscriptDelta | TranscriptDone
    | OutputTextDelta | OutputTextDone | FunctionCallArgumentsDelta | FunctionCallArgumentsDone
    | ResponseSteered | ImageReceived | ServerShutdown
    | SessionStats | Error
)  # fmt: skip

# -- encoding ------------------------------------------------------------------------------------

_decoder = msgspec.json.Decoder(AnyClientEvent)
_encoder = msgspec.json.Encoder()


class _Header(msgspec.Struct):
    # Read only on the error path, to name the offending event in the error sent back.
    type: Any = None
    event_id: Any = None


class EventError(ValueError):
    """A client message that cannot be taken, with the ``error`` event detail to answer it."""

    def __init__(
        self, code: str, message: str, *, event_id: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.detail = ErrorDetail(message=message, code=code, param=param, event_id=event_id)


def decode_client_event(raw: bytes | str, *, max_bytes: int) -> AnyClientEvent:
    """Decode one data-channel message, or raise ``EventError`` saying what is wrong with it."""
    if len(raw) > max_bytes:
        raise EventError(
            "message_too_large", f"event of {len(raw)} bytes exceeds the limit of {max_bytes}"
        )
    try:
        event: AnyClientEvent = _decoder.decode(raw)
        return event
    except msgspec.ValidationError as exc:
        header = _peek_header(raw)
        event_type = header.type if isinstance(header.type, str) else None
        event_id = header.event_id if isinstance(header.event_id, str) else None
        # msgspec checks the tag before the rest, so an unknown type is reported even when the
        # rest of the message is not valid JSON (and the header could not be read).
        bad_tag = re.fullmatch(r"Invalid value '(.*)' - at `\$\.type`", str(exc))
        if bad_tag and event_type is None:
            event_type = bad_tag.group(1)
        if event_type is not None and str(exc).endswith("at `$.type`"):
            raise EventError(
                "unknown_event",
                f"unknown or unsupported event type {event_type!r}",
                event_id=event_id,
                param="type",
            ) from None
        path = re.search(r"at `\$\.?([^`]*)`$", str(exc))
        raise EventError(
            "invalid_event",
            f"invalid event: {exc}",
            event_id=event_id,
            param=(path.group(1) or None) if path else None,
        ) from None
    except msgspec.DecodeError as exc:
        raise EventError("invalid_json", f"message is not JSON: {exc}") from None


def _peek_header(raw: bytes | str) -> _Header:
    try:
        return msgspec.json.decode(raw, type=_Header)
    except msgspec.DecodeError:
        return _Header()


def encode_event(event: ServerEvent) -> str:
    return _encoder.encode(event).decode()


def json_schema() -> dict[str, Any]:
    """The JSON schema of every client and server event (``docs/events.schema.json``)."""
    (client, server), components = msgspec.json.schema_components(
        [AnyClientEvent, AnyServerEvent], ref_template="#/$defs/{name}"
    )
    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "s2s data-channel events (OpenAI Realtime GA + s2s.* extensions)",
        "$defs": components,
        "properties": {"client_event": client, "server_event": server},
    }
    cleaned: dict[str, Any] = _clean_descriptions(schema)
    return cleaned


def _clean_descriptions(node: Any) -> Any:
    """Docstrings as ``inspect.cleandoc`` reads them: msgspec 0.23 started dedenting them and
    0.22 did not, so the exported file would otherwise depend on the installed version."""
    if isinstance(node, dict):
        return {
            key: inspect.cleandoc(value)
            if key == "description" and isinstance(value, str)
            else _clean_descriptions(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_clean_descriptions(item) for item in node]
    return node


if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2, sort_keys=True))

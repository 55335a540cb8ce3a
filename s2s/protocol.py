"""Data-channel events, shaped as the OpenAI Realtime API (GA) defines them.

Every event is a msgspec ``Struct`` tagged by its ``type``; clients' events decode in one call to
``decode_client_event`` and every server event encodes with ``encode_event``. Pure: no I/O.
Fields that stock clients send but s2s does not use (``tools``, ``tracing``, format objects...) are
accepted and ignored, since msgspec skips unknown fields.
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

# -- session configuration ---------------------------------------------------------------------


class AudioInput(msgspec.Struct, omit_defaults=True):
    # Kept as the client sent it; turn detection is interpreted by the session's VAD.
    turn_detection: dict[str, Any] | UnsetType | None = UNSET
    format: dict[str, Any] | UnsetType = UNSET


class AudioOutput(msgspec.Struct, omit_defaults=True):
    voice: str | UnsetType = UNSET
    speed: float | UnsetType = UNSET
    format: dict[str, Any] | UnsetType = UNSET


class AudioConfig(msgspec.Struct, omit_defaults=True):
    input: AudioInput | UnsetType = UNSET
    output: AudioOutput | UnsetType = UNSET


class SessionPatch(msgspec.Struct, omit_defaults=True):
    """A partial session as ``session.update`` (or the call's ``session`` part) carries it."""

    type: str | UnsetType = UNSET
    model: str | UnsetType = UNSET
    instructions: str | UnsetType = UNSET
    output_modalities: list[Literal["audio", "text"]] | UnsetType = UNSET
    audio: AudioConfig | UnsetType = UNSET


class SessionConfig(msgspec.Struct):
    """The whole effective configuration of one call, as ``session.created`` reports it."""

    id: str
    model: str
    type: str = "realtime"
    object: str = "realtime.session"
    instructions: str = ""
    output_modalities: list[Literal["audio", "text"]] = msgspec.field(
        default_factory=lambda: ["audio"]
    )
    voice: str = "alloy"
    speed: float = 1.0
    turn_detection: dict[str, Any] | None = msgspec.field(
        default_factory=lambda: {"type": "server_vad"}
    )

    def apply(self, patch: SessionPatch) -> None:
        """Take every field ``patch`` sets; leave the rest as they are."""
        if not isinstance(patch.instructions, UnsetType):
            self.instructions = patch.instructions
        if not isinstance(patch.output_modalities, UnsetType):
            self.output_modalities = patch.output_modalities
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
        return {
            "type": self.type,
            "object": self.object,
            "id": self.id,
            "model": self.model,
            "instructions": self.instructions,
            "output_modalities": self.output_modalities,
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24_000},
                    "turn_detection": self.turn_detection,
                },
                "output": {
                    "format": {"type": "audio/pcm", "rate": 24_000},
                    "voice": self.voice,
                    "speed": self.speed,
                },
            },
        }


# -- client events -------------------------------------------------------------------------------


class ClientEvent(msgspec.Struct, tag_field="type"):
    event_id: str | None = None


class SessionUpdate(ClientEvent, tag="session.update"):
    session: SessionPatch = msgspec.field(default_factory=SessionPatch)


class OutputAudioBufferClear(ClientEvent, tag="output_audio_buffer.clear"):
    pass


AnyClientEvent = SessionUpdate | OutputAudioBufferClear

# -- server events -------------------------------------------------------------------------------


def new_event_id() -> str:
    return f"event_{secrets.token_hex(8)}"


class ServerEvent(msgspec.Struct, tag_field="type", kw_only=True):
    event_id: str = msgspec.field(default_factory=new_event_id)


class SessionCreated(ServerEvent, tag="session.created"):
    session: dict[str, Any]


class SessionUpdated(ServerEvent, tag="session.updated"):
    session: dict[str, Any]


class OutputAudioBufferCleared(ServerEvent, tag="output_audio_buffer.cleared"):
    response_id: str | None = None


class ErrorDetail(msgspec.Struct):
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    event_id: str | None = None


class Error(ServerEvent, tag="error"):
    error: ErrorDetail


# -- encoding ------------------------------------------------------------------------------------

_decoder = msgspec.json.Decoder(AnyClientEvent)
_encoder = msgspec.json.Encoder()


class _Header(msgspec.Struct):
    # Read only on the error path, to name the offending event in the error we send back.
    type: Any = None
    event_id: Any = None


class EventError(ValueError):
    """A client message that cannot be taken, with the ``error`` event to answer it."""

    def __init__(self, code: str, message: str, *, event_id: str | None, param: str | None = None):
        super().__init__(message)
        self.detail = ErrorDetail(message=message, code=code, param=param, event_id=event_id)


def decode_client_event(raw: bytes | str, *, max_bytes: int) -> AnyClientEvent:
    """Decode one data-channel message, or raise ``EventError`` saying what is wrong with it."""
    if len(raw) > max_bytes:
        raise EventError(
            "message_too_large",
            f"event of {len(raw)} bytes exceeds the limit of {max_bytes} bytes",
            event_id=None,
        )
    try:
        event: AnyClientEvent = _decoder.decode(raw)
        return event
    except msgspec.ValidationError as exc:
        header = _peek_header(raw)
        event_type = header.type if isinstance(header.type, str) else None
        event_id = header.event_id if isinstance(header.event_id, str) else None
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
            param=path.group(1) or None if path else None,
        ) from None
    except msgspec.DecodeError as exc:
        raise EventError("invalid_json", f"message is not JSON: {exc}", event_id=None) from None


def _peek_header(raw: bytes | str) -> _Header:
    try:
        return msgspec.json.decode(raw, type=_Header)
    except msgspec.DecodeError:
        return _Header()


def encode_event(event: ServerEvent) -> str:
    return _encoder.encode(event).decode()

"""The session's configuration: what ``session.update`` patches and ``session.updated`` reports.

Turn detection (server or semantic VAD), output audio (voice, speed), the function tools the model
may call and how it must choose among them, and how a conversation past the model's prompt budget
is truncated.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

Speed = Annotated[float, Meta(ge=0.25, le=1.5)]
Threshold = Annotated[float, Meta(ge=0.0, le=1.0)]
Millis = Annotated[int, Meta(ge=0, le=600_000)]
Modalities = list[Literal["audio", "text"]]


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


class FunctionTool(msgspec.Struct, tag="function", tag_field="type", kw_only=True):
    """A function the model may call; ``parameters`` is a JSON schema of type ``object``."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


class ToolChoiceFunction(msgspec.Struct, tag="function", tag_field="type"):
    """Force a call of the function ``name``."""

    name: str


ToolChoice = Literal["auto", "none", "required"] | ToolChoiceFunction


class TokenLimits(msgspec.Struct, omit_defaults=True):
    """A lower budget for the conversation after the instructions, in tokens."""

    post_instructions: Annotated[int, Meta(ge=1)] | None = None


class RetentionRatio(msgspec.Struct, tag="retention_ratio", tag_field="type", omit_defaults=True):
    """Past the budget, drop the oldest turns until this share of it is left, so the next turns
    keep the same start (and a model's cache of it) until the budget is reached again."""

    retention_ratio: Threshold
    token_limits: TokenLimits | None = None


#: ``auto``: drop the oldest turns past the budget (s2s keeps 80% of it, as a retention ratio
#: of 0.8); ``disabled``: answer a response over the budget with an error instead.
Truncation = Literal["auto", "disabled"] | RetentionRatio


class SessionPatch(msgspec.Struct, omit_defaults=True):
    """A partial session, as ``session.update`` (or the call's ``session`` form field) sends."""

    #: Only ``realtime`` sessions (a ``transcription`` one would be a different service).
    type: Literal["realtime"] | UnsetType = UNSET
    model: str | UnsetType = UNSET
    instructions: str | UnsetType = UNSET
    output_modalities: Modalities | UnsetType = UNSET
    audio: AudioConfig | UnsetType = UNSET
    tools: list[FunctionTool] | UnsetType = UNSET
    tool_choice: ToolChoice | UnsetType = UNSET
    truncation: Truncation | UnsetType = UNSET


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
    truncation: Truncation = "auto"

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
        if not isinstance(patch.truncation, UnsetType):
            self.truncation = patch.truncation
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
                    "noise_reduction": None,  # s2s reduces none
                },
                "output": {"format": pcm, "voice": self.voice, "speed": self.speed},
            },
            "tools": msgspec.to_builtins(self.tools),
            "tool_choice": msgspec.to_builtins(self.tool_choice),
            "truncation": msgspec.to_builtins(self.truncation),
            "max_output_tokens": "inf",  # a reply is bounded by the model's own limits
            "tracing": None,
        }

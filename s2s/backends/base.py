"""The streaming model interface every backend implements.

A backend is loaded once per process and opens one ``ModelStream`` per call. The session feeds a
stream exactly one input frame at a time (``Backend.frame_samples`` mono ``int16`` samples at
``Backend.input_rate``) and gets back what the model produced since the last step: audio at
``Backend.output_rate`` with the transcript text that starts with it, and events. A step never
covers more than one frame of model work, so a cancel or reset is never stuck behind a long
computation: backends that compute (torch) do it on their device's executor, never on the event
loop, and turn-based backends generate in the background and hand out what is ready.

Turn-based backends (``turn_based = True``) also hear about the caller's turns
(``speech_started``, ``commit``, ``clear_input``) and are asked to ``respond``; continuous ones
(echo, full-duplex models) may ignore those calls.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from s2s.images import Picture
from s2s.protocol.items import Item
from s2s.protocol.session_config import FunctionTool, Truncation

EMPTY_PCM = np.zeros(0, np.int16)


def keep_latest(frames: collections.deque[np.ndarray], samples: int) -> None:
    """Drop the oldest of a turn's ``frames`` while the rest still hold ``samples`` (whole
    frames only, so at least that many are kept): what a turn-based stream does when its
    turn starts (``ModelStream.speech_started``)."""
    held = sum(len(frame) for frame in frames)
    while frames and held - len(frames[0]) >= samples:
        held -= len(frames.popleft())


@dataclass(frozen=True, slots=True)
class InputTranscribed:
    """The caller's committed turn ``item_id`` was transcribed."""

    item_id: str
    transcript: str


@dataclass(frozen=True, slots=True)
class ResponseFinished:
    """The backend has handed out everything for ``response_id``."""

    response_id: str


@dataclass(frozen=True, slots=True)
class ModelUnavailable:
    """The model lost this call's state (its worker died) and goes on with a fresh one."""

    message: str


@dataclass(frozen=True, slots=True)
class ToolCalled:
    """The model calls tool ``name`` in ``response_id``; ``arguments`` is a JSON object string.

    The response goes on (or finishes); the tool's output comes back as a conversation item.
    """

    response_id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ResponseFailed:
    """The model could not make ``response_id`` (``message`` says why); the call goes on."""

    response_id: str
    message: str


ModelEvent = InputTranscribed | ResponseFinished | ModelUnavailable | ToolCalled | ResponseFailed


@dataclass(slots=True)
class StepResult:
    """One step's output: mono ``int16`` audio, the text spoken from its start, and events.

    ``response_id`` names the response the audio and text belong to (None for continuous
    output), so output that was in flight when a response was cancelled can be dropped.
    """

    audio: np.ndarray = field(default_factory=lambda: EMPTY_PCM)
    text: str = ""
    response_id: str | None = None
    events: list[ModelEvent] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ResponseRequest:
    response_id: str
    instructions: str
    voice: str
    speed: float
    modalities: list[str]
    #: Messages, tool calls and tool outputs, oldest first.
    conversation: list[Item]
    trigger: Literal["turn", "client", "idle"] = "client"
    #: The latest pictures the caller sent (oldest first), checked and downscaled on arrival.
    pictures: list[Picture] = field(default_factory=list)
    #: Whether the last of ``pictures`` is a frame of the caller's camera (the others are
    #: uploads, each in the conversation while its item is).
    camera: bool = False
    #: The tools this response may call (none when ``tool_choice`` is ``none``), and whether it
    #: must call one (``required``, or a named function: then ``tools`` holds only that one).
    tools: list[FunctionTool] = field(default_factory=list)
    tool_required: bool = False
    #: The session's ``truncation``: how a conversation past the prompt budget is cut (the
    #: turn-based streamed model's; the others read the whole conversation or none of it).
    truncation: Truncation = "auto"


@dataclass(frozen=True, slots=True)
class Steering:
    """Changes for the rest of the response in progress; None leaves a setting as it is."""

    instructions: str | None = None
    voice: str | None = None
    speed: float | None = None


class ModelStream(Protocol):
    """One call's streaming state on a model."""

    async def step(self, pcm: np.ndarray) -> StepResult:
        """Feed one input frame; return what the model produced since the last step."""
        ...

    async def speech_started(self, item_id: str, since_ms: int) -> None:
        """The caller started a turn (server VAD), ``since_ms`` before the end of the audio
        ``step`` has had (the VAD's onset less its ``prefix_padding_ms``): what came before
        that is not the turn's."""
        ...

    async def commit(self, item_id: str) -> None:
        """The caller's audio since the last commit or clear is the user turn ``item_id``."""
        ...

    async def clear_input(self) -> None:
        """Forget the caller's uncommitted audio."""
        ...

    async def respond(self, request: ResponseRequest) -> None:
        """Start generating a response; its output comes out of later steps."""
        ...

    async def steer(self, steering: Steering) -> None:
        """Apply ``steering`` to the rest of the response in progress."""
        ...

    async def reset(self) -> None:
        """Drop pending output and in-flight generation (barge-in, ``response.cancel``)."""
        ...

    async def close(self) -> None:
        """Release the call's state. The stream is not used again."""
        ...


class ContinuousStream:
    """What streams of continuous models (echo, full duplex) share: they take no turns, so the
    turn hooks do nothing, and they never respond on request."""

    async def speech_started(self, item_id: str, since_ms: int) -> None:
        return None

    async def commit(self, item_id: str) -> None:
        return None

    async def clear_input(self) -> None:
        return None

    async def respond(self, request: ResponseRequest) -> None:
        raise NotImplementedError(f"{type(self).__name__} speaks when it chooses, not on request")


class Backend(Protocol):
    """A loaded model that serves many calls."""

    name: str
    input_rate: int
    output_rate: int
    frame_samples: int
    turn_based: bool
    #: Whether it can change a response it is making (``ModelStream.steer``).
    steers: bool

    async def open_stream(self, call_id: str) -> ModelStream:
        """Create the per-call state for a new call."""
        ...

    async def close(self) -> None:
        """Unload the model and stop its executors."""
        ...


class NoCapacity(RuntimeError):
    """No model worker has room for another call."""


@runtime_checkable
class PlacingBackend(Protocol):
    """A backend whose calls each need a place on one of several model workers (a Ray cluster):
    the server asks for it before answering the offer, so a full cluster is a 503."""

    async def place(self, call_id: str) -> None:
        """Reserve a place for ``call_id``, which ``open_stream`` then takes; ``NoCapacity``."""
        ...

    def unplace(self, call_id: str) -> None:
        """Free the place of ``call_id``, whose offer was refused after ``place``."""
        ...

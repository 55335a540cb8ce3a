"""What a server and a model worker say to each other: one tick each way per model step.

A full-duplex model (Moshi) gets every call's input frame with each tick, once per 80 ms frame.
A turn-based one (Qwen3-Omni) gets a whole turn with a ``respond`` change and then generates:
each tick is one decode step for every call that is answering, and its output is what that step
made (text, and an 80 ms frame of speech).

msgspec structs, encoded as msgpack; audio as raw mono ``int16`` bytes. New fields always get
defaults, so a worker and a server of neighbouring versions still understand each other.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class Turn(msgspec.Struct, frozen=True):
    """One turn of a conversation, as a turn-based model reads it."""

    role: Literal["system", "user", "assistant"]
    text: str = ""
    #: The caller's speech, mono int16 at the model's ``input_rate``, or empty.
    audio: bytes = b""
    #: Pictures (JPEG), oldest first.
    pictures: list[bytes] = msgspec.field(default_factory=list)
    #: The conversation item it is (empty for the instructions): a worker knows a call's
    #: prompt start and the audio it was sent by it.
    item: str = ""
    #: Its audio went with an earlier ``respond`` of this call, so ``audio`` is empty and the
    #: worker takes what it kept for ``item`` (each turn's audio crosses once, not every turn).
    heard: bool = False
    #: Its first ``seen`` pictures went with an earlier ``respond`` of this call: ``pictures``
    #: holds only those after them, and the worker takes the first ones it kept for ``item``.
    seen: int = 0


class Respond(msgspec.Struct, frozen=True):
    """Answer the conversation ``turns`` (oldest first; the worker drops the oldest to fit its
    prompt budget). A call answers one response at a time: a new one replaces the last."""

    response_id: str
    turns: list[Turn]
    voice: str = ""
    speak: bool = True
    #: The prompt's budget in tokens (0: the worker's default).
    prompt_tokens: int = 0
    #: The most prompt positions prefilled per tick, between the other calls' steps (0: the
    #: worker's default): smaller pieces keep their frames steadier, larger ones start this
    #: reply sooner.
    prefill_tokens: int = 0
    #: The session's ``truncation``: past the budget, whether the oldest turns are left out
    #: (else the response fails), down to what share of it (None: the worker's, 0.8), and a
    #: lower budget for the turns after the instructions (0: none).
    truncate: bool = True
    retain: float | None = None
    post_instructions: int = 0


class Change(msgspec.Struct, frozen=True):
    """A call joined, left, was reset (barge-in, cancel), steered (``text`` to speak next) or
    asked to respond (turn-based models)."""

    kind: Literal["join", "leave", "reset", "steer", "respond"]
    call: str
    text: str = ""
    respond: Respond | None = None


class Tick(msgspec.Struct, tag="tick"):
    """One model frame for every call that has one, after ``changes`` are applied in order."""

    changes: list[Change] = msgspec.field(default_factory=list)
    #: call id -> one input frame (``frame_samples`` mono int16 at ``input_rate``). A
    #: turn-based model's ticks name every open call with an empty frame (its input comes with
    #: ``respond``): a tick's outputs are those of the calls it names.
    frames: dict[str, bytes] = msgspec.field(default_factory=dict)


class Stop(msgspec.Struct, tag="stop"):
    """Unload and exit."""


class CallOutput(msgspec.Struct):
    #: The model's text for this frame (a word piece, with its leading space), or "".
    text: str = ""
    #: Mono int16 at ``output_rate``; empty while the model has no audio yet (its first frame).
    audio: bytes = b""
    #: Set when this call cannot be served (its join was refused); the others go on.
    error: str = ""
    #: The response this output belongs to (turn-based models), or "".
    response_id: str = ""
    #: Set when that response is over: "stop", "length", "cancelled", or "failed: why".
    done: str = ""


class TickResult(msgspec.Struct):
    outputs: dict[str, CallOutput] = msgspec.field(default_factory=dict)
    #: Device time of the tick's work, for metrics.
    step_ms: float = 0.0
    #: Set when the tick failed; the worker goes on with the next one.
    error: str = ""


class Hello(msgspec.Struct):
    """What a worker says once its model is loaded."""

    model: str
    device: str
    input_rate: int
    output_rate: int
    frame_samples: int
    slots: int
    error: str = ""


Request = Tick | Stop

encoder = msgspec.msgpack.Encoder()
request_decoder = msgspec.msgpack.Decoder(Request)
result_decoder = msgspec.msgpack.Decoder(TickResult)
hello_decoder = msgspec.msgpack.Decoder(Hello)

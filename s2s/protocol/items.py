"""Conversation items (messages, function calls and their outputs) and their content parts."""

from __future__ import annotations

from typing import Literal

import msgspec


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

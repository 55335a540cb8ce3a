"""Events a client sends on the data channel (``AnyClientEvent``), s2s extensions included."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

from s2s.protocol.items import Item
from s2s.protocol.session_config import (
    AudioConfig,
    FunctionTool,
    Modalities,
    SessionPatch,
    Speed,
    ToolChoice,
)


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
    #: An out-of-band response's own items (with ``conversation: "none"``): refused.
    input: list[Any] | UnsetType = UNSET
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

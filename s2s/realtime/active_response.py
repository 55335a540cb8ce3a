"""One response in progress, and the server events that tell its story as the OpenAI Realtime API
does: its message opened, its tool calls streamed, its text sent, its message and itself done.

Kept apart from ``Responses`` so that what a response looks like on the wire is in one place, and
``Responses`` reads as when things happen (model output, playback, requests), not how each event
is spelled. Everything here sends through the ``send`` it is given; nothing waits.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field

from s2s.protocol.ids import new_id
from s2s.protocol.items import FunctionCallItem, Item, MessageItem, OutputAudio, OutputText
from s2s.protocol.server_events import (
    ConversationItemDone,
    FunctionCallArgumentsDelta,
    FunctionCallArgumentsDone,
    OutputAudioDone,
    OutputTextDelta,
    OutputTextDone,
    Response,
    ResponseContentPartAdded,
    ResponseContentPartDone,
    ResponseOutputItemAdded,
    ResponseOutputItemDone,
    ResponsePart,
    ServerEvent,
    StatusDetails,
    StatusError,
    TranscriptDelta,
    TranscriptDone,
)

Send = Callable[[ServerEvent], None]
#: Adds an item to the conversation and announces it; returns the id of the item before it.
AddItem = Callable[[Item], str | None]


@dataclass(eq=False)
class ActiveResponse:
    """A response from ``response.created`` to ``response.done``: its outputs, and where its
    audio and each piece of its text sit in playback."""

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
    previous: dict[str, str | None] = field(default_factory=dict)  # item id -> the one before

    def open_message(self, send: Send, add_item: AddItem) -> None:
        text_only = "audio" not in self.modalities
        part: OutputAudio | OutputText = OutputText(text="") if text_only else OutputAudio()
        item = MessageItem(id=new_id("item"), role="assistant", status="in_progress", content=[])
        assert item.id is not None
        self.item = item
        index = len(self.outputs)
        self.outputs.append(item)
        send(ResponseOutputItemAdded(response_id=self.id, output_index=index, item=item))
        self.previous[item.id] = add_item(item)
        send(ResponseContentPartAdded(
            response_id=self.id, item_id=item.id, output_index=index, content_index=0,
            part=ResponsePart.of(part),
        ))  # fmt: skip

    def call_tool(self, name: str, arguments: str, send: Send, add_item: AddItem) -> None:
        """Add the model's call of ``name`` to the response, as OpenAI streams one."""
        item = FunctionCallItem(
            id=new_id("item"), call_id=new_id("call"), name=name, status="in_progress"
        )
        assert item.id is not None
        index = len(self.outputs)
        self.outputs.append(item)
        send(ResponseOutputItemAdded(response_id=self.id, output_index=index, item=item))
        previous = add_item(item)  # sent as it is now: the stored item is completed below
        ids = {"response_id": self.id, "item_id": item.id, "output_index": index,
               "call_id": item.call_id}  # fmt: skip
        send(FunctionCallArgumentsDelta(delta=arguments, **ids))  # type: ignore[arg-type]
        send(FunctionCallArgumentsDone(name=name, arguments=arguments, **ids))  # type: ignore[arg-type]
        item.arguments, item.status = arguments, "completed"
        send(ResponseOutputItemDone(response_id=self.id, output_index=index, item=item))
        send(ConversationItemDone(item=item, previous_item_id=previous))

    def emit_text(self, text: str, send: Send) -> None:
        self.spoken.append(text)
        assert self.item is not None and self.item.id is not None
        ids = {"response_id": self.id, "item_id": self.item.id,
               "output_index": self.outputs.index(self.item), "content_index": 0}  # fmt: skip
        delta = TranscriptDelta if "audio" in self.modalities else OutputTextDelta
        send(delta(delta=text, **ids))  # type: ignore[arg-type]

    def finish_message(self, item: MessageItem, status: str, send: Send) -> None:
        assert item.id is not None
        transcript = "".join(self.spoken)
        part: OutputAudio | OutputText = (
            OutputAudio(transcript=transcript) if "audio" in self.modalities
            else OutputText(text=transcript)
        )  # fmt: skip
        item.content = [part]
        item.status = "completed" if status == "completed" else "incomplete"
        index = self.outputs.index(item)
        ids = {"response_id": self.id, "item_id": item.id, "output_index": index,
               "content_index": 0}  # fmt: skip
        if isinstance(part, OutputAudio):
            send(OutputAudioDone(**ids))  # type: ignore[arg-type]
            send(TranscriptDone(transcript=transcript, **ids))  # type: ignore[arg-type]
        else:
            send(OutputTextDone(text=transcript, **ids))  # type: ignore[arg-type]
        send(ResponseContentPartDone(part=ResponsePart.of(part), **ids))  # type: ignore[arg-type]
        send(ResponseOutputItemDone(response_id=self.id, output_index=index, item=item))
        send(ConversationItemDone(item=item, previous_item_id=self.previous.get(item.id)))

    def response(
        self, status: str, reason: str | None = None, error: StatusError | None = None
    ) -> Response:
        details = None
        if status in ("cancelled", "failed", "incomplete"):
            details = StatusDetails(type=status, reason=reason, error=error)
        return Response(
            id=self.id, status=status, status_details=details,  # type: ignore[arg-type]
            output=list(self.outputs) if status != "in_progress" else [],
            output_modalities=self.modalities,  # type: ignore[arg-type]
            metadata=self.metadata,
        )  # fmt: skip

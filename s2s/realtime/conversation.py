"""One call's conversation: its items in order, and the pictures the caller sent or showed.

Pure bookkeeping plus image checking (run in a worker thread); no events are sent from here:
``Realtime`` announces what changes.
"""

from __future__ import annotations

import collections

import msgspec

from s2s import images
from s2s.images import ImageError, ImageLimits, Picture
from s2s.protocol.ids import new_id
from s2s.protocol.items import (
    ContentPart,
    FunctionCallItem,
    FunctionCallOutputItem,
    InputImage,
    Item,
    MessageItem,
)
from s2s.uploads import Uploads

_MAX_ITEMS = 500  # oldest items are forgotten past this, as a model's context would be
# Bytes of items (as JSON, pictures by reference) past which the oldest are forgotten too: 500
# items of a 256 KiB event each would hold 125 MiB per call. Pictures are bounded apart, by the
# image history. An item is measured when added: what grows after (a reply's transcript, a
# turn's transcription) is the model's output, bounded by its own limits.
_MAX_BYTES = 16 * 1024 * 1024
_ALLOWED = {
    "user": ("input_text", "input_image"),
    "system": ("input_text",),
    "assistant": ("output_text", "output_audio"),
}


class RequestError(ValueError):
    """A client event that is well-formed but cannot be honoured now."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.param = code, param


class Conversation:
    def __init__(self, image_limits: ImageLimits, image_history: int, upload_bytes: int) -> None:
        self.image_limits = image_limits
        self._items: collections.OrderedDict[str, Item] = collections.OrderedDict()
        self._sizes: dict[str, int] = {}  # each item's bytes when added, summed in ``_bytes``
        self._bytes = 0
        # Every function call's call_id, and whether its output has come: kept apart from the
        # items so an answer is checked even after the call's item was deleted or forgotten.
        self._calls: dict[str, bool] = {}
        self._history = image_history
        self._pictures: collections.OrderedDict[str, Picture] = collections.OrderedDict()
        self._camera: Picture | None = None  # the latest camera frame, if newer than uploads
        self.uploads = Uploads(upload_bytes)

    def items(self) -> list[Item]:
        return list(self._items.values())

    def find(self, item_id: str) -> Item | None:
        return self._items.get(item_id)

    def get(self, item_id: str) -> Item:
        item = self._items.get(item_id)
        if item is None:
            raise RequestError("item_not_found", f"no item {item_id!r}", "item_id")
        return item

    def delete(self, item_id: str) -> None:
        """Take the item out of what the model reads next, its picture with it."""
        self.get(item_id)
        self._forget(item_id)
        self._pictures.pop(item_id, None)

    def last(self) -> str | None:
        """The id of the conversation's last item (None when it is empty)."""
        return next(reversed(self._items), None)

    def add(self, item: Item, previous: str | None = None) -> str | None:
        """Place ``item`` after ``previous`` (the last item if None, first if "root").

        Returns the id of the item it now follows, as ``previous_item_id`` reports it.
        """
        assert item.id is not None
        if isinstance(item, FunctionCallItem):
            self._calls.setdefault(item.call_id, False)
        elif isinstance(item, FunctionCallOutputItem):
            self._calls[item.call_id] = True
        last = next(reversed(self._items), None)
        if previous is None:
            previous = last
        self._items[item.id] = item
        size = len(msgspec.json.encode(wire(item)))
        self._bytes += size - self._sizes.get(item.id, 0)
        self._sizes[item.id] = size
        if previous != last:
            # Placed after an earlier item (or at the root): move the ones after it behind.
            ids = [i for i in self._items if i != item.id]
            at = 0 if previous == "root" or previous is None else ids.index(previous) + 1
            for later in ids[at:]:
                self._items.move_to_end(later)
        while len(self._items) > _MAX_ITEMS or (self._bytes > _MAX_BYTES and len(self._items) > 1):
            # The oldest other than the new one (which may have been placed first).
            self._forget(next(i for i in self._items if i != item.id))
        return None if previous == "root" else previous

    def _forget(self, item_id: str) -> None:
        del self._items[item_id]
        self._bytes -= self._sizes.pop(item_id)

    async def check(
        self, item: Item, previous: str | None, pictures: dict[int, Picture]
    ) -> dict[int, Picture]:
        """Validate a client's item (ids, roles, parts, call ids); check and downscale images."""
        if item.id is None:
            item.id = new_id("item")
        elif item.id in self._items:
            raise RequestError("duplicate_item_id", f"item {item.id!r} exists", "item.id")
        if previous is not None and previous != "root" and previous not in self._items:
            raise RequestError("item_not_found", f"no item {previous!r}", "previous_item_id")
        match item:
            case FunctionCallOutputItem(call_id=call_id):
                answered = self._calls.get(call_id)
                if answered is None:
                    raise RequestError(
                        "call_id_not_found", f"no function call has call_id {call_id!r}",
                        "item.call_id",
                    )  # fmt: skip
                if answered:
                    raise RequestError(
                        "function_call_already_answered",
                        f"the function call {call_id!r} already has its output",
                        "item.call_id",
                    )  # fmt: skip
                return {}
            case FunctionCallItem(call_id=call_id):
                if call_id in self._calls:
                    raise RequestError(
                        "duplicate_call_id", f"a function call {call_id!r} exists", "item.call_id"
                    )
                return {}
        pictures = dict(pictures)
        for i, part in enumerate(item.content):
            kind = type(part).__struct_config__.tag
            if kind not in _ALLOWED[item.role]:
                raise RequestError(
                    "invalid_content", f"a {item.role} item cannot hold {kind} content",
                    f"item.content[{i}].type",
                )  # fmt: skip
            if isinstance(part, InputImage) and i not in pictures:
                try:
                    data = images.decode_data_url(part.image_url)
                    pictures[i] = await images.load_async(data, self.image_limits)
                except ImageError as exc:
                    raise RequestError(exc.code, str(exc), f"item.content[{i}].image_url") from None
                # Kept downscaled, once: what the model sees and what a retrieve returns.
                part.image_url = pictures[i].data_url
        return pictures

    async def upload(self, upload_id: str) -> tuple[MessageItem, Picture, int]:
        """A finished chunked upload as a new (not yet added) user item, its picture, its size."""
        try:
            raw = self.uploads.commit(upload_id)
            picture = await images.load_async(raw, self.image_limits)
        except ImageError as exc:
            raise RequestError(exc.code, str(exc), "upload_id") from None
        item = MessageItem(role="user", content=[InputImage(image_url=picture.data_url)])
        return item, picture, len(raw)

    def chunk(self, upload_id: str, index: int, total: int, data: str) -> None:
        try:
            self.uploads.chunk(upload_id, index, total, data)
        except ImageError as exc:
            raise RequestError(exc.code, str(exc), "upload_id") from None

    # -- pictures ----------------------------------------------------------------------------

    def see(self, picture: Picture) -> None:
        """A frame sampled from the caller's camera: the newest picture."""
        self._camera = picture

    @property
    def camera_seen(self) -> bool:
        """Whether the last of ``pictures()`` is a frame of the caller's camera."""
        return self._camera is not None

    def pictures(self) -> list[Picture]:
        """The pictures the model may look at, oldest first."""
        kept = list(self._pictures.values())
        return [*kept, self._camera] if self._camera is not None else kept

    def remember(self, item: Item, picture: Picture) -> None:
        """Keep the latest pictures; older ones leave the conversation to bound memory."""
        assert item.id is not None
        self._camera = None  # an uploaded picture is newer than the last camera frame
        self._pictures[item.id] = picture
        while len(self._pictures) > self._history:
            old_id, _ = self._pictures.popitem(last=False)
            old = self._items.get(old_id)
            if isinstance(old, MessageItem):
                old.content = [p for p in old.content if not isinstance(p, InputImage)]


def wire(item: Item) -> Item:
    """``item`` as events carry it: images by reference, not their bytes.

    A picture can be larger than one data-channel message; the client has it already, and the
    server keeps it (downscaled) for the model.
    """
    if not isinstance(item, MessageItem) or not any(
        isinstance(part, InputImage) for part in item.content
    ):
        return item
    content: list[ContentPart] = [
        msgspec.structs.replace(part, image_url=f"s2s:image/{item.id}/{i}")
        if isinstance(part, InputImage)
        else part
        for i, part in enumerate(item.content)
    ]
    return msgspec.structs.replace(item, content=content)

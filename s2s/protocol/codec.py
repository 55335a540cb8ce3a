"""JSON on the data channel: one decoder for every client event, one encoder for server events.

A message that cannot be taken raises ``EventError``, whose detail names the bad event and path.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from s2s.protocol.client_events import AnyClientEvent
from s2s.protocol.server_events import ErrorDetail, ServerEvent

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


def utf8_size(text: bytes | str) -> int:
    """The size of a message in bytes, as limits count it: ``len`` of a str counts characters,
    and a client could send four times the limit in 4-byte characters."""
    if isinstance(text, bytes) or text.isascii():  # isascii() is a flag read on CPython: O(1)
        return len(text)
    return len(text.encode())


def decode_client_event(raw: bytes | str, *, max_bytes: int) -> AnyClientEvent:
    """Decode one data-channel message, or raise ``EventError`` saying what is wrong with it."""
    size = utf8_size(raw)
    if size > max_bytes:
        raise EventError(
            "message_too_large", f"event of {size} bytes exceeds the limit of {max_bytes}"
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
    except RecursionError:  # msgspec's answer to JSON nested too deep
        raise EventError("invalid_json", "message is nested too deeply") from None


def _peek_header(raw: bytes | str) -> _Header:
    try:
        return msgspec.json.decode(raw, type=_Header)
    except (msgspec.DecodeError, RecursionError):
        return _Header()


def encode_event(event: ServerEvent) -> str:
    return _encoder.encode(event).decode()

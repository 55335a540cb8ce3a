"""Logging with the call id on every line."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(call_id)s] %(message)s"


class CallLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger whose records carry ``call_id`` for the formatter."""

    def __init__(self, logger: logging.Logger, call_id: str) -> None:
        super().__init__(logger, {"call_id": call_id})

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs.setdefault("extra", {}).update(self.extra or {})
        return msg, kwargs


class _DefaultCallId(logging.Filter):
    # Lines logged outside a call (start-up, HTTP errors) still format cleanly.
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "call_id"):
            record.call_id = "-"
        return True


def configure(level: str) -> None:
    """Send every log line to stderr in the s2s format, at ``level``."""
    handler = logging.StreamHandler()
    handler.addFilter(_DefaultCallId())
    handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aioice and aiortc are chatty at INFO about every candidate pair.
    for name in ("aioice", "aiortc"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))

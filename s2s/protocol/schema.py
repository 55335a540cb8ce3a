"""The JSON schema of every event, exported as ``docs/events.schema.json``."""

from __future__ import annotations

import inspect
from typing import Any

import msgspec

from s2s.protocol.client_events import AnyClientEvent
from s2s.protocol.server_events import AnyServerEvent


def json_schema() -> dict[str, Any]:
    """The JSON schema of every client and server event (``docs/events.schema.json``)."""
    (client, server), components = msgspec.json.schema_components(
        [AnyClientEvent, AnyServerEvent], ref_template="#/$defs/{name}"
    )
    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "s2s data-channel events (OpenAI Realtime GA + s2s.* extensions)",
        "$defs": components,
        "properties": {"client_event": client, "server_event": server},
    }
    cleaned: dict[str, Any] = _clean_descriptions(schema)
    return cleaned


def _clean_descriptions(node: Any) -> Any:
    """Docstrings as ``inspect.cleandoc`` reads them: msgspec 0.23 started dedenting them and
    0.22 did not, so the exported file would otherwise depend on the installed version."""
    if isinstance(node, dict):
        return {
            key: inspect.cleandoc(value)
            if key == "description" and isinstance(value, str)
            else _clean_descriptions(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_clean_descriptions(item) for item in node]
    return node

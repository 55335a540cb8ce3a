"""Check events against the exported ``docs/events.schema.json``: a small validator for the
subset of JSON schema msgspec writes (``$ref``, ``anyOf``, ``enum``, ``type``, ``properties``,
``required``, ``items``, ``additionalProperties``, bounds), strict about unknown fields."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "docs" / "events.schema.json"
_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "integer": (int,),
    "number": (int, float), "boolean": (bool,), "null": (type(None),),
}  # fmt: skip


@cache
def _schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_FILE.read_text())
    return loaded


def schema_problems(event: dict[str, Any], side: str = "server_event") -> list[str]:
    """What in ``event`` the exported schema does not allow (empty when it is valid)."""
    return _problems(event, _schema()["properties"][side], "$")


def _problems(value: Any, node: dict[str, Any], path: str) -> list[str]:
    if "$ref" in node:
        return _problems(value, _schema()["$defs"][node["$ref"].rsplit("/", 1)[1]], path)
    if "anyOf" in node:
        options = [_problems(value, option, path) for option in node["anyOf"]]
        if any(not found for found in options):
            return []
        return [f"{path}: matches none of its options ({min(options, key=len)[0]})"]
    if "enum" in node and value not in node["enum"]:
        return [f"{path}: {value!r} is not one of {node['enum']}"]
    kind = node.get("type")
    if kind is not None:
        allowed = _TYPES[kind]
        if not isinstance(value, allowed) or (kind in ("integer", "number") and value is True):
            return [f"{path}: {value!r} is not {kind}"]
    problems: list[str] = []
    if isinstance(value, dict) and "properties" in node:
        props = node["properties"]
        problems += [f"{path}: missing {k}" for k in node.get("required", []) if k not in value]
        for key, item in value.items():
            if key in props:
                problems += _problems(item, props[key], f"{path}.{key}")
            elif node.get("additionalProperties") is False or kind == "object":
                problems.append(f"{path}: unexpected field {key!r}")
    if isinstance(value, list) and "items" in node:
        for i, item in enumerate(value):
            problems += _problems(item, node["items"], f"{path}[{i}]")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in node and value < node["minimum"]:
            problems.append(f"{path}: {value} < {node['minimum']}")
        if "maximum" in node and value > node["maximum"]:
            problems.append(f"{path}: {value} > {node['maximum']}")
    return problems

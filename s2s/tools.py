"""Function tools: checking their definitions, choosing what a response may call, and reading the
tool calls out of a text model's output (the ``<tool_call>`` JSON blocks Qwen models write).

Pure: no I/O. Any backend may use ``tools_prompt`` and ``split_tool_calls``; ``Realtime`` uses
``check_tools`` and ``allowed_tools``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from msgspec import UnsetType

from s2s.protocol.items import FunctionCallOutputItem, Item
from s2s.protocol.session_config import FunctionTool, ToolChoice, ToolChoiceFunction

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
# Keywords whose value is one schema, a list of schemas, or a map of name to schema.
_ONE = ("items", "not", "if", "then", "else", "contains", "additionalProperties")
_MANY = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions")
#: How deep a tool's parameters may nest (a JSON schema needs a few levels, never hundreds).
MAX_NESTING = 64
_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


class ToolError(ValueError):
    """A tool definition or tool choice that cannot be used; ``param`` names where it is."""

    def __init__(self, code: str, message: str, param: str) -> None:
        super().__init__(message)
        self.code, self.param = code, param


def check_tools(tools: list[FunctionTool], choice: ToolChoice, where: str) -> None:
    """Raise ``ToolError`` unless every tool has a usable name and a JSON-schema object as its
    ``parameters``, names are unique, and a named ``choice`` names one of them.

    ``where`` prefixes the error's ``param`` (``"session"`` or ``"response"``).
    """
    names: set[str] = set()
    for i, tool in enumerate(tools):
        at = f"{where}.tools[{i}]"
        if not _NAME_RE.match(tool.name):
            raise ToolError(
                "invalid_tool", f"tool name {tool.name!r} must be 1-64 letters, digits, _ or -",
                f"{at}.name",
            )  # fmt: skip
        if tool.name in names:
            raise ToolError("invalid_tool", f"two tools are named {tool.name!r}", f"{at}.name")
        names.add(tool.name)
        problem = _parameters_problem(tool.parameters)
        if problem is not None:
            raise ToolError(
                "invalid_tool_schema", f"tool {tool.name!r}: {problem}", f"{at}.parameters"
            )
    if isinstance(choice, ToolChoiceFunction) and choice.name not in names:
        raise ToolError(
            "invalid_tool_choice", f"tool_choice names {choice.name!r}, which is not a tool",
            f"{where}.tool_choice",
        )  # fmt: skip


def take_tools(
    tools: list[FunctionTool] | UnsetType,
    choice: ToolChoice | UnsetType,
    current: tuple[list[FunctionTool], ToolChoice],
    where: str,
) -> tuple[list[FunctionTool], ToolChoice]:
    """The tools and choice in force once an update or a response sets ``tools`` and/or
    ``choice`` over ``current``; ``ToolError`` if they cannot be used together."""
    if isinstance(tools, UnsetType) and isinstance(choice, UnsetType):
        return current
    taken = current[0] if isinstance(tools, UnsetType) else tools
    chosen = current[1] if isinstance(choice, UnsetType) else choice
    check_tools(taken, chosen, where)
    return taken, chosen


def allowed_tools(tools: list[FunctionTool], choice: ToolChoice) -> tuple[list[FunctionTool], bool]:
    """The tools a response may call under ``choice``, and whether it must call one."""
    if choice == "none":
        return [], False
    if isinstance(choice, ToolChoiceFunction):
        return [t for t in tools if t.name == choice.name], True
    return list(tools), choice == "required" and bool(tools)


def _parameters_problem(schema: dict[str, Any]) -> str | None:
    if not schema:
        return None  # no parameters
    if schema.get("type") != "object":
        return 'parameters must be a JSON schema with "type": "object"'
    if _nesting(schema) > MAX_NESTING:
        # Deeper, and encoding the session (in every event that shows it) would overflow the
        # stack, ending the call.
        return f"parameters nest more than {MAX_NESTING} levels deep"
    return _schema_problem(schema, "parameters")


def _nesting(value: Any) -> int:
    """How many objects and arrays deep ``value`` goes (without recursing: it may go deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = (
            node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        )
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_NESTING:  # past the limit, how much deeper does not matter
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _schema_problem(node: Any, path: str) -> str | None:
    """What is structurally wrong with the JSON schema ``node`` (None if nothing we can see)."""
    if isinstance(node, bool):
        return None
    if not isinstance(node, dict):
        return f"{path} must be a JSON schema (an object), not {type(node).__name__}"
    kind = node.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    for k in kinds:
        if k not in _JSON_TYPES:
            return f"{path}.type {k!r} is not a JSON schema type"
    required = node.get("required")
    if required is not None and not (
        isinstance(required, list) and all(isinstance(r, str) for r in required)
    ):
        return f"{path}.required must be a list of property names"
    if "enum" in node and not isinstance(node["enum"], list):
        return f"{path}.enum must be a list"
    for key in ("description", "title"):
        if key in node and not isinstance(node[key], str):
            return f"{path}.{key} must be a string"
    for key in _ONE:
        if key in node and (problem := _schema_problem(node[key], f"{path}.{key}")):
            return problem
    for key in _MANY:
        if key in node:
            if not isinstance(node[key], list):
                return f"{path}.{key} must be a list of schemas"
            for i, sub in enumerate(node[key]):
                if problem := _schema_problem(sub, f"{path}.{key}[{i}]"):
                    return problem
    for key in _MAP:
        if key in node:
            if not isinstance(node[key], dict):
                return f"{path}.{key} must map names to schemas"
            for name, sub in node[key].items():
                if problem := _schema_problem(sub, f"{path}.{key}.{name}"):
                    return problem
    return None


# -- text models -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made: the tool's name and its arguments as a JSON object string."""

    name: str
    arguments: str


def tools_prompt(tools: list[FunctionTool], required: bool) -> str:
    """System-prompt text that offers ``tools`` in the ``<tool_call>`` format Qwen models learnt."""
    if not tools:
        return ""
    signatures = "\n".join(
        json.dumps({"type": "function", "function": _signature(t)}) for t in tools
    )
    must = "You must call one of them." if required else "Call one only when it helps."
    return (
        f"\n\n# Tools\n\nThese functions are available to you. {must}\n<tools>\n{signatures}\n"
        "</tools>\n\nTo call one, answer with only a JSON object holding its name and its "
        'arguments inside tool-call tags:\n<tool_call>\n{"name": "NAME", "arguments": {}}\n'
        "</tool_call>"
    )


def _signature(tool: FunctionTool) -> dict[str, Any]:
    return {"name": tool.name, "description": tool.description, "parameters": tool.parameters}


def split_tool_calls(text: str, tools: list[FunctionTool]) -> tuple[str, list[ToolCall]]:
    """The words to speak and the tool calls in a model's ``text``.

    A ``<tool_call>`` block is a call when it holds a JSON object with the ``name`` of one of
    ``tools`` and object ``arguments`` (or none); anything else (bad JSON, an unknown name, a
    block left open) stays in the spoken text, so a malformed call is heard, never lost.
    """
    names = {t.name for t in tools}
    calls: list[ToolCall] = []
    spoken: list[str] = []
    at = 0
    for match in _CALL_RE.finditer(text):
        call = _read_call(match.group(1), names)
        if call is None:
            continue
        spoken.append(text[at : match.start()])
        at = match.end()
        calls.append(call)
    if not calls:
        return text, []
    spoken.append(text[at:])
    return " ".join(part.strip() for part in spoken if part.strip()), calls


def _read_call(body: str, names: set[str]) -> ToolCall | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("name") not in names:
        return None
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # some checkpoints write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name=str(data["name"]), arguments=json.dumps(arguments))


def tool_response(conversation: list[Item]) -> str | None:
    """The tool output the conversation ends with, as a ``<tool_response>`` block for the user
    turn of a Qwen prompt; None when the latest item is not a tool's output."""
    latest = conversation[-1] if conversation else None
    if not isinstance(latest, FunctionCallOutputItem):
        return None
    return f"<tool_response>\n{latest.output}\n</tool_response>"

"""Tool definitions checked, and tool calls read out of a text model's reply: the Qwen-Omni path
with the tiny checkpoint's real tokenizer; the ``local`` model's documented rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from s2s.backends import ResponseFinished, ResponseRequest, ToolCalled
from s2s.backends.local_policy import reply, tool_call
from s2s.backends.qwen_omni import reply_steps
from s2s.protocol.items import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputText,
    Item,
    MessageItem,
)
from s2s.protocol.session_config import FunctionTool, ToolChoiceFunction
from s2s.tools import ToolError, check_tools, split_tool_calls, tool_response, tools_prompt

WEATHER = FunctionTool(
    name="get_weather",
    parameters={"type": "object", "properties": {"units": {"type": "string"},
                "city": {"type": "string"}}, "required": ["city"]},
)  # fmt: skip
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer(tiny_models: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models / "tiny-qwen-omni", local_files_only=True)


def as_generated(tokenizer: Any, text: str) -> str:
    """``text`` as the backend reads it back from generated ids."""
    ids = tokenizer(text)["input_ids"]
    return str(tokenizer.decode(ids, skip_special_tokens=True))


def request(conversation: list[Item] | None = None) -> ResponseRequest:
    return ResponseRequest(
        response_id="resp_1", instructions="", voice="alloy", speed=1.0, modalities=["audio"],
        conversation=conversation or [], tools=[WEATHER],
    )  # fmt: skip


def test_a_tool_call_in_qwen_output_becomes_a_call_not_speech(tokenizer: Any) -> None:
    text = as_generated(tokenizer, "Let me look.\n" + CALL)
    speech = np.ones(24_000, np.int16)
    steps = reply_steps(request(), text, speech)
    assert [s.text for s in steps] == ["Let me look.", ""]
    assert all(s.audio.size == 0 for s in steps)  # the speech said the JSON aloud: not played
    assert steps[-1].events == [
        ToolCalled("resp_1", "get_weather", json.dumps({"city": "Paris"})),
        ResponseFinished("resp_1"),
    ]


@pytest.mark.parametrize(
    "bad",
    [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>',  # cut JSON
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',  # not a tool
        '<tool_call>{"name": "get_weather", "arguments": ["Paris"]}</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}',  # never closed
    ],
)
def test_malformed_tool_call_text_is_spoken(tokenizer: Any, bad: str) -> None:
    text = as_generated(tokenizer, "Well. " + bad)
    speech = np.ones(24_000, np.int16)
    steps = reply_steps(request(), text, speech)
    assert steps[0].text == text and "get_" in text
    assert sum(s.audio.size for s in steps) == speech.size
    assert not any(isinstance(e, ToolCalled) for s in steps for e in s.events)


def test_two_calls_and_words_between_them() -> None:
    paris = CALL
    oslo = CALL.replace("Paris", "Oslo")
    spoken, calls = split_tool_calls(f"First {paris} then {oslo} done.", [WEATHER])
    assert spoken == "First then done."
    assert [json.loads(c.arguments)["city"] for c in calls] == ["Paris", "Oslo"]
    assert split_tool_calls("no call here\n", [WEATHER]) == ("no call here\n", [])


def test_the_prompt_offers_the_tools_and_a_tool_output_is_the_next_turn() -> None:
    prompt = tools_prompt([WEATHER], required=True)
    assert '"name": "get_weather"' in prompt and "<tool_call>" in prompt and "must" in prompt
    assert tools_prompt([], required=False) == ""
    call = FunctionCallItem(id="i1", call_id="c1", name="get_weather", arguments="{}")
    output = FunctionCallOutputItem(id="i2", call_id="c1", output="sunny")
    assert tool_response([call, output]) == "<tool_response>\nsunny\n</tool_response>"
    assert tool_response([call]) is None


@pytest.mark.parametrize(
    ("parameters", "problem"),
    [
        ({"type": "array"}, '"type": "object"'),
        ({"type": "object", "properties": {"a": {"type": "text"}}}, "not a JSON schema type"),
        ({"type": "object", "properties": []}, "must map names to schemas"),
        ({"type": "object", "required": "a"}, "list of property names"),
        ({"type": "object", "properties": {"a": {"anyOf": {"type": "string"}}}}, "list"),
        ({"type": "object", "properties": {"a": {"items": 3}}}, "must be a JSON schema"),
    ],
)
def test_bad_parameter_schemas_are_named(parameters: dict[str, Any], problem: str) -> None:
    with pytest.raises(ToolError) as caught:
        check_tools([FunctionTool(name="f", parameters=parameters)], "auto", "session")
    assert problem in str(caught.value) and caught.value.code == "invalid_tool_schema"


def _nested(key: str, depth: int) -> Any:
    node: Any = {"type": "string"} if key == "items" else 1
    for _ in range(depth):
        node = {"items": node} if key == "items" else [node]
    return node


@pytest.mark.parametrize("key", ["items", "default"])
def test_parameters_nested_hundreds_deep_are_refused(key: str) -> None:
    """Schemas (or values in them) nested 900 deep get past the JSON decoder; encoding the
    session with them overflowed the stack and ended the call. 64 levels are allowed."""
    deep = {"type": "object", "properties": {"a": {key: _nested(key, 900)}}}
    with pytest.raises(ToolError) as caught:
        check_tools([FunctionTool(name="f", parameters=deep)], "auto", "session")
    assert "64 levels" in str(caught.value) and caught.value.code == "invalid_tool_schema"
    fine = {"type": "object", "properties": {"a": {key: _nested(key, 60)}}}
    check_tools([FunctionTool(name="f", parameters=fine)], "auto", "session")


def test_good_schemas_pass() -> None:
    nested = {"type": "object", "properties": {"a": {"type": ["string", "null"]},
              "b": {"type": "array", "items": {"anyOf": [True, {"enum": [1, 2]}]}}},
              "additionalProperties": False, "required": ["a"]}  # fmt: skip
    check_tools([FunctionTool(name="f", parameters=nested), FunctionTool(name="g")],
                ToolChoiceFunction(name="g"), "session")  # fmt: skip


def test_local_rule_fills_the_first_required_string_with_the_words_after_the_name() -> None:
    assert tool_call("get weather Paris", [WEATHER], False) is not None
    found = tool_call("could you GET WEATHER new york, thanks", [WEATHER], False)
    assert found is not None and json.loads(found.arguments) == {"city": "new york"}
    assert tool_call("the weather in Paris", [WEATHER], False) is None
    forced = tool_call("Lima", [WEATHER], True)
    assert forced is not None and json.loads(forced.arguments) == {"city": "Lima"}
    bare = tool_call("get weather", [WEATHER], False)
    assert bare is not None and bare.arguments == "{}"
    # After the tool's output, it speaks the output; after its own words, it calls nothing.
    user = MessageItem(id="u", role="user", content=[InputText(text="get weather Paris")])
    call = FunctionCallItem(id="c", call_id="call_1", name="get_weather", arguments="{}")
    output = FunctionCallOutputItem(id="o", call_id="call_1", output="sunny, 21 degrees")
    assert reply([user], "", "client", tools=[WEATHER]).tool_call is not None
    spoken = reply([user, call, output], "", "client", tools=[WEATHER])
    assert spoken.tool_call is None and spoken.text == "sunny, 21 degrees"
    # Words an app forces with instructions win over a tool call.
    forced_words = reply([user], 'Say "one moment"', "client", tools=[WEATHER])
    assert forced_words.tool_call is None and forced_words.text == "one moment"

"""Function tools over real calls: the ``local`` model calls a tool it hears named, the caller or
an attached app backend answers, and the model speaks the answer; errors for bad tools and bad
answers; event order and shapes checked against the exported schema."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from s2s.client import Sideband, attach
from tests.conftest import Server, StartServer
from tests.peer import CallRefused, MicTrack, Peer
from tests.schema import schema_problems
from tests.stock_client import stock_client_parses_every_event, watch  # noqa: F401

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "units": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
TIME = {"type": "function", "name": "current_time", "parameters": {"type": "object"}}
# The events of a response that only calls a tool, in the order OpenAI sends them.
CALL_ORDER = [
    "response.created", "response.output_item.added", "conversation.item.added",
    "response.function_call_arguments.delta", "response.function_call_arguments.done",
    "response.output_item.done", "conversation.item.done", "response.done",
]  # fmt: skip


@pytest.fixture
async def local(start_server: StartServer) -> Server:
    return await start_server(model="local")


pytestmark = pytest.mark.usefixtures("stock_client_parses_every_event")


async def call(server: Server, **session: Any) -> Peer:
    peer = watch(Peer(server.url, MicTrack(), session={"type": "realtime", **session}))
    await peer.connect()
    await peer.next_event("session.created")
    return peer


def type_text(peer: Peer, text: str, **response: Any) -> int:
    """The caller types ``text`` and asks for a response; returns the event mark before it."""
    mark = len(peer.events)
    peer.send({"type": "conversation.item.create",
               "item": {"type": "message", "role": "user",
                        "content": [{"type": "input_text", "text": text}]}})  # fmt: skip
    peer.send({"type": "response.create", "response": response})
    return mark


def answer(call_id: str, output: str, event_id: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "conversation.item.create",
        "item": {"type": "function_call_output", "call_id": call_id, "output": output},
    }
    if event_id is not None:
        event["event_id"] = event_id
    return event


def response_events(peer: Peer, mark: int) -> list[dict[str, Any]]:
    """The events from ``mark`` to the first ``response.done``, without the caller's items."""
    out: list[dict[str, Any]] = []
    for event in peer.events[mark:]:
        if event["type"] == "response.created" or out:
            out.append(event)
        if event["type"] == "response.done":
            break
    return out


def assert_schema(events: list[dict[str, Any]]) -> None:
    for event in events:
        assert schema_problems(event) == [], event


async def test_local_model_calls_the_tool_it_hears_and_speaks_its_output(local: Server) -> None:
    peer = await call(local, tools=[WEATHER, TIME])
    try:
        mark = type_text(peer, "Get weather Paris, please.")
        done = await peer.next_event("response.done", after=mark, timeout=20)
        events = response_events(peer, mark)
        assert [e["type"] for e in events] == CALL_ORDER
        assert_schema(peer.events)
        added, item_added, delta, args_done, item_done = events[1:6]
        assert added["item"]["type"] == "function_call"
        assert added["item"]["status"] == "in_progress" and added["item"]["arguments"] == ""
        assert item_added["item"]["id"] == added["item"]["id"]
        call_id = args_done["call_id"]
        assert args_done["name"] == "get_weather"
        assert json.loads(args_done["arguments"]) == {"city": "Paris"} == json.loads(delta["delta"])
        assert item_done["item"]["status"] == "completed"
        assert item_done["item"]["arguments"] == args_done["arguments"]
        assert done["response"]["status"] == "completed"
        (output,) = done["response"]["output"]
        assert output == item_done["item"] and output["call_id"] == call_id
        peer.send({"type": "conversation.item.retrieve", "item_id": output["id"]})
        kept = (await peer.next_event("conversation.item.retrieved"))["item"]
        assert kept == output  # the conversation holds the finished call

        # The output, then a response: the model speaks it.
        mark = len(peer.events)
        peer.send(answer(call_id, "sunny, 21 degrees"))
        peer.send({"type": "response.create"})
        done = await peer.next_event("response.done", after=mark, timeout=20)
        (message,) = done["response"]["output"]
        assert message["type"] == "message"
        assert message["content"][0]["transcript"] == "sunny, 21 degrees"
        stored = await peer.next_event("conversation.item.done", after=mark)
        assert stored["item"]["type"] == "function_call_output"
        assert stored["item"]["call_id"] == call_id
        assert_schema(peer.events)

        # A second answer, and an answer to no call: errors, and the call goes on.
        for event_id, target, code in [
            ("evt_dup", call_id, "function_call_already_answered"),
            ("evt_none", "call_nope", "call_id_not_found"),
        ]:
            mark = len(peer.events)
            peer.send(answer(target, "rainy", event_id))
            error = (await peer.next_event("error", after=mark))["error"]
            assert (error["code"], error["event_id"], error["param"]) == (
                code, event_id, "item.call_id",
            )  # fmt: skip
        # Words that name no tool get a spoken answer as before.
        mark = type_text(peer, "say hello")
        done = await peer.next_event("response.done", after=mark, timeout=20)
        assert done["response"]["output"][0]["content"][0]["transcript"] == "hello"
    finally:
        await peer.close()


async def test_tool_choice_none_required_named_and_per_response(local: Server) -> None:
    peer = await call(local, tools=[WEATHER, TIME], tool_choice="none")
    try:
        # "none": the tool's name is just words.
        mark = type_text(peer, "get weather Paris")
        done = await peer.next_event("response.done", after=mark, timeout=20)
        assert done["response"]["output"][0]["type"] == "message"
        # Per response: "required" with no name heard calls the first tool with all the words.
        mark = type_text(peer, "Rome", tool_choice="required")
        done = await peer.next_event("response.done", after=mark, timeout=20)
        (called,) = done["response"]["output"]
        assert (called["name"], json.loads(called["arguments"])) == (
            "get_weather",
            {"city": "Rome"},
        )
        # A named function, from the session.
        named = {"type": "function", "name": "current_time"}
        peer.send({"type": "session.update", "session": {"tool_choice": named}})
        mark = type_text(peer, "get weather Oslo")
        done = await peer.next_event("response.done", after=mark, timeout=20)
        (called,) = done["response"]["output"]
        assert (called["name"], called["arguments"]) == ("current_time", "{}")
        # Per-response tools replace the session's for that response only.
        mark = type_text(peer, "get weather Oslo", tools=[WEATHER], tool_choice="auto")
        done = await peer.next_event("response.done", after=mark, timeout=20)
        (called,) = done["response"]["output"]
        assert json.loads(called["arguments"]) == {"city": "Oslo"}
        assert_schema(peer.events)
    finally:
        await peer.close()


async def test_bad_tool_definitions_get_errors_and_the_call_goes_on(local: Server) -> None:
    peer = await call(local)
    try:
        bad_schema = {**WEATHER, "parameters": {"type": "object", "properties": {"city": 5}}}
        not_object = {**WEATHER, "parameters": {"type": "string"}}
        bad_name = {**WEATHER, "name": "get weather"}
        cases: list[tuple[dict[str, Any], str, str]] = [
            ({"tools": [bad_schema]}, "invalid_tool_schema", "session.tools[0].parameters"),
            ({"tools": [not_object]}, "invalid_tool_schema", "session.tools[0].parameters"),
            ({"tools": [bad_name]}, "invalid_tool", "session.tools[0].name"),
            ({"tools": [WEATHER, WEATHER]}, "invalid_tool", "session.tools[1].name"),
            ({"tool_choice": {"type": "function", "name": "nope"}}, "invalid_tool_choice",
             "session.tool_choice"),
            ({"tools": [{"type": "mcp", "server_label": "x"}]}, "invalid_event",
             "session.tools[0].type"),
        ]  # fmt: skip
        for i, (session, code, param) in enumerate(cases):
            mark = len(peer.events)
            peer.send({"type": "session.update", "event_id": f"evt_{i}", "session": session})
            error = (await peer.next_event("error", after=mark))["error"]
            assert (error["code"], error["param"]) == (code, param), session
            assert error["event_id"] == f"evt_{i}" and error["message"]
        # A refused update changed nothing; a good one still applies.
        assert not any(e["type"] == "session.updated" for e in peer.events)
        peer.send({"type": "session.update", "session": {"tools": [WEATHER]}})
        updated = await peer.next_event("session.updated")
        assert updated["session"]["tools"] == [WEATHER]
        assert updated["session"]["tool_choice"] == "auto"
        mark = type_text(peer, "get weather Lima", tools=[bad_schema])
        error = (await peer.next_event("error", after=mark))["error"]
        assert error["param"] == "response.tools[0].parameters"
        assert not any(e["type"] == "response.created" for e in peer.events[mark:])
    finally:
        await peer.close()


@pytest.mark.parametrize("model", ["moshi", "echo"])
async def test_a_model_that_cannot_call_tools_says_so(
    start_server: StartServer, tiny_models: Path, model: str
) -> None:
    # Continuous models speak when they choose: they have no way to call a tool.
    spec = f"moshi:{tiny_models / 'tiny-moshi'}" if model == "moshi" else model
    peer = await call(await start_server(model=spec))
    try:
        peer.send({"type": "session.update", "event_id": "evt_t",
                   "session": {"tools": [WEATHER], "instructions": "Hi"}})  # fmt: skip
        error = (await peer.next_event("error", timeout=10))["error"]
        assert (error["code"], error["event_id"]) == ("tools_not_supported", "evt_t")
        assert model in error["message"]
        updated = (await peer.next_event("session.updated", timeout=10))["session"]
        assert updated["tools"] == [] and updated["instructions"] == "Hi"
    finally:
        await peer.close()


async def test_tools_in_the_offer_form_are_checked_too(server: Server) -> None:
    bad = {**WEATHER, "parameters": {"type": "object", "required": "city"}}
    for tools, code in [([bad], "invalid_tool_schema"), ([WEATHER], "tools_not_supported")]:
        peer = Peer(server.url, MicTrack(), session={"type": "realtime", "tools": tools})
        try:
            with pytest.raises(CallRefused) as refused:
                await peer.connect()
        finally:
            await peer.close()
        assert refused.value.status == 400
        assert json.loads(refused.value.body)["error"]["code"] == code
    assert len(server.registry) == 0
    # A client secret carries its session to the call: its tools are checked when it is minted.
    body = {"session": {"type": "realtime", "tool_choice": {"type": "function", "name": "x"}}}
    async with (
        aiohttp.ClientSession() as http,
        http.post(server.url + "/v1/realtime/client_secrets", json=body) as resp,
    ):
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_tool_choice"


async def _next(sideband: Sideband, type_: str) -> dict[str, Any]:
    async for event in sideband:
        if event["type"] == type_:
            return event
    raise AssertionError(f"the sideband closed before {type_}")


async def test_an_attached_app_backend_answers_a_tool_call_first(local: Server) -> None:
    peer = await call(local, tools=[WEATHER])
    assert peer.call_url is not None
    call_id = peer.call_url.rsplit("/", 1)[1]
    try:
        async with attach(local.url, call_id, None) as app:
            type_text(peer, "get weather Paris")
            # The app backend sees the call as the caller does, and answers it first.
            async with asyncio.timeout(20):
                item = (await _next(app, "response.output_item.done"))["item"]
            assert item["name"] == "get_weather"
            await app.send(answer(item["call_id"], "foggy, 9 degrees", "evt_app"))
            await app.send({"type": "response.create"})
            async with asyncio.timeout(20):
                await _next(app, "response.done")  # the response that called the tool
                done = await _next(app, "response.done")
            assert done["response"]["output"][0]["content"][0]["transcript"] == "foggy, 9 degrees"
            # The caller's late answer, and the app's own repeat, each get an error.
            mark = len(peer.events)
            peer.send(answer(item["call_id"], "sunny", "evt_caller"))
            error = (await peer.next_event("error", after=mark))["error"]
            assert (error["code"], error["event_id"]) == (
                "function_call_already_answered", "evt_caller",
            )  # fmt: skip
            await app.send(answer(item["call_id"], "foggy", "evt_again"))
            async with asyncio.timeout(5):
                while (event := await _next(app, "error"))["error"]["event_id"] != "evt_again":
                    pass
            assert event["error"]["code"] == "function_call_already_answered"
        outputs = [e["item"] for e in peer.events if e["type"] == "conversation.item.done"
                   and e["item"]["type"] == "function_call_output"]  # fmt: skip
        assert [o["output"] for o in outputs] == ["foggy, 9 degrees"]
    finally:
        await peer.close()

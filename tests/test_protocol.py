"""The event protocol as pure code: the schema file, the decoder under fuzzing, the policy."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s2s.backends import local_policy as policy
from s2s.protocol.codec import EventError, decode_client_event
from s2s.protocol.items import InputAudio, InputImage, InputText, MessageItem
from s2s.protocol.schema import json_schema

SCHEMA = Path(__file__).resolve().parent.parent / "docs" / "events.schema.json"


def test_exported_schema_is_current() -> None:
    current = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    assert SCHEMA.read_text() == current, "run: python -m s2s.protocol > docs/events.schema.json"


def test_schema_names_every_extension_event() -> None:
    text = SCHEMA.read_text()
    assert '"s2s.response.steer"' in text and '"s2s.response.steered"' in text


def test_truncation_is_a_session_setting_as_the_realtime_api_defines_it() -> None:
    """``session.update`` takes ``truncation`` (``auto``, ``disabled`` or a retention ratio with
    token limits), ``session.updated`` reports it, and a value outside the API's is an
    ``invalid_event`` naming the field."""
    import pytest

    from s2s.protocol.session_config import SessionConfig

    config = SessionConfig(id="sess_1", model="m")
    assert config.to_wire()["truncation"] == "auto"
    ratio = {"type": "retention_ratio", "retention_ratio": 0.5,
             "token_limits": {"post_instructions": 1000}}  # fmt: skip
    for truncation in ("disabled", ratio):
        raw = json.dumps({"type": "session.update", "session": {"truncation": truncation}})
        config.apply(decode_client_event(raw, max_bytes=10_000).session)  # type: ignore[union-attr]
        assert config.to_wire()["truncation"] == truncation
    for bad in ("sometimes", {**ratio, "retention_ratio": 1.5}):
        raw = json.dumps({"type": "session.update", "session": {"truncation": bad}})
        with pytest.raises(EventError) as caught:
            decode_client_event(raw, max_bytes=10_000)
        assert caught.value.detail.code == "invalid_event"
        assert "truncation" in caught.value.detail.message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
event_types = st.sampled_from([
    "session.update", "input_audio_buffer.commit", "conversation.item.create",
    "conversation.item.truncate", "response.create", "response.cancel", "s2s.response.steer",
    "no.such.event",
])  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_decoder_answers_any_bytes_with_an_event_or_an_event_error(raw: bytes) -> None:
    try:
        decode_client_event(raw, max_bytes=1000)
    except EventError as exc:
        assert exc.detail.code in {"invalid_json", "invalid_event", "unknown_event"}


def test_json_nested_too_deeply_is_an_event_error() -> None:
    """msgspec raises RecursionError, not a DecodeError, for deep nesting: it escaped and ended
    the call as internal_error."""
    deep = '{"type":"response.create","response":{"metadata":{"a":' + "[" * 5000 + "]" * 5000
    with pytest.raises(EventError) as exc:
        decode_client_event(deep + "}}}", max_bytes=100_000)
    assert exc.value.detail.code == "invalid_json"


def test_the_size_limit_counts_utf8_bytes_not_characters() -> None:
    """A str message of 4-byte characters is four times its ``len``: one of 300 emoji passed a
    1000-byte limit at 1,240 bytes (and 261k of them a 256 KiB limit at 1 MB)."""
    event = json.dumps({"type": "session.update", "session": {"instructions": "😀" * 300}},
                       ensure_ascii=False)  # fmt: skip
    assert len(event) < 1000 < len(event.encode())
    for raw in (event, event.encode()):
        with pytest.raises(EventError) as exc:
            decode_client_event(raw, max_bytes=1000)
        assert exc.value.detail.code == "message_too_large"
        assert f"of {len(event.encode())} bytes" in exc.value.detail.message
    decode_client_event(event, max_bytes=len(event.encode()))


@settings(max_examples=300, deadline=None)
@given(
    event_types,
    st.dictionaries(
        st.sampled_from(
            ["session", "item", "response", "item_id", "audio_end_ms", "event_id", "instructions"]
        ),
        json_values,
        max_size=4,
    ),
)
def test_decoder_on_event_shaped_json(event_type: str, fields: dict) -> None:
    raw = json.dumps({"type": event_type, **fields})
    try:
        event = decode_client_event(raw, max_bytes=100_000)
    except EventError as exc:
        assert exc.detail.message
        if event_type == "no.such.event":
            assert exc.detail.code == "unknown_event"
    else:
        assert type(event).__struct_config__.tag == event_type
        msgspec.json.encode(event)


def _user(part: InputText | InputAudio | InputImage) -> MessageItem:
    return MessageItem(id="item_1", role="user", content=[part])


def _png(rgb: tuple[int, int, int]) -> str:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (320, 240), rgb).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def test_policy_greets_repeats_and_says() -> None:
    assert policy.reply([], "", "client").text.startswith("Hello! I am Echo.")
    heard = policy.reply([_user(InputAudio(transcript="the weather is nice"))], "", "turn")
    assert heard.text == "I heard you say: the weather is nice."
    said = policy.reply([_user(InputText("please say one. two. three"))], "", "client")
    assert said.sentences == ["one.", "two.", "three"]
    assert policy.reply([_user(InputAudio(transcript=""))], "", "turn").text.startswith(
        "I did not catch that"
    )
    quoted = policy.reply([], 'Say "good night moon" and nothing else', "client")
    assert quoted.text == "good night moon"
    assert policy.reply([], "", "idle").text == "Are you still there?"


def test_policy_follows_simple_instructions() -> None:
    named = policy.reply([_user(InputText("what is your name?"))], "Your name is Nova.", "turn")
    assert named.text == "My name is Nova."
    french = policy.reply([_user(InputText("bonjour"))], "Please respond in French.", "turn")
    assert french.text.startswith("Je vous ai entendu dire") and french.style.voice("alloy") == "fr"
    honest = policy.reply([_user(InputText("why is the sky blue?"))], "", "turn")
    assert "cannot answer questions" in honest.text


def test_policy_describes_the_latest_picture_or_says_it_has_none() -> None:
    question = _user(InputText("what am I looking at?"))
    assert "no picture" in policy.reply([question], "", "turn").text
    pictures = [_user(InputImage(image_url=_png((10, 30, 220)))),
                _user(InputImage(image_url=_png((220, 20, 20))))]  # fmt: skip
    answer = policy.reply([*pictures, question], "", "turn").text
    assert "320 by 240" in answer and "mostly red" in answer

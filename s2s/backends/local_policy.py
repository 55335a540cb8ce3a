"""The local model's dialogue policy: small, deterministic and honest about what it cannot do.

It greets, repeats back what it heard, says what it is told to say, describes the latest picture
it was sent, follows simple instructions (a persona name, a language for its own phrases and
voice), calls a tool it hears named (see ``tool_call``) and speaks a tool's output, and says
plainly that it cannot do anything else. Pure: no audio, no I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from s2s.images import ImageError, ImageLimits, Picture, decode_data_url, load
from s2s.protocol.items import (
    FunctionCallOutputItem,
    InputAudio,
    InputImage,
    InputText,
    Item,
    MessageItem,
)
from s2s.protocol.session_config import FunctionTool
from s2s.tools import ToolCall

DEFAULT_NAME = "Echo"

# OpenAI voice names mapped onto espeak-ng voices and variants; other names are tried as espeak
# voice names (e.g. "en-gb", "fr") and fall back to American English.
VOICES = {
    "alloy": "en-us+f2", "ash": "en-us+m3", "ballad": "en-gb+m2", "coral": "en-us+f3",
    "echo": "en-us+m1", "sage": "en-gb+f3", "shimmer": "en-us+f4", "verse": "en-us+m4",
    "marin": "en-us+f1", "cedar": "en-us+m2",
}  # fmt: skip

_LANGUAGES = {
    "english": ("en-us", "I heard you say", "Hello! I am {name}."),
    "french": ("fr", "Je vous ai entendu dire", "Bonjour ! Je suis {name}."),
    "spanish": ("es", "Te escuché decir", "¡Hola! Soy {name}."),
    "german": ("de", "Ich habe gehört, du sagtest", "Hallo! Ich bin {name}."),
    "italian": ("it", "Ti ho sentito dire", "Ciao! Sono {name}."),
}
_LANGUAGE_RE = re.compile(
    r"\b(?:speak|respond|answer|reply|talk|use)\b[^.]*?\b(" + "|".join(_LANGUAGES) + r")\b", re.I
)
_NAME_RE = re.compile(
    r"\b(?:your name is|you are called|call yourself|you are)\s+([A-Z][\w-]+)", re.I
)
_QUOTED_RE = re.compile(r"\bsay\b[^\"“]*[\"“]([^\"”]+)[\"”]", re.I)
_SAY_RE = re.compile(r"^(?:please\s+)?(?:say|repeat after me)\b[\s:,]*(.+)$", re.I)
_LOOK_RE = re.compile(r"\b(looking at|what do you see|what is this|picture|image|see)\b", re.I)
_NAME_QUESTION_RE = re.compile(r"\byour name\b", re.I)
_GREETING_RE = re.compile(r"^\s*(hello|hi|hey|good (morning|afternoon|evening))\b", re.I)
_SENTENCE_RE = re.compile(r"[^.!?]+[.!?]*")


@dataclass(frozen=True, slots=True)
class Style:
    """What instructions set: the persona's name and the language of its own phrases."""

    name: str = DEFAULT_NAME
    language: str = "english"

    @classmethod
    def from_instructions(cls, instructions: str) -> Style:
        name = _NAME_RE.search(instructions)
        language = _LANGUAGE_RE.search(instructions)
        return cls(
            name=name.group(1) if name else DEFAULT_NAME,
            language=language.group(1).lower() if language else "english",
        )

    def voice(self, requested: str) -> str:
        if self.language != "english":
            return _LANGUAGES[self.language][0]
        return VOICES.get(requested, requested or "en-us")


@dataclass(slots=True)
class Reply:
    sentences: list[str] = field(default_factory=list)
    style: Style = field(default_factory=Style)
    tool_call: ToolCall | None = None  # set instead of sentences when the reply is a tool call

    @property
    def text(self) -> str:
        return " ".join(self.sentences)


def reply(
    conversation: list[Item],
    instructions: str,
    trigger: str,
    transcripts: dict[str, str] | None = None,
    pictures: list[Picture] | None = None,
    tools: list[FunctionTool] | None = None,
    tool_required: bool = False,
) -> Reply:
    """What to say (or which tool to call) next, given the conversation so far (``transcripts``:
    user audio items' transcripts the model knows before the conversation items carry them)."""
    style = Style.from_instructions(instructions)
    quoted = _QUOTED_RE.search(instructions)
    if quoted:  # words an app forces on a response win over everything else
        return Reply(split_sentences(quoted.group(1)), style)
    if trigger == "idle":
        return Reply(["Are you still there?"], style)
    latest = conversation[-1] if conversation else None
    if isinstance(latest, FunctionCallOutputItem):
        output = latest.output.strip()
        return Reply(split_sentences(output) or ["The tool returned nothing."], style)
    if tools and isinstance(latest, MessageItem) and latest.role == "user":
        call = tool_call(_last_user_text(conversation, transcripts or {}) or "", tools,
                         tool_required)  # fmt: skip
        if call is not None:
            return Reply(style=style, tool_call=call)
    heard = _last_user_text(conversation, transcripts or {})
    picture = pictures[-1].description if pictures else _latest_image(conversation)
    return Reply(split_sentences(_answer(heard, picture, style)), style)


def tool_call(heard: str, tools: list[FunctionTool], required: bool) -> ToolCall | None:
    """The call the caller's words ask for: the first tool whose name, ``_`` read as a space, is
    among the words (any case); its first required string parameter gets the words after the
    name, up to a punctuation mark ("get weather Paris, please" → ``get_weather({"city":
    "Paris"})``). With ``required`` and no name heard, the first tool is called with the words
    from the start."""
    for tool in tools:
        spoken_name = r"\s+".join(re.escape(w) for w in tool.name.replace("-", "_").split("_") if w)
        match = re.search(rf"\b{spoken_name}\b", heard, re.I) if spoken_name else None
        if match is not None:
            return _call(tool, heard[match.end() :])
    return _call(tools[0], heard) if required and tools else None


def _call(tool: FunctionTool, words: str) -> ToolCall:
    # The words up to the end of their clause: "Paris, please" fills in "Paris".
    words = re.split(r"[,.!?;:]", words.lstrip(" \t\n,.!?:;"), maxsplit=1)[0].strip()
    properties = tool.parameters.get("properties") or {}
    arguments: dict[str, str] = {}
    for name in tool.parameters.get("required") or []:
        if isinstance(properties.get(name), dict) and properties[name].get("type") == "string":
            if words:
                arguments[name] = words
            break
    return ToolCall(name=tool.name, arguments=json.dumps(arguments))


def restyle(sentences: list[str], old: Style, new: Style) -> list[str]:
    """Sentences not yet spoken, with the persona's name changed when instructions change."""
    if old.name == new.name:
        return sentences
    return [s.replace(old.name, new.name) for s in sentences]


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_RE.findall(text) if s.strip()]


def _answer(heard: str | None, picture: str | None, style: Style) -> str:
    _, heard_phrase, greeting = _LANGUAGES[style.language]
    greeting = greeting.format(name=style.name)
    if heard is None:
        return f"{greeting} I can repeat what you say and describe a picture you send me."
    text = heard.strip()
    if not text:
        return "I did not catch that. Could you say it again?"
    said = _SAY_RE.match(text)
    if said:
        return said.group(1)
    if _LOOK_RE.search(text):
        if picture is None:
            return "I have no picture yet. Send one from your camera and ask me again."
        return f"You are looking at {picture}."
    if _NAME_QUESTION_RE.search(text):
        return f"My name is {style.name}."
    if _GREETING_RE.match(text):
        return f"{greeting} I can repeat what you say and describe a picture you send me."
    if text.endswith("?") or text.lower().startswith(("what", "why", "how", "when", "who")):
        return (
            f"{heard_phrase}: {text}. I am a small offline voice, "
            "so I cannot answer questions; I can repeat what you say."
        )
    return f"{heard_phrase}: {text}."


def _last_user_text(conversation: list[Item], transcripts: dict[str, str]) -> str | None:
    for item in reversed(conversation):
        if not isinstance(item, MessageItem) or item.role != "user":
            continue
        for part in reversed(item.content):
            if isinstance(part, InputText):
                return part.text
            if isinstance(part, InputAudio):
                return part.transcript or transcripts.get(item.id or "", "")
    return None


def _latest_image(conversation: list[Item]) -> str | None:
    for item in reversed(conversation):
        if not isinstance(item, MessageItem):
            continue
        for part in reversed(item.content):
            if isinstance(part, InputImage):
                # Images were checked and downscaled on arrival; this decodes a small JPEG.
                try:
                    return load(decode_data_url(part.image_url), ImageLimits()).description
                except ImageError:
                    continue
    return None

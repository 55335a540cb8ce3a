"""What the Qwen3-Omni engine's tests share (``test_qwen3_omni.py``, ``test_omni_graphs.py``;
their fixtures ``model`` and ``pieces`` are in ``conftest.py``): prompts, a reply collected
step by step, and running an engine until it is done."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from s2s.omni.engine import OmniEngine
from s2s.omni.prompt import Message, build_inputs
from s2s.omni.request import GREEDY, Decoding, Request

MAX_TEXT = 8
QUESTIONS = ["what am I looking at", "say something nice please"]
MAX_FRAMES = 40
# generate() warns that its talker's repetition penalty sees only the new codes; that is what
# the engine mirrors, and pytest turns warnings into errors.
GENERATE_WARNING = "ignore:Passing `repetition_penalty` with `inputs_embeds`:UserWarning"


@dataclass
class Reply:
    text: list[int] = field(default_factory=list)
    codes: list[Tensor] = field(default_factory=list)
    audio: list[Tensor] = field(default_factory=list)
    first_audio_step: int | None = None
    steps: int = 0
    reason: str | None = None

    def waveform(self) -> Tensor:
        return torch.cat(self.audio)


def make_inputs(pieces: tuple[Any, Any, Any], kind: str, seed: int = 0) -> dict[str, Tensor]:
    rng = np.random.default_rng(seed)
    system = Message("system", "You are a helpful voice assistant.")
    if kind == "text":
        messages = [system, Message("user", "what is the weather today")]
    else:
        clip = (rng.standard_normal(16_000 + 4_000 * seed) * 0.1).astype(np.float32)
        picture = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
        messages = [
            system,
            Message("user", "hello there"),
            Message("assistant", "good morning"),
            Message("user", QUESTIONS[seed % len(QUESTIONS)], audio=[clip], images=[picture]),
        ]
    return build_inputs(*pieces, messages)


def make_request(inputs: dict[str, Tensor], decoding: Decoding = GREEDY) -> Request:
    return Request(inputs, max_text_tokens=MAX_TEXT, max_frames=MAX_FRAMES, decoding=decoding)


def run_engine(engine: OmniEngine, rows: dict[int, Reply], limit: int = 200) -> None:
    """Step ``engine`` until it has nothing left, collecting each row's output."""
    for _ in range(limit):
        if not engine.active:
            return
        for out in engine.step():
            reply = rows[out.row]
            reply.steps += 1
            reply.text += out.text
            if out.audio is not None and out.codes is not None:
                reply.codes.append(out.codes)
                reply.audio.append(out.audio)
                if reply.first_audio_step is None:
                    reply.first_audio_step = reply.steps
            if out.done:
                reply.reason = out.reason
    raise AssertionError(f"still generating after {limit} steps")


def run_alone(model: Any, request: Request) -> Reply:
    engine = OmniEngine(model, max_rows=1)
    reply = Reply()
    run_engine(engine, {engine.add(request): reply})
    return reply


def same_reply(a: Reply, b: Reply) -> None:
    assert a.text == b.text and len(a.codes) == len(b.codes) > 0
    assert all(torch.equal(x, y) for x, y in zip(a.codes, b.codes, strict=True))
    assert (a.waveform() - b.waveform()).abs().max() < 1e-4

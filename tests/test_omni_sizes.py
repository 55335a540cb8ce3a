"""Qwen3-Omni's real sizes (``scripts/omni_sizes.py``) and the random-weight bench model.

The real config is built on the ``meta`` device (shapes only, no memory): its parameter count
must stay near the published figures, so a mistyped size cannot pass for the real model. The
shrunk config, built with random weights as ``scripts/bench_omni.py`` builds it, must stream
finite audio through the engine.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

from s2s.omni.engine import OmniEngine
from s2s.omni.prompt import Message, Prompter
from s2s.omni.request import GREEDY, Request

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _script(name: str) -> ModuleType:
    """A module from ``scripts/`` (not a package); bench_omni imports its neighbours by name."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_real_config_has_the_published_parameter_count() -> None:
    sizes = _script("omni_sizes")
    with torch.device("meta"):
        model: Any = Qwen3OmniMoeForConditionalGeneration._from_config(  # type: ignore[no-untyped-call]
            sizes.real_config(), dtype=torch.bfloat16
        )
    # Hub: Qwen3-Omni-30B-A3B-Instruct, about 35 B parameters in all; the thinker's language
    # model with its head about 30.5 B (keras-hub's preset note).
    total = _count(model)
    language = _count(model.thinker.model.language_model) + _count(model.thinker.lm_head)
    assert 34.5e9 < total < 36.0e9, f"{total:,} parameters"
    assert 30.0e9 < language < 31.0e9, f"{language:,} in the thinker's language model"
    # The parts' shapes that set the cost of a step: 128 experts in both decoders, 16 codebooks.
    text = model.thinker.model.language_model
    assert len(text.layers) == 48 and text.layers[0].mlp.experts.gate_up_proj.shape == (
        128, 2 * 768, 2048,
    )  # fmt: skip
    assert len(model.talker.model.layers) == 20
    assert model.talker.model.layers[0].mlp.experts.gate_up_proj.shape == (128, 2 * 384, 1024)
    assert len(model.talker.code_predictor.lm_head) == 15
    assert len(model.thinker.model.audio_tower.layers) == 32
    assert len(model.thinker.model.visual.blocks) == 27


def test_a_shrunk_random_model_streams_finite_audio(tiny_models: Path) -> None:
    bench = _script("bench_omni")
    tokens = str(tiny_models / "tiny-qwen3-omni")
    model = bench.build_random("shrunk", tokens, "cpu", torch.float32)
    tiny: Any = Qwen3OmniMoeConfig.from_pretrained(tokens)
    assert model.config.im_end_token_id == tiny.im_end_token_id
    assert model.config.thinker_config.audio_token_id == tiny.thinker_config.audio_token_id
    for name, tensor in model.state_dict().items():
        assert tensor.isfinite().all(), name
    rng = np.random.default_rng(0)
    clip = (rng.standard_normal(16_000) * 0.1).astype(np.float32)
    picture = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    inputs = Prompter.from_pretrained(tokens).build(
        [Message("user", "what am I looking at", audio=[clip], images=[picture])]
    )
    request = Request(inputs, max_text_tokens=3, max_frames=4, decoding=GREEDY, fixed_length=True)
    engine = OmniEngine(model, max_rows=1)
    engine.add(request)
    text, audio = [], []
    for _ in range(10):
        if not engine.active:
            break
        for out in engine.step():
            text += out.text
            if out.audio is not None:
                audio.append(out.audio)
    assert not engine.active and len(text) == 3 and len(audio) == 3
    assert torch.cat(audio).isfinite().all()


def test_the_step_floor_counts_what_a_step_reads() -> None:
    """``scripts/omni_floor.py`` on the real config: one call reads its 8 experts a layer and
    the dense parts; many calls read every expert at most; the caches are read once, and the
    engine's attention moves them three times when few slots step, once per slot otherwise."""
    floor = _script("omni_floor")
    sizes = _script("omni_sizes")
    with torch.device("meta"):
        model: Any = Qwen3OmniMoeForConditionalGeneration._from_config(  # type: ignore[no-untyped-call]
            sizes.real_config(), dtype=torch.bfloat16
        )
    one, every = floor.step_bytes(model, 1, 0, 0), floor.step_bytes(model, 10_000, 0, 0)
    # A token picks 8 of the thinker's 128 experts a layer, 6 of the talker's 128.
    unread = 0.0
    for decoder, picked in ((model.thinker.model.language_model, 8), (model.talker.model, 6)):
        assert decoder.config.num_experts_per_tok == picked
        experts = sum(2 * _count(layer.mlp.experts) for layer in decoder.layers)
        unread += experts * (1 - picked / 128)
    assert abs((every.weights - one.weights) - unread) < 1e-4 * unread
    # The thinker's and talker's dense parts, its heads, 15 predictor passes, code2wav: 9.5 GB.
    assert 9.3e9 < one.weights < 9.7e9
    # 48 layers x 4 key heads x 128 x 2 bytes, keys and values; the talker's 20 x 2 x 128 x 2.
    per_call = floor.step_bytes(model, 1, 1000, 1000, slots=9)
    assert per_call.caches == 1000 * (48 * 4 * 128 * 2 * 2 + 20 * 2 * 128 * 2 * 2)
    assert per_call.moved == 3 * per_call.caches
    many = floor.step_bytes(model, 8, 1000, 1000, slots=9)
    assert many.moved == 9 * per_call.caches == 9 * many.caches // 8

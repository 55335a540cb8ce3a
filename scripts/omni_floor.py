#!/usr/bin/env python
"""The memory floor of a Qwen3-Omni decode step: the bytes it must read, over bandwidth.

A decode step at a few calls is bound by memory, not arithmetic: every weight it uses and every
cached key and value its calls attend to are read at least once. This counts those bytes for a
model (any size, random or loaded, or on the ``meta`` device for no memory at all) and N calls:

- the thinker's and the talker's layers but their experts, their output heads, the talker's
  text projection and code2wav, once per step (embeddings: one row per call, left out);
- the routed experts a step's tokens pick: with ``k`` of ``E`` experts per token, N tokens
  touch ``E * (1 - (1 - k / E) ** N)`` of them per layer on average (uniform routing; a
  trained router is less even, which touches fewer);
- the code predictor's layers once per codebook it fills (``num_code_groups - 1`` passes, one
  after another), and one of its heads per pass;
- each call's cached keys and values: the thinker's over its whole context, the talker's over
  its frames and prompt.

``moved`` is what the engine's attention moves of the caches instead (``SlotCache.decode``):
over every slot in place once a third of the slots step, else a copy of the stepping slots'
keys and values (read, written, read again).

    .venv/bin/python scripts/omni_floor.py          # the real size, on the meta device
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True, slots=True)
class StepBytes:
    """What one decode step of N calls reads, in bytes."""

    weights: int  # dense parts, routed experts and the code predictor's passes
    caches: int  # the calls' keys and values, each read once
    moved: int  # the caches as the engine's attention moves them

    def floor_ms(self, bandwidth_tbs: float) -> float:
        return 1000 * (self.weights + self.caches) / (bandwidth_tbs * 1e12)


def _bytes(module: Any, skip: tuple[Any, ...] = ()) -> int:
    ids = {id(p) for m in skip for p in m.parameters()}
    return sum(p.numel() * p.element_size() for p in module.parameters() if id(p) not in ids)


def _experts(model: Any) -> list[Any]:
    return [layer.mlp.experts for layer in model.layers if hasattr(layer.mlp, "experts")]


def _routed(model: Any, tokens: int) -> int:
    """Bytes of the experts ``tokens`` tokens are expected to touch, over every layer."""
    total = 0
    for experts in _experts(model):
        count, top_k = experts.num_experts, model.config.num_experts_per_tok
        touched = count * (1 - (1 - top_k / count) ** tokens)
        total += int(_bytes(experts) / count * touched)
    return total


def _per_position(model: Any) -> int:
    """Key and value bytes per position of a decoder's cache, over its layers."""
    attention = model.layers[0].self_attn
    element = attention.k_proj.weight.element_size()
    return 2 * len(model.layers) * attention.k_proj.out_features * element


def step_bytes(model: Any, calls: int, thinker_context: int, talker_context: int,
               slots: int | None = None) -> StepBytes:  # fmt: skip
    """The bytes a step of ``calls`` calls, all thinking and speaking, reads; each call has
    ``thinker_context`` and ``talker_context`` positions cached. ``slots``: the engine's
    (``max_rows + 1``; default ``calls + 1``), for ``moved``."""
    thinker, talker = model.thinker, model.talker
    text = thinker.model.language_model
    predictor = talker.code_predictor
    weights = _bytes(text, (text.embed_tokens, *_experts(text))) + _bytes(thinker.lm_head)
    weights += _routed(text, calls)
    body = talker.model
    weights += _bytes(body, (body.codec_embedding, *_experts(body)))
    weights += _bytes(talker.codec_head) + _bytes(talker.text_projection)
    weights += _routed(body, calls)
    passes = int(predictor.config.num_code_groups) - 1
    inner = predictor.model
    weights += passes * (_bytes(inner, (inner.codec_embedding,)) + _bytes(predictor.lm_head[0]))
    weights += _bytes(model.code2wav)
    per_call = thinker_context * _per_position(text) + talker_context * _per_position(body)
    slots = slots or calls + 1
    moved = slots * per_call if 3 * calls >= slots else 3 * calls * per_call
    return StepBytes(weights, calls * per_call, moved)


def main() -> None:
    import torch
    from omni_sizes import real_config

    from s2s.omni.model import prepare_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", default="1,4,8,16")
    parser.add_argument("--contexts", default="1024,8192", help="thinker positions per call")
    parser.add_argument("--bandwidth", type=float, default=4.3, help="TB/s (H200: ~4.3)")
    args = parser.parse_args()
    from transformers import Qwen3OmniMoeForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3OmniMoeForConditionalGeneration._from_config(
            real_config(), dtype=torch.bfloat16
        )
    model = prepare_model(model)
    print("Qwen3-Omni-30B-A3B, bf16: what one decode step reads (all calls think and speak; "
          f"floor at {args.bandwidth} TB/s)")  # fmt: skip
    print(f"{'calls':>5} {'context':>7} {'weights GB':>10} {'caches GB':>9} {'moved GB':>8} "
          f"{'floor ms':>8}")  # fmt: skip
    for context in [int(c) for c in args.contexts.split(",")]:
        for calls in [int(n) for n in args.calls.split(",")]:
            # The talker holds the user turns and the reply's frames: about the thinker's.
            count = step_bytes(model, calls, context, context)
            print(f"{calls:>5} {context:>7} {count.weights / 1e9:>10.2f} "
                  f"{count.caches / 1e9:>9.2f} {count.moved / 1e9:>8.2f} "
                  f"{count.floor_ms(args.bandwidth):>8.2f}")  # fmt: skip


if __name__ == "__main__":
    main()

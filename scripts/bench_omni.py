#!/usr/bin/env python
"""Time the streaming Qwen3-Omni engine (``s2s.omni``): first audio and step time per batch size.

    .venv/bin/python scripts/bench_omni.py --model models/tiny-qwen3-omni --calls 1,4,8

For each batch size N it adds N calls (each with a 2 s noise clip, a 640x480 picture and a short
question; prefills run one after another, as a worker would admit them), then steps until every
call is done. It prints, per N: the time from a call's admission to its first audio frame
(p50/p95), the mean step time, the real-time factor (step time over the 80 ms a step yields per
call; under 1 keeps up) and, on CUDA, peak memory.

With ``--beside-prompt TOKENS`` it then measures what a long turn does to calls that are
speaking: ``--beside-calls`` calls decode while one more call's prompt of about TOKENS tokens
(history, a clip and the picture) is prefilled, whole in one tick or in pieces of
``--prefill-tokens`` (one piece per tick, as the worker does); it prints the worst and median
tick (piece plus step: the gap between two frames of a speaking call), the first tick (whose
piece also runs the audio and vision encoders) and how many ticks the long call took to join.

Greedy decoding with the checkpoint's own end tokens, so reply lengths vary with the weights;
``--max-frames`` caps them. Not done here: building the real-size model with random weights
(``--random-size``), which needs Qwen3-Omni's real config values; pass a local checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import percentile

from s2s.omni.engine import GREEDY, OmniEngine, Request, load_model
from s2s.omni.prompt import Message, Prompter

FRAME_SECONDS = 0.08


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a local Qwen3-Omni checkpoint folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calls", default="1,4,8", help="batch sizes, comma-separated")
    parser.add_argument("--max-frames", type=int, default=40)
    parser.add_argument("--max-text", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--beside-prompt", type=int, default=0, help="long prompt tokens")
    parser.add_argument("--beside-calls", type=int, default=4)
    parser.add_argument("--prefill-tokens", default="512", help="piece sizes, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else None
    model = load_model(args.model, args.device, dtype)
    prompter = Prompter.from_pretrained(args.model)
    rng = np.random.default_rng(0)
    clip = (rng.standard_normal(32_000) * 0.1).astype(np.float32)
    picture = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
    messages = [
        Message("system", "You are a helpful voice assistant."),
        Message("user", "what am I looking at", audio=[clip], images=[picture]),
    ]
    inputs = prompter.build(messages)
    request = Request(
        inputs, max_text_tokens=args.max_text, max_frames=args.max_frames, decoding=GREEDY
    )
    print(f"{'calls':>5} {'first audio p50':>16} {'p95':>8} {'step ms':>8} {'RTF':>6} {'GiB':>6}")
    for calls in [int(n) for n in args.calls.split(",")]:
        engine = OmniEngine(model, max_rows=calls)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        admitted: dict[int, float] = {}
        first: dict[int, float] = {}
        for _ in range(calls):
            admitted[engine.add(request)] = time.perf_counter()
        steps: list[float] = []
        while engine.active:
            start = time.perf_counter()
            outs = engine.step()
            _sync(args.device)
            now = time.perf_counter()
            steps.append(now - start)
            for out in outs:
                if out.audio is not None and out.row not in first:
                    first[out.row] = now - admitted[out.row]
        latencies = [first[row] * 1000 for row in first]
        step_ms = 1000 * sum(steps) / max(len(steps), 1)
        memory = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else 0
        p50, p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
        rtf = step_ms / 1000 / FRAME_SECONDS
        print(f"{calls:>5} {p50:>14.0f}ms {p95:>6.0f}ms {step_ms:>8.1f} {rtf:>6.2f} {memory:>6.2f}")
    if args.beside_prompt:
        _prefill_beside(model, prompter, request, messages, args)


def _prefill_beside(model: Any, prompter: Prompter, request: Request,
                    messages: list[Message], args: argparse.Namespace) -> None:  # fmt: skip
    """Tick times of speaking calls while a long prompt is prefilled, whole vs in pieces."""
    words = " ".join(["and then we talked about the weather"] * 8)
    history = [Message("user" if i % 2 == 0 else "assistant", f"turn {i}: {words}")
               for i in range(args.beside_prompt // 40 + 2)]  # fmt: skip
    long_messages = [messages[0], *history, messages[-1]]
    inputs = prompter.build(long_messages, max_tokens=args.beside_prompt)
    long = Request(inputs, max_text_tokens=args.max_text, max_frames=args.max_frames,
                   decoding=GREEDY)  # fmt: skip
    # Speaking calls that outlast the prefill: no end token stops them early.
    speaking = Request(request.inputs, max_text_tokens=10_000, max_frames=10_000,
                       decoding=GREEDY)  # fmt: skip
    tokens = inputs["input_ids"].shape[1]
    print(f"\n{args.beside_calls} calls decoding beside a {tokens}-token prompt's prefill")
    print(f"{'piece':>7} {'worst tick ms':>14} {'median':>8} {'first':>8} {'ticks':>6}")
    sizes: list[int | None] = [None, *(int(n) for n in args.prefill_tokens.split(","))]
    for size in sizes:
        engine = OmniEngine(model, max_rows=args.beside_calls + 1)
        for _ in range(args.beside_calls):
            engine.add(speaking)
        for _ in range(3):  # past their first frames
            engine.step()
        _sync(args.device)
        row = engine.begin(long)
        ticks: list[float] = []
        while row in engine.prefilling:
            start = time.perf_counter()
            engine.prefill(row, size)
            engine.step()
            _sync(args.device)
            ticks.append(1000 * (time.perf_counter() - start))
        name = "whole" if size is None else str(size)
        worst, median = max(ticks), percentile(ticks, 0.5)
        print(f"{name:>7} {worst:>14.1f} {median:>8.1f} {ticks[0]:>8.1f} {len(ticks):>6}")


if __name__ == "__main__":
    main()

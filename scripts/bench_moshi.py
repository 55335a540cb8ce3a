#!/usr/bin/env python
"""Moshi batching benchmark: milliseconds per batched 80 ms step for N calls.

Times what the backend's device thread does each tick for N calls: one batched Mimi streaming
encode, one batched language-model step (main decoder + depth decoder) and one batched Mimi
decode for all of them. Prints ms per step for each N and the largest N within the 80 ms frame.

    .venv/bin/python scripts/make_tiny_models.py            # models/tiny-moshi (random, tiny)
    .venv/bin/python scripts/bench_moshi.py --model models/tiny-moshi --calls 1,4,16,64
    .venv/bin/python scripts/bench_moshi.py --model kyutai/moshiko-pytorch-bf16 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from s2s.backends.mimi_stream import MimiStreamDecoder, MimiStreamEncoder
    from s2s.backends.moshi import _load
    from s2s.backends.moshi_engine import MoshiEngine

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / "models" / "tiny-moshi"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--calls", default="1,4,16,64")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, _, device = _load(args.model, args.device)
    codec = model.audio_encoder
    frame = int(model.config.sampling_rate / model.config.audio_encoder_config.frame_rate)
    budget_ms = 1000 * frame / model.config.sampling_rate
    print(f"model {args.model} on {device}, frame {frame} samples ({budget_ms:.0f} ms)")
    print(f"{'calls':>6} {'ms_per_step':>12} {'lm_ms':>8} {'mimi_ms':>8} {'realtime':>9}")
    best = 0
    for n in (int(x) for x in args.calls.split(",")):
        engine = MoshiEngine(model)
        rows = [engine.join(i, seed=i) for i in range(n)]
        encoder = MimiStreamEncoder(codec, n)  # one codec batch for all calls, as the backend
        decoder = MimiStreamDecoder(codec, n)
        audio = torch.randn(n, 1, frame, device=device, dtype=model.dtype) * 0.1
        totals, lms = [], []
        with torch.inference_mode():
            for step in range(args.steps + 3):
                start = time.perf_counter()
                encoded = encoder.step(audio)[:, : engine.k, 0]
                codes = {r: encoded[i] for i, r in enumerate(rows)}
                lm_start = time.perf_counter()
                outputs = engine.step(codes)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                lm = time.perf_counter() - lm_start
                frames = [outputs[r].codes for r in rows]
                if all(f is not None for f in frames):
                    decoder.step(torch.stack(frames)[:, :, None])  # type: ignore[arg-type]
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                if step >= 3:  # warm-up steps are not counted
                    totals.append(time.perf_counter() - start)
                    lms.append(lm)
        ms = 1000 * statistics.median(totals)
        lm_ms = 1000 * statistics.median(lms)
        fits = ms < budget_ms
        best = n if fits else best
        print(f"{n:>6} {ms:>12.1f} {lm_ms:>8.1f} {ms - lm_ms:>8.1f} {'yes' if fits else 'no':>9}",
              flush=True)  # fmt: skip
    print(f"largest N within the {budget_ms:.0f} ms frame budget: {best}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Moshi step benchmark: what one 80 ms tick costs for N calls, on any checkpoint and device.

Times what a model worker does each tick for N calls (``s2s.worker.moshi``): one batched Mimi
streaming encode, one step of the slot engine (main decoder + depth decoder + sampling) and one
batched Mimi decode. Prints, per N: ms per step (p50, p99) and its language-model and codec
parts, and with ``--profile`` what the host does per step: operators dispatched (the CPU-side
op count, about one kernel launch each on a GPU), host syncs (ops that read a device value back:
``item``/``_local_scalar_dense``, and explicit CUDA synchronisations) and memory allocations.
On CUDA also the peak GPU memory. Then the largest N within the 80 ms frame.

    .venv/bin/python scripts/make_tiny_models.py models            # models/tiny-moshi
    .venv/bin/python scripts/bench_moshi.py --calls 1,16,64 --profile
    .venv/bin/python scripts/bench_moshi.py --model kyutai/moshiko-pytorch-bf16 --device cuda
    # real size, random weights, no download; each call's window full (2,900 frames):
    python scripts/bench_moshi.py --random-size moshiko --device cuda --calls 1,16,32,64,96 \\
        --context 2900
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import host_traffic, percentile, profile_step  # noqa: E402


def _random_moshiko(device: str) -> Any:
    """Moshi at moshiko's sizes (transformers' defaults: 7.77 B parameters) with random
    weights, built on the device; no download."""
    import torch
    from transformers import MimiConfig, MoshiConfig, MoshiForConditionalGeneration

    config = MoshiConfig(audio_encoder_config=MimiConfig().to_dict())
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        model = MoshiForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


def _floor_ms(model: Any, engine: Any, n: int, bandwidth_tbs: float) -> float:
    """The language model's memory-bandwidth floor: its weights (not the embedding tables, of
    which a step reads a few rows), and the part of every call's key/value cache a step reads,
    read once per step."""
    import torch

    weights = sum(
        p.numel() * p.element_size()
        for part in (model.decoder, model.depth_decoder)
        for module in part.modules()
        if not isinstance(module, torch.nn.Embedding)
        for p in module.parameters(recurse=False)
    )
    keys = engine._keys
    per_slot = keys[:, 0, :, : engine.span(n)].numel() * keys.element_size() * 2  # keys, values
    return 1000 * (weights + n * per_slot) / (bandwidth_tbs * 1e12)


class _Calls:
    """N calls on one engine and one codec batch, stepped as a worker's tick steps them (with
    the codec's CUDA graphs when the engine has its own)."""

    def __init__(
        self, engine: Any, model: Any, n: int, context: int, frame: int, cuda: bool
    ) -> None:
        import torch

        from s2s.backends.mimi_stream import MimiStreamDecoder, MimiStreamEncoder
        from s2s.worker.moshi import codec_graphs

        self.engine, self.cuda = engine, cuda
        self.rows = [engine.join(i, seed=i) for i in range(n)]
        self.slots = [r.slot for r in self.rows]
        for row in self.rows:
            if context:
                engine.skip_ahead(row, context)
        # The codec computes the engine's whole bucket, as a worker's does.
        self.width = width = engine.width()
        self.encoder = MimiStreamEncoder(model.audio_encoder, width)
        self.decoder = MimiStreamDecoder(model.audio_encoder, width)
        self.graphs = None
        if engine.graphs is not None:
            self.graphs = codec_graphs(self.encoder, self.decoder, engine.k)
        self.audio = torch.randn(width, 1, frame, device=model.device, dtype=model.dtype) * 0.1
        self.ready = torch.arange(width, device=model.device) < n

    def step(self, timed: bool = True) -> float:
        """One tick; returns the language model's share in seconds. ``timed=False`` (when
        profiling): no synchronisation to time it, which the profile would count as the
        engine's own host sync; the share returned is then only the host's."""
        import torch

        if self.graphs is None:
            encoded = self.encoder.step(self.audio, self.ready)
        else:
            encoded = self.graphs[0](self.width, (self.audio, self.ready))
        lm_start = time.perf_counter()
        stepped = self.engine.step_slots(self.slots, encoded[:, : self.engine.k, 0])
        if self.cuda and timed:
            torch.cuda.synchronize()
        lm = time.perf_counter() - lm_start
        if stepped.has_frame[self.slots].all():
            frames = stepped.frames[:, :, None]
            if self.graphs is None:
                self.decoder.step(frames, self.ready)
            else:
                self.graphs[1](self.width, (frames, self.ready))
        return lm


def main() -> None:
    import torch

    from s2s.worker.moshi import load_moshi

    # What capturing graphs took is the unknown of a first GPU run: show it.
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("s2s.backends.graphs").setLevel(logging.INFO)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(ROOT / "models" / "tiny-moshi"))
    parser.add_argument("--random-size", choices=("moshiko",), help="random weights, this size")
    parser.add_argument("--device", default=None)
    parser.add_argument("--calls", default="1,4,16,64")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--context", type=int, default=0, help="frames each call has had")
    parser.add_argument("--profile", action="store_true", help="ops, syncs, allocations/step")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs (they are on CUDA)")
    parser.add_argument(
        "--check-graphs", action="store_true", help="last, check (CUDA) that graph replay "
        "gives the eager step's tokens, through joins, a leave, a reset and a span change",
    )  # fmt: skip
    parser.add_argument(
        "--bandwidth", type=float, default=4.3, help="device memory bandwidth in TB/s, for the "
        "floor: the weights and every call's cache read once per step (H200: ~4.3 achievable)",
    )  # fmt: skip
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also time the language-model step of tests/moshi_reference.py (transformers' own "
        "forwards, the engine the slot engine replaced) against the slot engine's",
    )
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    if args.random_size:
        model, name = _random_moshiko(device), f"random {args.random_size}"
    else:
        model, _, device = load_moshi(args.model, device)
        name = args.model
    cuda = device.startswith("cuda")
    frame = int(model.config.sampling_rate / model.config.audio_encoder_config.frame_rate)
    budget_ms = 1000 * frame / model.config.sampling_rate
    window = int(getattr(model.config, "sliding_window", None) or 3000)
    params = sum(p.numel() for p in model.parameters())
    print(f"model {name} ({params / 1e9:.2f} B parameters, {model.dtype}) on {device} in "
          f"{time.perf_counter() - started:.1f} s; frame {frame} samples ({budget_ms:.0f} ms); "
          f"context {args.context} of a {window}-frame window")  # fmt: skip
    header = ["calls", "p50_ms", "p99_ms", "lm_ms", "mimi_ms", "floor_ms", "realtime"]
    if args.profile:
        header += ["ops", "syncs", "allocs", "reads", "uploads"]
    if cuda:
        header += ["gpu_gb", "graphs"]
    print(" ".join(f"{h:>8}" for h in header), flush=True)
    best = 0
    for n in (int(x) for x in args.calls.split(",")):
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            row, fits = _row(model, n, args, window, frame, budget_ms, cuda, device)
        except torch.OutOfMemoryError:
            print(f"{n:>8} does not fit in memory", flush=True)
            break
        except Exception:  # one size failing (a capture, say) must not cost the others
            print(f"{n:>8} failed:", flush=True)
            traceback.print_exc()
            continue
        best = n if fits else best
        print(" ".join(row), flush=True)
    print(f"largest N within the {budget_ms:.0f} ms frame (p99): {best}", flush=True)
    if args.reference:
        _compare_reference(model, [int(x) for x in args.calls.split(",")], args.steps, device)
    if args.check_graphs:
        _check_graphs(model)


def _row(
    model: Any,
    n: int,
    args: argparse.Namespace,
    window: int,
    frame: int,
    budget_ms: float,
    cuda: bool,
    device: str,
) -> tuple[list[str], bool]:
    """Time ``args.steps`` ticks of ``n`` calls: the printed row, and whether p99 fits."""
    import torch

    from s2s.backends.moshi_engine import MoshiEngine

    engine = MoshiEngine(model, context=window, max_calls=n, graphs=False if args.eager else None)
    calls = _Calls(engine, model, n, args.context, frame, cuda)
    times: list[float] = []
    lms: list[float] = []
    with torch.inference_mode():
        for i in range(args.steps + 3):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            lm = calls.step()
            if cuda:
                torch.cuda.synchronize()
            if i >= 3:  # warm-up steps are not counted
                times.append(1000 * (time.perf_counter() - start))
                lms.append(1000 * lm)
        untimed = functools.partial(calls.step, timed=False)
        counts = (*profile_step(untimed, device), *host_traffic(untimed)) if args.profile else ()
    p50, p99 = statistics.median(times), percentile(times, 0.99)
    lm_ms = statistics.median(lms)
    fits = p99 < budget_ms
    floor = _floor_ms(model, engine, n, args.bandwidth)
    row = [f"{n:>8}", f"{p50:>8.1f}", f"{p99:>8.1f}", f"{lm_ms:>8.1f}",
           f"{p50 - lm_ms:>8.1f}", f"{floor:>8.1f}", f"{'yes' if fits else 'no':>8}"]  # fmt: skip
    row += [f"{c:>8}" for c in counts]
    if cuda:
        captured = engine.graphs.captured if engine.graphs is not None else "eager"
        row += [f"{torch.cuda.max_memory_allocated() / 2**30:>8.1f}", f"{captured:>8}"]
    return row, fits


def _check_graphs(model: Any) -> None:
    """Graph replay against the eager step (CUDA), printed; a failure is printed, not raised."""
    from tests.moshi_graphs_check import codec_graphs_equal_eager, graphs_equal_eager

    try:
        started = time.perf_counter()
        same, captured = graphs_equal_eager(model)
        print(f"graph replay equals the eager step: {'yes' if same else 'NO'} (300 steps, "
              f"{captured} graphs, {time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
        codec = codec_graphs_equal_eager(model.audio_encoder)
        print(f"codec graph replay equals eager: {'yes' if codec else 'NO'}", flush=True)
    except Exception:
        print("graph check failed:", flush=True)
        traceback.print_exc()


def _compare_reference(model: Any, levels: list[int], steps: int, device: str) -> None:
    """The language-model step alone: the slot engine against transformers' own forwards."""
    import torch

    from s2s.backends.moshi_engine import MoshiEngine
    from tests.moshi_reference import MoshiEngine as ReferenceEngine

    print("language-model step alone, p50 ms / operators / host syncs per step:")
    print(f"{'calls':>8} {'slots':>20} {'reference':>20}")
    for n in levels:
        cells = []
        for engine in (MoshiEngine(model, max_calls=n), ReferenceEngine(model)):
            rows = [engine.join(i, seed=i) for i in range(n)]
            codes = torch.randint(0, 64, (engine.k,), device=model.device)
            feed = {r: codes for r in rows}
            times = []
            with torch.inference_mode():
                for i in range(steps + 3):
                    start = time.perf_counter()
                    engine.step(feed)
                    if i >= 3:
                        times.append(1000 * (time.perf_counter() - start))
                ops, syncs, _ = profile_step(lambda e=engine, f=feed: e.step(f), device)
            cells.append(f"{statistics.median(times):.1f} / {ops} / {syncs}")
        print(f"{n:>8} {cells[0]:>20} {cells[1]:>20}", flush=True)


if __name__ == "__main__":
    main()

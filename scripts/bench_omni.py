#!/usr/bin/env python
"""Time the streaming Qwen3-Omni engine (``s2s.omni``): first audio and step time per batch size.

    .venv/bin/python scripts/bench_omni.py --model models/tiny-qwen3-omni --calls 1,4,8
    python3 scripts/bench_omni.py --random-size qwen3-omni --device cuda --calls 1,4,8,16
    .venv/bin/python scripts/bench_omni.py --random-size shrunk --calls 1,2   # CPU smoke

``--model PATH`` loads a checkpoint; ``--random-size qwen3-omni`` builds Qwen3-Omni-30B-A3B-
Instruct's real sizes (``omni_sizes.real_config``, about 35 B parameters, 66 GiB in bf16) with
random weights directly on the device, no download (``--depth 1``: every stack one layer deep,
real widths, to check the real shapes on a CPU); ``shrunk`` the same wiring two layers deep and
a quarter as wide, to prove the path on a CPU in seconds; ``shrunk-deep`` those widths at the
real depths (48 thinker layers, 20 talker, 5 code predictor, 8 code2wav), so ``--profile``
counts on a CPU the operators a GPU would launch per step. A random model has no tokenizer:
prompts come from ``--tokens`` (the tiny checkpoint's tokenizer and preprocessors, whose special
ids the random config takes; sizes cost the time, ids do not).

For each batch size N, N calls arrive at once, each with a 2 s noise clip, a 640x480 picture and
a short question; their prefills run one after another (as a worker admits them), then the
engine steps until every call is done. It prints, per N: the mean prefill time; the time from
the calls' arrival to each one's first audio frame (p50/p95), which INCLUDES the prefills queued
ahead of it (a burst's worst case: every call of a burst gets its first frame in the first
step after the last prefill, so p50 and p95 are close and grow with N); the mean step time;
the real-time factor (step time over the 80 ms of speech a step yields per call; under 1 keeps
up); and, on CUDA, peak memory, with every slot's caches allocated up front as the worker
allocates them (``--prompt-tokens``, 8,192 by default there). ``--random-size`` runs use
``Request.fixed_length`` (end tokens never picked), so every call makes exactly ``--max-text``
text tokens and ``--max-frames`` first codes and runs compare; a checkpoint ends its replies
itself unless ``--fixed-length`` is given.

``--graphs on`` (CUDA) replays each step from CUDA graphs (``s2s.omni.graphs``; for each batch
size it runs once untimed first, to capture its shapes; for the largest it first captures every
shape up front as a worker of that many slots does at load, printing how many, how long and how
much memory), ``--graphs both`` prints an eager row and a
graphed one per batch size, and ``--check-graphs`` first checks that replay gives the eager
step's text and codes (``tests/omni_graphs_check.py``). On a CPU ``--profile`` counts what the
eager step dispatches, which is what graphs would save.

With ``--next-turn TOKENS`` it times a call's next turn after a conversation of about TOKENS
tokens (history, a clip and the picture, then the reply): its prefill with the previous turn's
thinker cache kept in the slot (``Request.conversation``) and from nothing.

With ``--beside-prompt TOKENS`` it then measures what a long turn does to calls that are
speaking: ``--beside-calls`` calls decode while one more call's prompt of about TOKENS tokens
(history, a clip and the picture) is prefilled, whole in one tick or in pieces of
``--prefill-tokens`` (one piece per tick, as the worker does); it prints the worst and median
tick (piece plus step: the gap between two frames of a speaking call), the first tick (whose
piece also runs the audio and vision encoders) and how many ticks the long call took to join.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib import host_traffic, percentile, profile_step  # noqa: E402
from omni_floor import step_bytes  # noqa: E402
from omni_sizes import borrow_token_ids, real_config, shrunk_config  # noqa: E402

from s2s.omni.engine import OmniEngine  # noqa: E402
from s2s.omni.media import Media  # noqa: E402
from s2s.omni.model import load_model, prepare_model  # noqa: E402
from s2s.omni.prompt import Message, Prompter  # noqa: E402
from s2s.omni.request import GREEDY, MAX_FRAMES, MAX_TEXT_TOKENS, Request, cache_positions  # noqa: E402

FRAME_SECONDS = 0.08
SIZES = {
    "qwen3-omni": real_config,
    "shrunk": shrunk_config,
    "shrunk-deep": lambda: shrunk_config(real_depth=True),
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fill_uninitialised(model: Any, std: float = 0.02) -> int:
    """Give small normal noise to every weight ``__init__`` leaves empty; returns how many.

    transformers 5.24 leaves the talker's experts ``torch.empty`` (whatever memory held: NaN at
    times) and its routers zero (every token to the same experts, which would time a cheaper
    MoE than the real one). Any other weight not finite or implausibly large gets the same.
    """
    filled = 0
    with torch.no_grad():
        for layer in model.talker.model.layers:
            for weight in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                weight.normal_(0.0, std)
            layer.mlp.gate.weight.normal_(0.0, std)
            filled += 3
        for tensor in model.parameters():  # buffers are computed in __init__, never empty
            if tensor.is_floating_point() and not bool(tensor.isfinite().all() and
                                                       tensor.abs().max() < 1e4):  # fmt: skip
                tensor.normal_(0.0, std)
                filled += 1
    return filled


def build_random(
    size: str, tokens: str, device: str, dtype: torch.dtype, depth: int | None = None
) -> Any:
    """The model of ``SIZES[size]`` (its stacks cut to ``depth`` layers) with random weights,
    built on ``device`` itself."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    config = real_config(depth) if size == "qwen3-omni" else SIZES[size]()
    borrow_token_ids(config, Qwen3OmniMoeConfig.from_pretrained(tokens))
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3OmniMoeForConditionalGeneration._from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    fill_uninitialised(model)
    return prepare_model(model)


def _messages() -> list[Message]:
    """The system prompt and a spoken question about a picture."""
    rng = np.random.default_rng(0)
    clip = (rng.standard_normal(32_000) * 0.1).astype(np.float32)  # 2 s at 16 kHz
    picture = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
    return [
        Message("system", "You are a helpful voice assistant."),
        Message("user", "what am I looking at", audio=[clip], images=[picture]),
    ]


def _requests(prompter: Prompter, args: argparse.Namespace) -> Request:
    inputs = prompter.build(_messages())
    return Request(
        inputs, max_text_tokens=args.max_text, max_frames=args.max_frames, decoding=GREEDY,
        fixed_length=args.fixed_length,
    )  # fmt: skip


def run_batch(
    engine: OmniEngine, request: Request, calls: int, device: str, profile: bool = False
) -> dict[str, float]:
    """N calls arriving at once, then steps until all are done; the row of the table. With
    ``profile``, two more steps once every call is speaking (not timed) are counted: operators,
    host syncs and allocations (torch's profiler), host reads and uploads (``s2s.hosttraffic``)."""
    arrival = time.perf_counter()
    prefills: list[float] = []
    rows = []
    for _ in range(calls):
        start = time.perf_counter()
        rows.append(engine.add(request))
        _sync(device)
        prefills.append(time.perf_counter() - start)
    first: dict[int, float] = {}
    steps: list[float] = []
    counted: dict[str, float] = {}
    while engine.active:
        if profile and len(steps) == 3 and not counted:
            ops, syncs, allocations = profile_step(engine.step, device)
            reads, uploads = host_traffic(engine.step)
            counted = {"ops": ops, "syncs": syncs, "allocs": allocations, "reads": reads,
                       "uploads": uploads}  # fmt: skip
            continue
        start = time.perf_counter()
        outs = engine.step()
        _sync(device)
        now = time.perf_counter()
        steps.append(now - start)
        for out in outs:
            if out.audio is not None and out.row not in first:
                first[out.row] = now - arrival
    if len(first) != calls:
        raise RuntimeError(f"{calls - len(first)} of {calls} calls made no audio")
    latencies = [1000 * first[row] for row in rows]
    step_ms = 1000 * sum(steps) / max(len(steps), 1)
    return {
        "prefill": 1000 * sum(prefills) / calls,
        "p50": percentile(latencies, 0.5),
        "p95": percentile(latencies, 0.95),
        "step": step_ms,
        "steps": len(steps),
        "rtf": step_ms / 1000 / FRAME_SECONDS,
        **counted,
    }


def main() -> None:
    # What capturing graphs took, and why one failed, are the unknowns of a first GPU run.
    logging.basicConfig(format="%(name)s: %(message)s")
    for name in ("s2s.backends.graphs", "s2s.omni.graphs", "s2s.omni.engine"):
        logging.getLogger(name).setLevel(logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a local Qwen3-Omni checkpoint folder")
    source.add_argument("--random-size", choices=sorted(SIZES), help="random weights, no download")
    parser.add_argument("--tokens", default=str(ROOT / "models" / "tiny-qwen3-omni"),
                        help="tokenizer and preprocessors for --random-size")  # fmt: skip
    parser.add_argument("--depth", type=int, help="with qwen3-omni: at most this many layers "
                        "per stack, real widths (to check the real shapes on a CPU)")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calls", default="1,4,8", help="batch sizes, comma-separated")
    parser.add_argument("--max-frames", type=int, default=40)
    parser.add_argument("--max-text", type=int, default=8)
    parser.add_argument("--fixed-length", action="store_true", help="(on with --random-size)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--beside-prompt", type=int, default=0, help="long prompt tokens")
    parser.add_argument("--beside-calls", type=int, default=4)
    parser.add_argument(
        "--next-turn", type=int, default=0,
        help="conversation tokens: time the next turn's prefill with its last turn's cache, "
        "and without",
    )  # fmt: skip
    parser.add_argument("--prefill-tokens", default="512", help="piece sizes, comma-separated")
    parser.add_argument(
        "--prompt-tokens", type=int, help="allocate every slot's caches at the start for a prompt "
        "this long and the longest reply (1,024 text tokens, 4,096 frames), as the worker does, "
        "so GiB is a server's; 0: start small and grow (default: 8192 on CUDA, 0 on a CPU)",
    )  # fmt: skip
    parser.add_argument("--graphs", choices=["off", "on", "both"], default="off", help="(CUDA) "
                        "replay each step from CUDA graphs (each batch size runs once untimed "
                        "first, to capture); both: an eager row, then a graphed one")  # fmt: skip
    parser.add_argument("--check-graphs", action="store_true", help="(CUDA) first check that "
                        "graph replay gives the eager step's text, codes and audio")  # fmt: skip
    parser.add_argument("--bandwidth", type=float, default=4.3, help="(CUDA) device memory "
                        "bandwidth in TB/s for the floor column (H200: ~4.3)")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="count what one step dispatches: "
                        "ops, host syncs, allocations, host reads and uploads")  # fmt: skip
    args = parser.parse_args()
    args.fixed_length = args.fixed_length or args.random_size is not None
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if args.prompt_tokens is None:
        args.prompt_tokens = 8192 if cuda else 0
    # generate()'s longest reply, which the worker allocates for unless a checkpoint says less.
    longest = (args.prompt_tokens, MAX_TEXT_TOKENS, MAX_FRAMES)
    positions = cache_positions(*longest) if args.prompt_tokens else None
    dtype = torch.bfloat16 if cuda else torch.float32
    start = time.perf_counter()
    if args.random_size:
        model = build_random(args.random_size, args.tokens, args.device, dtype, args.depth)
        prompter = Prompter.from_pretrained(args.tokens)
    else:
        model = load_model(args.model, args.device, dtype if cuda else None)
        prompter = Prompter.from_pretrained(args.model)
    _sync(args.device)
    built = time.perf_counter() - start
    parameters = sum(p.numel() for p in model.parameters())
    weights = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    depth = f" (depth {args.depth})" if args.depth else ""
    print(f"model: {args.random_size or args.model}{depth}, {parameters / 1e9:.2f} B parameters, "
          f"{dtype}, built/loaded in {built:.1f} s, {weights:.1f} GiB on the device")  # fmt: skip
    request = _requests(prompter, args)
    print(f"prompt: {request.inputs['input_ids'].shape[1]} tokens; reply: "
          f"{args.max_text} text tokens, {args.max_frames} frames"
          f"{' (fixed)' if args.fixed_length else ' (or fewer)'}")  # fmt: skip
    # Warm-up: kernels, allocator and library handles, outside the timed runs.
    warm = Request(request.inputs, max_text_tokens=2, max_frames=3, decoding=GREEDY,
                   fixed_length=True)  # fmt: skip
    run_batch(OmniEngine(model, max_rows=1), warm, 1, args.device)
    counts = ("ops", "syncs", "allocs", "reads", "uploads") if args.profile else ()
    print(f"{'calls':>5} {'graphs':>6} {'prefill ms':>10} {'first audio p50':>16} {'p95':>8} "
          f"{'step ms':>8} {'floor':>6} {'steps':>5} {'RTF':>6} {'GiB':>6}"
          + "".join(f" {name:>7}" for name in counts))  # fmt: skip
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.graphs]
    sizes = [int(n) for n in args.calls.split(",")]
    fits = True
    for calls in sizes:
        for graphs in modes:
            try:
                _row(model, request, calls, graphs, calls == max(sizes), positions, args)
            except torch.OutOfMemoryError:
                print(f"{calls:>5} does not fit in memory", flush=True)
                fits = False  # nor will more calls: their time goes to what comes after
                break
            except Exception:  # one size failing (a capture, say) must not cost the others
                print(f"{calls:>5} {'yes' if graphs else 'no':>6} failed:", flush=True)
                traceback.print_exc()
            if cuda:
                torch.cuda.empty_cache()
        if not fits:
            break
    if args.check_graphs:
        _check_graphs(model, request)
    if args.beside_prompt:
        _prefill_beside(model, prompter, request, args)
    if args.next_turn:
        _next_turn(model, prompter, args)


def _row(
    model: Any,
    request: Request,
    calls: int,
    graphs: bool,
    largest: bool,
    positions: tuple[int, int] | None,
    args: argparse.Namespace,
) -> None:
    """Time ``calls`` calls' replies on one engine, eager or graphed, and print the row."""
    cuda = args.device.startswith("cuda")
    counts = ("ops", "syncs", "allocs", "reads", "uploads") if args.profile else ()
    prompt = int(request.inputs["input_ids"].shape[1])
    engine = OmniEngine(model, max_rows=calls, graphs=graphs, positions=positions)
    if graphs and largest:
        # What a worker of this many slots does at load: every shape of each part,
        # captured up front (for the largest size only: the device call's budget).
        reserved = torch.cuda.memory_reserved()
        started = time.perf_counter()
        count = engine.capture(request.decoding)
        print(f"  ({calls} calls: {count} step graphs captured in "
              f"{time.perf_counter() - started:.1f} s, "
              f"{(torch.cuda.memory_reserved() - reserved) / 2**30:.2f} GiB)",
              flush=True)  # fmt: skip
    if graphs:
        run_batch(engine, request, calls, args.device)  # captures this batch's shapes
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    row = run_batch(engine, request, calls, args.device, args.profile)
    # What ran: a capture that failed left the engine eager (it says so in the log).
    graphed = "yes" if engine.graphs is not None else ("failed" if graphs else "no")
    if engine.graphs_failed:
        print(f"  graphs failed at {calls} calls: {engine.graphs_failed}", flush=True)
    memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    # What a step must read, its context about the prompt (a GPU's figure alone).
    floor = step_bytes(model, calls, prompt, prompt).floor_ms(args.bandwidth)
    print(f"{calls:>5} {graphed:>6} {row['prefill']:>10.0f} "
          f"{row['p50']:>14.0f}ms {row['p95']:>6.0f}ms {row['step']:>8.1f} "
          f"{floor if cuda else float('nan'):>6.1f} "
          f"{row['steps']:>5} {row['rtf']:>6.2f} {memory:>6.2f}"
          + "".join(f" {row.get(name, 0):>7.0f}" for name in counts),
          flush=True)  # fmt: skip


def _check_graphs(model: Any, request: Request) -> None:
    """Graph replay against the eager step (CUDA), printed; a failure is printed, not raised."""
    from tests.omni_graphs_check import graphs_equal_eager

    try:
        started = time.perf_counter()
        same, worst, captured = graphs_equal_eager(model, request.inputs)
        print(f"graph replay equals the eager step: {'yes' if same else 'NO'} (text and codes; "
              f"audio within {worst:.1e}; {captured} graphs; "
              f"{time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    except Exception:
        print("graph check failed:", flush=True)
        traceback.print_exc()


def _prefill_beside(
    model: Any, prompter: Prompter, request: Request, args: argparse.Namespace
) -> None:
    """Tick times of speaking calls while a long prompt is prefilled, whole vs in pieces."""
    messages = _messages()
    words = " ".join(["and then we talked about the weather"] * 8)
    history = [Message("user" if i % 2 == 0 else "assistant", f"turn {i}: {words}")
               for i in range(args.beside_prompt // 40 + 2)]  # fmt: skip
    inputs = prompter.build([messages[0], *history, messages[-1]], max_tokens=args.beside_prompt)
    long = Request(inputs, max_text_tokens=args.max_text, max_frames=args.max_frames,
                   decoding=GREEDY, fixed_length=args.fixed_length)  # fmt: skip
    # Speaking calls that outlast the prefill: no end token stops them early.
    speaking = Request(request.inputs, max_text_tokens=10_000, max_frames=10_000,
                       decoding=GREEDY, fixed_length=True)  # fmt: skip
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


def _next_turn(model: Any, prompter: Prompter, args: argparse.Namespace) -> None:
    """A call's next turn after a long spoken conversation (every user turn a 3 s clip, the
    first one also the picture): building its prompt and its prefill, with what the call kept
    from its previous turn (the thinker and talker caches in its slot, ``Request.conversation``;
    its media prepared and encoded, ``Media``), with the caches alone, and from nothing."""
    rng = np.random.default_rng(1)
    words = " ".join(["and then we talked about the weather"] * 8)
    first, asked = _messages()
    history: list[Message] = []
    for i in range(args.next_turn // 110 + 2):
        clip = (rng.standard_normal(48_000) * 0.1).astype(np.float32)
        history += [Message("user", f"turn {i}", audio=[clip]), Message("assistant", words)]
    history[0] = replace(history[0], images=asked.images)
    asked = [first, *history, replace(asked, images=[])]
    whole = 10**9  # no turn left out: a prompt budget that cuts the oldest turns moves the start

    def first_turn(media: Media) -> tuple[OmniEngine, list[int]]:
        inputs = prompter.build(asked, max_tokens=whole, media=media)
        engine = OmniEngine(model, max_rows=1)
        row = engine.add(Request(inputs, max_text_tokens=args.max_text,
                                 max_frames=args.max_frames, decoding=GREEDY, fixed_length=True,
                                 conversation="call", media=media.latest))  # fmt: skip
        made: list[int] = []
        while engine.active:
            made += [t for out in engine.step() if out.row == row for t in out.text]
        return engine, made

    media = Media()
    kept_all, made = first_turn(media)
    engines = {"caches+media": kept_all, "caches": first_turn(Media())[0],
               "nothing": OmniEngine(model, max_rows=1)}  # fmt: skip
    said = prompter.tokenizer.decode(made, skip_special_tokens=True)
    clip = (rng.standard_normal(32_000) * 0.1).astype(np.float32)
    then = [*asked, Message("assistant", said), Message("user", "and now?", audio=[clip])]
    clips = sum(len(m.audio) for m in then)
    tokens = prompter.build(asked, max_tokens=whole)["input_ids"].shape[1]
    print(f"\nthe next turn of a {tokens}-token conversation ({clips} clips and a picture)")
    print(f"{'kept':>13} {'build ms':>9} {'prefill ms':>11} {'thinker run':>12} "
          f"{'talker reused':>14} {'encoded':>8}")  # fmt: skip
    for kept, engine in engines.items():
        memo = media if kept == "caches+media" else Media()
        start = time.perf_counter()
        after = prompter.build(then, max_tokens=whole, media=memo)
        built = 1000 * (time.perf_counter() - start)
        request = Request(after, max_text_tokens=args.max_text, max_frames=args.max_frames,
                          decoding=GREEDY, fixed_length=True, media=memo.latest,
                          conversation="call" if kept != "nothing" else None)  # fmt: skip
        reused, talker, encoded = engine.reused, engine.talker_reused, memo.encoded
        _sync(args.device)
        start = time.perf_counter()
        engine.add(request)
        _sync(args.device)
        took = 1000 * (time.perf_counter() - start)
        ran = after["input_ids"].shape[1] - (engine.reused - reused)
        spared = engine.talker_reused - talker
        print(f"{kept:>13} {built:>9.0f} {took:>11.0f} {ran:>12} {spared:>14} "
              f"{memo.encoded - encoded:>8}")  # fmt: skip


if __name__ == "__main__":
    main()

"""Graph replay against the eager step on a GPU, shared by ``tests/test_moshi.py`` (``-m gpu``)
and ``scripts/bench_moshi.py --check-graphs`` (the device machine has no pytest); with
``rerun=True`` on any device, the CPU's stand-in for graphs (``StepGraphs(rerun=True)``)."""

from __future__ import annotations

from typing import Any

import torch

from s2s.backends.moshi_engine import MoshiEngine


def graphs_equal_eager(
    model: Any, steps: int = 300, context: int = 400, rerun: bool = False
) -> tuple[bool, int]:
    """Two engines on ``model`` (a CUDA one, unless ``rerun``), one graphed and one eager,
    through joins, a leave, a reset and a span change; returns (every output equal, graphs
    captured)."""
    k = int(model.config.num_codebooks)
    generator = torch.Generator().manual_seed(0)
    device = model.device
    codes = [torch.randint(0, 64, (k,), generator=generator).to(device) for _ in range(steps)]
    graphed = MoshiEngine(model, max_calls=8, context=context, graphs=not rerun)
    if rerun:
        graphed.graphs = graphed.step_graphs(rerun=True)
    eager = MoshiEngine(model, max_calls=8, context=context, graphs=False)
    rows: list[tuple[Any, Any]] = [(graphed.join(0, seed=0), eager.join(0, seed=0))]
    same = True
    for t in range(steps):
        if t in (5, 40):
            rows.append((graphed.join(t, seed=t), eager.join(t, seed=t)))
        if t == 60:
            graphed.leave(rows[1][0])
            eager.leave(rows.pop(1)[1])
        if t == 100:
            graphed.reset(rows[0][0])
            eager.reset(rows[0][1])
        out_g = graphed.step({a: codes[(t + i) % steps] for i, (a, _) in enumerate(rows)})
        out_e = eager.step({b: codes[(t + i) % steps] for i, (_, b) in enumerate(rows)})
        for a, b in rows:
            x, y = out_g[a], out_e[b]
            same &= x.text_token == y.text_token
            same &= (x.codes is None) == (y.codes is None)
            same &= x.codes is None or y.codes is None or torch.equal(x.codes, y.codes)
    assert graphed.graphs is not None
    return bool(same), graphed.graphs.captured


def codec_graphs_equal_eager(mimi: Any, steps: int = 30, rerun: bool = False) -> bool:
    """The codec's steps replayed from graphs (``rerun``: the CPU's stand-in) against eager
    ones, on 3 of 4 slots that skip ticks and reset; True when codes and audio are
    identical."""
    from s2s.backends.graphs import StepGraphs
    from s2s.backends.mimi_stream import MimiStreamDecoder, MimiStreamEncoder

    device, dtype = mimi.device, mimi.dtype
    frame, quantizers = int(mimi.config.frame_size), int(mimi.config.num_quantizers)
    eager = MimiStreamEncoder(mimi, slots=4), MimiStreamDecoder(mimi, slots=4)
    graphed = MimiStreamEncoder(mimi, slots=4), MimiStreamDecoder(mimi, slots=4)
    ready = torch.zeros(4, dtype=torch.bool, device=device)
    encode = StepGraphs(
        "encode",
        lambda n, x, mask: graphed[0].step(x, mask),
        [torch.zeros((4, 1, frame), dtype=dtype, device=device), ready],
        (0.0, False),
        rerun,
    )
    decode = StepGraphs(
        "decode",
        lambda n, x, mask: graphed[1].step(x, mask),
        [torch.zeros((4, quantizers, 1), dtype=torch.long, device=device), ready.clone()],
        (0, False),
        rerun,
    )
    generator = torch.Generator().manual_seed(1)
    same = True
    for t in range(steps):
        audio = (0.1 * torch.randn(3, 1, frame, generator=generator)).to(device, dtype)
        mask = torch.tensor([t % 2 == 0, True, t % 5 != 0], device=device)
        if t == 12:
            for codec in (*eager, *graphed):
                codec.reset(1)
        codes_e = eager[0].step(audio, mask)
        codes_g = encode(3, (audio, mask)).clone()
        audio_e = eager[1].step(codes_e, mask)
        audio_g = decode(3, (codes_g, mask)).clone()
        same &= torch.equal(codes_e[mask], codes_g[mask])
        same &= torch.equal(audio_e[mask], audio_g[mask])
    return bool(same)

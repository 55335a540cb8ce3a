#!/usr/bin/env python
"""Measure how far along the code sequence Qwen2.5-Omni's token2wav reaches (CPU, prints numbers).

    .venv/bin/python scripts/probe_token2wav.py                   # ~15 min on two CPU cores
    .venv/bin/python scripts/probe_token2wav.py --parts real-width  # real widths, short codes

token2wav turns talker codes (50 Hz) into a mel (``repeats`` = 2 frames per code, 10 ms each)
with a DiT integrated by RK4 from noise (``Qwen2_5OmniToken2WavDiTModel.sample``), then into
24 kHz audio with BigVGAN. Each DiT layer attends within blocks of ``block_size`` mel frames
counted from frame 0; a layer listed in ``look_ahead_layers`` also sees the next block, one in
``look_backward_layers`` the previous one. One DiT evaluation therefore reaches ``len(ahead)``
blocks forward and ``len(backward)`` back, and the ODE composes evaluations: ``num_steps``
time points give ``num_steps - 1`` RK4 intervals of 4 chained evaluations each.

For each model it draws random codes and fixed noise, changes the code at one position t and
reports how far BEFORE t (the lookahead a chunked form needs) and AFTER t (the left context it
needs) the mel and the waveform change: "exact" counts any bit that moved, "tol" changes above
``--tol`` of the output's peak. Evaluations: one DiT forward, ``num_steps=2`` (one RK4
interval) and ``--steps`` (generate()'s default 10). ``--parts``: "loaded" is the tiny
checkpoint as ``from_pretrained`` gives it; "tiny" the same with its DiT weights redrawn at
1/sqrt(fan_in) (``wake``: at transformers' init a code's effect on other blocks is lost in
rounding); "real" transformers' ``Qwen2_5OmniDiTConfig`` defaults, which are Qwen2.5-Omni-7B's
(22 layers, block 24, ahead (10,), back (0, 20)), woken, but 64 wide so 36 evaluations over 28 s
of codes fit a CPU; "real-width" also the real widths (1024-wide DiT, 1536-channel BigVGAN), for
one evaluation and one RK4 interval only. Whether a bit moves is set by the masks, not the
weights; how far a change stays above ``--tol`` depends on the weights.

It also checks that the noise is one ``randn`` over the whole sequence (so a chunked run must
slice the same draw to be equal) and prints the error of an approximate chunked form that emits
the first blocks having seen only L codes past them (on the tiny model: its evaluations reach one
block ahead, as the real one's do, at a tenth of the cost).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniToken2WavConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniToken2WavModel,
    RungeKutta4ODESolver,
)

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_RATE = 24000  # Qwen2.5-Omni's output rate; BigVGAN's upsampling makes 240 samples a frame
NARROW_DIT = {  # real structure, narrow widths: only the masks and the ODE set the reach
    "hidden_size": 64,
    "num_attention_heads": 2,
    "head_dim": 32,
    "emb_dim": 32,
    "enc_emb_dim": 32,
    "enc_dim": 16,
    "enc_channels": [32, 32, 32, 32, 96],
    "enc_attention_channels": 16,
    "enc_se_channels": 16,
}


@dataclass
class Setup:
    """One token2wav with the speaker conditioning generate() would hand it."""

    name: str
    model: Any  # Qwen2_5OmniToken2WavModel
    cond: torch.Tensor
    ref_mel: torch.Tensor

    @property
    def dit(self) -> Any:
        return self.model.code2wav_dit_model

    @property
    def hop(self) -> int:
        return math.prod(self.model.config.bigvgan_config.upsample_rates)

    @property
    def frame_ms(self) -> float:
        return 1000 * self.hop / SAMPLE_RATE


def integrate(s: Setup, codes: torch.Tensor, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """``sample()``'s ODE with the noise given; ``steps == 1`` means one DiT evaluation."""
    speaker = s.cond.unsqueeze(1).repeat(1, noise.shape[1], 1)

    def velocity(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = s.dit(
            hidden_states=x,
            quantized_code=codes,
            speaker_embedding=speaker,
            condition_vector=s.ref_mel,
            time_step=t,
            apply_cfg=True,
        )
        guided, null = torch.chunk(out, 2, dim=0)
        return guided + (guided - null) * 0.5  # generate()'s guidance_scale

    with torch.no_grad():
        if steps == 1:
            return velocity(torch.tensor(0.0), noise).permute(0, 2, 1)
        times = torch.linspace(0, 1, steps)
        times += -1.0 * (torch.cos(torch.pi / 2 * times) - 1 + times)  # sway_coefficient=-1
        solver: Any = RungeKutta4ODESolver(function=velocity, initial_value=noise)  # type: ignore[no-untyped-call]
        mel: torch.Tensor = solver.integrate(times)[-1].permute(0, 2, 1)
        return mel


def span(a: torch.Tensor, b: torch.Tensor, tol: float) -> tuple[int, int] | None:
    """First and last index along the last axis where a and b differ (above tol of a's peak)."""
    diff = (a - b).abs().reshape(-1, a.shape[-1]).amax(dim=0)
    moved = torch.nonzero(diff > tol * float(a.abs().max())).flatten()
    return None if moved.numel() == 0 else (int(moved[0]), int(moved[-1]))


def reach_line(
    label: str, hit: tuple[int, int] | None, lo: int, hi: int, per_code: float, ms: float
) -> str:
    """Format how far before ``lo`` and after ``hi`` the change reached, in codes and ms."""
    if hit is None:
        return f"    {label:<11} no change"
    before, after = max(lo - hit[0], 0), max(hit[1] - hi, 0)
    return (
        f"    {label:<11} before t: {before / per_code:7.1f} codes {before * ms:8.0f} ms"
        f"   after t: {after / per_code:7.1f} codes {after * ms:8.0f} ms"
    )


def probe_dit(s: Setup, steps: int, tol: float, seed: int, vocode: bool) -> None:
    """Change one code and print how far the mel (and waveform) moved, against the mask bound."""
    cfg = s.dit.config
    ahead, back = len(cfg.look_ahead_layers), len(cfg.look_backward_layers)
    evals = 1 if steps == 1 else 4 * (steps - 1)
    block_codes = cfg.block_size // cfg.repeats
    n_codes = block_codes * (evals * (ahead + back) + 6)
    t = block_codes * (evals * ahead + 3) + block_codes // 2
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(1, cfg.num_embeds, (1, n_codes), generator=gen)
    noise = torch.randn(1, n_codes * cfg.repeats, cfg.mel_dim, generator=gen)
    changed = codes.clone()
    changed[0, t] = codes[0, t] % (cfg.num_embeds - 1) + 1
    mel_a, mel_b = integrate(s, codes, noise, steps), integrate(s, changed, noise, steps)
    if not bool(mel_a.isfinite().all()):
        print("  (mel not finite: the numbers below mean nothing)")
    what = "1 DiT forward" if steps == 1 else f"num_steps={steps} ({evals} evaluations)"
    blocks_ms = cfg.block_size * s.frame_ms
    print(
        f"  {what}, {n_codes} codes, code t={t} changed; mask bound: "
        f"{evals * ahead} blocks before ({evals * ahead * blocks_ms:.0f} ms), "
        f"{evals * back} after ({evals * back * blocks_ms:.0f} ms)"
    )
    r, ms = cfg.repeats, s.frame_ms
    lo, hi = t * r, t * r + r - 1
    for label, tl in (("mel exact", 0.0), ("mel tol", tol)):
        print(reach_line(label, span(mel_a, mel_b, tl), lo, hi, r, ms))
    if vocode:
        with torch.no_grad():
            wav_a = s.model.code2wav_bigvgan_model(mel_a).reshape(1, -1)
            wav_b = s.model.code2wav_bigvgan_model(mel_b).reshape(1, -1)
        h = s.hop * r
        for label, tl in (("wave exact", 0.0), ("wave tol", tol)):
            print(
                reach_line(
                    label, span(wav_a, wav_b, tl), t * h, t * h + h - 1, h, 1000 / SAMPLE_RATE
                )
            )


def probe_vocoder(s: Setup, tol: float, seed: int) -> None:
    """Change one mel frame and print how far the BigVGAN waveform moved."""
    gen = torch.Generator().manual_seed(seed)
    frames, at = 120, 60
    mel = torch.randn(1, 80, frames, generator=gen) - 5.0
    bumped = mel.clone()
    bumped[:, :, at] += 1.0
    with torch.no_grad():
        a = s.model.code2wav_bigvgan_model(mel).reshape(1, -1)
        b = s.model.code2wav_bigvgan_model(bumped).reshape(1, -1)
    print(f"  BigVGAN alone, mel frame {at} of {frames} changed:")
    ms = 1000 / SAMPLE_RATE
    for label, tl in (("wave exact", 0.0), ("wave tol", tol)):
        hit = span(a, b, tl)
        if hit is None:
            print(f"    {label:<11} no change")
            continue
        before, after = at * s.hop - hit[0], hit[1] - (at * s.hop + s.hop - 1)
        print(
            f"    {label:<11} before: {before / s.hop:5.1f} frames {before * ms:5.0f} ms"
            f"   after: {after / s.hop:5.1f} frames {after * ms:5.0f} ms"
        )


def check_noise(s: Setup, seed: int) -> None:
    """Show sample() draws its noise in one randn over the whole sequence; check our ODE mirror."""
    cfg = s.dit.config
    codes = torch.randint(1, cfg.num_embeds, (1, 30), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    ours_noise = torch.randn(1, 30 * cfg.repeats, cfg.mel_dim)
    torch.manual_seed(seed)
    theirs = s.dit.sample(s.cond, s.ref_mel, codes, num_steps=3)
    ours = integrate(s, codes, ours_noise, 3)
    torch.manual_seed(seed)
    short = torch.randn(1, 10 * cfg.repeats, cfg.mel_dim)
    print(
        f"  sample() == ODE mirror fed randn(1, {30 * cfg.repeats}, {cfg.mel_dim}) after "
        f"manual_seed: {torch.equal(theirs, ours)}; a 10-code draw is the longer draw's prefix "
        f"(CPU generator): {torch.equal(short, ours_noise[:, : short.shape[1]])}"
    )


def probe_chunked(s: Setup, seed: int) -> None:
    """Error of emitting a block having seen only L codes after it (noise sliced from one draw)."""
    cfg = s.dit.config
    block_codes = cfg.block_size // cfg.repeats
    ahead = 36 * len(cfg.look_ahead_layers) * block_codes
    end = 4 * block_codes  # emit codes [0, end): the first blocks of a reply
    gen = torch.Generator().manual_seed(seed)
    n_codes = end + ahead + block_codes
    codes = torch.randint(1, cfg.num_embeds, (1, n_codes), generator=gen)
    noise = torch.randn(1, n_codes * cfg.repeats, cfg.mel_dim, generator=gen)
    whole = integrate(s, codes, noise, 10)[:, :, : end * cfg.repeats]
    print(f"  chunked approximation, num_steps=10: mel of codes [0, {end}) with L codes after seen")
    for blocks in (0, 1, 2, 4, 8, 16, 36):
        seen = end + blocks * block_codes
        part = integrate(s, codes[:, :seen], noise[:, : seen * cfg.repeats], 10)
        err = float((part[:, :, : end * cfg.repeats] - whole).abs().max() / whole.abs().max())
        ms = blocks * cfg.block_size * s.frame_ms
        print(
            f"    L = {blocks * block_codes:4d} codes ({ms:5.0f} ms): max error {err:.2e} of peak"
        )


def wake(s: Setup, seed: int) -> Setup:
    """Redraw the DiT's weights at 1/sqrt(fan_in) so every layer passes O(1) signals.

    transformers' random init (std 0.02) leaves the velocity about 1e-3 of the noise, so what a
    code does to the next block is lost in float32 rounding of the ODE state and the measured
    reach stops at one evaluation's; a trained model moves the noise to a mel in 9 intervals.
    """
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in s.dit.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=module.in_features**-0.5)
                if module.bias is not None:
                    torch.nn.init.normal_(module.bias, std=0.1)
            elif isinstance(module, torch.nn.Embedding):
                torch.nn.init.normal_(module.weight)
    return Setup(f"{s.name}, weights at 1/sqrt(fan_in)", s.model, s.cond, s.ref_mel)


def tiny(path: Path) -> Setup:
    model: Any = Qwen2_5OmniForConditionalGeneration.from_pretrained(path, local_files_only=True)  # type: ignore[no-untyped-call]
    speaker = next(iter(model.speaker_map.values()))
    return Setup(
        path.name,
        model.token2wav.float().eval(),
        speaker["cond"].float(),
        speaker["ref_mel"].float(),
    )


def random_setup(name: str, dit: dict[str, Any], bigvgan: dict[str, Any], seed: int) -> Setup:
    torch.manual_seed(seed)
    config: Any = Qwen2_5OmniToken2WavConfig(dit_config=dit, bigvgan_config=bigvgan)
    model: Any = Qwen2_5OmniToken2WavModel(config)
    model.eval()
    d = config.dit_config
    return Setup(name, model, torch.randn(1, d.enc_emb_dim), torch.randn(1, 400, d.mel_dim))


def describe(s: Setup, steps: int) -> None:
    c = s.dit.config
    print(
        f"\n== {s.name}: block_size {c.block_size} frames ({c.block_size * s.frame_ms:.0f} ms), "
        f"{c.num_hidden_layers} layers, look_ahead_layers {list(c.look_ahead_layers)}, "
        f"look_backward_layers {list(c.look_backward_layers)}, repeats {c.repeats}, hidden "
        f"{c.hidden_size}, ODE num_steps {steps} (generate()'s default), frame {s.frame_ms:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "tiny-qwen-omni")
    parser.add_argument(
        "--steps", type=int, default=10, help="ODE time points (token2wav's default 10)"
    )
    parser.add_argument("--tol", type=float, default=1e-6, help="relative to the output's peak")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--parts",
        default="loaded,tiny,real,chunked",
        help="comma list of loaded, tiny, real, chunked, real-width (slow on a CPU)",
    )
    args = parser.parse_args()

    parts = set(args.parts.split(","))
    small_vgan = {"upsample_initial_channel": 128}
    if "loaded" in parts:
        loaded = tiny(args.model)
        describe(loaded, args.steps)
        check_noise(loaded, args.seed)
        for steps in (1, 2, args.steps):
            probe_dit(loaded, steps, args.tol, args.seed, vocode=False)
    woken = wake(tiny(args.model), args.seed)
    wide: list[Setup] = [woken] if "tiny" in parts else []
    if "real" in parts:
        narrow = random_setup("real structure, 64 wide", NARROW_DIT, small_vgan, args.seed)
        wide.append(wake(narrow, args.seed))
    for s in wide:
        describe(s, args.steps)
        for steps in (1, 2, args.steps):
            probe_dit(s, steps, args.tol, args.seed, vocode=steps == args.steps)
        probe_vocoder(s, args.tol, args.seed)
    if "chunked" in parts:
        probe_chunked(woken, args.seed)
    if "real-width" in parts:
        s = wake(random_setup("real widths", {}, {}, args.seed), args.seed)
        describe(s, args.steps)
        for steps in (1, 2):
            probe_dit(s, steps, args.tol, args.seed, vocode=False)
        probe_vocoder(s, args.tol, args.seed)


if __name__ == "__main__":
    main()

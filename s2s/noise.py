"""Counter-based random noise for sampling many rows (calls) at once on the device.

A row's noise is a hash of (its seed, its counter, a stream number, the column): no generator
state, so a row draws the same numbers whichever other rows share the batch and in whatever
order they step, nothing is read back to the host, and there is no Python loop over rows. The
engines give each call a seed, count its steps (the counter) and give each kind of token it
picks its own stream, so no two draws of one call reuse the same noise.

Sampling with it is Gumbel-max: ``argmax(scores + gumbel(...))`` over a row's scores (logits
over temperature, filtered tokens at ``-inf``) is an exact draw from ``softmax(scores)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
#: Streams are numbered ``0 <= stream < STREAMS``; (counter, stream) pairs stay distinct for
#: counters below ``2**32 // STREAMS`` (over four million steps).
STREAMS = 0x3F1
_COLUMN_STEP = 0x9E3779B9  # 2**32 over the golden ratio: spreads the columns' hash inputs
# The largest float32 below 1: the uniform never reaches 1, so the noise stays finite.
_BELOW_ONE = 1.0 - 2.0**-24


def uniform(seeds: Tensor, counters: Tensor, stream: int, width: int) -> Tensor:
    """Noise uniform in (0, 1), float32 ``(rows, width)``, one row per entry of ``seeds``.

    ``seeds`` and ``counters`` are int64 ``(rows,)`` on the device the noise is made on (the
    seed's high and low 32 bits are folded together); ``stream`` tells apart draws of one row
    at one counter (``0 <= stream < STREAMS``); ``width`` is the number of columns (the
    vocabulary). Row ``i`` depends only on ``seeds[i]``, ``counters[i]`` and ``stream``.
    """
    if not 0 <= stream < STREAMS:
        raise ValueError(f"stream {stream} is outside 0..{STREAMS - 1}")
    seeds = (seeds ^ (seeds >> 32)) & _MASK32
    step = (counters * STREAMS + stream) & _MASK32
    base = _mix((seeds ^ _mix(step)) & _MASK32)
    columns = torch.arange(width, device=seeds.device, dtype=torch.long) * _COLUMN_STEP
    bits = _mix((base[:, None] + columns[None, :]) & _MASK32)
    # float32 rounds the top 128 of the 2**32 values up to 2**32 (a uniform of exactly 1).
    return ((bits.to(torch.float32) + 0.5) / 4294967296.0).clamp_max(_BELOW_ONE)


def gumbel(seeds: Tensor, counters: Tensor, stream: int, width: int) -> Tensor:
    """Standard Gumbel noise, float32 ``(rows, width)``: ``-log(-log(uniform(...)))`` with the
    same arguments as ``uniform``."""
    return -torch.log(-torch.log(uniform(seeds, counters, stream, width)))


def _mix(x: Tensor) -> Tensor:
    """A 32-bit integer hash on int64 tensors holding values below 2**32 (products stay below
    2**59, so nothing overflows)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def reseeded(seed: torch.Tensor | int) -> torch.Tensor | int:
    """The seed a call's noise goes on with after a reset: an odd multiplier and an increment
    mod 2**32, a bijection, so distinct seeds stay distinct and a call never cycles back soon."""
    return (seed * 0x9E3779B1 + 1) & _MASK32

"""Choosing the next token for a batch of calls, each with its own settings.

The filters are those ``generate()`` applies, in its order (repetition penalty and suppressed
tokens first, then temperature, top-k and top-p), computed for the whole batch at once with a
per-row parameter; a row without settings (``None``) takes the argmax, as greedy ``generate()``
does. A sampled row takes the argmax of its filtered scores plus Gumbel noise from its own seed
and counter (``s2s.noise``): an exact draw from the softmax of those scores that depends on
nothing else in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from s2s.noise import gumbel


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sample from the logits divided by ``temperature``, among the ``top_k`` most likely tokens
    (0: all) whose probabilities add up to ``top_p``."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling settings {self}")


def penalize(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """Make tokens already produced (``seen`` ``(batch, vocab)``) less likely by ``penalty``
    ``(batch,)``: negative logits multiplied by it, positive ones divided."""
    factor = penalty[:, None].to(logits.dtype)
    penalized = torch.where(logits < 0, logits * factor, logits / factor)
    return torch.where(seen, penalized, logits)


def noise_keys(device: torch.device, keys: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """Rows' (seed, counter) pairs as the int64 ``seeds`` and ``counters`` ``pick`` takes, on
    ``device``, in one copy that does not wait for the device (the host values are staged at
    once)."""
    both = torch.tensor(keys, dtype=torch.long).T.contiguous().to(device, non_blocking=True)
    return both[0], both[1]


def pick(
    logits: Tensor, settings: list[Sampling | None], seeds: Tensor, counters: Tensor, stream: int
) -> Tensor:
    """One token per row of ``logits`` ``(batch, vocab)``: the argmax where ``settings`` has
    None, a sample elsewhere, drawn with ``s2s.noise.gumbel(seeds, counters, stream, vocab)``
    (``seeds`` and ``counters``: int64 ``(batch,)`` on the logits' device)."""
    greedy = logits.argmax(dim=-1)
    if all(s is None for s in settings):
        return greedy
    device = logits.device
    chosen = [s or Sampling() for s in settings]
    temperature = torch.tensor([s.temperature for s in chosen], device=device)
    scores = logits.float() / temperature[:, None]
    vocab = scores.shape[-1]
    top_k = torch.tensor([min(s.top_k, vocab) or vocab for s in chosen], device=device)
    ranked = scores.sort(dim=-1, descending=True).values
    kth = ranked.gather(1, (top_k - 1)[:, None])
    scores = scores.masked_fill(scores < kth, float("-inf"))
    top_p = torch.tensor([s.top_p for s in chosen], device=device)
    ascending, order = scores.sort(dim=-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - top_p)[:, None]
    drop[:, -1] = False  # the most likely token always stays
    scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    sampled = (scores + gumbel(seeds, counters, stream, vocab)).argmax(dim=-1)
    is_greedy = torch.tensor([s is None for s in settings], device=device)
    return torch.where(is_greedy, greedy, sampled)

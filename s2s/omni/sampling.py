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

from s2s.hosttraffic import upload
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


@dataclass(frozen=True, slots=True)
class Draws:
    """How each row of a batch picks its token, as tensors on the device (one entry per row):
    its noise key (``seeds``, ``counters``, int64), whether it takes the argmax (``greedy``) and
    otherwise its ``temperature``, ``top_k`` (0: all) and ``top_p``. ``sampled`` (on the host)
    says whether any row samples at all."""

    seeds: Tensor
    counters: Tensor
    greedy: Tensor
    temperature: Tensor
    top_k: Tensor
    top_p: Tensor
    sampled: bool

    @staticmethod
    def columns(
        name: str, settings: list[Sampling | None], keys: list[tuple[int, int]]
    ) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
        """The int64 and float32 host columns, named after ``name``, that ``Draws.of`` reads
        back once uploaded (``s2s.hosttraffic.upload``): so a step sends every batch's draws
        in its one copy. ``keys``: each row's (seed, counter)."""
        chosen = [s or Sampling() for s in settings]
        ints = {
            f"{name}.seed": [seed for seed, _ in keys],
            f"{name}.counter": [counter for _, counter in keys],
            f"{name}.greedy": [int(s is None) for s in settings],
            f"{name}.top_k": [s.top_k for s in chosen],
        }
        floats = {
            f"{name}.temperature": [s.temperature for s in chosen],
            f"{name}.top_p": [s.top_p for s in chosen],
        }
        return ints, floats

    @staticmethod
    def of(name: str, uploaded: dict[str, Tensor], sampled: bool) -> Draws:
        """The draws of ``Draws.columns(name, settings, ...)`` once uploaded; ``sampled``:
        whether any of ``settings`` samples (``Draws.samples``)."""
        return Draws(
            seeds=uploaded[f"{name}.seed"],
            counters=uploaded[f"{name}.counter"],
            greedy=uploaded[f"{name}.greedy"].bool(),
            temperature=uploaded[f"{name}.temperature"],
            top_k=uploaded[f"{name}.top_k"],
            top_p=uploaded[f"{name}.top_p"],
            sampled=sampled,
        )

    @staticmethod
    def samples(settings: list[Sampling | None]) -> bool:
        """Whether any row of ``settings`` samples (else every row takes the argmax)."""
        return any(s is not None for s in settings)

    @staticmethod
    def send(
        device: torch.device, settings: list[Sampling | None], keys: list[tuple[int, int]]
    ) -> Draws:
        """``settings`` and ``keys`` uploaded on their own (a prefill's single row, tests)."""
        ints, floats = Draws.columns("d", settings, keys)
        uploaded = upload(device, torch.int64, **ints) | upload(device, torch.float32, **floats)
        return Draws.of("d", uploaded, Draws.samples(settings))


def pick(logits: Tensor, draws: Draws, stream: int) -> Tensor:
    """One token per row of ``logits`` ``(batch, vocab)``: the argmax for a greedy row, a sample
    elsewhere, drawn with ``s2s.noise.gumbel(draws.seeds, draws.counters, stream, vocab)``."""
    greedy = logits.argmax(dim=-1)
    if not draws.sampled:
        return greedy
    scores = logits.float() / draws.temperature[:, None]
    vocab = scores.shape[-1]
    top_k = torch.where((draws.top_k > 0) & (draws.top_k < vocab), draws.top_k, vocab)
    ranked = scores.sort(dim=-1, descending=True).values
    kth = ranked.gather(1, (top_k - 1)[:, None])
    scores = scores.masked_fill(scores < kth, float("-inf"))
    ascending, order = scores.sort(dim=-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - draws.top_p)[:, None]
    drop[:, -1] = False  # the most likely token always stays
    scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    sampled = (scores + gumbel(draws.seeds, draws.counters, stream, vocab)).argmax(dim=-1)
    return torch.where(draws.greedy, greedy, sampled)

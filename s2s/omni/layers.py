"""The pieces of a Qwen3 decoder layer that the engine's own loops share, in fewer operators.

A decode step is launch-bound (every operator is a kernel launch and Python around it), so
what runs once per layer per step counts. transformers' RMSNorm is eight operators (casts,
``pow``, ``mean``, ``add``, ``rsqrt``, two ``mul``); ``rms_norm`` here is torch's fused one, with
the weight. Its rotary embedding is seven per tensor (two ``mul``, two ``slice``, ``neg``,
``cat``, ``add``), after unsqueezing the angles per layer; ``Rotary`` prepares the angles once
per step (the sine with the sign ``rotate_half`` would give it), leaving four (``roll``, two
``mul``, ``add``). Both are bit-equal to transformers' in float32 (``tests/test_qwen3_omni.py``
compares with ``generate()``); in bf16 the norm rounds once where transformers rounds twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional


def rms_norm(norm: Any, x: Tensor) -> Tensor:
    """What ``norm(x)`` computes for a Qwen3-Omni RMSNorm module (``weight``,
    ``variance_epsilon``), in one operator."""
    out: Tensor = functional.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return out


@dataclass(frozen=True, slots=True)
class Rotary:
    """Rotary angles for positions ``(batch, 1, positions, head_dim)``: ``cos``, and ``sin``
    negated on its first half, so that rotating is ``x * cos + x.roll(half) * sin``."""

    cos: Tensor
    sin: Tensor

    @staticmethod
    def of(cos: Tensor, sin: Tensor) -> Rotary:
        """From a rotary embedding's ``(cos, sin)`` ``(batch, positions, head_dim)``."""
        half = sin.shape[-1] // 2
        signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        return Rotary(cos[:, None], signed[:, None])

    def __call__(self, x: Tensor) -> Tensor:
        """``x`` ``(batch, heads, positions, head_dim)`` rotated (``apply_rotary_pos_emb``)."""
        return x * self.cos + x.roll(x.shape[-1] // 2, dims=-1) * self.sin

    def __getitem__(self, positions: slice) -> Rotary:
        return Rotary(self.cos[:, :, positions], self.sin[:, :, positions])


def causal_rows(start: int, count: int, groups: int, device: torch.device) -> Tensor:
    """The mask ``(groups * count, start + count)`` of ``count`` new positions from ``start``,
    each seeing every earlier position and itself, with ``grouped_attention``'s rows: one set
    per query head that shares a key head."""
    new = torch.arange(start, start + count, device=device)
    mask = torch.arange(start + count, device=device)[None, :] <= new[:, None]
    return mask.repeat(groups, 1)


def grouped_attention(
    query: Tensor, keys: Tensor, values: Tensor, scale: float, mask: Tensor | None = None
) -> Tensor:
    """Grouped-query attention without copying keys per query head: the query heads that share
    a key head become that head's rows. ``query`` ``(batch, heads, count, head_dim)``, ``keys``
    and ``values`` ``(batch, kv_heads, positions, head_dim)``, ``mask`` broadcastable to
    ``(batch, kv_heads, heads // kv_heads * count, positions)`` (``causal_rows``; None: every
    position). Returns ``(batch, count, heads * head_dim)``, ready for the output projection."""
    batch, heads, count, head_dim = query.shape
    kv_heads = keys.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads * count, head_dim)
    out = functional.scaled_dot_product_attention(
        grouped, keys, values, attn_mask=mask, scale=scale
    )
    if count == 1:
        return out.reshape(batch, 1, -1)
    return out.view(batch, heads, count, head_dim).transpose(1, 2).reshape(batch, count, -1)


def project(attention: Any, hidden: Tensor, rotary: Rotary, head_dim: int
            ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``attention``'s queries, keys and values for ``hidden`` ``(batch, positions, hidden)``, as
    ``(batch, heads, positions, head_dim)``, queries and keys normed and rotated."""
    shape = (*hidden.shape[:2], -1, head_dim)
    query = rms_norm(attention.q_norm, attention.q_proj(hidden).view(shape)).transpose(1, 2)
    key = rms_norm(attention.k_norm, attention.k_proj(hidden).view(shape)).transpose(1, 2)
    value = attention.v_proj(hidden).view(shape).transpose(1, 2)
    return rotary(query), rotary(key), value

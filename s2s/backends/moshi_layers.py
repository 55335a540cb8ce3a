"""The Moshi checkpoint's layers as the engine (``s2s.backends.moshi_engine``) applies them:
one position per slot, and the depth decoder's per-codebook weights sliced, not broadcast."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def rms(x: torch.Tensor, norm: Any) -> torch.Tensor:
    # As transformers' MoshiRMSNorm: in float32, then back to the activations' dtype.
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + norm.eps)
    weight: torch.Tensor = norm.weight
    return (y * weight.float()).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def mlp(h: torch.Tensor, mlp: Any, codebook: int | None) -> torch.Tensor:
    up = mlp.fc1(h) if codebook is None else F.linear(h, mlp.fc1.weight[codebook])
    gate, value = up.view(*up.shape[:-1], 2, -1).unbind(dim=-2)
    inner = mlp.activation_fn(gate) * value
    if codebook is None:
        out: torch.Tensor = mlp.fc2(inner)
        return out
    return F.linear(inner, mlp.fc2.weight[codebook])

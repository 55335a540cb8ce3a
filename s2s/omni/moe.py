"""Mixture-of-experts feed-forward for the decode step, tokens grouped by expert.

transformers' expert modules loop over the experts in Python (one small matmul per expert hit,
each a host sync to find its tokens), which dominates a decode step where every layer sees only
a few tokens. Here the ``(token, expert)`` pairs are sorted by expert and each projection is one
``grouped_mm`` over the sorted tokens, so a layer costs the same few kernels whatever the
routing, with no host sync. The weights are the module's own (``gate_up_proj``
``(experts, 2 * inter, hidden)``, ``down_proj`` ``(experts, hidden, inter)``); nothing is copied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional


def _grouped(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """``x[rows of group g] @ weight[g]`` for consecutive groups ending at ``offsets``."""
    if hasattr(functional, "grouped_mm"):
        out: Tensor = functional.grouped_mm(x, weight, offs=offsets)
        return out
    # Older torch (the device image's 2.11) has the private op only.
    out = torch._grouped_mm(x, weight, offs=offsets)
    return out


def grouped_available(x: Tensor) -> bool:
    """Whether ``grouped_mm`` takes ``x``'s dtype on its device (CUDA's kernel: bf16 only)."""
    return x.device.type == "cpu" or x.dtype == torch.bfloat16


def experts_forward(
    experts: Any, x: Tensor, index: Tensor, weights: Tensor, grouped: bool | None = None
) -> Tensor:
    """What ``experts(x, index, weights)`` computes: ``x`` ``(tokens, hidden)``, ``index`` and
    ``weights`` ``(tokens, top_k)`` from the router.

    ``grouped`` (default: where the kernel exists) picks ``grouped_mm``; otherwise each
    ``(token, expert)`` pair gathers its expert's weights for one batched matmul, which reads a
    weight copy per pair: fine for a decode step's few tokens in float32 tests on a GPU, not for
    long prefills.
    """
    if grouped is None:
        grouped = grouped_available(x)
    if not grouped:
        return _gathered(experts, x, index, weights)
    top_k = index.shape[1]
    flat = index.reshape(-1)
    order = flat.argsort(stable=True)
    source = order // top_k
    # Not bincount: on CUDA it reads the largest index back to size its output (a host sync).
    counts = flat.new_zeros(experts.num_experts).index_add_(0, flat, torch.ones_like(flat))
    offsets = counts.cumsum(0).to(torch.int32)
    picked = x[source]
    gate_up = _grouped(picked, experts.gate_up_proj.transpose(1, 2), offsets)
    gate, up = gate_up.chunk(2, dim=-1)
    hidden = experts.act_fn(gate) * up
    out = _grouped(hidden, experts.down_proj.transpose(1, 2), offsets)
    out = out * weights.reshape(-1)[order, None].to(out.dtype)
    return torch.zeros_like(x).index_add_(0, source, out.to(x.dtype))


def _gathered(experts: Any, x: Tensor, index: Tensor, weights: Tensor) -> Tensor:
    gate_up = torch.matmul(experts.gate_up_proj[index], x[:, None, :, None])[..., 0]
    gate, up = gate_up.chunk(2, dim=-1)
    hidden = experts.act_fn(gate) * up
    out = torch.matmul(experts.down_proj[index], hidden[..., None])[..., 0]
    return (out * weights[..., None].to(out.dtype)).sum(dim=1).to(x.dtype)


def feed_forward(mlp: Any, x: Tensor) -> Tensor:
    """A decoder layer's ``mlp`` on ``x`` ``(batch, steps, hidden)``: a dense MLP as it is, a
    sparse block (the thinker's, or the talker's with its gated shared expert) grouped."""
    if not hasattr(mlp, "experts"):
        dense: Tensor = mlp(x)
        return dense
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    _, weights, index = mlp.gate(flat)
    out = experts_forward(mlp.experts, flat, index, weights)
    if hasattr(mlp, "shared_expert"):
        shared = mlp.shared_expert(flat)
        out = out + torch.sigmoid(mlp.shared_expert_gate(flat)) * shared
    return out.reshape(shape)

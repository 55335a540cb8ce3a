"""The talker's code predictor for a batch of frames, one codebook after another, over a cache
it owns.

Each frame, the code predictor reads the talker's last hidden state and the frame's first code
(positions 0 and 1), then fills the frame's other codebooks one by one, each fed back as the
next position: ``num_code_groups`` positions in all, always from position 0. So its cache is
the same few positions every frame; here it is one preallocated tensor per layer, ``(rows,
kv_heads, groups, head_dim)``, written in place (rows past the batch, and positions past the
current one, hold an earlier frame's values and are never read), and the rotary embedding of
those positions is computed once. transformers' forward builds a fresh ``DynamicCache``, a
causal mask and the rotary embedding on every call, 15 calls a frame: about twice the
operators, and memory allocated per call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from s2s.omni.layers import Rotary, causal_rows, grouped_attention, project, rms_norm


class CodePredictor:
    """``predictor`` (``Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration``) over
    up to ``rows`` frames at once."""

    def __init__(self, predictor: Any, rows: int) -> None:
        self.model = predictor.model
        self.heads = predictor.lm_head
        config = self.model.config
        attention = self.model.layers[0].self_attn
        self.head_dim = int(attention.head_dim)
        self.kv_heads = attention.k_proj.out_features // self.head_dim
        self.heads_per_kv = attention.q_proj.out_features // self.head_dim // self.kv_heads
        self.positions = int(config.num_code_groups)
        weight = attention.k_proj.weight
        shape = (rows, self.kv_heads, self.positions, self.head_dim)
        self.keys = [weight.new_zeros(shape) for _ in self.model.layers]
        self.values = [weight.new_zeros(shape) for _ in self.model.layers]
        with torch.inference_mode():
            ids = torch.arange(self.positions, device=weight.device)[None]
            self.rotary = Rotary.of(*self.model.rotary_emb(weight, ids))

    def embed(self, group: int, codes: Tensor) -> Tensor:
        """The embedding ``(batch, 1, hidden)`` of codebook ``group + 1``'s ``codes``, as fed
        back after ``logits(group, ...)`` picked them."""
        embedded: Tensor = self.model.codec_embedding[group](codes[:, None])
        return embedded

    def logits(self, group: int, hidden: Tensor) -> Tensor:
        """Scores ``(batch, vocab)`` of codebook ``group + 1`` from ``hidden``'s last position."""
        out: Tensor = self.heads[group](hidden[:, -1])
        return out

    def run(self, hidden: Tensor, start: int) -> Tensor:
        """Feed ``hidden`` ``(batch, n, hidden)`` as positions ``start`` to ``start + n - 1`` of
        every row's frame (row ``i`` of the batch in cache row ``i``), attending to the frame's
        earlier positions; returns the normed output ``(batch, n, hidden)``."""
        batch, count = hidden.shape[:2]
        end = start + count
        rotary = self.rotary[start:end]
        # One position sees all the frame's earlier ones: no mask. More need a causal one.
        mask = None
        if count > 1:
            mask = causal_rows(start, count, self.heads_per_kv, hidden.device)
        for number, layer in enumerate(self.model.layers):
            attention = layer.self_attn
            query, key, value = project(
                attention, rms_norm(layer.input_layernorm, hidden), rotary, self.head_dim
            )
            self.keys[number][:batch, :, start:end] = key
            self.values[number][:batch, :, start:end] = value
            attended = grouped_attention(
                query,
                self.keys[number][:batch, :, :end],
                self.values[number][:batch, :, :end],
                attention.scaling,
                mask,
            )
            hidden = hidden + attention.o_proj(attended)
            hidden = hidden + layer.mlp(rms_norm(layer.post_attention_layernorm, hidden))
        return rms_norm(self.model.norm, hidden)

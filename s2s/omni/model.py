"""Loading a Qwen3-Omni checkpoint for the streaming engine (``s2s.omni.engine``)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Qwen3OmniMoeForConditionalGeneration


def load_model(path: str, device: str = "cpu", dtype: torch.dtype | None = None) -> Any:
    """``Qwen3OmniMoeForConditionalGeneration.from_pretrained(path)``, ready for the engine.

    The talker's multimodal RoPE reads ``config.audio_config.n_window`` through the thinker's
    rope-index code, but the talker's config has no audio config (transformers 5.24), so a prompt
    with audio fails in ``generate()`` too; the thinker's is lent to it.
    """
    model: Any = Qwen3OmniMoeForConditionalGeneration.from_pretrained(path, dtype=dtype)
    return prepare_model(model.to(device))


def prepare_model(model: Any) -> Any:
    """What the engine needs of a built model besides its weights (``load_model`` does this; a
    model built another way, say with random weights, calls it itself): eval mode, and the
    thinker's audio config lent to the talker (see ``load_model``)."""
    model = model.eval()
    if not hasattr(model.talker.config, "audio_config"):
        model.talker.config.audio_config = model.config.thinker_config.audio_config
    return model

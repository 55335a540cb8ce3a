"""A call the engine has begun and not yet stepped: its request checked and put on the device
(``prompt_inputs``), and its prefill's progress (``Prefilling``), run piece by piece by
``OmniEngine.prefill`` over the prompts ``s2s.omni.prefill`` prepares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from s2s.omni.kept import Kept
from s2s.omni.prefill import Pieces, ThinkerPrompt
from s2s.omni.request import Request
from s2s.omni.rows import Row


@dataclass(slots=True)
class Prefilling:
    """A call begun whose prompts are being prefilled, piece by piece."""

    id: int
    slot: int
    request: Request
    inputs: dict[str, Tensor]
    thinker: ThinkerPrompt | None = None  # once the encoders have run
    row: Row | None = None  # once the thinker's prefill is complete
    talker: Pieces | None = None
    kept: Kept | None = None  # the conversation's last turn, in this slot


def prompt_inputs(
    request: Request, config: Any, device: torch.device, dtype: torch.dtype
) -> dict[str, Tensor]:
    """``request``'s inputs on ``device``, checked: features and pixels in the weights'
    ``dtype`` (bf16 on a GPU), ids and masks as they are. Raises ``ValueError`` for a request
    the engine cannot run."""
    if request.speaker.lower() not in config.talker_config.speaker_id:
        raise ValueError(f"unknown speaker {request.speaker!r}")
    if request.max_text_tokens < 1 or request.max_frames < 1:
        raise ValueError("max_text_tokens and max_frames must be at least 1")
    inputs = {
        k: v.to(device, dtype=dtype if v.is_floating_point() else v.dtype)
        for k, v in request.inputs.items()
    }
    ids = inputs["input_ids"]
    if ids.shape[0] != 1:
        raise ValueError(f"one call per request, got a batch of {ids.shape[0]}")
    if "attention_mask" in inputs and not bool(inputs["attention_mask"].all()):
        raise ValueError("a padded prompt (attention_mask with zeros) is not supported")
    opening = [config.im_start_token_id, config.assistant_token_id]
    if ids.shape[1] < 3 or ids[0, -3:-1].tolist() != opening:
        # The talker's prompt starts from these three tokens (as generate() assumes).
        raise ValueError("the prompt must end with the open assistant turn")
    return inputs

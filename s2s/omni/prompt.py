"""Qwen3-Omni's model inputs from a conversation, without its processor class.

``Qwen3OmniMoeProcessor`` needs torchvision (for its video processor), which this project does
not install; this does the processor's work for audio, pictures and text with the pieces that
load without it: the tokenizer, ``WhisperFeatureExtractor`` and ``Qwen2VLImageProcessorPil``.
Each audio clip becomes ``<|audio_start|>`` + one ``<|audio_pad|>`` per audio-encoder output
frame + ``<|audio_end|>``; each picture ``<|vision_start|>`` + one ``<|image_pad|>`` per merged
patch + ``<|vision_end|>``, inside Qwen's chat template, and the prompt ends with the open
assistant turn the model answers in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

AUDIO_RATE = 16_000  # Whisper features


@dataclass(frozen=True, slots=True)
class Prompter:
    """The three pieces that stand in for Qwen's processor, loaded from a checkpoint folder."""

    tokenizer: Any
    features: Any  # WhisperFeatureExtractor
    images: Any  # Qwen2VLImageProcessorPil

    @classmethod
    def from_pretrained(cls, path: str) -> Prompter:
        """Load them from ``path`` (a local folder or hub id) with ``from_pretrained``."""
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, WhisperFeatureExtractor

        return cls(
            AutoTokenizer.from_pretrained(path),
            WhisperFeatureExtractor.from_pretrained(path),
            Qwen2VLImageProcessorPil.from_pretrained(path),
        )

    def build(self, messages: list[Message], max_tokens: int | None = None) -> dict[str, Any]:
        """``build_inputs`` with these pieces."""
        return build_inputs(self.tokenizer, self.features, self.images, messages, max_tokens)

    def fit(self, messages: list[Message], max_tokens: int, dropped: int = 0,
            retain: float = 1.0) -> tuple[dict[str, Any], int]:  # fmt: skip
        """``fit_inputs`` with these pieces."""
        return fit_inputs(
            self.tokenizer, self.features, self.images, messages, max_tokens, dropped, retain
        )


@dataclass(frozen=True, slots=True)
class Message:
    """One chat turn: its role and, in order, its audio clips, pictures and text."""

    role: str  # "system", "user" or "assistant"
    text: str = ""
    audio: list[np.ndarray] = field(default_factory=list)  # float32 mono at AUDIO_RATE
    images: list[Any] = field(default_factory=list)  # PIL images


def audio_tokens(frames: int, n_window: int = 50) -> int:
    """How many ``<|audio_pad|>`` stand for ``frames`` mel frames (the encoder's output length).

    The audio encoder cuts features into windows of ``2 * n_window`` frames; each full window
    gives 13 outputs and the rest three stride-2 convolutions' worth.
    """
    window = 2 * n_window
    rest = (frames % window - 1) // 2 + 1
    return ((rest - 1) // 2 + 1 - 1) // 2 + 1 + (frames // window) * 13


def build_inputs(
    tokenizer: Any,
    features: Any,
    images: Any,
    messages: list[Message],
    max_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """The thinker's keyword arguments (``input_ids``, ``attention_mask`` and, when there is
    audio or a picture, ``input_features``/``feature_attention_mask`` and
    ``pixel_values``/``image_grid_thw``) for ``messages``, batch of one.

    With ``max_tokens``, the oldest turns after the leading system message are left out until
    the prompt fits; ``ValueError`` if even the last turn alone does not.
    """
    if max_tokens is None:
        return _build(tokenizer, features, images, messages)
    return fit_inputs(tokenizer, features, images, messages, max_tokens)[0]


def fit_inputs(
    tokenizer: Any,
    features: Any,
    images: Any,
    messages: list[Message],
    max_tokens: int,
    dropped: int = 0,
    retain: float = 1.0,
) -> tuple[dict[str, torch.Tensor], int]:
    """``build_inputs`` for ``messages`` without their ``dropped`` oldest turns (after the
    leading system message) and, if that is still over ``max_tokens``, without as many more as
    bring it within ``retain`` of the budget; returns the inputs and the turns left out.

    Cutting to less than the budget (``retain`` < 1, as the Realtime API's ``retention_ratio``)
    and passing the count back in next turn keeps the prompt's start where it was for the turns
    after, until the budget is reached again: what a kept cache of the last turn needs
    (``OmniEngine``), since a prompt that starts elsewhere shares nothing with it."""
    first = 1 if messages and messages[0].role == "system" else 0
    dropped = min(dropped, max(len(messages) - first - 1, 0))
    kept = messages[:first] + messages[first + dropped :]
    inputs = _build(tokenizer, features, images, kept)
    if inputs["input_ids"].shape[1] <= max_tokens:
        return inputs, dropped
    target = max_tokens * retain
    while inputs["input_ids"].shape[1] > target and len(kept) - first > 1:
        del kept[first]
        dropped += 1
        inputs = _build(tokenizer, features, images, kept)
    if inputs["input_ids"].shape[1] > max_tokens:
        raise ValueError(f"the last turn alone is over the {max_tokens}-token budget")
    return inputs, dropped


def _build(
    tokenizer: Any, features: Any, images: Any, messages: list[Message]
) -> dict[str, torch.Tensor]:
    prompt = ""
    clips: list[np.ndarray] = []
    pictures: list[Any] = []
    for message in messages:
        if message.role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown role {message.role!r}")
        body = ""
        for clip in message.audio:
            clips.append(np.asarray(clip, dtype=np.float32))
            body += "<|audio_start|>{audio}<|audio_end|>"
        for picture in message.images:
            pictures.append(picture)
            body += "<|vision_start|>{image}<|vision_end|>"
        prompt += f"<|im_start|>{message.role}\n{body}{message.text}<|im_end|>\n"
    prompt += "<|im_start|>assistant\n"
    kwargs: dict[str, torch.Tensor] = {}
    pads: list[str] = []
    if clips:
        feats = features(
            clips, sampling_rate=AUDIO_RATE, return_attention_mask=True, padding="longest",
            return_tensors="pt",
        )  # fmt: skip
        mask = feats["attention_mask"]
        kwargs["input_features"] = feats["input_features"]
        kwargs["feature_attention_mask"] = mask
        pads += ["<|audio_pad|>" * audio_tokens(int(n)) for n in mask.sum(-1)]
    if pictures:
        pixels = images(images=pictures, return_tensors="pt")
        kwargs["pixel_values"] = pixels["pixel_values"]
        kwargs["image_grid_thw"] = pixels["image_grid_thw"]
        merged = images.merge_size**2
        pads_image = ["<|image_pad|>" * (int(g.prod()) // merged) for g in pixels["image_grid_thw"]]
    else:
        pads_image = []
    # Fill the placeholders in order of appearance, audio and pictures each in their own order.
    audio_iter, image_iter = iter(pads), iter(pads_image)
    parts = prompt.split("{audio}")
    prompt = parts[0] + "".join(next(audio_iter) + part for part in parts[1:])
    parts = prompt.split("{image}")
    prompt = parts[0] + "".join(next(image_iter) + part for part in parts[1:])
    ids = tokenizer(prompt, return_tensors="pt")
    kwargs["input_ids"] = ids["input_ids"]
    kwargs["attention_mask"] = ids["attention_mask"]
    return kwargs

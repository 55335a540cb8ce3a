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

from s2s.omni.media import AUDIO_RATE, Media, audio_tokens, clip_batch, clip_mask

__all__ = ["AUDIO_RATE", "Message", "Prompter", "audio_tokens", "build_inputs", "fit_inputs"]


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

    def build(self, messages: list[Message], max_tokens: int | None = None,
              media: Media | None = None) -> dict[str, Any]:  # fmt: skip
        """``build_inputs`` with these pieces."""
        return build_inputs(self.tokenizer, self.features, self.images, messages, max_tokens, media)

    def fit(
        self, messages: list[Message], max_tokens: int, dropped: int = 0, retain: float = 1.0,
        media: Media | None = None, **truncation: Any,
    ) -> tuple[dict[str, Any], int]:  # fmt: skip
        """``fit_inputs`` with these pieces (``truncation``: its keyword arguments)."""
        pieces = (self.tokenizer, self.features, self.images)
        return fit_inputs(*pieces, messages, max_tokens, dropped, retain, media, **truncation)


@dataclass(frozen=True, slots=True)
class Message:
    """One chat turn: its role and, in order, its audio clips, pictures and text."""

    role: str  # "system", "user" or "assistant"
    text: str = ""
    #: Mono at AUDIO_RATE: float32 in [-1, 1], or int16.
    audio: list[np.ndarray] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)  # PIL images or an image file's bytes
    #: The conversation item it is, if any: its clips and pictures are known by it and their
    #: place (neither ever changes for an item), not by hashing their bytes every turn.
    item: str = ""


def build_inputs(
    tokenizer: Any,
    features: Any,
    images: Any,
    messages: list[Message],
    max_tokens: int | None = None,
    media: Media | None = None,
) -> dict[str, torch.Tensor]:
    """The thinker's keyword arguments (``input_ids``, ``attention_mask`` and, when there is
    audio or a picture, ``input_features``/``feature_attention_mask`` and
    ``pixel_values``/``image_grid_thw``) for ``messages``, batch of one; with ``media``, the
    conversation's clips and pictures already prepared are taken from it (and ``media.latest``
    is this prompt's plan).

    With ``max_tokens``, the oldest turns after the leading system message are left out until
    the prompt fits; ``ValueError`` if even the last turn alone does not.
    """
    return fit_inputs(tokenizer, features, images, messages, max_tokens, media=media)[0]


def fit_inputs(
    tokenizer: Any,
    features: Any,
    images: Any,
    messages: list[Message],
    max_tokens: int | None,
    dropped: int = 0,
    retain: float = 1.0,
    media: Media | None = None,
    *,
    truncate: bool = True,
    post_instructions: int | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """``build_inputs`` for ``messages`` without their ``dropped`` oldest turns (after the
    leading system message) and, if that is still over ``max_tokens``, without as many more as
    bring it within ``retain`` of the budget; returns the inputs and the turns left out.

    Cutting to less than the budget (``retain`` < 1, as the Realtime API's ``retention_ratio``)
    and passing the count back in next turn keeps the prompt's start where it was for the turns
    after, until the budget is reached again: what a kept cache of the last turn needs
    (``OmniEngine``), since a prompt that starts elsewhere shares nothing with it.

    Each turn is tokenized once and on its own (every turn begins and ends with a special
    token, which the tokenizer never merges across), so what fits is counted, not rebuilt.

    Without ``truncate``, a conversation over the budget is a ``ValueError`` (the Realtime API's
    ``truncation: disabled``); ``post_instructions`` is a lower budget for the turns after the
    leading system message (its ``token_limits``).

    With ``media`` (a conversation's, for ``OmniEngine``) the inputs are planned: they carry
    the audio masks and picture grids but no features or pixels, which the engine takes from
    ``media.latest`` for the clips and pictures it has not encoded yet."""
    planned = media is not None
    media = Media() if media is None else media
    first = 1 if messages and messages[0].role == "system" else 0
    dropped = min(dropped, max(len(messages) - first - 1, 0))
    opening = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    turns = [_turn(tokenizer, features, images, media, m) for m in messages[:first]]
    rest = [_turn(tokenizer, features, images, media, m) for m in messages[first + dropped :]]
    total = len(opening) + sum(len(t.ids) for t in turns + rest)
    if post_instructions is not None:
        after = post_instructions + len(opening) + sum(len(t.ids) for t in turns)
        max_tokens = after if max_tokens is None else min(max_tokens, after)
    if max_tokens is not None and total > max_tokens and not truncate:
        raise ValueError(
            f"the conversation is {total} tokens, over the {max_tokens}-token budget, and its "
            "truncation is disabled"
        )
    if max_tokens is not None and total > max_tokens:
        target = max_tokens * retain
        while total > target and len(rest) > 1:
            total -= len(rest.pop(0).ids)
            dropped += 1
        if total > max_tokens:
            raise ValueError(f"the last turn alone is over the {max_tokens}-token budget")
    return _assemble(media, [*turns, *rest], opening, planned), dropped


@dataclass(slots=True)
class _Turn:
    """One message's tokens and, in order, its clips' and pictures' digests and inputs."""

    ids: list[int]
    audio: list[tuple[bytes, int]]  # feature frames
    pictures: list[tuple[bytes, torch.Tensor]]  # patch grid


def _turn(tokenizer: Any, features: Any, images: Any, media: Media, message: Message) -> _Turn:
    if message.role not in ("system", "user", "assistant"):
        raise ValueError(f"unknown role {message.role!r}")
    body = ""
    audio = [
        media.clip(features, clip, f"{message.item}#{i}" if message.item else None)
        for i, clip in enumerate(message.audio)
    ]
    for _, frames in audio:
        body += "<|audio_start|>" + "<|audio_pad|>" * audio_tokens(frames)
        body += "<|audio_end|>"
    pictures = [
        media.picture(images, picture, f"{message.item}#picture{i}" if message.item else None)
        for i, picture in enumerate(message.images)
    ]
    merged = images.merge_size**2
    for _, grid in pictures:
        body += "<|vision_start|>" + "<|image_pad|>" * (int(grid.prod()) // merged)
        body += "<|vision_end|>"
    text = f"<|im_start|>{message.role}\n{body}{message.text}<|im_end|>\n"
    return _Turn(media.tokens(tokenizer, text), audio, pictures)


def _assemble(
    media: Media, turns: list[_Turn], opening: list[int], planned: bool
) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[token for turn in turns for token in turn.ids] + opening])
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    audio = [clip for turn in turns for clip in turn.audio]
    pictures = [picture for turn in turns for picture in turn.pictures]
    if audio:
        kwargs["feature_attention_mask"] = clip_mask([frames for _, frames in audio])
        if not planned:
            kwargs["input_features"] = clip_batch([media.features(key) for key, _ in audio])
    if pictures:
        kwargs["image_grid_thw"] = torch.stack([grid for _, grid in pictures])
        if not planned:
            kwargs["pixel_values"] = torch.cat([media.pixels(key) for key, _ in pictures])
    media.plan([key for key, _ in audio], [key for key, _ in pictures])
    return kwargs

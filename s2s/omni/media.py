"""A conversation's audio clips and pictures, prepared and encoded once for all its prompts.

Each turn's prompt carries the conversation so far, its media included. Built from nothing, every
turn redoes for each earlier clip and picture the host's work (Whisper features, decoding and
resizing a picture: 71 ms for sixteen 5 s clips and 25 ms for a 640x480 JPEG on this CPU) and the
device's (the audio and vision encoders), in the tick every other call's next frame waits on.
``Media`` keeps both by the digest of each clip's samples or picture's bytes (and each turn's
tokens by its text), so a turn prepares, tokenizes and encodes only what is new; it holds just
what the conversation's latest prompt holds (``plan``), so it is bounded by the prompt budget.

A clip's features are computed alone (Qwen's processor pads a prompt's clips to the longest
together, which changes a shorter clip's last frames with whatever else the prompt holds), and
the encoders run per clip and per picture, which is what they compute anyway: the audio encoder
attends within windows of one clip, the vision encoder within one picture.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

AUDIO_RATE = 16_000  # Whisper features


def audio_tokens(frames: int, n_window: int = 50) -> int:
    """How many ``<|audio_pad|>`` stand for ``frames`` mel frames (the encoder's output length).

    The audio encoder cuts features into windows of ``2 * n_window`` frames; each full window
    gives 13 outputs and the rest three stride-2 convolutions' worth.
    """
    window = 2 * n_window
    rest = (frames % window - 1) // 2 + 1
    return ((rest - 1) // 2 + 1 - 1) // 2 + 1 + (frames // window) * 13


@dataclass(slots=True)
class _Clip:
    features: Tensor  # (mel bins, frames)
    encoded: Tensor | None = None  # (tokens, hidden), on the model's device


@dataclass(slots=True)
class _Picture:
    pixels: Tensor  # (patches, values per patch)
    grid: Tensor  # (3,): patches in time, height and width
    encoded: Tensor | None = None  # (tokens, hidden), on the model's device
    deepstack: list[Tensor] = field(default_factory=list)  # per deepstack layer, (tokens, hidden)


class Media:
    """One conversation's clips and pictures, by digest: their features or pixels, and once a
    prompt holding them has been prefilled, their encoders' outputs."""

    def __init__(self) -> None:
        self._clips: dict[bytes, _Clip] = {}
        self._pictures: dict[bytes, _Picture] = {}
        self._tokens: dict[str, list[int]] = {}  # each turn's text, tokenized
        self._used: set[str] = set()  # the texts of the prompt being built
        #: Clips and pictures prepared on the host, and run through an encoder, in all.
        self.prepared = 0
        self.encoded = 0
        #: The plan of the prompt built last with this conversation's media.
        self.latest: MediaPlan | None = None

    def __len__(self) -> int:
        return len(self._clips) + len(self._pictures)

    # -- the host's part: what the prompt builder needs -----------------------------------------

    def clip(
        self, extractor: Any, samples: np.ndarray, name: str | None = None
    ) -> tuple[bytes, Tensor]:
        """The key and Whisper features ``(mel bins, frames)`` of ``samples`` (float32 in
        [-1, 1], or int16): the digest of the samples, or of ``name`` and their length where
        the caller names a clip that never changes (a conversation item's)."""
        if name is not None:
            key = _digest(b"named", name.encode(), len(samples).to_bytes(8, "big"))
        else:
            key = _digest(b"clip", str(samples.dtype).encode(), samples.tobytes())
        entry = self._clips.get(key)
        if entry is None:
            if samples.dtype == np.int16:
                samples = samples.astype(np.float32) / 32768
            samples = np.ascontiguousarray(samples, dtype=np.float32)
            made = extractor(
                [samples], sampling_rate=AUDIO_RATE, return_attention_mask=True,
                return_tensors="pt",
            )  # fmt: skip
            frames = int(made["attention_mask"][0].sum())
            entry = self._clips[key] = _Clip(made["input_features"][0, :, :frames])
            self.prepared += 1
        return key, entry.features

    def picture(
        self, processor: Any, picture: Any, name: str | None = None
    ) -> tuple[bytes, Tensor, Tensor]:
        """The key, pixel patches and patch grid of ``picture``: an encoded image's bytes
        (decoded only when new; known by ``name`` and their length where the caller names a
        picture that never changes, else by their digest) or a PIL image. ``ValueError`` if the
        bytes are no image."""
        raw = bytes(picture) if isinstance(picture, bytes | bytearray | memoryview) else None
        if raw is not None and name is not None:
            key = _digest(b"named file", name.encode(), len(raw).to_bytes(8, "big"))
        elif raw is not None:
            key = _digest(b"file", raw)
        else:
            head = f"{picture.mode} {picture.size}".encode()
            key = _digest(b"image", head, picture.tobytes())
        entry = self._pictures.get(key)
        if entry is None:
            image = picture if raw is None else _decode(raw)
            made = processor(images=[image], return_tensors="pt")
            entry = _Picture(made["pixel_values"], made["image_grid_thw"][0])
            self._pictures[key] = entry
            self.prepared += 1
        return key, entry.pixels, entry.grid

    def tokens(self, tokenizer: Any, text: str) -> list[int]:
        """``text`` (one turn of the chat template) tokenized, once for as long as the
        conversation's prompts hold it: most of a prompt build's time otherwise."""
        ids = self._tokens.get(text)
        if ids is None:
            ids = self._tokens[text] = tokenizer(text, add_special_tokens=False)["input_ids"]
        self._used.add(text)
        return ids

    def plan(self, audio: list[bytes], pictures: list[bytes]) -> MediaPlan:
        """The plan of a prompt holding these clips and pictures (``latest`` from now on);
        everything else is let go."""
        self._tokens = {text: self._tokens[text] for text in self._used}
        self._used = set()
        self._clips = {key: self._clips[key] for key in audio}
        self._pictures = {key: self._pictures[key] for key in pictures}
        clips = tuple(self._clips[key] for key in audio)
        self.latest = MediaPlan(self, clips, tuple(self._pictures[key] for key in pictures))
        return self.latest


@dataclass(frozen=True, slots=True)
class MediaPlan:
    """The media of one built prompt, in order: its ``input_features`` rows' clips and its
    ``pixel_values``' pictures, as ``media`` holds them; what the engine encodes with them."""

    media: Media
    clips: tuple[_Clip, ...]
    pictures: tuple[_Picture, ...]

    def audio_embeds(self, model: Any, features: Tensor, mask: Tensor) -> Tensor:
        """The audio encoder's outputs for the prompt's clips, in order ``(tokens, hidden)``:
        run for the clips not encoded yet, all of them in one batch."""
        clips = self.clips
        if len(clips) != features.shape[0]:
            raise ValueError(f"{features.shape[0]} clips in the prompt, {len(clips)} planned")
        new = [i for i, clip in enumerate(clips) if clip.encoded is None]
        if new:
            index = torch.tensor(new, device=features.device)
            lengths = mask[index].sum(-1)
            width = int(lengths.max())
            out = model.get_audio_features(
                features[index, :, :width], mask[index, :width], return_dict=True
            ).last_hidden_state
            sizes = [audio_tokens(int(n)) for n in lengths]
            for i, encoded in zip(new, out.split(sizes), strict=True):
                clips[i].encoded = encoded
            self.media.encoded += len(new)
        return torch.cat([clip.encoded for clip in clips if clip.encoded is not None])

    def image_embeds(self, model: Any, pixels: Tensor, grid: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The vision encoder's outputs for the prompt's pictures, in order: their embeddings
        ``(tokens, hidden)`` and deepstack features (one such per deepstack layer); run for the
        pictures not encoded yet, all of them in one batch."""
        pictures = self.pictures
        if len(pictures) != grid.shape[0]:
            raise ValueError(f"{grid.shape[0]} pictures in the prompt, {len(pictures)} planned")
        new = [i for i, picture in enumerate(pictures) if picture.encoded is None]
        if new:
            patches = grid.prod(-1).tolist()
            starts = [0, *np.cumsum(patches).tolist()]
            rows = torch.cat([pixels[starts[i] : starts[i + 1]] for i in new])
            out = model.get_image_features(rows, grid[new], return_dict=True)
            for j, i in enumerate(new):
                pictures[i].encoded = out.pooler_output[j]
                pictures[i].deepstack = [layer[j] for layer in out.deepstack_features]
            self.media.encoded += len(new)
        embeds = torch.cat([p.encoded for p in pictures if p.encoded is not None])
        layers = len(pictures[0].deepstack)
        deepstack = [torch.cat([p.deepstack[n] for p in pictures]) for n in range(layers)]
        return embeds, deepstack


def _digest(kind: bytes, *parts: bytes) -> bytes:
    digest = hashlib.blake2b(kind, digest_size=16)
    for part in parts:
        digest.update(part)
    return digest.digest()


def _decode(data: bytes) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"a picture that cannot be decoded: {exc}") from None

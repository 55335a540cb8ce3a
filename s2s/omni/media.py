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


def clip_mask(frames: list[int]) -> Tensor:
    """The feature mask of clips of these lengths in one batch ``(clips, longest)``."""
    return (torch.arange(max(frames))[None, :] < torch.tensor(frames)[:, None]).int()


def clip_batch(features: list[Tensor]) -> Tensor:
    """Clips' features ``(mel bins, frames)`` in one batch, each alone and zero-padded to the
    longest ``(clips, mel bins, longest)``; ``clip_mask`` says how far each goes."""
    longest = max(clip.shape[1] for clip in features)
    batch = features[0].new_zeros(len(features), features[0].shape[0], longest)
    for row, clip in enumerate(features):
        batch[row, :, : clip.shape[1]] = clip
    return batch


@dataclass(slots=True)
class _Clip:
    frames: int
    features: Tensor | None  # (mel bins, frames) until encoded, then let go
    encoded: Tensor | None = None  # (tokens, hidden), in host memory


@dataclass(slots=True)
class _Picture:
    grid: Tensor  # (3,): patches in time, height and width
    pixels: Tensor | None  # (patches, values per patch) until encoded, then let go
    encoded: Tensor | None = None  # (tokens, hidden), in host memory
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

    @property
    def held_bytes(self) -> int:
        """Bytes of features and pixels held on the host: those of media not encoded yet."""
        held = [c.features for c in self._clips.values()]
        held += [p.pixels for p in self._pictures.values()]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    # -- the host's part: what the prompt builder needs -----------------------------------------

    def clip(
        self, extractor: Any, samples: np.ndarray, name: str | None = None
    ) -> tuple[bytes, int]:
        """The key and Whisper feature frames of ``samples`` (float32 in [-1, 1], or int16):
        the digest of the samples, or of ``name`` and their length where the caller names a
        clip that never changes (a conversation item's)."""
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
                # As Qwen3-Omni's processor calls it: the extractor's defaults pad every clip to
                # 30 s (its last frame's features differ) and cut longer ones there.
                [samples], sampling_rate=AUDIO_RATE, return_attention_mask=True,
                return_tensors="pt", padding="longest", truncation=False,
            )  # fmt: skip
            frames = int(made["attention_mask"][0].sum())
            entry = self._clips[key] = _Clip(frames, made["input_features"][0, :, :frames])
            self.prepared += 1
        return key, entry.frames

    def picture(
        self, processor: Any, picture: Any, name: str | None = None
    ) -> tuple[bytes, Tensor]:
        """The key and patch grid of ``picture``: an encoded image's bytes
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
            entry = _Picture(made["image_grid_thw"][0], made["pixel_values"])
            self._pictures[key] = entry
            self.prepared += 1
        return key, entry.grid

    def features(self, key: bytes) -> Tensor:
        """A clip's Whisper features, before it is encoded."""
        features = self._clips[key].features
        if features is None:
            raise ValueError("that clip's features were let go once it was encoded")
        return features

    def pixels(self, key: bytes) -> Tensor:
        """A picture's pixel patches, before it is encoded."""
        pixels = self._pictures[key].pixels
        if pixels is None:
            raise ValueError("that picture's pixels were let go once it was encoded")
        return pixels

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
    """The media of one built prompt, in order, as ``media`` holds them: what the engine
        encodes (the new ones) or takes as encoded before. A planned prompt's inputs carry no
        features or pixels (``feature_attention_mask`` and ``image_grid_thw`` only): the entries
        hold them until they are encoded, and let them go then. Encoder outputs are kept in host
    memory (a 1024x768 picture's are about 13 MB at the real size) and a prompt uploads its
    media's when it is prefilled, so what a call holds on the device is its slot, set aside at
    load."""

    media: Media
    clips: tuple[_Clip, ...]
    pictures: tuple[_Picture, ...]

    def audio_embeds(self, model: Any) -> Tensor:
        """The audio encoder's outputs for the prompt's clips, in order ``(tokens, hidden)``:
        run for the clips not encoded yet, all of them in one batch."""
        clips = self.clips
        new = [clip for clip in clips if clip.encoded is None]
        if new:
            device, dtype = model.device, model.audio_tower.dtype
            features = clip_batch([_features(clip) for clip in new])
            mask = clip_mask([clip.frames for clip in new])
            out = model.get_audio_features(
                features.to(device, dtype), mask.to(device), return_dict=True
            ).last_hidden_state
            sizes = [audio_tokens(clip.frames) for clip in new]
            for clip, encoded in zip(new, out.cpu().split(sizes), strict=True):
                clip.encoded, clip.features = encoded, None
            self.media.encoded += len(new)
        kept = torch.cat([clip.encoded for clip in clips if clip.encoded is not None])
        return kept.to(model.device)

    def image_embeds(self, model: Any) -> tuple[Tensor, list[Tensor]]:
        """The vision encoder's outputs for the prompt's pictures, in order: their embeddings
        ``(tokens, hidden)`` and deepstack features (one such per deepstack layer); run for the
        pictures not encoded yet, all of them in one batch."""
        pictures = self.pictures
        new = [picture for picture in pictures if picture.encoded is None]
        if new:
            device, dtype = model.device, model.visual.dtype
            rows = torch.cat([_pixels(picture) for picture in new]).to(device, dtype)
            grid = torch.stack([picture.grid for picture in new]).to(device)
            out = model.get_image_features(rows, grid, return_dict=True)
            for j, picture in enumerate(new):
                picture.encoded, picture.pixels = out.pooler_output[j].cpu(), None
                picture.deepstack = [layer[j].cpu() for layer in out.deepstack_features]
            self.media.encoded += len(new)
        device = model.device
        embeds = torch.cat([p.encoded for p in pictures if p.encoded is not None]).to(device)
        layers = len(pictures[0].deepstack)
        deepstack = [
            torch.cat([p.deepstack[n] for p in pictures]).to(device) for n in range(layers)
        ]
        return embeds, deepstack


def _features(clip: _Clip) -> Tensor:
    assert clip.features is not None, "a clip not encoded yet has its features"
    return clip.features


def _pixels(picture: _Picture) -> Tensor:
    assert picture.pixels is not None, "a picture not encoded yet has its pixels"
    return picture.pixels


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

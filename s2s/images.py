"""Plain facts about a picture (size, brightness, dominant colours), for the local model."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np

_COLOURS = {
    "black": (20, 20, 20), "white": (235, 235, 235), "grey": (128, 128, 128),
    "red": (200, 30, 30), "orange": (240, 140, 20), "yellow": (230, 220, 40),
    "green": (40, 160, 60), "blue": (40, 80, 200), "purple": (130, 50, 160),
    "pink": (240, 150, 190), "brown": (120, 75, 35),
}  # fmt: skip
_MAX_PIXELS = 40_000_000


class ImageError(ValueError):
    pass


def decode_data_url(url: str) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URL."""
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
        raise ImageError("expected a data:image/...;base64, URL")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise ImageError(f"invalid base64: {exc}") from None


def describe(data: bytes) -> str:
    """One sentence about the picture: its size, how bright it is, its main colours."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = _MAX_PIXELS
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            image.thumbnail((64, 64))
            rgb = np.asarray(image.convert("RGB"), np.float32).reshape(-1, 3)
    except Exception as exc:  # Pillow raises many types for bad input
        raise ImageError(f"cannot decode the image: {exc}") from None
    brightness = float(rgb.mean()) / 255
    names = list(_COLOURS)
    palette = np.array([_COLOURS[n] for n in names], np.float32)
    nearest = np.argmin(((rgb[:, None, :] - palette[None, :, :]) ** 2).sum(axis=2), axis=1)
    counts = np.bincount(nearest, minlength=len(names))
    order = [i for i in np.argsort(counts)[::-1] if counts[i] >= 0.15 * rgb.shape[0]][:2]
    colours = " and ".join(names[i] for i in order) or "many colours"
    light = "bright" if brightness > 0.6 else "dark" if brightness < 0.3 else "evenly lit"
    return f"a {width} by {height} pixel picture, {light}, mostly {colours}"

"""Images from clients: checked, decoded once with Pillow, downscaled once, described.

Only JPEG, PNG and WebP are taken. Sizes are capped in bytes and in pixels; the pixel cap is
checked from the header, before any decoding, so a decompression bomb costs nothing. Camera
frames are held to the same pixel cap, and scaled down as they are turned into RGB.
Everything here is CPU work: callers run it off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The EXIF tag saying how a photo is stored relative to how it is seen.
_ORIENTATION = 0x0112
_MAGIC = {b"\xff\xd8\xff": "jpeg", b"\x89PNG\r\n\x1a\n": "png"}
_COLOURS = {
    "black": (20, 20, 20), "white": (235, 235, 235), "grey": (128, 128, 128),
    "red": (200, 30, 30), "orange": (240, 140, 20), "yellow": (230, 220, 40),
    "green": (40, 160, 60), "blue": (40, 80, 200), "purple": (130, 50, 160),
    "pink": (240, 150, 190), "brown": (120, 75, 35),
}  # fmt: skip


class ImageError(ValueError):
    """An image that cannot be taken; ``code`` names why, for the ``error`` event."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 1024  # images are downscaled once, on arrival, to at most this


@dataclass(frozen=True, slots=True)
class Picture:
    """An image as the session keeps it: downscaled, re-encoded as JPEG, and its facts."""

    jpeg: bytes
    width: int  # of the original
    height: int
    description: str

    @property
    def data_url(self) -> str:
        return "data:image/jpeg;base64," + base64.b64encode(self.jpeg).decode()


def decode_data_url(url: str) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URL."""
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
        raise ImageError("invalid_image_url", "expected a data:image/...;base64, URL")
    return decode_base64(payload)


def decode_base64(payload: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise ImageError("invalid_base64", f"invalid base64: {exc}") from None


def image_format(data: bytes) -> str:
    for magic, name in _MAGIC.items():
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise ImageError("unsupported_image_format", "only JPEG, PNG and WebP images are accepted")


#: Where pictures are decoded, two at a time for the whole server: a picture at the pixel cap
#: takes about a second of a core and 340 MB while it decodes (a 155 kB PNG can claim 40 Mpx),
#: so a few callers sending them at once would otherwise take the server's memory and threads.
_DECODER = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="s2s-images")


async def load_async(data: bytes, limits: ImageLimits) -> Picture:
    """``load`` off the event loop, in the server's picture decoder."""
    return await asyncio.get_running_loop().run_in_executor(_DECODER, load, data, limits)


def load(data: bytes, limits: ImageLimits) -> Picture:
    """Check, decode, downscale and describe an image, or raise ``ImageError``."""
    from PIL import Image, ImageOps

    if len(data) > limits.max_bytes:
        raise ImageError(
            "image_too_large", f"image of {len(data)} bytes exceeds {limits.max_bytes} bytes"
        )
    kind = image_format(data)
    try:
        with warnings.catch_warnings():
            # The pixel cap below is ours; Pillow's own bomb warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[kind.upper()])
        with image:
            width, height = image.size
            _check_pixels(width, height, limits)
            image.draft("RGB", (limits.max_side, limits.max_side))  # JPEG: decode at lower scale
            image.load()
            if image.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):  # stored sideways
                width, height = height, width
            rgb = _rgb(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError("image_too_many_pixels", str(exc)) from None
    except Exception as exc:  # Pillow raises many types for truncated or corrupt files
        raise ImageError("invalid_image", f"cannot decode the {kind} image: {exc}") from None
    rgb.thumbnail((limits.max_side, limits.max_side))
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=85)
    return Picture(out.getvalue(), width, height, describe(rgb, width, height))


def _rgb(image: Any) -> Any:
    """``image`` as RGB the way it looks: see-through parts on white (not black), 16-bit grey
    scaled to 8 bits (not clipped to white)."""
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return image.convert("RGB")


def _check_pixels(width: int, height: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise ImageError(
            "image_too_many_pixels", f"{width}x{height} pixels exceeds {limits.max_pixels} pixels"
        )


def convert_video_frame(frame: Any, limits: ImageLimits) -> asyncio.Future[Picture]:
    """Start ``from_video_frame`` in the server's picture decoder; a frame over the pixel cap
    raises ``ImageError`` here, without taking a decoder's turn."""
    _check_pixels(frame.width, frame.height, limits)
    return asyncio.get_running_loop().run_in_executor(_DECODER, from_video_frame, frame, limits)


def from_video_frame(frame: Any, limits: ImageLimits) -> Picture:
    """A decoded camera frame (``av.VideoFrame``) as a picture, downscaled like uploads."""
    width, height = frame.width, frame.height
    _check_pixels(width, height, limits)
    # Scaled while converted to RGB: a full-size RGB copy of a 9000x9000 frame took 1.2 s and
    # 1 GB; straight to 1024 pixels it takes 40 ms and no more memory than the result.
    scale = min(1.0, limits.max_side / max(width, height))
    image = frame.to_image(
        width=max(1, round(width * scale)),
        height=max(1, round(height * scale)),
        interpolation="AREA",  # the average of the pixels each one covers: no aliasing
    )
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return Picture(out.getvalue(), width, height, describe(image, width, height))


def describe(image: object, width: int, height: int) -> str:
    """One sentence about the picture: its size, how bright it is, its main colours."""
    from PIL import Image

    assert isinstance(image, Image.Image)
    small = image.copy()
    small.thumbnail((64, 64))
    rgb = np.asarray(small.convert("RGB"), np.float32).reshape(-1, 3)
    brightness = float(rgb.mean()) / 255
    names = list(_COLOURS)
    palette = np.array([_COLOURS[n] for n in names], np.float32)
    nearest = np.argmin(((rgb[:, None, :] - palette[None, :, :]) ** 2).sum(axis=2), axis=1)
    counts = np.bincount(nearest, minlength=len(names))
    order = [i for i in np.argsort(counts)[::-1] if counts[i] >= 0.15 * rgb.shape[0]][:2]
    colours = " and ".join(names[i] for i in order) or "many colours"
    light = "bright" if brightness > 0.6 else "dark" if brightness < 0.3 else "evenly lit"
    return f"a {width} by {height} pixel picture, {light}, mostly {colours}"

"""Every image the workbench reads is opened here, so every command sees the same pixels.

``open_rgb`` applies the EXIF orientation (a phone photo is upright, as a viewer shows it), scales
16-bit and float images to 8 bits by their range, expands palettes, and composites transparency
onto ``BACKGROUND`` (white, as viewers show it), noting once per run that it did. A file that
cannot be decoded (not an image, truncated) raises ``ImageError`` naming the file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from workbench.errors import UserError

BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white

_noted: set[str] = set()


class ImageError(UserError, ValueError):
    """An image file that cannot be decoded; the message names it."""


def _note_once(key: str, text: str) -> None:
    if key not in _noted:
        _noted.add(key)
        print(f"note: {text}", file=sys.stderr)


def open_image(path: str | Path, convert=None) -> Image.Image:
    """The decoded image, as stored or passed through ``convert`` while the file is open (EXIF
    lives in the file); ``ImageError`` if it cannot be decoded."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later in a model
            return convert(image) if convert else image.copy()
    except FileNotFoundError:
        raise ImageError(f"{path}: image file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL reports a bad file as UnidentifiedImageError (an OSError), OSError("image file is
        # truncated"), SyntaxError (broken PNG chunks) or ValueError, depending on where it broke.
        raise ImageError(f"{path}: cannot decode image ({e})") from None


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """An 8-bit RGB image as a viewer would show ``image``."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _to_8_bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        image = image.convert("RGBA")
        alpha = np.asarray(image.getchannel("A"))
        if (alpha < 255).any():
            _note_once("alpha", f"{name} has transparent pixels; composited onto white {BACKGROUND} "
                                "(noted once per run)")
        background = Image.new("RGBA", image.size, BACKGROUND + (255,))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grey levels scaled to 0..255: integer levels by the 16-bit range (so
    a mid-grey stays mid-grey), anything else (float, negative) by the data's own range."""
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        scaled = values / 257.0  # 16-bit: 65535 -> 255
    elif image.mode == "I" and values.min() >= 0 and values.max() <= 255:
        scaled = values  # 8-bit levels stored in a wider type
    elif image.mode == "I" and values.min() >= 0 and values.max() <= 65535:
        scaled = values / 257.0  # a 16-bit file some decoders open as mode "I"
    else:
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
    return Image.fromarray(np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8))  # uint8 [H, W]: "L"


def open_rgb(path: str | Path) -> Image.Image:
    """The image at ``path`` as 8-bit RGB, upright, transparency on white; ``ImageError`` if it
    cannot be decoded."""
    return open_image(path, convert=lambda image: to_rgb(image, name=str(path)))


def blank_image(size: tuple[int, int]) -> Image.Image:
    """A uniform mid-grey image of ``size`` (width, height): the blank-image control."""
    return Image.new("RGB", size, (128, 128, 128))

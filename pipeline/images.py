"""Decoding an image file as a viewer shows it: the one function prepare (and anything that predicts on
new images) turns a file's bytes into the RGB pixels the models see.

- **Format**: whatever Pillow opens (JPEG, PNG, WebP, TIFF, BMP, GIF, PPM...); a multi-page TIFF or an
  animated GIF/WebP gives its first page or frame.
- **EXIF orientation** applied (`ImageOps.exif_transpose`): a phone photo stored sideways comes out upright.
- **16- and 32-bit greyscale** (`I;16`, `I;16B`, `I;16L`, `I`) scaled to 8 bits by the 16-bit depth
  (value x 255 / 65535), the same for every image, so that one intensity means the same in every image
  of a competition (a per-image stretch would make a dark X-ray and a bright one look alike);
  float images (`F`) by their own range unless it lies within [0, 1].
- **Transparency** (RGBA, LA, a palette with a transparent colour) composited on a white background.
- **CMYK, YCbCr, palette, 1-bit** converted to RGB as Pillow does.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

BACKGROUND = (255, 255, 255)  # what transparent pixels become: the white a page or a viewer shows them on


def _greyscale_to_8bit(img: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float greyscale image as 8-bit `L` (see the module docstring)."""
    a = np.asarray(img)
    if img.mode == "F":
        a = a.astype(np.float64)
        finite = a[np.isfinite(a)]
        low, high = (
            (0.0, 1.0)
            if finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1)
            else (
                float(finite.min()),
                float(finite.max()),
            )
        )
        scaled = (np.nan_to_num(a, nan=low) - low) / max(high - low, 1e-12) * 255
    else:  # I;16 (any byte order) and I: integers of a 16-bit depth
        scaled = a.astype(np.float64) * (255 / 65535)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def viewer_rgb(img: Image.Image) -> Image.Image:
    """`img` (opened, maybe in draft mode) as an RGB image a viewer would show: first frame, EXIF
    orientation, high bit depths scaled, transparency on `BACKGROUND`."""
    if img.getexif().get(0x0112, 1) != 1:  # EXIF Orientation: not "as stored" (exif_transpose copies otherwise)
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _greyscale_to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        canvas = Image.new("RGB", img.size, BACKGROUND)
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    return img.convert("RGB")


def to_square(img: Image.Image, size: int, resize: str) -> Image.Image:
    """`img` as a (size, size) RGB image: `squash` ignores the aspect ratio, `pad` fits the longer side
    and pads the shorter one with black, `center_crop` fits the shorter side and crops the longer one.
    JPEGs are first downscaled in the DCT domain (PIL's draft mode) to no less than what is needed,
    then turned as their EXIF says (`viewer_rgb`)."""
    w, h = img.size
    if resize == "pad":
        scale = size / max(w, h)
        img.draft("RGB", (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))))
    else:
        img.draft("RGB", (size, size))  # both sides stay >= size
    img.load()
    img = viewer_rgb(img)
    w, h = img.size
    if resize == "squash":
        return img if (w, h) == (size, size) else img.resize((size, size), Image.BILINEAR)
    if resize == "center_crop":
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR) if (nw, nh) != (w, h) else img
        left, top = (nw - size) // 2, (nh - size) // 2
        return img.crop((left, top, left + size, top + size))
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("RGB", (size, size))
    canvas.paste(
        img.resize((nw, nh), Image.BILINEAR) if (nw, nh) != (w, h) else img, ((size - nw) // 2, (size - nh) // 2)
    )
    return canvas


def decode_image(data: bytes, size: int, resize: str) -> tuple[np.ndarray, tuple[int, int]]:
    """(uint8 (size, size, 3) image, original (width, height) as stored); ValueError saying why it cannot be."""
    if not data:
        raise ValueError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
        original = img.size
        return np.asarray(to_square(img, size, resize), dtype=np.uint8), original
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode: {exc.__class__.__name__}: {exc}") from None

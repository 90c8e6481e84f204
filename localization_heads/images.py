"""Reading an image: one rule for every file, used for the model and for the figure alike, so the
figure shows exactly the pixels the model saw.

    16-bit grey (I;16, I)          scaled to 8 bits: v · 255 / 65535, rounded
    alpha (RGBA, LA, PA, ...) or   composited on white (BACKGROUND): transparent parts look as a
    a transparent colour (P, L,    viewer shows them, never as the hidden colour under them
    RGB with tRNS)
    1, L, P, CMYK, YCbCr, LAB, HSV Pillow's conversion to RGB (16-bit RGB files already read as 8 bits)
    F (32-bit float)               refused: there is no agreed range to scale from
    animated (GIF, APNG, WebP)     the first frame, with a warning
    EXIF orientation               NOT applied (logged): the model sees the pixels as stored, which
                                   is what RefCOCO's boxes and every box this tool writes refer to
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from localization_heads.dataio import InputError

log = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)
EXIF_ORIENTATION = 0x0112
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")


def load_image(path: str | Path) -> Image.Image:
    """The file as 8-bit RGB by the rule above, or InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image not found; check data.image_file / image_path")
    try:
        with Image.open(path) as im:
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                log.warning("%s: animated (%d frames); the model sees the first frame only", path, frames)
                im.seek(0)
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
            if orientation != 1:
                log.info("%s: EXIF orientation %d is not applied; the model and the boxes use the pixels as stored",
                         path, orientation)
            return to_rgb(im, path)
    except InputError:
        raise
    except Exception as e:  # PIL raises several types for broken files
        raise InputError(f"{path}: cannot read image ({e.__class__.__name__}: {e})") from None


def to_rgb(im: Image.Image, path: Path) -> Image.Image:
    if im.mode == "F":
        raise InputError(f"{path}: 32-bit float image; convert it to 8 or 16 bits per channel")
    if im.mode in SIXTEEN_BIT:
        values = np.asarray(im).astype(np.uint32).clip(0, 65535)                   # [H, W]
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if im.mode in ALPHA or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, BACKGROUND + (255,)), rgba).convert("RGB")
    return im.convert("RGB")

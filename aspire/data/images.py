"""Image and mask loading with errors that name the file, and a torch Dataset over samples."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from aspire.errors import DataError
from aspire.schemas import Sample


ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
# How far an image may be enlarged to the classifier's input. CelebA's 178x218 faces go to a ResNet's 224 (1.26x),
# as in every published pipeline; beyond 2x the classifier would see the interpolation rather than the image.
MAX_UPSCALE = 2.0


def min_image_side(input_size: int) -> int:
    """The smallest image side (px) a classifier of square `input_size` input accepts."""
    return math.ceil(input_size / MAX_UPSCALE)


def load_image(path: str | Path, *, min_side: int = 0) -> Image.Image:
    """Load an image as 8-bit RGB; a missing, corrupt or (with `min_side`) too small file raises DataError naming it.

    16-bit and 32-bit images are scaled to 8 bits (not clipped: a 16-bit PNG would turn white), palette and
    grayscale images are expanded, and transparency (RGBA, LA, a palette's transparent colour) is composited on
    `ALPHA_BACKGROUND`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file is missing")
    try:
        with Image.open(path) as im:
            if min(im.size) < min_side:
                raise DataError(f"{path}: image {im.size[0]}x{im.size[1]} is too small for the classifier: each side "
                                f"must be at least {min_side} px (its input, at most {MAX_UPSCALE:g}x enlarged)")
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: corrupt or unreadable image ({type(e).__name__})") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """An image of any mode as 8-bit RGB (see `load_image`)."""
    if im.mode.startswith("I") or im.mode == "F":   # 16-bit or 32-bit integer samples, or floats
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F" and a.max(initial=0) <= 1:
            top = 1.0
        elif im.mode.startswith("I;16") or a.max(initial=0) > 255:
            top = 65535.0
        else:
            top = 255.0
        im = Image.fromarray(np.clip(np.rint(a / top * 255), 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return im.convert("RGB")


def load_mask(path: str | Path, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """Load a 0/255 PNG mask as a bool array (H, W); `size` (W, H) is checked when given."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: mask file is missing")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: corrupt or unreadable mask ({type(e).__name__})") from None
    if size is not None and (arr.shape[1], arr.shape[0]) != tuple(size):
        raise DataError(f"{path}: mask size {arr.shape[1]}x{arr.shape[0]} differs from image size {size[0]}x{size[1]}")
    return arr > 127


def save_mask(mask: np.ndarray, path: str | Path) -> Path:
    from aspire.atomic import write_with

    img = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")
    return write_with(path, lambda tmp: img.save(tmp, format="PNG"))


def dilate(mask: np.ndarray, radius_px: int) -> np.ndarray:
    """Grow a bool mask (H, W) by `radius_px` with an elliptical (disc) kernel of size 2r+1 (a copy)."""
    return _morph(mask, radius_px, grow=True)


def erode(mask: np.ndarray, radius_px: int) -> np.ndarray:
    """Shrink a bool mask (H, W) by `radius_px` with the same kernel as `dilate` (a copy)."""
    return _morph(mask, radius_px, grow=False)


def _morph(mask: np.ndarray, radius_px: int, grow: bool) -> np.ndarray:
    import cv2

    mask = np.array(mask, dtype=bool)
    if radius_px <= 0:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius_px + 1, 2 * radius_px + 1))
    return (cv2.dilate if grow else cv2.erode)(mask.astype(np.uint8), kernel) > 0


class ImageDataset:
    """A torch-style dataset over samples: returns (image tensor, y, attr or -1, index)."""

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], "object"]):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        return self.transform(load_image(s.path)), s.y, (-1 if s.attr is None else s.attr), i

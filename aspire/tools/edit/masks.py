"""The masks and pixels of editing: where a control goes (`find_control`), the checks of a mask against its image,
and the compositing every backend shares (inpainting, pasting back, a donor region laid over)."""

from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image

from aspire.data.images import dilate
from aspire.errors import DataError


def find_control(mask: np.ndarray, seed: int, gap_px: int = 4) -> tuple[Optional[np.ndarray], str]:
    """A control mask of the same area as `mask`, off `mask` dilated by `gap_px`, and how it was placed.

    First the mask itself translated to a random place where it fits; else a random rectangle of exactly
    the same area (several aspect ratios tried). Returns (None, why) when nothing fits. Deterministic by seed.
    """
    import cv2

    mask = as_mask(mask)
    H, W = mask.shape
    area = int(mask.sum())
    if area == 0:
        return None, "the phrase's mask is empty"
    rng = np.random.default_rng(seed)
    forbidden = dilate(mask, gap_px).astype(np.float32)  # (H, W)
    # 1. translation: overlap of the mask's bounding-box crop with `forbidden` at every offset
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)  # (h, w)
    overlap = cv2.matchTemplate(forbidden, crop, cv2.TM_CCORR)  # (H-h+1, W-w+1)
    free = np.argwhere(overlap < 0.5)
    if len(free):
        y0, x0 = free[rng.integers(len(free))]
        out = np.zeros_like(mask)
        out[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop > 0
        return out, f"translated by ({y0 - ys.min()}, {x0 - xs.min()}) px"
    # 2. a rectangle of the same area: rows of width w, the last one partly filled
    integral = cv2.integral(forbidden.astype(np.uint8))  # (H+1, W+1)
    options = []
    for ratio in (1.0, 0.5, 2.0, 0.25, 4.0, 0.125, 8.0):  # width / height
        w = max(1, int(round(np.sqrt(area * ratio))))
        h = -(-area // w)  # ceil
        if h > H or w > W:
            continue
        sums = (integral[h:, w:] - integral[:-h, w:] - integral[h:, :-w] + integral[:-h, :-w])  # (H-h+1, W-w+1)
        spots = np.argwhere(sums == 0)
        if len(spots):
            options.append((h, w, spots))
    if not options:
        share = area / (H * W)
        return None, f"no free place for a control of {area} px outside the phrase's mask ({share:.0%} of the image)"
    h, w, spots = options[rng.integers(len(options))]
    y0, x0 = spots[rng.integers(len(spots))]
    block = np.zeros(h * w, bool)
    block[:area] = True
    out = np.zeros_like(mask)
    out[y0:y0 + h, x0:x0 + w] = block.reshape(h, w)
    return out, f"rectangle {w}x{h} px at ({x0}, {y0})"


def as_rgb(image: Image.Image | np.ndarray, key: str) -> np.ndarray:
    """(H, W, 3) uint8 from a PIL image or an RGB uint8 array."""
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise DataError(f"image {key!r}: expected an RGB image, got an array of shape {arr.shape} {arr.dtype}")
    return arr.copy()


def as_mask(mask: np.ndarray) -> np.ndarray:
    arr = np.asarray(mask)
    return arr if arr.dtype == bool else arr > (127 if arr.dtype == np.uint8 and arr.max(initial=0) > 1 else 0)


def check_mask(mask: Optional[np.ndarray], image: np.ndarray, phrase: str, key: str, what: str,
                allow_empty: bool = False) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise DataError(f"{what} for phrase {phrase!r} in image {key!r} must be 2-D (H, W), got shape {arr.shape}")
    if arr.shape != image.shape[:2]:
        raise DataError(f"{what} size {arr.shape[1]}x{arr.shape[0]} differs from image size "
                        f"{image.shape[1]}x{image.shape[0]} (phrase {phrase!r}, image {key!r})")
    arr = as_mask(arr)
    if not allow_empty and not arr.any():
        raise DataError(f"empty {what} for phrase {phrase!r} in image {key!r}")
    return arr


def region_fill(donor: np.ndarray, region: np.ndarray, target: np.ndarray, radius: int) -> np.ndarray:
    """An image of the donor's size whose pixels come from the donor's `region` at the same places: where the
    region does not reach (over the target's pixels outside it), inpainted from the region's own pixels, so the
    donor's texture keeps its scale and nothing of the donor outside its region is used. (H, W, 3) uint8."""
    H, W = target.shape
    if donor.shape[:2] != (H, W):  # another size: the donor and its region resized to the target's
        donor = np.asarray(Image.fromarray(donor).resize((W, H), Image.BICUBIC))
        region = np.asarray(mask_pil(region).resize((W, H), Image.NEAREST)) > 0
    if not (target & ~region).any() or not region.any():
        return donor
    return telea(donor, ~region, radius)  # the donor outside its region, inpainted from the region


def mask_pil(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")


def telea(image: np.ndarray, mask: np.ndarray, radius: int) -> np.ndarray:
    """OpenCV Telea inpainting of an (H, W, 3) uint8 RGB image inside a bool mask."""
    import cv2

    bgr = np.ascontiguousarray(image[:, :, ::-1])
    out = cv2.inpaint(bgr, mask.astype(np.uint8) * 255, radius, cv2.INPAINT_TELEA)
    return np.ascontiguousarray(out[:, :, ::-1])


def paste(source: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`edited` inside the bool mask, `source` exactly everywhere else."""
    return np.where(mask[:, :, None], edited, source).astype(np.uint8)

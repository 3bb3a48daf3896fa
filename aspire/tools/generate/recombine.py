"""The offline generation backend (CPU, nothing to download): recombination. The label object of a flipped edit
(its edited image under the object's mask) is pasted onto backgrounds the caller chose to be free of the class's
spurious features (other images with their own object inpainted away), with a random horizontal flip, a small
scale and shift of the object, and a colour jitter of the composite. Without backgrounds, or without an object
mask, the whole edited image is flipped, scaled, shifted and jittered. Byte-identical given the job's seed.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np
from PIL import Image

from aspire.config import GenerateSettings
from aspire.errors import ConfigError
from aspire.tools.generate.records import Background, ClassJob, GeneratedImage, SourceEdit, color_jitter, derive_seed


def recombine(job: ClassJob, settings: GenerateSettings, n: Optional[int] = None) -> Iterator[GeneratedImage]:
    """`n` (default `images_per_class`) composites: edits in turn, a random background each."""
    n = settings.images_per_class if n is None else n
    lo, hi = settings.scale_range
    if not 0 < lo <= hi:
        raise ConfigError(f"generate.scale_range must be 0 < lo <= hi, got {settings.scale_range}")
    for i in range(n):
        src = job.sources[i % len(job.sources)]
        seed = derive_seed(job.seed, job.class_index, i)
        rng = np.random.default_rng(seed)
        bg = job.backgrounds[int(rng.integers(len(job.backgrounds)))] if job.backgrounds else None
        image, transform = _composite(src, bg, rng, settings)
        yield GeneratedImage(
            image=Image.fromarray(image, mode="RGB"), class_index=job.class_index, seed=seed,
            sources=[src.image_key] + ([bg.key] if bg is not None else []), edits=[src.edit_id],
            info={"donor": None if bg is None else bg.key, "transform": transform})


def _composite(src: SourceEdit, bg: Optional[Background], rng: np.random.Generator,
               s: GenerateSettings) -> tuple[np.ndarray, dict[str, Any]]:
    import cv2

    H, W = src.edited.shape[:2]
    # 1. draw every random number first, in a fixed order
    flip = bool(s.flip and rng.random() < 0.5)
    scale = float(rng.uniform(*s.scale_range))
    ux, uy = float(rng.random()), float(rng.random())
    j = s.color_jitter
    brightness, contrast, saturation = (float(v) for v in rng.uniform(1 - j, 1 + j, 3))
    recombined = bg is not None and src.object_mask is not None and src.object_mask.any()
    # 2. the object's (or the whole image's) box, and the shift that keeps it inside the image
    if recombined:
        ys, xs = np.nonzero(src.object_mask)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    else:
        x0, x1, y0, y1 = 0, W - 1, 0, H - 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    dx = _shift(ux, cx, (x1 - x0) / 2 * scale, W, s.translate_frac) if recombined else \
        int(round((2 * ux - 1) * s.translate_frac * W))
    dy = _shift(uy, cy, (y1 - y0) / 2 * scale, H, s.translate_frac) if recombined else \
        int(round((2 * uy - 1) * s.translate_frac * H))
    # 3. x' = a (x - cx) + cx + dx with a = -scale when flipped; y' = scale (y - cy) + cy + dy
    a = -scale if flip else scale
    M = np.float32([[a, 0, cx - a * cx + dx], [0, scale, cy - scale * cy + dy]])  # (2, 3)
    interp = cv2.INTER_NEAREST if scale == 1.0 else cv2.INTER_LINEAR  # scale 1: pixels copied exactly
    if recombined:
        base = np.asarray(Image.fromarray(bg.image).resize((W, H), Image.BICUBIC)) \
            if bg.image.shape[:2] != (H, W) else bg.image
        obj = cv2.warpAffine(src.edited, M, (W, H), flags=interp, borderMode=cv2.BORDER_CONSTANT)
        mask = cv2.warpAffine(src.object_mask.astype(np.uint8) * 255, M, (W, H), flags=cv2.INTER_NEAREST) > 127
        out = np.where(mask[:, :, None], obj, base).astype(np.uint8)  # (H, W, 3)
    else:
        out = cv2.warpAffine(src.edited, M, (W, H), flags=interp, borderMode=cv2.BORDER_REFLECT_101)
    if j > 0:
        out = color_jitter(out, brightness, contrast, saturation)
    transform = {"mode": "recombined" if recombined else "whole-image", "flip": flip, "scale": scale,
                 "dx_px": dx, "dy_px": dy, "brightness": brightness, "contrast": contrast,
                 "saturation": saturation}
    return np.ascontiguousarray(out), transform


def _shift(u: float, centre: float, half: float, size: int, frac: float) -> int:
    """A shift in [-frac*size, frac*size] (from u in [0, 1)) that keeps a box of half-width `half` inside."""
    lo = max(-frac * size, half - centre)
    hi = min(frac * size, size - 1 - half - centre)
    if lo > hi:  # the box does not fit whatever the shift: keep it where it is
        return 0
    return int(round(lo + u * (hi - lo)))

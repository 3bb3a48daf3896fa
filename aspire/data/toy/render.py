"""Render a scene, optionally without some of its elements or with another place.

Layers are composited back to front at the supersampled size, then averaged down in blocks. A layer
that is skipped changes only the pixels where it was visible, so a counterfactual differs from its
source exactly inside the removed thing's visible mask (`masks[name]`), and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import cv2
import numpy as np

from aspire.data.toy.art import ELEMENTS, draw_place, draw_sky
from aspire.data.toy.objects import draw_object
from aspire.data.toy.painter import SUPERSAMPLE, Layer, Painter
from aspire.data.toy.scenes import Scene

PLACE_DEPTH, OBJECT_DEPTH = 30, 100
OBJECT, PLACE = "object", "place"   # mask owners besides the element names


@dataclass
class Rendering:
    image: np.ndarray                  # (S, S, 3) uint8
    masks: dict[str, np.ndarray]       # owner -> (S, S) bool: the pixels that owner is visible in


def scene_layers(scene: Scene, size_px: int, *, remove: Iterable[str] = (), place: Optional[str] = None) -> list[Layer]:
    """The scene's layers, back to front, without the elements in `remove`, on `place` if given."""
    p = Painter(size_px)
    removed = set(remove)
    stack: list[tuple[int, list[Layer]]] = [
        (0, draw_sky(p, scene.sky, scene.ground["horizon"])),
        (PLACE_DEPTH, draw_place(p, place or scene.place, scene.ground)),
        (OBJECT_DEPTH, draw_object(p, scene.shape, scene.object)),
    ]
    for name, params in scene.elements.items():
        if name not in removed:
            _, draw, depth = ELEMENTS[name]
            stack.append((depth, [l for l in draw(p, params, name) if l is not None]))
    stack.sort(key=lambda t: t[0])
    return [layer for _, layers in stack for layer in layers]


def composite(layers: list[Layer], size_px: int) -> np.ndarray:
    """Alpha-composite at the supersampled size and average down: (S, S, 3) uint8."""
    hr = size_px * SUPERSAMPLE
    img = np.zeros((hr, hr, 3), np.float32)
    for l in layers:
        a = l.alpha[:, :, None]                                     # (h, w, 1)
        if a.size > 4096:                                           # big layers: copy the fully opaque rows
            solid = l.alpha.min(axis=1) >= 1.0                      # (h,)
            if solid.all():
                img[l.y0:l.y1, l.x0:l.x1] = l.color
                continue
            if solid.any():
                rows = np.flatnonzero(solid)
                img[l.y0 + rows, l.x0:l.x1] = l.color[rows] if l.color.ndim == 3 else l.color
                keep = np.flatnonzero(~solid)
                a, color = a[keep], (l.color[keep] if l.color.ndim == 3 else l.color)
                region = img[l.y0 + keep, l.x0:l.x1]
                img[l.y0 + keep, l.x0:l.x1] = region * (1 - a) + a * color
                continue
        region = img[l.y0:l.y1, l.x0:l.x1]
        img[l.y0:l.y1, l.x0:l.x1] = region * (1 - a) + a * l.color  # exact where a is 0 or 1
    small = cv2.resize(img, (size_px, size_px), interpolation=cv2.INTER_AREA)  # block means
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def visible_masks(layers: list[Layer], size_px: int) -> dict[str, np.ndarray]:
    """Per owner, the output pixels where any of its layers has coverage not hidden by an opaque layer above."""
    hr = size_px * SUPERSAMPLE
    opaque = np.zeros((hr, hr), bool)
    seen: dict[str, np.ndarray] = {}
    for l in reversed(layers):
        box = (slice(l.y0, l.y1), slice(l.x0, l.x1))
        mask = seen.setdefault(l.owner, np.zeros((hr, hr), bool))
        mask[box] |= (l.alpha > 0) & ~opaque[box]
        opaque[box] |= l.alpha >= 1.0
    return {o: cv2.resize(m.astype(np.float32), (size_px, size_px), interpolation=cv2.INTER_AREA) > 0
            for o, m in seen.items()}


def render(scene: Scene, size_px: int = 64, *, remove: Iterable[str] = (), place: Optional[str] = None,
           masks: bool = False) -> Rendering:
    """Draw a scene; `remove` element names, swap to `place`; `masks` also returns the visible masks."""
    layers = scene_layers(scene, size_px, remove=remove, place=place)
    image = composite(layers, size_px)
    return Rendering(image, visible_masks(layers, size_px) if masks else {})


def render_variants(scene: Scene, size_px: int, variants: list[tuple[tuple[str, ...], Optional[str]]]) -> list[np.ndarray]:
    """Images of one scene under several (remove, place) changes, sharing the drawing work; each equals
    `render(scene, size_px, remove=remove, place=place).image`."""
    layers = scene_layers(scene, size_px)
    images = []
    for remove, place in variants:
        kept = [l for l in layers if l.owner not in remove]
        if place is not None and place != scene.place:
            new = draw_place(Painter(size_px), place, scene.ground)
            at = next(i for i, l in enumerate(kept) if l.owner == PLACE)
            kept = kept[:at] + new + [l for l in kept[at:] if l.owner != PLACE]
        images.append(composite(kept, size_px))
    return images

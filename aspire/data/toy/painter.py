"""The painter of the toy drawings: layers (colour and alpha on the supersampled canvas), anti-aliased fills in grid
units, colours, smooth noise, and the layout that keeps a scene's things apart."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

GRID = 64.0
SUPERSAMPLE = 4
SHIFT = 4  # OpenCV fixed-point bits: sub-pixel precision of 1/16 px


# ---------------------------------------------------------------- layers and the painter
@dataclass
class Layer:
    """One part of a thing: coverage `alpha` (h, w) in [0, 1] and `color` (3,) or (h, w, 3), both over the
    box rows y0:y1, columns x0:x1 of the supersampled canvas."""

    owner: str
    y0: int
    y1: int
    x0: int
    x1: int
    alpha: np.ndarray
    color: np.ndarray


class Painter:
    """Draws shapes in grid units onto supersampled uint8 coverage buffers and cuts them into layers."""

    def __init__(self, size_px: int, supersample: int = SUPERSAMPLE):
        self.size_px = size_px
        self.size_hr = size_px * supersample
        self.scale = self.size_hr / GRID  # supersampled px per grid unit

    def buffer(self) -> np.ndarray:
        return np.zeros((self.size_hr, self.size_hr), np.uint8)

    def _fixed(self, pts) -> np.ndarray:
        return np.round(np.asarray(pts, np.float64) * self.scale * (1 << SHIFT)).astype(np.int32)

    def poly(self, buf: np.ndarray, pts, value: int = 255) -> None:
        cv2.fillPoly(buf, [self._fixed(pts)], value, cv2.LINE_AA, shift=SHIFT)

    def ellipse(self, buf: np.ndarray, cx: float, cy: float, rx: float, ry: float, angle_deg: float = 0.0,
                value: int = 255) -> None:
        self.poly(buf, ellipse_points(cx, cy, rx, ry, angle_deg), value)

    def line(self, buf: np.ndarray, pts, width: float, value: int = 255) -> None:
        thickness = max(1, int(round(width * self.scale)))
        cv2.polylines(buf, [self._fixed(pts)], False, value, thickness, cv2.LINE_AA, shift=SHIFT)

    def lines(self, buf: np.ndarray, segments: np.ndarray, width: float, value: int = 255) -> None:
        """Many polylines (n, k, 2) of one width in one call."""
        thickness = max(1, int(round(width * self.scale)))
        cv2.polylines(buf, list(self._fixed(segments)), False, value, thickness, cv2.LINE_AA, shift=SHIFT)

    def layer(self, owner: str, buf: np.ndarray, color, opacity: float = 1.0) -> Optional[Layer]:
        """Cut the non-zero box of `buf` into a layer; `color` is (3,) or a full-canvas (H, W, 3) array."""
        rows, cols = np.flatnonzero(buf.any(1)), np.flatnonzero(buf.any(0))
        if rows.size == 0:
            return None
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        alpha = buf[y0:y1, x0:x1].astype(np.float32) / 255.0
        if opacity != 1.0:
            alpha *= np.float32(opacity)
        color = np.asarray(color, np.float32)
        if color.ndim == 3:
            color = color[y0:y1, x0:x1]
        return Layer(owner, y0, y1, x0, x1, alpha, color)


def ellipse_points(cx: float, cy: float, rx: float, ry: float, angle_deg: float = 0.0, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    a = np.deg2rad(angle_deg)
    return np.stack([cx + x * np.cos(a) - y * np.sin(a), cy + x * np.sin(a) + y * np.cos(a)], 1)


def hsv(h_deg: float, s: float, v: float) -> list[float]:
    """An RGB colour in 0..255 from hue in degrees, saturation and value in 0..1."""
    return [255.0 * c for c in colorsys.hsv_to_rgb((h_deg % 360) / 360.0, min(max(s, 0), 1), min(max(v, 0), 1))]


def scaled(rgb, factor: float) -> list[float]:
    return [min(255.0, max(0.0, c * factor)) for c in rgb]


def smooth_noise(rng: np.random.Generator, size_hr: int, cells: int = 6) -> np.ndarray:
    """Low-frequency noise (H, W) with about unit standard deviation."""
    grid = rng.normal(size=(cells, cells)).astype(np.float32)
    return cv2.resize(grid, (size_hr, size_hr), interpolation=cv2.INTER_CUBIC)


def random_color(rng: np.random.Generator) -> list[float]:
    return hsv(rng.uniform(0, 360), rng.uniform(0.35, 0.9), rng.uniform(0.3, 0.9))


def bird_color(rng: np.random.Generator) -> list[float]:
    """Mostly bird-like browns and greys, sometimes any colour; the same for every class."""
    r = rng.random()
    if r < 0.45:
        return hsv(rng.uniform(10, 45), rng.uniform(0.35, 0.8), rng.uniform(0.25, 0.75))
    if r < 0.75:
        return hsv(0, 0, rng.uniform(0.1, 0.95))
    return random_color(rng)


# ---------------------------------------------------------------- layout
@dataclass
class Layout:
    """Where things may go in one scene: the horizon and the boxes (x0, y0, x1, y1) already taken."""

    horizon: float
    taken: list[tuple[float, float, float, float]]

    def place(self, rng: np.random.Generator, w: float, h: float, x_range: tuple[float, float],
              y_range: tuple[float, float], tries: int = 24) -> tuple[float, float]:
        """Top-left corner of a w x h box inside the ranges, overlapping the taken boxes least; takes it."""
        best, best_overlap = None, None
        for _ in range(tries):
            x0 = rng.uniform(x_range[0], max(x_range[0], x_range[1] - w))
            y0 = rng.uniform(y_range[0], max(y_range[0], y_range[1] - h))
            overlap = sum(_overlap((x0, y0, x0 + w, y0 + h), t) for t in self.taken)
            if best_overlap is None or overlap < best_overlap:
                best, best_overlap = (x0, y0), overlap
            if overlap == 0:
                break
        self.taken.append((best[0], best[1], best[0] + w, best[1] + h))
        return best


def _overlap(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))

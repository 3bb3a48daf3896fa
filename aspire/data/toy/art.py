"""The drawings: samplers that choose a thing's parameters, drawers that turn parameters into layers.

Geometry is in grid units of a 64 x 64 canvas (y down), whatever the pixel size. A sampler uses the
scene's random generator and returns plain parameters; a drawer is deterministic (a texture draws its
noise from a seed among its parameters), so a scene re-renders identically without any of its parts.
Drawing happens at `SUPERSAMPLE` times the pixel size with OpenCV's anti-aliased fills; `render.py`
composites the layers and averages blocks down to the output size.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Callable, Optional

import cv2
import numpy as np

GRID = 64.0
SUPERSAMPLE = 4
# Calibrated so that ERM on toy-waterbirds (smallcnn, the CLI's defaults) learns the place first and the
# bird only partly: the place hues overlap (colour alone does not separate land from water; texture
# does) and the birds differ in silhouette (legs, neck, posture) that a small CNN picks up slowly.
HUES = {"land": (80.0, 160.0), "water": (140.0, 220.0)}
LEG_WIDTH = 1.2
_SHIFT = 4  # OpenCV fixed-point bits: sub-pixel precision of 1/16 px


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
        return np.round(np.asarray(pts, np.float64) * self.scale * (1 << _SHIFT)).astype(np.int32)

    def poly(self, buf: np.ndarray, pts, value: int = 255) -> None:
        cv2.fillPoly(buf, [self._fixed(pts)], value, cv2.LINE_AA, shift=_SHIFT)

    def ellipse(self, buf: np.ndarray, cx: float, cy: float, rx: float, ry: float, angle_deg: float = 0.0,
                value: int = 255) -> None:
        self.poly(buf, ellipse_points(cx, cy, rx, ry, angle_deg), value)

    def line(self, buf: np.ndarray, pts, width: float, value: int = 255) -> None:
        thickness = max(1, int(round(width * self.scale)))
        cv2.polylines(buf, [self._fixed(pts)], False, value, thickness, cv2.LINE_AA, shift=_SHIFT)

    def lines(self, buf: np.ndarray, segments: np.ndarray, width: float, value: int = 255) -> None:
        """Many polylines (n, k, 2) of one width in one call."""
        thickness = max(1, int(round(width * self.scale)))
        cv2.polylines(buf, list(self._fixed(segments)), False, value, thickness, cv2.LINE_AA, shift=_SHIFT)

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


def _scaled(rgb, factor: float) -> list[float]:
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


# ---------------------------------------------------------------- sky and places (full-canvas layers)
def sample_sky(rng: np.random.Generator) -> dict:
    hue = rng.uniform(195, 220)
    return {"top": hsv(hue, rng.uniform(0.35, 0.65), rng.uniform(0.72, 0.92)),
            "bottom": hsv(hue + rng.uniform(-10, 10), rng.uniform(0.08, 0.3), rng.uniform(0.88, 1.0))}


def draw_sky(p: Painter, q: dict, horizon: float) -> list[Layer]:
    t = np.clip(np.arange(p.size_hr, dtype=np.float32) / (horizon * p.scale), 0, 1)[:, None, None]  # (H, 1, 1)
    col = np.asarray(q["top"], np.float32) * (1 - t) + np.asarray(q["bottom"], np.float32) * t     # (H, 1, 3)
    color = np.repeat(col, p.size_hr, axis=1)                                                       # (H, W, 3)
    return [Layer("sky", 0, p.size_hr, 0, p.size_hr, np.ones((p.size_hr, p.size_hr), np.float32), color)]


def sample_ground(rng: np.random.Generator) -> dict:
    """The ground's outline (shared by every place, so swapping the place changes only its texture)."""
    return {"horizon": float(rng.uniform(24, 34)), "amp": float(rng.uniform(0, 1.5)),
            "freq": float(rng.uniform(0.05, 0.15)), "phase": float(rng.uniform(0, 2 * np.pi)),
            "seed": int(rng.integers(2**31))}


def ground_alpha(p: Painter, g: dict) -> np.ndarray:
    xs = np.linspace(0, GRID, 65)
    top = g["horizon"] + g["amp"] * np.sin(g["freq"] * xs * 2 * np.pi / 6 + g["phase"])
    pts = np.concatenate([np.stack([xs, top], 1), [[GRID + 1, GRID + 1], [-1, GRID + 1]]])
    buf = p.buffer()
    p.poly(buf, pts)
    return buf


def _vertical(p: Painter, g: dict, near, far) -> np.ndarray:
    """A colour (H, W, 3) going from `far` at the horizon to `near` at the bottom."""
    y = np.arange(p.size_hr, dtype=np.float32) / p.scale
    t = np.clip((y - g["horizon"]) / (GRID - g["horizon"]), 0, 1)[:, None, None]
    col = np.asarray(far, np.float32) * (1 - t) + np.asarray(near, np.float32) * t
    return np.broadcast_to(col, (p.size_hr, p.size_hr, 3)).copy()


def _strokes(p: Painter, rng: np.random.Generator, g: dict, n: int, length: tuple[float, float],
             angle: tuple[float, float], width: float) -> np.ndarray:
    """Coverage (H, W, 1) in 0..1 of n short strokes scattered below the horizon, longer nearer."""
    x, y = rng.uniform(0, GRID, n), rng.uniform(g["horizon"] + 1, GRID, n)
    ln = rng.uniform(*length, n) * (0.5 + 0.5 * (y - g["horizon"]) / (GRID - g["horizon"]))
    a = np.deg2rad(rng.uniform(*angle, n))
    segments = np.stack([np.stack([x, y], 1), np.stack([x + ln * np.cos(a), y - ln * np.sin(a)], 1)], 1)  # (n, 2, 2)
    buf = p.buffer()
    p.lines(buf, segments, width)
    return buf.astype(np.float32)[:, :, None] / 255.0


def _texture(name: str, out: Painter, g: dict) -> np.ndarray:
    """The place's colour (H, W, 3), drawn at twice the output size and smoothly enlarged (fast)."""
    p = Painter(out.size_px, 2)
    rng = np.random.default_rng([g["seed"], len(name), sum(map(ord, name))])
    noise = smooth_noise(rng, p.size_hr)[:, :, None]
    if name in ("land", "grass"):
        hue = rng.uniform(*HUES["land"])
        col = _vertical(p, g, hsv(hue, rng.uniform(0.5, 0.75), rng.uniform(0.3, 0.45)),
                        hsv(hue + 10, rng.uniform(0.35, 0.6), rng.uniform(0.5, 0.65)))
        col *= 1 + 0.08 * noise
        dark = _strokes(p, rng, g, 90, (1.5, 3.5), (60, 120), 0.35)
        light = _strokes(p, rng, g, 40, (1.0, 2.5), (60, 120), 0.3)
        col = col * (1 - 0.45 * dark) + 0.3 * light * np.asarray(hsv(hue, 0.4, 0.85), np.float32)
    elif name == "water":
        hue = rng.uniform(*HUES["water"])
        col = _vertical(p, g, hsv(hue, rng.uniform(0.6, 0.85), rng.uniform(0.4, 0.55)),
                        hsv(hue - 5, rng.uniform(0.35, 0.6), rng.uniform(0.65, 0.85)))
        col *= 1 + 0.06 * noise
        light = _strokes(p, rng, g, 45, (2.5, 7.0), (-4, 4), 0.35)
        dark = _strokes(p, rng, g, 25, (2.0, 5.0), (-4, 4), 0.3)
        col = col * (1 - 0.5 * light - 0.25 * dark) + 0.5 * light * np.asarray(hsv(hue, 0.15, 0.97), np.float32)
    elif name == "sand":
        hue = rng.uniform(33, 45)
        col = _vertical(p, g, hsv(hue, rng.uniform(0.35, 0.5), rng.uniform(0.72, 0.82)),
                        hsv(hue, rng.uniform(0.25, 0.4), rng.uniform(0.85, 0.95)))
        col *= 1 + 0.07 * noise
        dots = _strokes(p, rng, g, 70, (0.3, 0.8), (0, 180), 0.3)
        col = col * (1 - 0.25 * dots)
    elif name == "snow":
        col = _vertical(p, g, hsv(rng.uniform(200, 220), rng.uniform(0.05, 0.12), rng.uniform(0.88, 0.94)),
                        hsv(rng.uniform(200, 220), rng.uniform(0.0, 0.06), rng.uniform(0.95, 1.0)))
        col *= 1 + 0.035 * noise
        drifts = _strokes(p, rng, g, 20, (4.0, 9.0), (-8, 8), 0.4)
        col = col * (1 - 0.1 * drifts)
    else:
        raise KeyError(f"no texture for place {name!r}")
    col = cv2.resize(np.ascontiguousarray(col, np.float32), (out.size_hr, out.size_hr), interpolation=cv2.INTER_LINEAR)
    return np.clip(col, 0, 255)


def draw_place(p: Painter, name: str, g: dict) -> list[Layer]:
    return [p.layer("place", ground_alpha(p, g), _texture(name, p, g))]


# ---------------------------------------------------------------- elements
def _sun(rng, lay: Layout) -> dict:
    r = rng.uniform(3.2, 5.5)
    x, y = lay.place(rng, 2 * r, 2 * r, (2, GRID - 2), (2, lay.horizon - 3))
    return {"cx": x + r, "cy": y + r, "r": r, "color": hsv(rng.uniform(38, 55), rng.uniform(0.55, 0.9), 1.0)}


def _draw_sun(p: Painter, q: dict, owner: str) -> list[Layer]:
    glow, disc = p.buffer(), p.buffer()
    p.ellipse(glow, q["cx"], q["cy"], q["r"] * 1.45, q["r"] * 1.45)
    p.ellipse(disc, q["cx"], q["cy"], q["r"], q["r"])
    return [p.layer(owner, glow, q["color"], 0.35), p.layer(owner, disc, q["color"])]


def _cloud(rng, lay: Layout) -> dict:
    puffs = []
    for _ in range(int(rng.integers(1, 3))):
        w, h = rng.uniform(10, 16), rng.uniform(4, 6)
        x, y = lay.place(rng, w, h, (0, GRID), (2, lay.horizon - 2))
        n = int(rng.integers(3, 5))
        for i in range(n):
            cx = x + w * (i + 0.5) / n + rng.uniform(-1, 1)
            puffs.append([cx, y + h * rng.uniform(0.45, 0.65), w / n * rng.uniform(0.75, 1.0), h * rng.uniform(0.4, 0.55)])
        puffs.append([x + w / 2, y + h * 0.7, w * 0.48, h * 0.3])
    return {"puffs": puffs, "color": hsv(rng.uniform(200, 230), rng.uniform(0, 0.08), rng.uniform(0.92, 1.0))}


def _draw_cloud(p: Painter, q: dict, owner: str) -> list[Layer]:
    buf, shade = p.buffer(), p.buffer()
    for cx, cy, rx, ry in q["puffs"]:
        p.ellipse(buf, cx, cy, rx, ry)
        p.ellipse(shade, cx, cy + ry * 0.45, rx * 0.8, ry * 0.5)
    return [p.layer(owner, buf, q["color"]), p.layer(owner, shade, _scaled(q["color"], 0.88), 0.6)]


def _fence(rng, lay: Layout) -> dict:
    w, h = rng.uniform(22, 32), rng.uniform(9, 12)
    x, y = lay.place(rng, w, h, (0, GRID), (lay.horizon + 1, min(GRID - 2, lay.horizon + 18)))
    r = rng.random()
    if r < 0.5:    # white
        color = hsv(0, 0, rng.uniform(0.9, 1.0))
    elif r < 0.8:  # red
        color = hsv(rng.uniform(0, 12), rng.uniform(0.6, 0.85), rng.uniform(0.55, 0.8))
    else:          # dark wood
        color = hsv(rng.uniform(20, 30), rng.uniform(0.5, 0.7), rng.uniform(0.25, 0.4))
    return {"x": x, "y": y, "w": w, "h": h, "posts": int(rng.integers(4, 7)), "color": color}


def _draw_fence(p: Painter, q: dict, owner: str) -> list[Layer]:
    buf = p.buffer()
    x, y, w, h = q["x"], q["y"], q["w"], q["h"]
    for i in range(q["posts"]):
        px = x + w * i / (q["posts"] - 1)
        p.poly(buf, [[px - 0.9, y], [px, y - 1.0], [px + 0.9, y], [px + 0.9, y + h], [px - 0.9, y + h]])
    for fy in (0.3, 0.65):
        p.line(buf, [[x, y + h * fy], [x + w, y + h * fy]], 1.4)
    return [p.layer(owner, buf, q["color"])]


def _boat(rng, lay: Layout) -> dict:
    w = rng.uniform(11, 17)
    hull, sail = w * rng.uniform(0.22, 0.3), w * rng.uniform(0.7, 0.95)
    x, y = lay.place(rng, w, hull + sail, (0, GRID), (lay.horizon - sail * 0.6, GRID - 1))
    return {"x": x, "y": y + sail, "w": w, "hull": hull, "sail": sail, "facing": float(rng.choice([-1, 1])),
            "hull_color": hsv(rng.choice([0, 25, 215, 30]) + rng.uniform(-8, 8), rng.uniform(0.4, 0.8), rng.uniform(0.3, 0.6)),
            "sail_color": hsv(rng.uniform(0, 60), rng.uniform(0, 0.15), rng.uniform(0.9, 1.0))}


def _draw_boat(p: Painter, q: dict, owner: str) -> list[Layer]:
    x, y, w, hh, sh, f = q["x"], q["y"], q["w"], q["hull"], q["sail"], q["facing"]
    mx = x + w * (0.5 - 0.05 * f)
    hull, sail, mast = p.buffer(), p.buffer(), p.buffer()
    p.poly(hull, [[x, y], [x + w, y], [x + w - hh * 0.9, y + hh], [x + hh * 0.9, y + hh]])
    p.poly(sail, [[mx + 0.4 * f, y - sh], [mx + 0.4 * f, y - 0.8], [mx + f * w * 0.42, y - 0.8]])
    p.line(mast, [[mx, y - sh * 1.05], [mx, y]], 0.5)
    return [p.layer(owner, mast, [60, 45, 35]), p.layer(owner, sail, q["sail_color"]), p.layer(owner, hull, q["hull_color"])]


def _balloon(rng, lay: Layout) -> dict:
    rx = rng.uniform(2.8, 3.8)
    ry, string = rx * 1.25, rng.uniform(5, 8)
    x, y = lay.place(rng, 2 * rx, 2 * ry + string, (2, GRID - 2), (2, lay.horizon + 8))
    return {"cx": x + rx, "cy": y + ry, "rx": rx, "ry": ry, "string": string, "sway": rng.uniform(-1.5, 1.5),
            "color": hsv(rng.choice([0, 330, 280, 50, 200]) + rng.uniform(-10, 10), rng.uniform(0.65, 0.95), rng.uniform(0.75, 0.95))}


def _draw_balloon(p: Painter, q: dict, owner: str) -> list[Layer]:
    body, string, shine = p.buffer(), p.buffer(), p.buffer()
    bottom = q["cy"] + q["ry"]
    p.line(string, [[q["cx"], bottom], [q["cx"] + q["sway"], bottom + q["string"] / 2], [q["cx"], bottom + q["string"]]], 0.3)
    p.ellipse(body, q["cx"], q["cy"], q["rx"], q["ry"])
    p.poly(body, [[q["cx"] - 0.7, bottom + 0.8], [q["cx"] + 0.7, bottom + 0.8], [q["cx"], bottom - 0.5]])
    p.ellipse(shine, q["cx"] - q["rx"] * 0.35, q["cy"] - q["ry"] * 0.4, q["rx"] * 0.22, q["ry"] * 0.3, -30)
    return [p.layer(owner, string, [70, 70, 70]), p.layer(owner, body, q["color"]),
            p.layer(owner, shine, [255, 255, 255], 0.6)]


def _kite(rng, lay: Layout) -> dict:
    s = rng.uniform(4.5, 7)
    x, y = lay.place(rng, s * 1.6, s * 2.6, (1, GRID - 1), (1, lay.horizon + 4))
    return {"cx": x + s * 0.8, "cy": y + s, "s": s, "tilt": rng.uniform(-25, 25),
            "color": random_color(rng), "color2": random_color(rng)}


def _draw_kite(p: Painter, q: dict, owner: str) -> list[Layer]:
    s, a = q["s"], np.deg2rad(q["tilt"])
    local = np.array([[0, -s], [0.7 * s, -0.2 * s], [0, s], [-0.7 * s, -0.2 * s]])
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    pts = local @ rot.T + [q["cx"], q["cy"]]
    body, half, tail = p.buffer(), p.buffer(), p.buffer()
    p.poly(body, pts)
    p.poly(half, [pts[0], pts[1], pts[2]])
    tip = pts[2]
    p.line(tail, [tip, tip + [1.2, 2.5], tip + [-0.8, 4.5], tip + [0.8, 6.5]], 0.35)
    return [p.layer(owner, tail, [60, 60, 60]), p.layer(owner, body, q["color"]), p.layer(owner, half, q["color2"])]


def _house(rng, lay: Layout) -> dict:
    w = rng.uniform(9, 13)
    h, roof = w * rng.uniform(0.65, 0.85), w * rng.uniform(0.4, 0.6)
    x, y = lay.place(rng, w + 2, h + roof, (0, GRID), (lay.horizon - roof - h * 0.5, lay.horizon + 12))
    return {"x": x + 1, "y": y + roof, "w": w, "h": h, "roof": roof,
            "wall": hsv(rng.uniform(20, 60), rng.uniform(0.1, 0.4), rng.uniform(0.7, 0.95)),
            "roof_color": hsv(rng.choice([0, 15, 200]) + rng.uniform(-8, 8), rng.uniform(0.5, 0.8), rng.uniform(0.35, 0.6))}


def _draw_house(p: Painter, q: dict, owner: str) -> list[Layer]:
    x, y, w, h, r = q["x"], q["y"], q["w"], q["h"], q["roof"]
    wall, roof, door = p.buffer(), p.buffer(), p.buffer()
    p.poly(wall, [[x, y], [x + w, y], [x + w, y + h], [x, y + h]])
    p.poly(roof, [[x - 1, y + 0.3], [x + w / 2, y - r], [x + w + 1, y + 0.3]])
    p.poly(door, [[x + w * 0.4, y + h * 0.45], [x + w * 0.6, y + h * 0.45], [x + w * 0.6, y + h], [x + w * 0.4, y + h]])
    return [p.layer(owner, wall, q["wall"]), p.layer(owner, roof, q["roof_color"]), p.layer(owner, door, [70, 50, 40])]


def _tree(rng, lay: Layout) -> dict:
    h = rng.uniform(13, 19)
    r = h * rng.uniform(0.28, 0.36)
    x, y = lay.place(rng, 2 * r, h, (0, GRID), (lay.horizon - h * 0.75, lay.horizon + 10))
    return {"cx": x + r, "base": y + h, "h": h, "r": r,
            "leaves": hsv(rng.uniform(85, 140), rng.uniform(0.5, 0.8), rng.uniform(0.25, 0.45)),
            "trunk": hsv(rng.uniform(20, 30), rng.uniform(0.4, 0.6), rng.uniform(0.25, 0.4))}


def _draw_tree(p: Painter, q: dict, owner: str) -> list[Layer]:
    cx, base, h, r = q["cx"], q["base"], q["h"], q["r"]
    trunk, crown, shade = p.buffer(), p.buffer(), p.buffer()
    p.poly(trunk, [[cx - 0.8, base], [cx + 0.8, base], [cx + 0.5, base - h * 0.6], [cx - 0.5, base - h * 0.6]])
    top = base - h + r
    for dx, dy, k in ((0, 0, 1.0), (-r * 0.45, r * 0.6, 0.75), (r * 0.45, r * 0.6, 0.75)):
        p.ellipse(crown, cx + dx, top + dy, r * k, r * k)
    p.ellipse(shade, cx + r * 0.3, top + r * 0.7, r * 0.6, r * 0.45)
    return [p.layer(owner, trunk, q["trunk"]), p.layer(owner, crown, q["leaves"]),
            p.layer(owner, shade, _scaled(q["leaves"], 0.7), 0.7)]


def _flower(rng, lay: Layout) -> dict:
    s = rng.uniform(3.0, 4.0)
    stem = rng.uniform(4, 7)
    x, y = lay.place(rng, 3 * s, 2 * s + stem, (1, GRID - 1), (lay.horizon + 2, GRID - 1))
    return {"cx": x + 1.5 * s, "cy": y + s, "s": s, "stem": stem,
            "petals": hsv(rng.choice([0, 50, 300, 270, 30]) + rng.uniform(-10, 10), rng.uniform(0.5, 0.9), rng.uniform(0.8, 1.0)),
            "centre": hsv(rng.uniform(40, 55), 0.9, rng.uniform(0.6, 0.9))}


def _draw_flower(p: Painter, q: dict, owner: str) -> list[Layer]:
    cx, cy, s = q["cx"], q["cy"], q["s"]
    stem, petals, centre = p.buffer(), p.buffer(), p.buffer()
    p.line(stem, [[cx, cy], [cx + 0.5, cy + q["stem"]]], 0.45)
    p.poly(stem, [[cx + 0.3, cy + q["stem"] * 0.6], [cx + 2.2, cy + q["stem"] * 0.35], [cx + 0.3, cy + q["stem"] * 0.8]])
    for k in range(6):
        a = k * np.pi / 3
        p.ellipse(petals, cx + 0.6 * s * np.cos(a), cy + 0.6 * s * np.sin(a), 0.5 * s, 0.3 * s, np.rad2deg(a))
    p.ellipse(centre, cx, cy, 0.32 * s, 0.32 * s)
    return [p.layer(owner, stem, [60, 130, 50]), p.layer(owner, petals, q["petals"]), p.layer(owner, centre, q["centre"])]


# name -> (sampler, drawer, depth); things are composited by depth (the place is depth 30, the object 100)
ELEMENTS: dict[str, tuple[Callable, Callable, int]] = {
    "sun": (_sun, _draw_sun, 10),
    "cloud": (_cloud, _draw_cloud, 20),
    "house": (_house, _draw_house, 40),
    "tree": (_tree, _draw_tree, 50),
    "fence": (_fence, _draw_fence, 60),
    "boat": (_boat, _draw_boat, 70),
    "flower": (_flower, _draw_flower, 80),
    "balloon": (_balloon, _draw_balloon, 90),
    "kite": (_kite, _draw_kite, 95),
}
SKY_ELEMENTS = ("sun", "cloud", "balloon", "kite")  # sampled before the ground things (free sky first)


# ---------------------------------------------------------------- objects (the class's own thing)
def sample_object(rng: np.random.Generator, shape: str, lay: Layout) -> dict:
    if shape in ("landbird", "waterbird"):
        length = rng.uniform(24, 30)
        cx = rng.uniform(20, 44)
        cy = rng.uniform(lay.horizon + 8, GRID - length * 0.45)
        color = bird_color(rng)
        q = {"cx": cx, "cy": cy, "L": length, "facing": float(rng.choice([-1, 1])), "tilt": rng.uniform(-10, 10),
             "plump": rng.uniform(0.85, 1.15), "color": color, "wing": _scaled(color, rng.uniform(0.55, 0.8)),
             "beak": hsv(rng.uniform(25, 50), rng.uniform(0.6, 0.9), rng.uniform(0.4, 0.9)) if rng.random() < 0.6
             else hsv(0, 0, rng.uniform(0.15, 0.4))}
        lay.taken.append((cx - length * 0.55, cy - length * 0.55, cx + length * 0.55, cy + length * 0.45))
        return q
    r = rng.uniform(9, 12)
    cx, cy = rng.uniform(18, 46), rng.uniform(max(r + 2, lay.horizon - 4), GRID - r - 2)
    lay.taken.append((cx - r, cy - r, cx + r, cy + r))
    return {"cx": cx, "cy": cy, "r": r, "rot": rng.uniform(-20, 20), "color": random_color(rng)}


def _rotated(pts: np.ndarray, deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return pts @ np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])


def _bird_parts(waterbird: bool) -> dict[str, list[np.ndarray]]:
    """Parts in body-length units, facing +x, body centred at 0. The classes differ in silhouette only:
    a waterbird swims (flat body, long upright neck, flat bill, no legs), a landbird perches (upright
    body, head on top, short pointed beak, legs). Size, colour and pose are drawn alike for both."""
    if waterbird:
        return {"body": [ellipse_points(0, 0, 0.5, 0.2)],
                "tail": [np.array([[-0.4, -0.02], [-0.66, -0.2], [-0.56, 0.06]])],
                "wing": [ellipse_points(-0.08, -0.03, 0.32, 0.11, -5)],
                "head": [np.array([[0.24, -0.08], [0.34, -0.62], [0.46, -0.6], [0.44, -0.04]]),
                         ellipse_points(0.43, -0.64, 0.13, 0.12)],
                "beak": [np.array([[0.51, -0.68], [0.8, -0.64], [0.8, -0.58], [0.51, -0.58]])],
                "legs": [],
                "eye": [ellipse_points(0.46, -0.67, 0.03, 0.03)]}
    t = -35.0  # the perching body leans back
    return {"body": [_rotated(ellipse_points(0, 0, 0.42, 0.24), t)],
            "tail": [_rotated(np.array([[-0.32, -0.04], [-0.74, 0.02], [-0.72, 0.14], [-0.32, 0.12]]), t)],
            "wing": [_rotated(ellipse_points(-0.06, 0.0, 0.28, 0.13, -5), t)],
            "head": [ellipse_points(0.26, -0.42, 0.16, 0.15)],
            "beak": [np.array([[0.38, -0.47], [0.56, -0.42], [0.38, -0.36]])],
            "legs": [np.array([[-0.02, 0.2], [-0.05, 0.6], [-0.15, 0.64]]),
                     np.array([[0.12, 0.16], [0.14, 0.6], [0.04, 0.64]])],
            "eye": [ellipse_points(0.3, -0.45, 0.03, 0.03)]}


def draw_object(p: Painter, shape: str, q: dict) -> list[Layer]:
    if shape in ("landbird", "waterbird"):
        return _draw_bird(p, q, shape == "waterbird")
    return _draw_shape(p, shape, q)


def _draw_bird(p: Painter, q: dict, waterbird: bool) -> list[Layer]:
    a = np.deg2rad(q["tilt"])
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])

    def to_grid(pts: np.ndarray) -> np.ndarray:
        pts = pts * [1.0, q["plump"]] @ rot.T * q["L"]
        return pts * [q["facing"], 1.0] + [q["cx"], q["cy"]]

    parts = _bird_parts(waterbird)
    layers = []
    legs = p.buffer()
    for leg in parts["legs"]:
        p.line(legs, to_grid(leg), LEG_WIDTH)
    layers.append(p.layer("object", legs, [90, 70, 50]))
    for name, color in (("tail", q["wing"]), ("body", q["color"]), ("head", q["color"]), ("wing", q["wing"]),
                        ("beak", q["beak"]), ("eye", [20, 20, 20])):
        buf = p.buffer()
        for poly in parts[name]:
            p.poly(buf, to_grid(poly))
        layers.append(p.layer("object", buf, color))
    return [l for l in layers if l is not None]


def _shape_points(shape: str) -> list[np.ndarray]:
    """Outline(s) at unit radius; a second outline is a hole."""
    t = lambda n, off=0.0: np.linspace(0, 2 * np.pi, n, endpoint=False) + off  # noqa: E731
    if shape == "star":
        a = t(10, -np.pi / 2)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return [np.stack([r * np.cos(a), r * np.sin(a)], 1)]
    if shape == "heart":
        s = np.linspace(0, 2 * np.pi, 60, endpoint=False)
        x = 16 * np.sin(s) ** 3
        y = -(13 * np.cos(s) - 5 * np.cos(2 * s) - 2 * np.cos(3 * s) - np.cos(4 * s))
        return [np.stack([x, y + 2], 1) / 16.0]
    if shape == "crescent":
        return [ellipse_points(0, 0, 1, 1), ellipse_points(0.45, -0.2, 0.82, 0.82)]
    if shape == "cross":
        w = 0.34
        return [np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1], [-w, w], [-1, w],
                          [-1, -w], [-w, -w]])]
    if shape == "arrow":
        return [np.array([[-1, -0.22], [0.2, -0.22], [0.2, -0.6], [1, 0], [0.2, 0.6], [0.2, 0.22], [-1, 0.22]])]
    if shape == "ring":
        return [ellipse_points(0, 0, 1, 1), ellipse_points(0, 0, 0.55, 0.55)]
    if shape == "triangle":
        a = t(3, -np.pi / 2)
        return [np.stack([np.cos(a), np.sin(a) + 0.15], 1)]
    if shape == "hexagon":
        a = t(6)
        return [np.stack([np.cos(a), np.sin(a)], 1) * 0.92]
    raise KeyError(f"no drawing for shape {shape!r}")


def _draw_shape(p: Painter, shape: str, q: dict) -> list[Layer]:
    a = np.deg2rad(q["rot"])
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    outlines = [o @ rot.T * q["r"] + [q["cx"], q["cy"]] for o in _shape_points(shape)]
    fill, edge = p.buffer(), p.buffer()
    p.poly(fill, outlines[0])
    for hole in outlines[1:]:
        p.poly(fill, hole, 0)
    for outline in outlines:
        p.line(edge, np.vstack([outline, outline[:1]]), 0.8)
    # keep the edge only along the shape (a hole's outline reaches beyond the crescent)
    k = max(3, int(round(p.scale)) | 1)
    edge = np.minimum(edge, cv2.dilate(fill, np.ones((k, k), np.uint8)))
    return [l for l in (p.layer("object", fill, q["color"]), p.layer("object", edge, _scaled(q["color"], 0.6))) if l]

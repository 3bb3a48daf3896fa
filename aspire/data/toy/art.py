"""The drawings of the sky, the places and the scene elements (the class's own objects: objects.py; layers, fills and
colours: painter.py): samplers that choose a thing's parameters, drawers that turn parameters into layers.

Geometry is in grid units of a 64 x 64 canvas (y down), whatever the pixel size. A sampler uses the
scene's random generator and returns plain parameters; a drawer is deterministic (a texture draws its
noise from a seed among its parameters), so a scene re-renders identically without any of its parts.
Drawing happens at `SUPERSAMPLE` times the pixel size with OpenCV's anti-aliased fills; `render.py`
composites the layers and averages blocks down to the output size.
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from aspire.data.toy.painter import GRID, Layer, Layout, Painter, hsv, random_color, scaled, smooth_noise

# Calibrated so that ERM on toy-waterbirds (smallcnn, the CLI's defaults) learns the place first and the
# bird only partly: the place hues overlap (colour alone does not separate land from water; texture
# does) and the birds differ in silhouette (legs, neck, posture) that a small CNN picks up slowly.
HUES = {"land": (80.0, 160.0), "water": (140.0, 220.0)}


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
    return [p.layer(owner, buf, q["color"]), p.layer(owner, shade, scaled(q["color"], 0.88), 0.6)]


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
            p.layer(owner, shade, scaled(q["leaves"], 0.7), 0.7)]


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

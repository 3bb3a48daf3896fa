"""The class's own thing in a toy scene: birds (land and water) and geometric shapes, sampled and drawn."""

from __future__ import annotations


import cv2
import numpy as np

from aspire.data.toy.painter import GRID, Layer, Layout, Painter, bird_color, ellipse_points, hsv, random_color, scaled

# the birds' legs, calibrated with the places' hues (art.py)
LEG_WIDTH = 1.2


def sample_object(rng: np.random.Generator, shape: str, lay: Layout) -> dict:
    if shape in ("landbird", "waterbird"):
        length = rng.uniform(24, 30)
        cx = rng.uniform(20, 44)
        cy = rng.uniform(lay.horizon + 8, GRID - length * 0.45)
        color = bird_color(rng)
        q = {"cx": cx, "cy": cy, "L": length, "facing": float(rng.choice([-1, 1])), "tilt": rng.uniform(-10, 10),
             "plump": rng.uniform(0.85, 1.15), "color": color, "wing": scaled(color, rng.uniform(0.55, 0.8)),
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
    return [l for l in (p.layer("object", fill, q["color"]), p.layer("object", edge, scaled(q["color"], 0.6))) if l]

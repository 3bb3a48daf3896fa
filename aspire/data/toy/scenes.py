"""Scene descriptions: everything about an image, sampled before anything is drawn.

Which class, place and elements each image gets is assigned by exact counts per (split, class)
(round(p * n) images, at shuffled positions), so the planted strengths hold exactly, not just on
average. Each scene then draws its geometry and colours from its own generator, seeded by
(seed, split, index); rendering a scene without an element reuses every other draw unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from aspire.data.toy.art import ELEMENTS, SKY_ELEMENTS, sample_ground, sample_sky
from aspire.data.toy.objects import sample_object
from aspire.data.toy.painter import Layout
from aspire.data.toy.spec import SPLITS, BenchmarkSpec

SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class Scene:
    split: str
    index: int                  # position in its split
    y: int
    shape: str                  # the object's drawer
    place: str
    alt_place: str              # the place a place-swap counterfactual shows
    sky: dict
    ground: dict
    object: dict
    elements: dict[str, dict] = field(default_factory=dict)   # present elements -> parameters
    caption_seed: int = 0

    @property
    def stem(self) -> str:
        return f"{self.index:05d}"


def exact_counts(probs: tuple[float, ...], n: int) -> list[int]:
    """Integer counts summing to n, as close to probs * n as possible (largest remainder)."""
    raw = np.asarray(probs, np.float64) / max(sum(probs), 1e-12) * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def split_sizes(spec: BenchmarkSpec, scale: int = 1, sizes: Optional[dict[str, int]] = None) -> dict[str, int]:
    """Images per class in each split: the spec's sizes times `scale`, or `sizes` when given."""
    base = sizes or spec.n_per_class
    return {s: int(base[s]) * (1 if sizes else int(scale)) for s in SPLITS}


def sample_scenes(spec: BenchmarkSpec, seed: int, per_class: dict[str, int]) -> dict[str, list[Scene]]:
    """All scenes of a benchmark, per split, in file order."""
    return {split: _sample_split(spec, seed, split, per_class[split]) for split in SPLITS}


def _sample_split(spec: BenchmarkSpec, seed: int, split: str, n: int) -> list[Scene]:
    # 1. assign class, place and elements by exact counts per class
    code = SPLIT_CODE[split]
    rng = np.random.default_rng([seed, 1000 + code])
    train = split == "train"
    plan = []  # (y, place index, present element names)
    for y in range(len(spec.classes)):
        probs = (spec.place_train if train else spec.place_eval)[y]
        places = np.repeat(np.arange(len(spec.places)), exact_counts(probs, n))
        rng.shuffle(places)
        present = np.zeros((n, len(spec.elements)), bool)
        for j, e in enumerate(spec.elements):
            k = int(round((e.p_train if train else e.p_eval)[y] * n))
            present[rng.permutation(n)[:k], j] = True
        for i in range(n):
            plan.append((y, int(places[i]), [e.name for j, e in enumerate(spec.elements) if present[i, j]]))
    order = rng.permutation(len(plan))

    # 2. each scene draws its own geometry, in a fixed order: sky, ground, object, sky things, ground things
    scenes = []
    for index, k in enumerate(order):
        y, place, names = plan[k]
        srng = np.random.default_rng([seed, code, index])
        others = [p for p in range(len(spec.places)) if p != place]
        alt = others[int(srng.integers(len(others)))]
        sky, ground = sample_sky(srng), sample_ground(srng)
        layout = Layout(ground["horizon"], [])
        shape = spec.classes[y].shape
        obj = sample_object(srng, shape, layout)
        ordered = [e for e in SKY_ELEMENTS if e in names] + [e for e in ELEMENTS if e in names and e not in SKY_ELEMENTS]
        elements = {e: ELEMENTS[e][0](srng, layout) for e in ordered}
        scenes.append(Scene(split, index, y, shape, spec.places[place].name, spec.places[alt].name, sky, ground,
                            obj, elements, int(srng.integers(2**31))))
    return scenes

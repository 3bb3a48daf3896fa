"""Write a toy benchmark in the waterbirds format (DESIGN §4), with ground truth and counterfactuals.

Files under the output folder:
  metadata.csv          img_filename, y, split (0/1/2), the attribute column, the place column,
                        has_<element> (0/1) for every element
  classes.txt           one class name per line (index = y)
  images/<split>/*.png  the images
  annotations.jsonl     {"image", "caption", "regions": [{"phrase", "mask"}]}, mask paths relative to the root: the
                        caption's phrases first, then every visible thing under each of its names (a complete
                        segmentation: the annotations grounder finds what a caption left out, as GroundingDINO
                        would)
  masks/<split>/*.png   0/255 masks of the image size: every visible thing, and every counterfactual's region
  counterfactuals.csv   img_filename, source_filename, y, element, change (remove|swap), replacement, mask
  counterfactuals/*.png the test images re-rendered without one element, or on the other place
  ground_truth.json     per class the planted spurious elements (phrases, kind, strengths), the distractors,
                        and P(element | class) per split for every element and place

The same seed writes byte-identical files. The folder is built beside `out` and renamed into place.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from aspire.atomic import atomic_dir
from aspire.data.toy.art import ELEMENTS
from aspire.data.toy.captions import make_caption
from aspire.data.toy.render import OBJECT, PLACE, render, render_variants
from aspire.data.toy.scenes import SPLIT_CODE, Scene, sample_scenes, split_sizes
from aspire.data.toy.spec import SPLITS, BenchmarkSpec, multiclass_spec, waterbirds_spec
from aspire.errors import ConfigError, DataError

BENCHMARKS: dict[str, Callable[[], BenchmarkSpec]] = {
    "toy-waterbirds": waterbirds_spec,
    "toy-multiclass": multiclass_spec,
}
PARALLEL_FROM = 600  # scenes; below this, starting worker processes costs more than it saves
COUNTERFACTUAL_COLUMNS = ("img_filename", "source_filename", "y", "element", "change", "replacement", "mask")


def min_visible_px(size_px: int) -> int:
    """A thing is 'shown' (mentioned, counterfactual-worthy) when at least this many pixels of it are visible."""
    return max(2, round(4 * (size_px / 64) ** 2))


def attr_value(spec: BenchmarkSpec, scene: Scene) -> int:
    """The group attribute: the place index when the attribute is the place column, else 1 when the image
    shows its own class's planted element (an element, or a place)."""
    place = [p.name for p in spec.places].index(scene.place)
    if spec.attr_name == spec.place_column:
        return place
    own = any(scene.y in e.spurious_for and e.name in scene.elements for e in spec.elements)
    return int(own or scene.y in spec.place_spurious_for[place])


def write_benchmark(name: str | BenchmarkSpec, out: str | Path, *, seed: int = 0, scale: int = 1, size_px: int = 64,
                    sizes: Optional[dict[str, int]] = None, workers: Optional[int] = None,
                    progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Build benchmark `name` (a built-in's name, or a spec of one's own) into `out` (refused when it exists and
    is not empty); returns a summary.
    `sizes` (images per class per split) overrides the default sizes times `scale` (tests use it).
    `workers` processes render in parallel (default: the CPU count for large sets, else 1); the files
    are the same whatever the number of workers."""
    # 1. check inputs
    if isinstance(name, str) and name not in BENCHMARKS:
        raise ConfigError(f"unknown toy benchmark {name!r}: expected one of {', '.join(BENCHMARKS)}")
    if int(scale) < 1:
        raise ConfigError(f"--scale must be at least 1, got {scale}")
    if int(size_px) < 16:
        raise ConfigError(f"image size must be at least 16 px, got {size_px}")
    if sizes is not None and (set(sizes) != set(SPLITS) or any(int(v) < 1 for v in sizes.values())):
        raise ConfigError(f"sizes must give at least 1 image per class for each of {', '.join(SPLITS)}, got {sizes}")
    out = Path(out).expanduser()
    if out.exists():
        if not out.is_dir() or any(out.iterdir()):
            raise DataError(f"{out}: output folder already exists and is not empty; choose another --out or remove it")
        out.rmdir()
    spec = BENCHMARKS[name]() if isinstance(name, str) else name
    name = spec.name
    _check_spec(spec)

    # 2. sample every scene first, then render them
    started = time.perf_counter()
    per_class = split_sizes(spec, scale, sizes)
    scenes = sample_scenes(spec, seed, per_class)
    total = sum(len(v) for v in scenes.values())
    done = 0
    with atomic_dir(out) as tmp:
        for sub in ("images", "masks"):
            for split in SPLITS:
                (tmp / sub / split).mkdir(parents=True)
        (tmp / "counterfactuals").mkdir()
        meta_rows, annotations, cf_rows = [], [], []
        ordered = [scene for split in SPLITS for scene in scenes[split]]
        for meta, ann, cfs in _render_all(spec, ordered, tmp, size_px, workers):
            meta_rows.append(meta)
            annotations.append(ann)
            cf_rows.extend(cfs)
            done += 1
            if progress:
                progress(done, total)

        # 3. tables, class names, ground truth
        element_cols = [f"has_{e.name}" for e in spec.elements]
        head = ["img_filename", "y", "split", spec.attr_name] + \
               ([spec.place_column] if spec.place_column != spec.attr_name else []) + element_cols
        _write_csv(tmp / "metadata.csv", head, meta_rows)
        _write_csv(tmp / "counterfactuals.csv", list(COUNTERFACTUAL_COLUMNS), cf_rows)
        (tmp / "classes.txt").write_text("".join(c + "\n" for c in spec.class_names), encoding="utf-8")
        (tmp / "annotations.jsonl").write_text("".join(json.dumps(a) + "\n" for a in annotations), encoding="utf-8")
        truth = ground_truth(spec, seed=seed, scale=scale, size_px=size_px, per_class=per_class, n_cf=len(cf_rows))
        (tmp / "ground_truth.json").write_text(json.dumps(truth, indent=2) + "\n", encoding="utf-8")
    return {"out": str(out.resolve()), "benchmark": name, "seed": seed, "scale": scale, "image_size_px": size_px,
            "classes": spec.class_names, "images": {s: len(scenes[s]) for s in SPLITS},
            "counterfactuals": len(cf_rows), "seconds": round(time.perf_counter() - started, 2)}


def _render_all(spec: BenchmarkSpec, scenes: list[Scene], root: Path, size_px: int, workers: Optional[int]):
    """Yield each scene's rows in order, rendering in `workers` processes when more than one."""
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if len(scenes) >= PARALLEL_FROM else 1
    if workers <= 1:
        for scene in scenes:
            yield _write_scene(spec, scene, root, size_px)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a parent that may hold threads (torch, OpenCV)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        yield from pool.map(partial(_write_scene, spec, root=root, size_px=size_px), scenes, chunksize=16)


def _check_spec(spec: BenchmarkSpec) -> None:
    k = len(spec.classes)
    for e in spec.elements:
        assert e.name in ELEMENTS, f"no drawing for element {e.name!r}"
        assert len(e.p_train) == k and len(e.p_eval) == k, f"element {e.name!r} needs one strength per class"
    assert len(spec.place_train) == k and len(spec.place_eval) == k
    assert len(spec.place_spurious_for) == len(spec.places)


def _png(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def _write_scene(spec: BenchmarkSpec, scene: Scene, root: Path, size_px: int) -> tuple[dict, dict, list[dict]]:
    """Render one scene; write its image, masks and (test split) counterfactuals; return its rows."""
    # 1. the image, and what is visible in it
    r = render(scene, size_px, masks=True)
    image = f"images/{scene.split}/{scene.stem}.png"
    _png(root / image, r.image)
    shown = {o for o, m in r.masks.items() if int(m.sum()) >= min_visible_px(size_px)}
    mask_paths: dict[str, str] = {}

    def mask(owner: str) -> str:
        if owner not in mask_paths:
            mask_paths[owner] = f"masks/{scene.split}/{scene.stem}_{owner}.png"
            _png(root / mask_paths[owner], np.where(r.masks[owner], 255, 0).astype(np.uint8))
        return mask_paths[owner]

    # 2. caption with a mask per mentioned region, then every visible thing under each of its names
    caption, mentions = make_caption(spec, scene, shown)
    names = [(ph, o) for o in sorted(shown) for ph in _names(spec, scene, o) if (ph, o) not in mentions]
    ann = {"image": image, "caption": caption,
           "regions": [{"phrase": ph, "mask": mask(o)} for ph, o in [*mentions, *names]]}

    # 3. metadata row
    place_index = [p.name for p in spec.places].index(scene.place)
    meta = {"img_filename": image, "y": scene.y, "split": SPLIT_CODE[scene.split],
            spec.attr_name: attr_value(spec, scene), spec.place_column: place_index}
    meta.update({f"has_{e.name}": int(e.name in scene.elements) for e in spec.elements})

    # 4. counterfactuals of the test split: each shown element removed; the place swapped
    cfs: list[dict] = []
    if scene.split == "test":
        removed = [n for n in scene.elements if n in shown]
        variants = [((n,), None) for n in removed] + [((), scene.alt_place)]
        for n, cf in zip(removed + [PLACE], render_variants(scene, size_px, variants)):
            swap = n == PLACE
            path = f"counterfactuals/{scene.stem}_" + (f"{scene.place}_to_{scene.alt_place}" if swap else f"no_{n}") + ".png"
            _png(root / path, cf)
            cfs.append({"img_filename": path, "source_filename": image, "y": scene.y,
                        "element": scene.place if swap else n, "change": "swap" if swap else "remove",
                        "replacement": scene.alt_place if swap else "", "mask": mask(n)})
    return meta, ann, cfs


def _names(spec: BenchmarkSpec, scene: Scene, owner: str) -> tuple[str, ...]:
    """Every phrase that names a visible thing: the class's object phrases, the place's, an element's (the sky
    has none)."""
    if owner == OBJECT:
        return spec.classes[scene.y].phrases
    if owner == PLACE:
        return next(p for p in spec.places if p.name == scene.place).phrases
    return next((e.phrases for e in spec.elements if e.name == owner), ())


def _write_csv(path: Path, header: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def ground_truth(spec: BenchmarkSpec, *, seed: int, scale: int, size_px: int, per_class: dict[str, int],
                 n_cf: int) -> dict:
    """The planted truth: what each class's spurious features are, and P(thing | class) per split."""
    names = spec.class_names

    def by_class(ps) -> dict[str, float]:
        return {c: float(p) for c, p in zip(names, ps)}

    things: dict[str, dict] = {}
    for e in spec.elements:
        things[e.name] = {"kind": "foreground", "phrases": list(e.phrases),
                          "role": "spurious" if e.spurious_for else "distractor",
                          "spurious_for": [names[c] for c in e.spurious_for],
                          "p_given_class": {"train": by_class(e.p_train), "val": by_class(e.p_eval),
                                            "test": by_class(e.p_eval)}}
    for i, p in enumerate(spec.places):
        things[p.name] = {"kind": "background", "phrases": list(p.phrases),
                          "role": "spurious" if spec.place_spurious_for[i] else "place",
                          "spurious_for": [names[c] for c in spec.place_spurious_for[i]],
                          "p_given_class": {"train": by_class(row[i] for row in spec.place_train),
                                            "val": by_class(row[i] for row in spec.place_eval),
                                            "test": by_class(row[i] for row in spec.place_eval)}}
    classes = {}
    for y, c in enumerate(spec.classes):
        planted = [n for n, t in things.items() if c.name in t["spurious_for"]]
        classes[c.name] = {
            "index": y,
            "object_phrases": list(c.phrases),
            "spurious": [{"element": n, "phrases": things[n]["phrases"], "kind": things[n]["kind"],
                          "strength": things[n]["p_given_class"]["train"][c.name],
                          "p_given_other_classes": round(float(np.mean([v for k, v in things[n]["p_given_class"]["train"].items()
                                                                        if k != c.name])), 4)}
                         for n in planted],
            "distractors": [{"element": n, "phrases": t["phrases"], "kind": t["kind"]}
                            for n, t in things.items() if t["role"] == "distractor"],
        }
    return {
        "benchmark": spec.name, "seed": seed, "scale": scale, "image_size_px": size_px,
        "class_names": names,
        "images_per_class": per_class,
        "attr": {"column": spec.attr_name, "doc": spec.attr_doc},
        "place_column": spec.place_column,
        "places": [p.name for p in spec.places],
        "mask_owners": {"object": "the class's own object", "place": "the place (ground) region",
                        "<element>": "that element"},
        "elements": things,
        "classes": classes,
        "counterfactuals": {"file": "counterfactuals.csv", "split": "test", "n": n_cf,
                            "doc": "each test image re-rendered without one shown element (change=remove) or "
                                   "on another place (change=swap), everything else identical; it differs "
                                   "from its source only inside `mask`"},
    }

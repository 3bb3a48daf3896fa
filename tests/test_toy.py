"""The toy benchmarks: determinism, ground truth, planted strengths, group balance, exact counterfactuals,
the CLI, and reliance measured on the counterfactual set."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aspire.data import load_dataset
from aspire.data.annotations import read_annotations
from aspire.data.toy import measure_reliance, read_counterfactuals, render, sample_scenes, write_benchmark
from aspire.data.toy.benchmark import BENCHMARKS, attr_value
from aspire.data.toy.render import render_variants
from aspire.data.toy.scenes import split_sizes
from aspire.errors import DataError

SMALL = {"train": 60, "val": 12, "test": 16}       # images per class
TINY = {"train": 6, "val": 2, "test": 4}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _array(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


@pytest.fixture(scope="module")
def waterbirds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "wb"
    write_benchmark("toy-waterbirds", out, seed=0, sizes=SMALL)
    return out


@pytest.fixture(scope="module")
def multiclass(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "mc"
    write_benchmark("toy-multiclass", out, seed=0, sizes={"train": 20, "val": 6, "test": 8})
    return out


# ---------------------------------------------------------------- determinism
def test_same_seed_same_bytes_different_seed_different(tmp_path):
    write_benchmark("toy-waterbirds", tmp_path / "a", seed=7, sizes=TINY)
    write_benchmark("toy-waterbirds", tmp_path / "b", seed=7, sizes=TINY, workers=2)  # parallel: same bytes
    write_benchmark("toy-waterbirds", tmp_path / "c", seed=8, sizes=TINY)
    a, b, c = (_hashes(tmp_path / x) for x in "abc")
    assert a == b
    assert len(a) > 50
    images = [k for k in a if k.startswith("images/")]
    assert sum(a[k] != c.get(k) for k in images) == len(images)  # every image differs with another seed


# ---------------------------------------------------------------- files and ground truth
@pytest.mark.parametrize("bench", ["waterbirds", "multiclass"])
def test_dataset_and_annotations_load(bench, request):
    root = request.getfixturevalue(bench)
    truth = json.loads((root / "ground_truth.json").read_text())
    ds = load_dataset(root, attr=truth["attr"]["column"])
    assert ds.class_names == truth["class_names"]
    assert ds.has_groups
    ann = read_annotations(root / "annotations.jsonl")
    assert set(ann) == {s.image for s in ds.samples}
    n_per_class = {"waterbirds": SMALL, "multiclass": {"train": 20, "val": 6, "test": 8}}[bench]
    for split, n in n_per_class.items():
        assert Counter(s.y for s in ds.split(split)) == {y: n for y in range(len(ds.class_names))}
    sizes = {_array(Path(s.path)).shape for s in ds.samples[:20]}
    assert sizes == {(64, 64, 3)}


@pytest.mark.parametrize("bench", ["waterbirds", "multiclass"])
def test_every_region_has_a_mask_and_a_name_of_what_it_shows(bench, request):
    """The caption's phrases come first; then every visible thing under each of its names (a complete
    segmentation), so the annotations grounder finds what the caption left out."""
    root = request.getfixturevalue(bench)
    truth = json.loads((root / "ground_truth.json").read_text())
    owner_phrases = {name: set(t["phrases"]) for name, t in truth["elements"].items()}
    object_phrases = {c: set(v["object_phrases"]) for c, v in truth["classes"].items()}
    meta = {r["img_filename"]: r for r in _rows(root / "metadata.csv")}
    places = truth["places"]
    n_mentioned, n_unmentioned, owners_seen = 0, 0, Counter()
    for line in (root / "annotations.jsonl").read_text().splitlines():
        a = json.loads(line)
        row = meta[a["image"]]
        assert a["caption"].strip()
        in_caption = [bool(re.search(rf"\b{re.escape(r['phrase'])}\b", a["caption"])) for r in a["regions"]]
        owners = {}
        for region, said in zip(a["regions"], in_caption):
            phrase, mask_path = region["phrase"], root / region["mask"]
            mask = _array(mask_path)
            assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255} and mask.max() == 255
            owner = mask_path.stem.split("_", 1)[1]
            owners_seen[owner] += 1
            owners.setdefault(owner, set()).add(phrase)
            n_mentioned += said
            n_unmentioned += not said
            if owner == "object":
                names = object_phrases[truth["class_names"][int(row["y"])]]
            elif owner == "place":
                names = owner_phrases[places[int(row[truth["place_column"]])]]
            else:
                names = owner_phrases[owner]
                assert row[f"has_{owner}"] == "1"
            assert phrase in names
        for owner, phrases in owners.items():   # each visible thing is named by all its names
            assert phrases == (object_phrases[truth["class_names"][int(row["y"])]] if owner == "object" else
                               owner_phrases[places[int(row[truth["place_column"]])]] if owner == "place" else
                               owner_phrases[owner])
    assert n_mentioned > 100 and n_unmentioned > 100
    assert owners_seen["object"] > 0 and owners_seen["place"] > 0
    assert len(owners_seen) >= 5


def test_ground_truth_describes_planted_and_distractor_elements(waterbirds, multiclass):
    wb = json.loads((waterbirds / "ground_truth.json").read_text())
    assert wb["attr"]["column"] == "place" and wb["places"] == ["land", "water"]
    water = next(s for s in wb["classes"]["waterbird"]["spurious"] if s["element"] == "water")
    assert water["kind"] == "background" and {"lake", "pond", "sea"} <= set(water["phrases"])
    assert water["strength"] == pytest.approx(0.95)
    boat = next(s for s in wb["classes"]["waterbird"]["spurious"] if s["element"] == "boat")
    assert boat["kind"] == "foreground" and boat["strength"] > boat["p_given_other_classes"] + 0.5
    assert {d["element"] for d in wb["classes"]["landbird"]["distractors"]} == {"sun", "cloud"}
    mc = json.loads((multiclass / "ground_truth.json").read_text())
    assert len(mc["class_names"]) >= 8
    planted = {c: v["spurious"] for c, v in mc["classes"].items()}
    controls = [c for c, s in planted.items() if not s]
    assert len(controls) >= 2
    strengths = [s[0]["strength"] for s in planted.values() if s]
    assert len(set(strengths)) >= 4  # each class its own strength
    owners = [s[0]["element"] for s in planted.values() if s]
    assert len(owners) == len(set(owners))  # each class its own element


# ---------------------------------------------------------------- planted strengths and group balance
@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_planted_strengths_hold_on_the_training_split(name):
    spec = BENCHMARKS[name]()
    scenes = sample_scenes(spec, 3, split_sizes(spec))["train"]  # the default size, geometry only
    by_class = defaultdict(list)
    for s in scenes:
        by_class[s.y].append(s)
    for y, members in by_class.items():
        for e in spec.elements:
            p = np.mean([e.name in s.elements for s in members])
            assert abs(p - e.p_train[y]) <= 0.07, (name, y, e.name, p)
        for i, place in enumerate(spec.places):
            p = np.mean([s.place == place.name for s in members])
            assert abs(p - spec.place_train[y][i]) <= 0.07, (name, y, place.name, p)


def test_written_metadata_matches_ground_truth_strengths(waterbirds):
    truth = json.loads((waterbirds / "ground_truth.json").read_text())
    train = [r for r in _rows(waterbirds / "metadata.csv") if r["split"] == "0"]
    for y, cls in enumerate(truth["class_names"]):
        rows = [r for r in train if int(r["y"]) == y]
        for name, t in truth["elements"].items():
            if t["kind"] == "foreground":
                observed = np.mean([r[f"has_{name}"] == "1" for r in rows])
            else:
                observed = np.mean([truth["places"][int(r["place"])] == name for r in rows])
            assert abs(observed - t["p_given_class"]["train"][cls]) <= 0.07, (cls, name, observed)


def test_val_and_test_groups_are_balanced(waterbirds, multiclass):
    for split in ("val", "test"):
        ds = load_dataset(waterbirds)
        groups = Counter((s.y, s.attr) for s in ds.split(split))
        assert len(groups) == 4 and len(set(groups.values())) == 1, groups
        ds = load_dataset(multiclass, attr="attr")
        groups = Counter((s.y, s.attr) for s in ds.split(split))
        truth = json.loads((multiclass / "ground_truth.json").read_text())
        for y, cls in enumerate(ds.class_names):
            if truth["classes"][cls]["spurious"]:
                assert groups[(y, 0)] == groups[(y, 1)] > 0, (cls, groups)
            else:
                assert groups[(y, 1)] == 0 and groups[(y, 0)] > 0


def test_multiclass_attr_marks_the_own_planted_element():
    spec = BENCHMARKS["toy-multiclass"]()
    scenes = sample_scenes(spec, 0, {"train": 30, "val": 2, "test": 2})["train"]
    for s in scenes[:200]:
        own = [e.name for e in spec.elements if s.y in e.spurious_for]
        expected = (own and own[0] in s.elements) or (s.place == "snow" and spec.classes[s.y].name == "crescent")
        assert attr_value(spec, s) == int(bool(expected))


# ---------------------------------------------------------------- counterfactuals
@pytest.mark.parametrize("bench", ["waterbirds", "multiclass"])
def test_counterfactuals_differ_only_inside_the_changed_region(bench, request):
    root = request.getfixturevalue(bench)
    rows = read_counterfactuals(root)
    meta = {r["img_filename"]: r for r in _rows(root / "metadata.csv")}
    test_images = {k for k, r in meta.items() if r["split"] == "2"}
    assert {r.source for r in rows} == test_images  # every test image has at least its place swap
    kinds = Counter(r.change for r in rows)
    assert kinds["swap"] == len(test_images) and kinds["remove"] > len(test_images) // 2
    for r in rows:
        src, cf = _array(root / r.source), _array(root / r.image)
        mask = _array(Path(r.mask_png)) > 127
        changed = (src != cf).any(axis=2)
        assert changed.any(), r.image
        assert not (changed & ~mask).any(), f"{r.image} changes pixels outside {r.mask_png}"
        assert meta[r.source]["y"] == str(r.y)
        if r.change == "remove":
            assert meta[r.source][f"has_{r.element}"] == "1"


def test_rendering_without_an_element_is_the_scene_minus_that_element():
    spec = BENCHMARKS["toy-waterbirds"]()
    scenes = sample_scenes(spec, 5, {"train": 1, "val": 1, "test": 6})["test"]
    scene = next(s for s in scenes if len(s.elements) >= 2)
    full = render(scene, masks=True)
    a, b = list(scene.elements)[:2]
    without_a = render(scene, remove=[a])
    assert not np.array_equal(full.image, without_a.image)
    assert np.array_equal(full.image[~full.masks[a]], without_a.image[~full.masks[a]])
    # the fast shared-layers path gives the same pixels as rendering from scratch
    fast = render_variants(scene, 64, [((a,), None), ((a, b), None), ((), scene.alt_place)])
    assert np.array_equal(fast[0], without_a.image)
    assert np.array_equal(fast[1], render(scene, remove=[a, b]).image)
    swapped = render(scene, place=scene.alt_place).image
    assert np.array_equal(fast[2], swapped)
    outside = ~full.masks["place"]
    assert np.array_equal(full.image[outside], swapped[outside]) and not np.array_equal(full.image, swapped)


# ---------------------------------------------------------------- reliance
class PlaceOracle:
    """A stand-in classifier that relies on the place only: it predicts the class whose usual place the
    image shows. It knows each image's place from the files (the boundary we fake is the model)."""

    def __init__(self, root: Path):
        self.class_names = [ln for ln in (root / "classes.txt").read_text().splitlines() if ln]
        places = json.loads((root / "ground_truth.json").read_text())["places"]
        place_of = {r["img_filename"]: int(r["place"]) for r in _rows(root / "metadata.csv")}
        self.by_pixels = {_array(root / image).tobytes(): place for image, place in place_of.items()}
        for r in _rows(root / "counterfactuals.csv"):
            place = places.index(r["replacement"]) if r["change"] == "swap" else place_of[r["source_filename"]]
            self.by_pixels[_array(root / r["img_filename"]).tobytes()] = place

    def predict_proba(self, images, batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(images), len(self.class_names)), np.float32)
        for i, im in enumerate(images):
            out[i, self.by_pixels[np.asarray(im).tobytes()]] = 1.0
        return out


def test_measure_reliance_finds_exactly_the_place_reliance(waterbirds):
    rows = {(r.class_, r.element, r.change): r for r in measure_reliance(PlaceOracle(waterbirds), waterbirds)}
    cf = read_counterfactuals(waterbirds)
    assert sum(r.n for r in rows.values()) == len(cf)
    water = rows[("waterbird", "water", "swap")]
    assert (water.accuracy_original, water.accuracy_counterfactual, water.drop) == (1.0, 0.0, 1.0)
    assert water.mean_prob_drop == pytest.approx(1.0)
    assert rows[("landbird", "water", "swap")].drop == -1.0      # a landbird on water is right once on land
    assert rows[("landbird", "land", "swap")].drop == 1.0
    removals = [r for r in rows.values() if r.change == "remove"]
    assert removals and all(r.drop == 0.0 and r.mean_prob_drop == 0.0 for r in removals)
    assert {r.element for r in removals} == {"sun", "cloud", "fence", "boat"}


def test_measure_reliance_rejects_a_classifier_of_other_classes(waterbirds):
    oracle = PlaceOracle(waterbirds)
    oracle.class_names = ["cat", "dog"]
    with pytest.raises(DataError, match="classes.txt"):
        measure_reliance(oracle, waterbirds)


# ---------------------------------------------------------------- command line
def _aspire(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from aspire.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_benchmarks_refuses_to_overwrite_and_measures_reliance(tmp_path):
    import torch

    from aspire.models.classifier import build_classifier, save_checkpoint

    # 1. write a small toy-multiclass; it loads
    out = tmp_path / "mc"
    done = _aspire("data", "toy-multiclass", "--out", str(out), "--seed", "2", "--sizes", "3,2,2", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["images"] == {"train": 24, "val": 16, "test": 16} and summary["counterfactuals"] >= 16
    ds = load_dataset(out, attr="attr")
    assert len(ds.class_names) == 8 and len(read_annotations(out / "annotations.jsonl")) == 56

    # 2. a second write into the non-empty folder is refused with one line, and changes nothing
    before = _hashes(out)
    again = _aspire("data", "toy-waterbirds", "--out", str(out), "--sizes", "2,2,2")
    assert again.returncode == 1 and "not empty" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert _hashes(out) == before
    assert _aspire("data", "toy-waterbirds", "--out", str(tmp_path / "x"), "--sizes", "2,2").returncode == 2

    # 3. reliance of a (random) smallcnn checkpoint: one row per (class, element, change), n adds up
    torch.manual_seed(0)
    model = tmp_path / "m.pt"
    save_checkpoint(build_classifier("smallcnn", ds.class_names), model)
    rel = _aspire("reliance", "--data", str(out), "--model", str(model), "--json")
    assert rel.returncode == 0, rel.stderr
    rows = json.loads(rel.stdout)["reliance"]
    cf = read_counterfactuals(out)
    assert {(r["class"], r["element"], r["change"]) for r in rows} == \
        {(ds.class_names[c.y], c.element, c.change) for c in cf}
    assert sum(r["n"] for r in rows) == len(cf)
    for r in rows:
        assert r["drop"] == pytest.approx(r["accuracy_original"] - r["accuracy_counterfactual"])
    table = _aspire("reliance", "--data", str(out), "--model", str(model))
    assert table.returncode == 0 and "drop" in table.stdout
    missing = _aspire("reliance", "--data", str(tmp_path), "--model", str(model))
    assert missing.returncode == 1 and "counterfactuals.csv" in missing.stderr

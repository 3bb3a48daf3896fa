"""The probe pipeline end to end with the offline backends, on a hand-built classifier whose rule is known.

The world: grey 64x64 images; every "widget" image carries a red cube and a blue disk, every "gizmo"
image a blue disk only. The classifier looks at one thing: red pixels mean "widget". So removing the red
cube must flip it (a spurious finding for widget), removing the blue disk must not, and control edits of
the same area elsewhere must not either.
"""

from pathlib import Path

import numpy as np
import pytest

from aspire.config import load_config
from aspire.data import load_dataset
from aspire.workflows.probe import ProbePipeline
from aspire.schemas import Edit, Probe
from aspire.store import RunStore
from known_classifier import RedMeansWidget
from worlds import write_world

SIZE = 64


def _square(y0, x0, h, w):
    m = np.zeros((SIZE, SIZE), bool)
    m[y0:y0 + h, x0:x0 + w] = True
    return m


def _disk(cy, cx, r):
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def make_world(root: Path, n_per_class: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(2 * n_per_class):
        y = i % 2
        img = np.full((SIZE, SIZE, 3), 128, np.uint8) + rng.integers(0, 8, (SIZE, SIZE, 3), dtype=np.uint8)
        regions, mentions = [], []
        obj = _square(24, 4, 16, 12)                            # the label's own object, left
        img[obj] = (90, 90, 90)
        regions.append(("widget" if y else "gizmo", obj))
        disk = _disk(int(rng.integers(12, 20)), int(rng.integers(40, 52)), 5)
        img[disk] = (30, 60, 200)
        regions.append(("blue disk", disk))
        mentions.append("a blue disk")
        if y == 1:
            cube = _square(int(rng.integers(40, 50)), int(rng.integers(36, 50)), 7, 7)
            img[cube] = (220, 20, 20)
            regions.append(("red cube", cube))
            mentions.insert(0, "a red cube")
        items.append((img, y, 0, f"a {'widget' if y else 'gizmo'} with {' and '.join(mentions)}", regions))
    write_world(root, items, extra_rows=["images/000.png,0,2"])
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


def _pipeline(world: Path, run_dir: Path, **overrides) -> ProbePipeline:
    cfg = load_config(None, {"caption": {"annotations": str(world / "annotations.jsonl")},
                             "ground": {"annotations": str(world / "annotations.jsonl")},
                             "holdout": {"fraction": 1.0}, **overrides})
    return ProbePipeline(load_dataset(world), RedMeansWidget(), cfg, RunStore(run_dir), seed=0)


def test_probe_flags_exactly_the_region_the_classifier_looks_at(world, tmp_path):
    result = _pipeline(world, tmp_path / "run").run()
    by_key = {(f.class_, f.phrase): f for f in result.findings}

    cube = by_key[("widget", "red cube")]
    assert cube.spurious and cube.flips == cube.occurrences == 12
    assert cube.control_occurrences == 12 and cube.control_flips == 0 and cube.flip_p_value < 1e-4
    # the known rule: removing the cube drops P(widget) from 0.95 to 0.05, its control changes nothing
    assert cube.pairs == 12 and cube.control_kind == "same-area"
    assert cube.effect == pytest.approx(0.9, abs=1e-6) and cube.effect_ci == pytest.approx([0.9, 0.9], abs=1e-6)
    assert cube.p_value == pytest.approx(2.0 ** -12)   # exact Wilcoxon: all 12 differences positive
    assert cube.q_value < 0.05 and cube.margin_effect == pytest.approx(2 * np.log(0.95 / 0.05), rel=1e-4)
    for cls in ("widget", "gizmo"):
        disk = by_key[(cls, "blue disk")]
        assert not disk.spurious and disk.flips == 0
    # the label's own object is never a finding; every finding but the cube is not spurious
    assert not any(f.phrase in ("widget", "gizmo") for f in result.findings)
    assert [f.phrase for f in result.findings if f.spurious] == ["red cube"]
    assert result.counts.edits == result.counts.control_edits == 36


def test_pipeline_resumes_without_duplicating_work(world, tmp_path):
    first = _pipeline(world, tmp_path / "run")
    first.select_holdout()
    first.caption()
    first.extract_phrases()
    first.store.close()

    again = _pipeline(world, tmp_path / "run")       # a new process would open the same store
    result = again.run()
    store = again.store
    edits = store.all("edit", Edit)
    assert len(edits) == len({e.edit_id for e in edits}) == store.count("probe")
    n_files = len(list((tmp_path / "run" / "edits").glob("*.png")))
    again.run()                                     # a finished run re-run changes nothing
    assert store.count("edit") == len(edits) and store.count("probe") == len(edits)
    assert len(list((tmp_path / "run" / "edits").glob("*.png"))) == n_files
    assert [f.phrase for f in result.findings if f.spurious] == ["red cube"]


def test_pipeline_is_deterministic_given_a_seed(world, tmp_path):
    a = _pipeline(world, tmp_path / "a", holdout={"fraction": 0.5}).run()
    b = _pipeline(world, tmp_path / "b", holdout={"fraction": 0.5}).run()
    assert [f.to_json() for f in a.findings] == [f.to_json() for f in b.findings]
    assert RunStore(tmp_path / "a").get_meta("holdout") == RunStore(tmp_path / "b").get_meta("holdout")


def test_hypotheses_restrict_the_edits(world, tmp_path):
    pipe = _pipeline(world, tmp_path / "run")
    pipe.select_holdout()
    pipe.make_edits(only_phrases={1: {"red cube"}})
    probes = pipe.probe()
    assert {p.phrase for p in probes} == {"red cube"} and all(p.y == 1 for p in probes)
    assert len(probes) == 24 and sum(p.control for p in probes) == 12
    assert all(isinstance(p, Probe) for p in probes)


class GreenMeansNotWidget:
    """A binary attribute classifier, as the CelebA format names its classes: "not widget" when the image shows
    the green gadget (that class's own object), else "widget"."""

    class_names = ["not widget", "widget"]
    num_classes = 2
    arch = "smallcnn"
    input_size = 32

    def predict_proba(self, images, batch_size=64):
        out = []
        for im in images:
            a = np.asarray(im.convert("RGB")).astype(int)
            green = ((a[..., 1] > 150) & (a[..., 0] < 80) & (a[..., 2] < 80)).mean() > 0.01
            out.append([0.95, 0.05] if green else [0.05, 0.95])
        return np.array(out, dtype=np.float32)


def _attribute_world(root: Path) -> Path:
    rng = np.random.default_rng(0)
    items = []
    for i in range(24):
        y = i % 2
        img = np.full((SIZE, SIZE, 3), 128, np.uint8) + rng.integers(0, 8, (SIZE, SIZE, 3), dtype=np.uint8)
        own = _square(24, 4, 16, 12)
        img[own] = (90, 90, 90) if y else (20, 200, 20)      # the widget, or the gadget of a "not widget"
        disk = _disk(int(rng.integers(12, 20)), int(rng.integers(40, 52)), 5)
        img[disk] = (30, 60, 200)
        name = "widget" if y else "gadget"
        items.append((img, y, 0, f"a {name} with a blue disk", [(name, own), ("blue disk", disk)]))
    return write_world(root, items, classes=("not widget", "widget"))


def test_a_negated_class_names_its_object_only_by_label_objects(tmp_path):
    """A class named "not X" (the CelebA format's negatives) names no object of its own: its object is a feature
    to the probe, found spurious, until probe.label_objects names it."""
    from aspire.errors import ConfigError
    from aspire.workflows.runs import check_probe_inputs

    world = _attribute_world(tmp_path / "w")
    ann = str(world / "annotations.jsonl")

    def run(run_dir, **probe):
        cfg = load_config(None, {"caption": {"annotations": ann}, "ground": {"annotations": ann},
                                 "holdout": {"fraction": 1.0}, "probe": probe})
        return ProbePipeline(load_dataset(world), GreenMeansNotWidget(), cfg, RunStore(run_dir), seed=0).run()

    unnamed = {(f.class_, f.phrase): f for f in run(tmp_path / "unnamed").findings}
    assert unnamed[("not widget", "gadget")].spurious              # its own object, tested as a feature
    named = run(tmp_path / "named", label_objects={"not widget": ["gadget"]}).findings
    assert not any(f.phrase == "gadget" for f in named)            # never tested: it is the class's object
    assert not any(f.spurious for f in named)
    # a setting naming a class the classifier does not have is refused before anything runs
    cfg = load_config(None, {"probe": {"label_objects": {"not a widget": ["gadget"]}}})
    with pytest.raises(ConfigError, match="probe.label_objects names 'not a widget'"):
        check_probe_inputs(load_dataset(world), GreenMeansNotWidget(), cfg, None)

"""The probe's graded, paired evidence on constructed probes and on hand-built classifiers with known rules:
the paired statistics, false-discovery control, the control-kind fallback, kinds from masks, merging by
appearance, the insertion test and joint removal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aspire.config import ProbeSettings, load_config
from aspire.data import load_dataset
from aspire.workflows.probe import ProbePipeline
from aspire.schemas import Edit, Probe
from aspire.store import RunStore
from aspire.tools.ground import region_kind
from aspire.tools.groups import colour_histogram, merge_by_appearance
from aspire.tools.probe import aggregate_findings, min_testable_pairs, q_values
from known_classifier import GradedWidget
from test_pipeline import _square as _box
from worlds import write_world

SIZE = 64


# ---------------------------------------------------------------- statistics on constructed probes
def _pair(i: int, phrase: str, real_after: float, control_after: float, before: float = 0.9, y: int = 1,
          kind: str = "foreground") -> list[Probe]:
    common = dict(image=f"img{i}", phrase=phrase, kind=kind, y=y, pred_original=y, prob_true_original=before,
                  pair=f"img{i}|{kind}|{phrase}")
    return [Probe(edit_id=f"{phrase}{i}r", control=False, pred_edited=y if real_after >= 0.5 else 1 - y,
                  prob_true_edited=real_after, flipped=real_after < 0.5, **common),
            Probe(edit_id=f"{phrase}{i}c", control=True, pred_edited=y if control_after >= 0.5 else 1 - y,
                  prob_true_edited=control_after, flipped=control_after < 0.5, control_kind="same-area", **common)]


def test_graded_effect_is_found_where_no_edit_flips():
    # "mark": every removal lowers P(y) by 0.1 and never flips; its controls change nothing
    probes = [p for i in range(12) for p in _pair(i, "mark", 0.8, 0.9)]
    f, = aggregate_findings(probes, ["a", "b"])
    assert f.flips == 0 and f.flip_p_value == 1.0            # the paper's evidence sees nothing
    assert f.effect == pytest.approx(0.1) and f.effect_ci == pytest.approx([0.1, 0.1])
    assert f.p_value == pytest.approx(2.0 ** -12) and f.pairs == 12 and f.control_kind == "same-area"
    assert f.q_value == pytest.approx(f.p_value) and f.spurious   # one test: BY leaves it as it is


def test_effect_below_min_effect_or_unpaired_is_not_spurious():
    small = [p for i in range(20) for p in _pair(i, "speck", 0.88, 0.9)]          # significant, but 0.02
    unpaired = [p for i in range(20) for p in _pair(i, "blob", 0.1, 0.9) if not p.control]
    by = {f.phrase: f for f in aggregate_findings(small + unpaired, ["a", "b"])}
    assert by["speck"].q_value < 0.05 and by["speck"].effect == pytest.approx(0.02) and not by["speck"].spurious
    assert by["blob"].pairs == 0 and by["blob"].q_value == 1.0 and not by["blob"].spurious
    assert by["blob"].flips == 20   # flips without controls prove nothing


def test_q_values_are_benjamini_yekutieli_over_the_testable_groups():
    p = [0.001, 0.01, 0.02, 0.04]
    m, c = len(p), sum(1 / k for k in range(1, 5))
    expected = np.minimum.accumulate([min(1.0, p[i] * m * c / (i + 1)) for i in reversed(range(m))])[::-1]
    assert q_values(p) == pytest.approx(list(expected))
    # a group with fewer pairs than the test needs (2^-n >= alpha) is not a test: it does not dilute the others
    settings = ProbeSettings()
    assert min_testable_pairs(settings) == 5
    probes = [p for i in range(8) for p in _pair(i, "mark", 0.8, 0.9)]
    alone = aggregate_findings(probes, ["a", "b"])[0].q_value
    probes += [p for i in range(4) for p in _pair(i, "tiny", 0.8, 0.9)]
    by = {f.phrase: f for f in aggregate_findings(probes, ["a", "b"], settings)}
    assert by["mark"].q_value == pytest.approx(alone) and by["tiny"].q_value == 1.0


def test_null_groups_stay_unflagged():
    rng = np.random.default_rng(0)
    probes = []
    for g in range(30):   # real and control drops from one distribution: nothing is relied upon
        for i in range(20):
            a, b = rng.uniform(0.6, 0.9, 2)
            probes += _pair(i, f"thing{g}", float(a), float(b))
    assert not any(f.spurious for f in aggregate_findings(probes, ["a", "b"]))


# ---------------------------------------------------------------- geometry and appearance
def test_region_kind_comes_from_the_mask():
    ground = np.zeros((SIZE, SIZE), bool)
    ground[30:] = True                       # the lower half: left, right and bottom sides
    obj = np.zeros((SIZE, SIZE), bool)
    obj[20:40, 20:36] = True
    assert region_kind(ground & ~obj, obj) == "background"
    strip = np.zeros((SIZE, SIZE), bool)
    strip[40:44] = True                      # three sides, but a thin fence-like strip
    assert region_kind(strip, obj) == "foreground"
    blob = np.zeros((SIZE, SIZE), bool)
    blob[8:56, 8:56] = True                  # most of the image, touching no side: an object
    assert region_kind(blob, None) == "foreground"


def test_merge_by_appearance_joins_lookalike_groups_only():
    rng = np.random.default_rng(0)

    def texture(rgb):
        img = np.clip(np.asarray(rgb) + rng.normal(0, 12, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        return colour_histogram(img, np.ones((SIZE, SIZE), bool))

    hists = {"tarn": [texture((40, 90, 200)) for _ in range(6)], "loch": [texture((40, 90, 200)) for _ in range(3)],
             "heath": [texture((90, 160, 60)) for _ in range(5)]}
    assert merge_by_appearance(hists) == {"tarn": "tarn", "loch": "tarn", "heath": "heath"}


# ---------------------------------------------------------------- hand-built classifiers on a constructed world
def make_world(root: Path, *, big_block: bool, n_per_class: int = 12) -> Path:
    """Grey images; gizmos carry a green object, widgets a grey one, a blue mark (top right) and, in every other
    widget image, a red block: small (corner) or big (most of the image, no room for a same-area control)."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(2 * n_per_class):
        y = i % 2
        img = np.full((SIZE, SIZE, 3), 128, np.uint8) + rng.integers(0, 8, (SIZE, SIZE, 3), dtype=np.uint8)
        regions = []
        obj = _box(24, 2, 16, 10)
        img[obj] = (30, 200, 30) if y == 0 else (90, 90, 90)
        regions.append(("widget" if y else "gizmo", obj))
        words = []
        if y == 1:
            mark = _box(2, 56, 5, 5)
            img[mark] = (30, 60, 220)
            regions.append(("blue mark", mark))
            words.append("a blue mark")
            if (i // 2) % 2 == 0:
                block = _box(8, 16, 48, 44) if big_block else _box(44, 40, 8, 8)
                img[block] = (220, 20, 20)
                regions.append(("red block", block))
                words.append("a red block")
        caption = f"a {'widget' if y else 'gizmo'}" + (" with " + " and ".join(words) if words else "")
        items.append((img, y, 0, caption, regions))
    write_world(root, items)
    return root


def _run(world: Path, run_dir: Path, classifier) -> dict:
    ann = str(world / "annotations.jsonl")
    cfg = load_config(None, {"caption": {"annotations": ann}, "ground": {"annotations": ann, "dilation_px": 0},
                             "holdout": {"fraction": 1.0}})
    result = ProbePipeline(load_dataset(world), classifier, cfg, RunStore(run_dir), seed=0).run()
    return {f.phrase: f for f in result.findings if f.class_ == "widget"}, result


def test_graded_world_finds_the_mark_that_never_flips_and_tests_insertion(tmp_path):
    found, result = _run(make_world(tmp_path / "w", big_block=False), tmp_path / "run", GradedWidget())
    mark, block = found["blue mark"], found["red block"]
    assert mark.flips == 0 and mark.effect == pytest.approx(0.1, abs=1e-6) and mark.spurious
    assert block.effect == pytest.approx(0.3, abs=1e-6) and block.spurious
    # sufficiency: pasted into gizmo images, the block raises P(widget) by 0.3 and the mark by 0.1
    assert block.insertion_effect == pytest.approx(0.3, abs=1e-6) and block.insertion_q_value < 0.05
    assert mark.insertion_effect == pytest.approx(0.1, abs=1e-6)
    assert result.counts.insertion_edits > 0 and not any(f.joint for f in found.values())


def test_a_region_too_big_for_a_same_area_control_gets_a_matched_image_control(tmp_path):
    found, result = _run(make_world(tmp_path / "w", big_block=True), tmp_path / "run", GradedWidget())
    block = found["red block"]
    assert block.kind == "foreground" and block.control_kind == "matched-image" and block.pairs == block.occurrences
    # the control inpaints the same big area of a widget image without the block (its mark lies outside it)
    assert block.effect == pytest.approx(0.3, abs=1e-6) and block.spurious


def test_joint_removal_finds_redundant_shortcuts(tmp_path):
    found, result = _run(make_world(tmp_path / "w", big_block=False), tmp_path / "run", GradedWidget("either"))
    mark, block = found["blue mark"], found["red block"]
    # alone, neither matters where the other is present; together they carry 0.35
    assert block.effect == pytest.approx(0.0, abs=1e-6) and block.joint_effect == pytest.approx(0.35, abs=1e-6)
    assert block.joint and block.spurious and block.joint_q_value < 0.05
    assert result.joint["widget"]["effect"] == pytest.approx(0.35, abs=1e-6)
    assert mark.joint_effect == pytest.approx(0.35, abs=1e-6)


class CyanMeansWidget:
    """P(widget) = 0.9 on a mostly cyan image (the widgets' lagoon), else 0.2: a background shortcut."""

    class_names = ["gizmo", "widget"]
    num_classes = 2
    arch = "smallcnn"
    input_size = 64
    train_info = GradedWidget.train_info

    def predict_proba(self, images, batch_size=64):
        out = []
        for im in images:
            a = np.asarray(im.convert("RGB")).astype(int)
            cyan = ((a[..., 0] < 80) & (a[..., 1] > 150) & (a[..., 2] > 150)).mean()
            p = 0.9 if cyan > 0.5 else 0.2
            out.append([1 - p, p])
        return np.array(out, dtype=np.float32)


def one_background_per_class_world(root: Path, n_per_class: int = 12) -> Path:
    """Every gizmo on a sand-coloured dune, every widget on a cyan lagoon: a class's own images show one background."""
    rng = np.random.default_rng(1)
    items = []
    for i in range(2 * n_per_class):
        y = i % 2
        img = np.zeros((SIZE, SIZE, 3), np.uint8) + np.array((30, 200, 210) if y else (210, 190, 120), np.uint8)
        img = img + rng.integers(0, 8, (SIZE, SIZE, 3), dtype=np.uint8)
        obj = _box(24, 20, 16, 16)
        img[obj] = (220, 20, 20) if y else (30, 30, 30)
        name, place = ("widget", "lagoon") if y else ("gizmo", "dune")
        items.append((img, y, 0, f"a {name} on a {place}", [(name, obj), (place, ~obj)]))
    return write_world(root, items)


def test_a_class_probed_alone_borrows_other_classes_backgrounds(tmp_path):
    """Probing the widgets alone (--classes, a batch unit): their hold-out shows only lagoons, so the background
    change takes its donors from the gizmos' training images, which are described but not tested themselves (the
    insertion test pastes into them). Without donors (holdout.donor_images = 0) the lagoon cannot be tested at all."""
    world = one_background_per_class_world(tmp_path / "w")
    (world / "images" / "000.png").write_bytes(b"not an image")   # a gizmo: never picked as a donor
    ann = str(world / "annotations.jsonl")

    def probe(run: str, donors: int):
        cfg = load_config(None, {"caption": {"annotations": ann}, "ground": {"annotations": ann, "dilation_px": 0},
                                 "holdout": {"fraction": 1.0, "donor_images": donors}})
        pipeline = ProbePipeline(load_dataset(world), CyanMeansWidget(), cfg, RunStore(tmp_path / run), seed=0,
                                 classes=["widget"])
        return pipeline, pipeline.run()

    pipeline, result = probe("with", donors=12)   # every gizmo, but the unreadable one
    donors = pipeline.store.meta("donors", [])
    assert len(donors) == 11 and all(pipeline.samples[k].y == 0 for k in donors) and result.counts.donors == 11
    assert "images/000.png" not in donors
    assert result.counts.holdout == 12 and result.counts.captions == 12   # the donors are described, not counted
    edits = [e for e in pipeline.store.all("edit", Edit) if e.test == "removal"]
    assert edits and {pipeline.samples[e.image].y for e in edits} == {1}   # only widgets are tested for removal
    real = [e for e in edits if e.kind == "background" and not e.control]
    assert real and {e.donor for e in real} <= set(donors)
    lagoon, = [f for f in result.findings if f.kind == "background"]
    assert lagoon.phrase == "lagoon" and lagoon.spurious and lagoon.effect == pytest.approx(0.7, abs=1e-6)
    # sufficiency too: the lagoon pasted into the gizmo donors raises P(widget) from 0.2 to 0.9
    assert lagoon.insertion_effect == pytest.approx(0.7, abs=1e-6) and result.counts.insertion_edits > 0

    pipeline, result = probe("without", donors=0)
    assert pipeline.store.meta("donors", []) == [] and not any(f.kind == "background" for f in result.findings)
    reasons = {e["reason"] for e in pipeline.store.events("skipped")}
    assert "no hold-out or donor image with another background to take one from" in reasons

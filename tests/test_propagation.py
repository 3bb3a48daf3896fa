"""Step 3b: phrases a caption left out are grounded where the hold-out names them elsewhere, and phrases that
land on each other's regions are one group (aliases by grounding, whatever the words)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aspire.config import GroundSettings, load_config
from aspire.data import load_dataset
from aspire.store import RunStore
from aspire.tools.ground import Grounder
from aspire.workflows.probe import ProbePipeline
from known_classifier import GradedWidget
from test_pipeline import _square as _box
from worlds import write_world

SIZE = 64
N_PER_CLASS = 16


def make_world(root: Path) -> Path:
    """Gizmos (green object) and widgets (grey object, a blue mark top right). A widget's caption names its mark
    in every other image, as "blue mark" or "azure dot" in turn; the annotations segment every image whole: the
    mark under both names, whatever the caption said."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(2 * N_PER_CLASS):
        y = i % 2
        img = np.full((SIZE, SIZE, 3), 128, np.uint8) + rng.integers(0, 8, (SIZE, SIZE, 3), dtype=np.uint8)
        obj = _box(24, 2, 16, 10)
        img[obj] = (30, 200, 30) if y == 0 else (90, 90, 90)
        regions = [("widget" if y else "gizmo", obj)]
        caption = f"a {'widget' if y else 'gizmo'}"
        if y == 1:
            mark = _box(2, 56, 5, 5)
            img[mark] = (30, 60, 220)
            said = ("blue mark", "azure dot")[(i // 2) % 2] if (i // 4) % 2 == 0 else None
            if said:
                caption += f" with a {said}"
            regions += [(said, mark)] if said else []
            regions += [(name, mark) for name in ("blue mark", "azure dot") if name != said]
        items.append((img, y, 0, caption, regions))
    return write_world(root, items)


def _probe(world: Path, run_dir: Path, propagate: bool):
    ann = str(world / "annotations.jsonl")
    cfg = load_config(None, {"caption": {"annotations": ann}, "ground": {"annotations": ann, "dilation_px": 0},
                             "holdout": {"fraction": 1.0}, "probe": {"propagate": propagate}})
    pipeline = ProbePipeline(load_dataset(world), GradedWidget(), cfg, RunStore(run_dir), seed=0)
    result = pipeline.run()
    return pipeline, result, [f for f in result.findings if f.class_ == "widget"]


def test_what_captions_left_out_is_grounded_and_aliases_make_one_group(tmp_path):
    world = make_world(tmp_path / "w")
    pipeline, result, widget = _probe(world, tmp_path / "run", propagate=True)
    # every widget shows the mark; half the captions name it (4 + 4 under two names)
    mark, = [f for f in widget if f.kind == "foreground"]
    assert set(mark.phrases) == {"azure dot", "blue mark"}
    assert mark.pairs == N_PER_CLASS and mark.effect == pytest.approx(0.1, abs=1e-6) and mark.spurious
    assert result.counts.propagated == N_PER_CLASS // 2
    # the aliases come from where the phrases landed: each on the other's region in every image naming it;
    # the group is named by its most often named phrase (a tie here: the first by name)
    assert pipeline.phrase_aliases() == {"blue mark": "azure dot"}
    # gizmos show no mark: looking for it there finds nothing
    gizmo = [k for k in pipeline.store.keys("propagated") if pipeline.samples[k].y == 0]
    assert gizmo and all(not pipeline.phrase_set(k).foreground for k in gizmo)


def test_without_propagation_each_name_is_tested_on_the_captions_that_say_it(tmp_path):
    _, result, widget = _probe(make_world(tmp_path / "w"), tmp_path / "run", propagate=False)
    by = {f.phrase: f for f in widget}
    assert set(by) == {"blue mark", "azure dot"} and by["blue mark"].pairs == by["azure dot"].pairs == 4
    assert result.counts.propagated == 0


def test_resume_does_not_ground_again(tmp_path):
    world = make_world(tmp_path / "w")
    _probe(world, tmp_path / "run", propagate=True)
    store = RunStore(tmp_path / "run")
    regions = store.count("region")
    _, again, _ = _probe(world, tmp_path / "run", propagate=True)
    assert store.count("region") == regions and again.counts.propagated == N_PER_CLASS // 2


def test_exact_grounding_takes_no_near_duplicate(tmp_path):
    root = tmp_path / "d"
    (root / "masks").mkdir(parents=True)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[40:] = 255
    Image.fromarray(mask).save(root / "masks" / "ground.png")
    (root / "annotations.jsonl").write_text(json.dumps(
        {"image": "a.png", "caption": "a snowfield", "regions": [{"phrase": "snowfield", "mask": "masks/ground.png"}]})
        + "\n")
    grounder = Grounder(GroundSettings(backend="annotations", annotations=str(root / "annotations.jsonl")))
    image = Image.new("RGB", (SIZE, SIZE))
    near, = grounder.ground("a.png", image, ["field"], tmp_path / "out")
    assert near.grounded   # a caption's phrase reworded ("field" for "snowfield") still finds its region
    exact, = grounder.ground("a.png", image, ["field"], tmp_path / "out", exact=True)
    assert not exact.grounded   # but looked for where no caption said it, only the same words count
    same, = grounder.ground("a.png", image, ["snowfields"], tmp_path / "out", exact=True)
    assert same.grounded   # the same words, plural or not


def test_a_group_too_rare_in_the_holdout_gets_more_images(tmp_path):
    """Widgets show a red block in every other image; a hold-out of 7 widgets (of 12) holds too few of them, so
    the other widget images are searched for the block and those showing it join the hold-out."""
    from test_probe_evidence import make_world as block_world

    world = block_world(tmp_path / "w", big_block=False, n_per_class=12)
    ann = str(world / "annotations.jsonl")
    settings = {"caption": {"annotations": ann}, "ground": {"annotations": ann, "dilation_px": 0},
                "probe": {"min_occurrences": 2}}

    def probe(run: str, min_group_images: int) -> ProbePipeline:
        cfg = load_config(None, {**settings, "holdout": {"fraction": 0.01, "min_per_class": 7, "max_per_class": 12,
                                                         "min_group_images": min_group_images}})
        pipeline = ProbePipeline(load_dataset(world), GradedWidget(), cfg, RunStore(tmp_path / run), seed=0)
        pipeline.run()
        return pipeline

    def widgets_with_block(pipeline) -> list[str]:
        return [k for k in pipeline.store.get_meta("holdout") if pipeline.samples[k].y == 1
                and "red block" in pipeline.phrase_set(k).foreground]

    plain = probe("plain", 0)
    assert plain.store.get_meta("holdout_extension") is None and len(plain.store.get_meta("holdout")) == 14
    before = len(widgets_with_block(plain))
    assert 2 <= before < 6   # frequent enough to be a group (probe.min_occurrences), too rare to test well
    extended = probe("extended", 6)
    added = extended.store.get_meta("holdout_extension")
    assert set(added) == {"widget"}   # gizmos show no group at all
    assert len(widgets_with_block(extended)) == 6 and len(added["widget"]) == 6 - before
    block = next(f for f in extended.findings() if f.class_ == "widget" and f.phrase == "red block")
    assert block.pairs == 6 and block.effect == pytest.approx(0.3, abs=1e-6)
    assert any(e["widget"] == 6 - before for e in extended.store.events("holdout_extended"))

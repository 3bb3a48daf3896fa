"""A tool's failure on one image or phrase is recorded and skipped, never fatal: a planted bad mask on a world
whose classifier's rule is known. A resumed run does not retry it unless asked; all items failing is an error."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from PIL import Image

from aspire.errors import AspireError
from aspire.schemas import Failure
from test_pipeline import _pipeline, make_world


def _plant_bad_mask(world, image_index: int, phrase: str) -> str:
    """Overwrite one annotated mask with one of the wrong size; returns its path."""
    path = world / "masks" / f"{image_index:03d}_{phrase.replace(' ', '_')}.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    return str(path)


def test_a_bad_mask_skips_its_image_and_the_run_goes_on(tmp_path):
    world = make_world(tmp_path / "w")
    good = tmp_path / "good.png"
    shutil.copy(world / "masks" / "001_red_cube.png", good)
    bad = _plant_bad_mask(world, 1, "red cube")          # a widget image: its cube mask is 8x8
    pipeline = _pipeline(world, tmp_path / "run")
    result = pipeline.run()

    # the image is skipped with the reason (the mask file, its size); every other widget's cube is still found
    failure, = pipeline.store.all("failure", Failure)
    assert failure.stage == "edit" and failure.image == "images/001.png" and bad in failure.reason
    assert "differs from image size" in failure.reason and result.counts.failures == 1 <= result.counts.skipped
    cube = next(f for f in result.findings if f.phrase == "red cube")
    assert cube.spurious and cube.occurrences == 11
    assert any(e["reason"] == failure.reason for e in pipeline.store.events("skipped"))

    # resumed: the failure is not retried; asked to (and the mask fixed), the image is edited
    shutil.copy(good, world / "masks" / "001_red_cube.png")
    again = _pipeline(world, tmp_path / "run")
    assert next(f for f in again.run().findings if f.phrase == "red cube").occurrences == 11
    assert again.retry_failed() == 1
    assert next(f for f in again.run().findings if f.phrase == "red cube").occurrences == 12
    assert again.store.count("failure") == 0


def test_an_unreadable_training_image_is_left_out_of_the_hold_out(tmp_path):
    world = make_world(tmp_path / "w")
    (world / "images" / "003.png").write_bytes(b"not a png")     # a widget image
    pipeline = _pipeline(world, tmp_path / "run")
    result = pipeline.run()
    failure, = pipeline.store.all("failure", Failure)
    assert (failure.stage, failure.image) == ("holdout", "images/003.png") and "corrupt" in failure.reason
    assert "images/003.png" not in pipeline.store.get_meta("holdout")
    assert result.counts.failures == 1   # a failure, not an edit skipped:
    assert not any(e["image"] == "images/003.png" for e in pipeline.store.events("skipped"))
    cube = next(f for f in result.findings if f.phrase == "red cube")
    assert cube.spurious and cube.occurrences == 11
    assert pipeline.retry_failed() == 0 and pipeline.store.count("failure") == 1   # chosen once: not retried
    # a class none of whose images can be read is an error naming the first
    for i in range(1, 24, 2):
        (world / "images" / f"{i:03d}.png").write_bytes(b"not a png")
    with pytest.raises(AspireError, match=r"class 'widget': none of its 12 training images could be read"):
        _pipeline(world, tmp_path / "run2").run()


def test_an_image_too_small_for_the_classifier_is_left_out_of_the_hold_out(tmp_path):
    world = make_world(tmp_path / "w")
    Image.new("RGB", (1, 1)).save(world / "images" / "003.png")    # the classifier takes 32 px: at least 16 px
    pipeline = _pipeline(world, tmp_path / "run")
    result = pipeline.run()
    failure, = pipeline.store.all("failure", Failure)
    assert (failure.stage, failure.image) == ("holdout", "images/003.png")
    assert "image 1x1 is too small for the classifier: each side must be at least 16 px" in failure.reason
    assert next(f for f in result.findings if f.phrase == "red cube").spurious


def test_every_item_failing_is_one_error(tmp_path):
    world = make_world(tmp_path / "w", n_per_class=3)
    for i in range(6):   # every image's own object mask is broken: no image can be grounded
        _plant_bad_mask(world, i, "widget" if i % 2 else "gizmo")
    with pytest.raises(AspireError, match="editing failed for every hold-out image .*6 failed; the first: edit failed"):
        _pipeline(world, tmp_path / "run").run()


def test_retry_skipped_through_the_console_script(tmp_path, monkeypatch, capsys):
    import aspire.models.classifier as classifier
    from cli_main import run_main
    from known_classifier import RedMeansWidget

    world = make_world(tmp_path / "w")
    _plant_bad_mask(world, 1, "red cube")
    (tmp_path / "m.pt").write_text("a hand-built classifier stands for it")
    monkeypatch.setattr(classifier, "load_checkpoint", lambda path, device=None: RedMeansWidget())
    monkeypatch.setenv("ASPIRE_HOLDOUT__FRACTION", "1.0")
    args = ["probe", "--data", str(world), "--model", str(tmp_path / "m.pt"), "--run-dir", str(tmp_path / "run")]
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 0 and "1 tool failures" in err and re.search(r"[1-9]\d* edits not made", err)   # counted
    code, _, err = run_main(monkeypatch, capsys, *args, "--retry-skipped")
    assert code == 0 and "retrying 1 recorded failure(s)" in err


def test_retry_skipped_extracts_failed_phrase_sets_again(tmp_path):
    world = make_world(tmp_path / "w", n_per_class=4)
    unreachable = {"phrases": {"backend": "llm", "base_url": "http://127.0.0.1:9/v1", "api_key": "x",
                               "max_retries": 0, "timeout_s": 2}}
    first = _pipeline(world, tmp_path / "run", **unreachable)
    with pytest.raises(AspireError, match="phrase extraction failed for every hold-out image .8; the first: llm"):
        first.run()   # an endpoint that never answers is an error, not a clean result with no findings
    assert first.counts().phrase_failures == 8 and not first.store.count("edit")
    # the same run folder with the offline extractor: the failed sets are cached until asked to retry them
    again = _pipeline(world, tmp_path / "run")
    with pytest.raises(AspireError, match="--retry-skipped"):
        again.run()
    assert again.retry_failed() == 8
    result = again.run()
    assert result.counts.phrase_failures == 0 and any(f.phrase == "red cube" and f.flips == f.occurrences == 4
                                                      for f in result.findings)


def test_bad_inputs_are_refused_before_a_run_folder_is_written(tmp_path, monkeypatch, capsys):
    import aspire.models.classifier as classifier
    from cli_main import run_main
    from known_classifier import RedMeansWidget

    class OneClass(RedMeansWidget):
        class_names = ["gizmo"]

    world = make_world(tmp_path / "w", n_per_class=3)
    for name in ("one.pt", "two.pt"):
        (tmp_path / name).write_text(name)
    monkeypatch.setattr(classifier, "load_checkpoint",
                        lambda path, device=None: OneClass() if str(path).endswith("one.pt") else RedMeansWidget())
    run = tmp_path / "run"
    probe = ["probe", "--data", str(world), "--run-dir", str(run)]
    code, _, err = run_main(monkeypatch, capsys, *probe, "--model", str(tmp_path / "one.pt"))
    assert code == 1 and "the classifier has 1 classes (gizmo) but " in err and "names 2 (gizmo, widget)" in err \
        and not run.exists()
    code, _, err = run_main(monkeypatch, capsys, *probe, "--model", str(tmp_path / "two.pt"), "--classes", "sprocket")
    assert code == 1 and "unknown class 'sprocket'" in err and not run.exists()
    lines = (world / "annotations.jsonl").read_text().splitlines()
    (world / "annotations.jsonl").write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    code, _, err = run_main(monkeypatch, capsys, *probe, "--model", str(tmp_path / "two.pt"))
    assert code == 1 and "annotations.jsonl:3: invalid JSON" in err and not run.exists()
    (world / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    assert run_main(monkeypatch, capsys, *probe, "--model", str(tmp_path / "two.pt"))[0] == 0   # the retry works


def test_a_run_dir_that_is_not_a_run_folder_is_refused(tmp_path):
    from aspire.workflows.runs import RunArgs, open_run

    args = RunArgs(data="d", model="m.pt")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("the user's own file")
    with pytest.raises(AspireError, match="exists and is not a run folder"):
        open_run(tmp_path / "mine", "probe", args)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["thesis.tex"]   # nothing written beside it
    (tmp_path / "file").write_text("x")
    with pytest.raises(AspireError, match="is a file"):
        open_run(tmp_path / "file", "probe", args)
    (tmp_path / "empty").mkdir()
    open_run(tmp_path / "empty", "probe", args).close()          # an empty folder becomes the run
    open_run(tmp_path / "empty", "probe", args).close()          # and resumes

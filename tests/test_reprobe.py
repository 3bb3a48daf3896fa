"""Re-probing after repair: the stored edits and controls scored on another classifier of the same classes, with
the probe's statistics, a reduction test and a verdict per finding (hand-built classifiers with known rules)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aspire.config import load_config
from aspire.data import load_dataset
from aspire.errors import DataError
from aspire.workflows.probe import ProbePipeline
from aspire.store import RunStore
from aspire.tools.probe import remaining
from known_classifier import GradedWidget, RedMeansWidget
from test_probe_evidence import make_world


def _pipeline(world, run_dir, classifier) -> ProbePipeline:
    ann = str(world / "annotations.jsonl")
    cfg = load_config(None, {"caption": {"annotations": ann}, "ground": {"annotations": ann, "dilation_px": 0},
                             "holdout": {"fraction": 1.0}})
    return ProbePipeline(load_dataset(world), classifier, cfg, RunStore(run_dir), seed=0)


def _model_file(tmp_path, name: str) -> str:
    path = tmp_path / f"{name}.pt"   # reprobe tells models apart by their file's content
    path.write_text(name)
    return str(path)


def _widget(findings) -> dict:
    return {f.phrase: f for f in findings if f.class_ == "widget"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("reprobe") / "w", big_block=False, n_per_class=20)


def test_a_repair_that_removes_the_feature_is_removed_and_the_other_unchanged(world, tmp_path):
    pipeline = _pipeline(world, tmp_path / "run", GradedWidget())
    before = _widget(pipeline.run().findings)
    assert before["red block"].spurious and before["blue mark"].spurious
    after = _widget(pipeline.reprobe(GradedWidget(red=0.0), _model_file(tmp_path, "no-red")))
    block, mark = after["red block"].after, after["blue mark"].after
    assert block.verdict == "removed" and not block.spurious and block.effect == pytest.approx(0.0, abs=1e-6)
    assert block.reduction == pytest.approx(0.3, abs=1e-6) and block.reduction_q_value < 0.05
    assert mark.verdict == "unchanged" and mark.spurious and mark.effect == pytest.approx(0.1, abs=1e-6)
    assert mark.reduction == pytest.approx(0.0, abs=1e-6)
    # the before statistics are unchanged, and the store's findings carry `after`
    assert after["red block"].effect == pytest.approx(before["red block"].effect)
    assert _widget(pipeline.store.all("finding", type(after["red block"])))["red block"].after.verdict == "removed"
    assert pipeline.store.get_meta("reprobe")["verdicts"] == {"removed": 1, "unchanged": 1}
    # the CI gate's view: what still stands after the repair
    assert [f.phrase for f in remaining(after.values())] == ["blue mark"]
    assert remaining(after.values(), min_effect=0.2) == []
    # an unchanged finding whose q-value crossed alpha still stands
    faded = after["blue mark"].model_copy(update={"after": mark.model_copy(update={"spurious": False, "q_value": 0.2})})
    assert remaining([faded]) == [faded]


def test_a_repair_that_amplifies_another_shortcut_is_new(world, tmp_path):
    pipeline = _pipeline(world, tmp_path / "run", GradedWidget(blue=0.0))
    before = _widget(pipeline.run().findings)
    assert before["red block"].spurious and not before["blue mark"].spurious
    after = _widget(pipeline.reprobe(GradedWidget(red=0.0, blue=0.3), _model_file(tmp_path, "blue")))
    assert after["red block"].after.verdict == "removed"
    mark = after["blue mark"].after
    assert mark.verdict == "new" and mark.spurious and mark.effect == pytest.approx(0.3, abs=1e-6)
    assert mark.reduction_p_value is None   # reduction is tested only for what was confirmed before


def test_a_weaker_reliance_is_reduced(world, tmp_path):
    pipeline = _pipeline(world, tmp_path / "run", GradedWidget())
    pipeline.run()
    block = _widget(pipeline.reprobe(GradedWidget(red=0.15), _model_file(tmp_path, "half")))["red block"].after
    assert block.verdict == "reduced" and block.spurious and block.effect == pytest.approx(0.15, abs=1e-6)


def test_a_redundant_shortcut_is_judged_by_its_joint_test(world, tmp_path):
    pipeline = _pipeline(world, tmp_path / "run", GradedWidget("either"))
    assert _widget(pipeline.run().findings)["red block"].joint
    block = _widget(pipeline.reprobe(GradedWidget(red=0.0, blue=0.0), _model_file(tmp_path, "none")))["red block"]
    # its single-removal effect was 0 before and after: the joint pairs carry the change
    assert block.after.verdict == "removed" and block.after.joint_effect == pytest.approx(0.0, abs=1e-6)
    assert block.after.reduction == pytest.approx(0.35, abs=1e-6)


def test_reprobe_resumes_per_model_and_refuses_other_classes(world, tmp_path):
    pipeline = _pipeline(world, tmp_path / "run", GradedWidget())
    pipeline.run()
    scored = pipeline.store.count("probe")
    pipeline.reprobe(GradedWidget(red=0.0), _model_file(tmp_path, "a"))
    assert pipeline.store.count("reprobe") == scored
    # the same checkpoint again: nothing is scored twice; another one: its scores replace the first's
    calls = []

    class Counting(GradedWidget):
        def predict_proba(self, images, batch_size=64):
            calls.append(len(images))
            return super().predict_proba(images, batch_size)

    pipeline.reprobe(Counting(red=0.0), _model_file(tmp_path, "a"))
    assert calls == []
    found = _widget(pipeline.reprobe(Counting(), _model_file(tmp_path, "b")))
    assert sum(calls) > 0 and pipeline.store.count("reprobe") == scored
    assert found["red block"].after.verdict == "unchanged"
    assert pipeline.store.get_meta("reprobe")["model"].endswith("b.pt")

    class Other(RedMeansWidget):
        class_names = ["gizmo", "sprocket"]

    with pytest.raises(DataError, match="classes gizmo, sprocket"):
        pipeline.reprobe(Other(), _model_file(tmp_path, "other"))


# ---------------------------------------------------------------- the CI gate, through the console script's main()
MODELS = {"before.pt": GradedWidget(), "no-red.pt": GradedWidget(red=0.0), "neither.pt": GradedWidget(red=0.0, blue=0.0)}


@pytest.fixture()
def cli(world, tmp_path, monkeypatch, capsys):
    """`aspire ...` with checkpoints named in MODELS standing for hand-built classifiers (no weights here)."""
    import aspire.models.classifier as classifier

    from cli_main import run_main

    for name in MODELS:
        (tmp_path / name).write_text(name)
    monkeypatch.setattr(classifier, "load_checkpoint", lambda path, device=None: MODELS[Path(path).name])
    monkeypatch.setenv("ASPIRE_GROUND__DILATION_PX", "0")
    monkeypatch.setenv("ASPIRE_HOLDOUT__FRACTION", "1.0")
    return lambda *args: run_main(monkeypatch, capsys, *args)


def test_fail_on_exits_3_while_a_confirmed_finding_remains(cli, world, tmp_path):
    import json

    run = str(tmp_path / "run")
    probe = ["probe", "--data", str(world), "--model", str(tmp_path / "before.pt"), "--run-dir", run]
    code, out, err = cli(*probe, "--json", "--fail-on", "spurious")
    assert code == 3 and "2 confirmed spurious finding(s) remain" in err
    assert sum(f["spurious"] for f in json.loads(out)["findings"]) == 2      # the results are printed first
    assert cli(*probe, "--fail-on", "0.5")[0] == 0                           # effects 0.3 and 0.1: under 0.5
    assert cli(*probe, "--fail-on", "0.2")[0] == 3
    # after a repair the gate reads the repaired model's verdicts
    code, out, err = cli("reprobe", "--run-dir", run, "--model", str(tmp_path / "no-red.pt"), "--fail-on", "spurious")
    assert code == 3 and "widget: blue mark +0.10" in err and "removed" in out
    assert cli("reprobe", "--run-dir", run, "--model", str(tmp_path / "no-red.pt"), "--fail-on", "0.2")[0] == 0
    code, out, _ = cli("reprobe", "--run-dir", run, "--model", str(tmp_path / "neither.pt"), "--json",
                       "--fail-on", "spurious")
    assert code == 0 and json.loads(out)["verdicts"] == {"removed": 2}


def test_fail_on_and_reprobe_refuse_bad_input(cli, world, tmp_path):
    run = str(tmp_path / "run")
    code, _, err = cli("probe", "--data", str(world), "--model", str(tmp_path / "before.pt"), "--run-dir", run,
                       "--fail-on", "sometimes")
    assert code == 2 and "expected 'spurious' or an effect between 0 and 1" in " ".join(err.replace("│", " ").split())
    assert cli("probe", "--data", str(world), "--model", str(tmp_path / "before.pt"), "--run-dir", run)[0] == 0
    code, _, err = cli("reprobe", "--run-dir", run)
    assert code == 1 and "has no model after repair; give --model" in err
    code, _, err = cli("reprobe", "--run-dir", str(tmp_path / "nothing"), "--model", str(tmp_path / "no-red.pt"))
    assert code == 1 and "not a run folder" in err

"""`aspire batch`: one audit per class, in-process, in a process pool and on a local Ray, merged into one
report. Real runs on a tiny toy-multiclass with a smallcnn: the same findings whatever the executor, a class
with a corrupt training image reported as failed while the others finish, a batch killed with SIGKILL
resumed without redoing finished classes, and --repair's single retraining over the union."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aspire import cli
from aspire.batch import plan_units
from aspire.batch.state import BatchStore, all_units
from aspire.config import BatchSettings
from aspire.errors import ConfigError

ASPIRE = str(Path(sys.executable).with_name("aspire"))
CLASSES = "ring,heart,star,triangle"
CONFIG = {"holdout": {"fraction": 1.0, "max_per_class": 40}, "agent": {"offline": True, "max_rounds": 2, "retrain_epochs": 1},
          "generate": {"images_per_class": 12}}
ENV = {"OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """toy-multiclass at 32 px (80 training images per class) and a smallcnn trained 8 epochs on it: enough
    paired edits per class for the probe's test to confirm the star's balloon."""
    from aspire.data.formats import load_dataset
    from aspire.data.toy.benchmark import write_benchmark
    from aspire.models.classifier import build_classifier, save_checkpoint
    from aspire.models.train import train_classifier

    root = tmp_path_factory.mktemp("toy")
    write_benchmark("toy-multiclass", root / "data", seed=0, size_px=32, sizes={"train": 80, "val": 8, "test": 10})
    ds = load_dataset(root / "data")
    clf = build_classifier("smallcnn", ds.class_names, input_size=32, seed=0)
    train_classifier(clf, ds.split("train"), [], epochs=8, batch_size=32, lr=0.05, weight_decay=5e-4, seed=0,
                     augment=False, progress=False)
    save_checkpoint(clf, root / "model.pt")
    (root / "config.json").write_text(json.dumps(CONFIG))
    return root


def batch_args(toy: Path, out: Path, *extra: str, data: Path | None = None) -> list[str]:
    return ["batch", "--data", str(data or toy / "data"), "--attr", "attr", "--model", str(toy / "model.pt"),
            "--config", str(toy / "config.json"), "--run-dir", str(out), "--json", *extra]


def invoke(args: list[str]):
    return CliRunner().invoke(cli.app, args, env=ENV)


def units(batch_dir: Path) -> dict:
    store = BatchStore(batch_dir)
    try:
        return {u.unit: u for u in all_units(store)}
    finally:
        store.close()


def findings_by_class(summary: dict) -> dict[str, list[dict]]:
    return {c["class"]: c["findings"] for c in summary["classes"]}


@pytest.fixture(scope="module")
def local_batch(toy, tmp_path_factory):
    """The reference: the batch run in-process (--executor local, --workers 1)."""
    out = tmp_path_factory.mktemp("local") / "batch"
    result = invoke(batch_args(toy, out, "--classes", CLASSES, "--executor", "local"))
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


# ---------------------------------------------------------------- planning and settings
def test_plan_units_groups_and_slugs():
    assert plan_units(["Land Bird", "water/bird", "x"], 1) == [("land-bird", ["Land Bird"]),
                                                                ("water-bird", ["water/bird"]), ("x", ["x"])]
    assert plan_units(["a", "b", "c"], 2) == [("a+b", ["a", "b"]), ("c", ["c"])]
    # two names with one slug stay apart; a long group gets a short, stable name
    assert [u for u, _ in plan_units(["a b", "a-b"], 1)] == ["a-b-0", "a-b-1"]
    long = [f"class number {i}" for i in range(10)]
    (unit, names), = plan_units(long, 10)
    assert names == long and len(unit) < 60 and unit.startswith("class-number-0+9-more-")
    assert plan_units(long, 10) == [(unit, names)]
    with pytest.raises(ConfigError, match="group-size"):
        plan_units(["a"], 0)


def test_ray_missing_is_a_one_line_error(monkeypatch, tmp_path):
    from aspire.batch.executors import make_executor

    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"--executor ray needs Ray: pip install"):
        make_executor(BatchSettings(executor="ray"), tmp_path)


def test_batch_takes_run_dir_like_probe_and_audit_and_still_out():
    from typer.main import get_command

    from aspire import cli

    option = next(p for p in get_command(cli.app).commands["batch"].params if p.name == "out_dir")
    assert option.opts[:2] == ["--run-dir", "--out"]


# ---------------------------------------------------------------- a batch in-process
def test_local_batch_merges_ranked_findings_and_reports(local_batch):
    out, summary = local_batch
    # 1. every class audited once, in this process, in its own run folder with its own report
    states = units(out)
    assert sorted(states) == sorted(CLASSES.split(","))
    assert {s.status for s in states.values()} == {"done"} and {s.attempts for s in states.values()} == {1}
    assert {s.pid for s in states.values()} == {os.getpid()}
    assert summary["status"] == "done" and summary["counts"]["done"] == 4
    for c in summary["classes"]:
        assert Path(c["run_dir"]) == out / "runs" / c["class"]
        assert Path(c["report"]["html"]).is_file()
        assert all(f["class"] == c["class"] for f in c["findings"])
        assert c["accuracy"]["before"]["n"] == 10 and c["accuracy"]["after"] is None
    # 2. findings in the merge are the class runs' own, and some class has a spurious one
    assert summary["counts"]["spurious"] >= 1
    ring = next(c for c in summary["classes"] if c["class"] == "ring")
    report = json.loads(Path(ring["report"]["json"]).read_text())
    assert sorted(f["phrase"] for f in report["findings"]) == sorted(f["phrase"] for f in ring["findings"])
    # 3. ranked by the effect of the top spurious finding, classes without one after
    tops = [c["top_finding"] for c in summary["classes"]]
    effects = [t["effect"] for t in tops if t]
    assert effects == sorted(effects, reverse=True)
    assert all(t is not None for t in tops[:len(effects)]) and all(t is None for t in tops[len(effects):])
    # 4. no per-class retraining or generation; the approvals are recorded as automatic
    from aspire.store import RunStore

    run = RunStore(ring["run_dir"])
    try:
        assert run.get_meta("models") is None and run.get_meta("augmented") is None
        approvals = run.get_meta("approvals")
        assert approvals and all(a["auto"] for a in approvals)
        assert run.get_meta("evaluation")["before"]["n"] == summary["accuracy"]["before"]["n"]
    finally:
        run.close()
    # 5. the report: an overview linking to each class's section and report, batch.json beside it
    html = (out / "report" / "batch.html").read_text()
    for c in summary["classes"]:
        assert f'href="../runs/{c["class"]}/report/report.html"' in html
        assert f'id="class-{c["rank"]}"' in html
    md = (out / "report" / "batch.md").read_text()
    assert f"| 1 | [{summary['classes'][0]['class']}](#class-1) | done |" in md
    assert json.loads((out / "batch.json").read_text())["classes"] == summary["classes"]


def test_rerun_skips_finished_classes_and_refuses_other_inputs(toy, local_batch):
    out, summary = local_batch
    before = units(out)
    again = invoke(batch_args(toy, out, "--classes", CLASSES))
    assert again.exit_code == 0, again.output
    assert units(out) == before                       # nothing re-run: same attempts, same timestamps
    assert findings_by_class(json.loads(again.stdout)) == findings_by_class(summary)
    other = invoke(batch_args(toy, out, "--classes", CLASSES, "--seed", "1"))
    assert other.exit_code == 1 and "holds a batch with other inputs (seed)" in str(other.exception or other.output)


# ---------------------------------------------------------------- failures and crashes
def test_a_failing_class_is_retried_then_reported_while_the_rest_finish(toy, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(toy / "data", data)
    meta = (data / "metadata.csv").read_text().splitlines()
    header = meta[0].split(",")
    heart_train = [r.split(",") for r in meta[1:]
                   if r.split(",")[header.index("y")] == "1" and r.split(",")[header.index("split")] == "0"]
    corrupt = [data / r[header.index("img_filename")] for r in heart_train]
    for path in corrupt:                             # every training image of class 1 (heart): an unreadable
        path.write_bytes(b"not a png")               # image alone is skipped, a class of them is an error
    out = tmp_path / "batch"
    result = invoke(batch_args(toy, out, "--classes", "star,heart", "--workers", "2", data=data))
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    rows = {c["class"]: c for c in summary["classes"]}
    assert rows["star"]["status"] == "done" and rows["star"]["attempts"] == 1
    assert rows["heart"]["status"] == "failed" and rows["heart"]["attempts"] == 2   # one retry
    error = rows["heart"]["error"]
    assert "none of its" in error and "corrupt" in error and any(p.name in error for p in corrupt)
    assert "\n" not in rows["heart"]["error"]
    assert {u.pid for u in units(out).values()} - {os.getpid()}                     # ran in the pool
    assert summary["status"] == "failed" and [c["class"] for c in summary["classes"]][-1] == "heart"
    events = [e for e in summary["attempts"] if e["unit"] == "heart"]
    assert [e["phase"] for e in events] == ["start", "retry", "start", "failed"]
    assert "Traceback" in events[-1]["traceback"]
    assert any(p.name in (out / "report" / "batch.md").read_text() for p in corrupt)


def _states(db: Path) -> dict[str, dict]:
    if not db.is_file():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            rows = conn.execute("SELECT key, value FROM meta WHERE key LIKE 'unit:%'").fetchall()
    except sqlite3.OperationalError:
        return {}
    return {k[5:]: json.loads(v) for k, v in rows}


def test_killed_batch_resumes_without_redoing_finished_classes(toy, local_batch, tmp_path):
    out = tmp_path / "batch"
    cmd = [ASPIRE, *batch_args(toy, out, "--classes", CLASSES)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, **ENV})
    deadline = time.monotonic() + 300
    try:
        while sum(s["status"] == "done" for s in _states(out / "batch.sqlite").values()) < 2:
            if proc.poll() is not None:
                pytest.fail(f"the batch ended before it could be killed: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the batch never finished two classes")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed = _states(out / "batch.sqlite")
    finished = {u: s for u, s in killed.items() if s["status"] == "done"}
    assert 2 <= len(finished) < 4

    result = invoke(batch_args(toy, out, "--classes", CLASSES))
    assert result.exit_code == 0, result.output
    after = {u: s.model_dump(mode="json") for u, s in units(out).items()}
    for unit, state in finished.items():                   # finished classes were not run again
        assert after[unit] == state
    interrupted = [u for u, s in killed.items() if s["status"] == "running"]
    for unit in interrupted:                               # the one running at the kill: one more attempt
        assert after[unit]["status"] == "done" and after[unit]["attempts"] == 2
    assert {s["status"] for s in after.values()} == {"done"}
    # the same findings as the batch that was never interrupted
    assert findings_by_class(json.loads(result.stdout)) == findings_by_class(local_batch[1])


# ---------------------------------------------------------------- --repair
def test_repair_retrains_one_classifier_over_the_union(toy, local_batch, tmp_path):
    out = tmp_path / "batch"
    result = invoke(batch_args(toy, out, "--classes", "ring,star", "--repair"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    star = next(c for c in summary["classes"] if c["class"] == "star")
    assert star["n_spurious"] >= 1 and star["augmented"]["n_images"] == 12   # generated per class ...
    repair = summary["repair"]
    assert repair["status"] == "done" and Path(repair["models"]["after"]) == out / "repair" / "after.pt"
    assert repair["augmented"]["n_images"] == sum(c["augmented"]["n_images"] for c in summary["classes"]
                                                  if c["augmented"])
    assert (out / "repair" / "after.pt").is_file()
    assert summary["accuracy"]["after"]["n"] == summary["accuracy"]["before"]["n"]   # ... evaluated once
    assert all(c["accuracy"]["after"] is not None for c in summary["classes"])
    from aspire.store import RunStore

    for c in summary["classes"]:                                    # ... and no class retrained on its own
        run = RunStore(c["run_dir"])
        try:
            assert run.get_meta("models") is None
            assert {a["stage"]: a["decision"] for a in run.get_meta("approvals")}.get("retrain") in (None, "reject")
        finally:
            run.close()
    assert "Retraining over the union" in (out / "report" / "batch.html").read_text()
    # every class run was re-probed on the one retrained classifier, and its report says so
    assert summary["reprobe"]["status"] == "done" and summary["reprobe"]["model"] == repair["models"]["after"]
    top = star["top_finding"]["after"]
    assert top["verdict"] in ("removed", "reduced", "unchanged")
    assert all(f["after"] is not None for c in summary["classes"] for f in c["findings"])
    assert "Did the repair remove the reliance?" in Path(star["report"]["md"]).read_text()
    assert summary["reprobe"]["verdicts"]["star"] == RunStore(star["run_dir"]).get_meta("reprobe")["verdicts"]


# ---------------------------------------------------------------- Ray (one local session, last in the module)
@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp = tempfile.mkdtemp(prefix="aspire-ray-", dir="/tmp")   # short: Ray's socket paths are limited
    import logging

    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def test_ray_batch_gives_the_same_findings_as_local(toy, local_batch, local_ray, tmp_path):
    out = tmp_path / "batch"
    result = invoke(batch_args(toy, out, "--classes", CLASSES, "--executor", "ray"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["status"] == "done"
    assert findings_by_class(summary) == findings_by_class(local_batch[1])
    assert [c["class"] for c in summary["classes"]] == [c["class"] for c in local_batch[1]["classes"]]
    states = units(out)
    assert os.getpid() not in {s.pid for s in states.values()}     # Ray workers ran the audits
    assert {s.attempts for s in states.values()} == {1}
    assert local_ray.is_initialized()                               # the caller's Ray is left running

"""`aspire demo` end to end on a small toy-waterbirds: data → ERM smallcnn → offline audit (approved) →
generate → retrain → evaluate → report, as the console script runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from aspire.store import RunStore

ASPIRE = str(Path(sys.executable).with_name("aspire"))

pytestmark = pytest.mark.slow


def test_demo_runs_the_whole_method_offline(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OPENAI_API_KEY": "", "OPENAI_BASE_URL": "", "ASPIRE_GENERATE__IMAGES_PER_CLASS": "24",
           "ASPIRE_HOLDOUT__FRACTION": "0.5"}
    cmd = [ASPIRE, "demo", "--out", str(out), "--size", "32", "--train-per-class", "96", "--epochs", "5",
           "--retrain-epochs", "1", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)

    # 1. every stage ran and left its records
    assert result["status"] == "done" and Path(result["run_dir"]) == (out / "run").resolve()
    store = RunStore(result["run_dir"])
    assert store.get_meta("kind") == "audit" and store.get_meta("record")["planner"] == "offline"
    contract = {"class", "phrase", "kind", "occurrences", "flips", "flip_rate", "control_flip_rate", "p_value",
                "spurious", "q_value", "effect", "effect_ci", "control_kind", "flip_p_value", "insertion_effect",
                "insertion_p_value", "joint"}
    assert result["findings"] and all(contract <= set(f) for f in result["findings"])
    assert store.events("hypothesis") and store.events("outcome")
    assert {h["source"] for h in store.events("hypothesis")} == {"planner"}
    # at this size the ERM model relies on the background: spurious findings, repaired
    assert any(f["spurious"] and f["q_value"] < 0.05 for f in result["findings"])
    assert store.get_meta("record")["demo"]["augment_select"] == "spurious"
    assert result["approvals"] == {"generate": "approve", "retrain": "approve"}
    assert result["augmented"]["n_images"] > 0 and Path(result["augmented"]["dir"]).is_dir()
    assert Path(result["models"]["after"]).is_file()
    accuracy = result["accuracy"]
    assert 0 <= accuracy["before"]["worst_group_accuracy"] <= 1 and 0 <= accuracy["after"]["worst_group_accuracy"] <= 1
    assert set(store.get_meta("evaluation")) == {"before", "after"}
    for key in ("html", "md", "json"):
        assert Path(result["report"][key]).is_file()
    assert "worst-group" in Path(result["report"]["md"]).read_text().lower()
    # the repaired model was re-probed on the same edits: before → after per finding, in the JSON and the report
    confirmed = [f for f in result["findings"] if f["spurious"]]
    assert all(f["after"]["verdict"] in ("removed", "reduced", "unchanged") for f in confirmed)
    verdicts = Counter(f["after"]["verdict"] for f in result["findings"] if f["after"]["verdict"])
    assert result["reprobe"]["verdicts"] == dict(verdicts) and result["reprobe"]["model"] == result["models"]["after"]
    md = Path(result["report"]["md"]).read_text()
    assert "Did the repair remove the reliance?" in md and "img/effect_change.png" in md

    # 2. run again: everything is reused, nothing is redone
    n_edits, n_events = store.count("edit"), len(store.events())
    again = subprocess.run(cmd[:-1], capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "worst-group accuracy" in again.stdout and "report:" in again.stdout
    assert store.count("edit") == n_edits and len(store.events()) == n_events

    # 3. the CI gate through the console script: exit 3 exactly when a confirmed finding remains after the repair
    gate = subprocess.run([ASPIRE, "reprobe", "--run-dir", result["run_dir"], "--json", "--fail-on", "spurious"],
                          capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    remains = [f for f in json.loads(gate.stdout)["findings"] if f["after"]["spurious"]]
    assert gate.returncode == (3 if remains else 0), gate.stderr[-2000:]
    assert store.count("edit") == n_edits   # scored already: nothing new

"""Crash and resume: `aspire audit` killed with SIGKILL mid-edit and mid-probe, resumed with
`aspire audit --resume RUN_DIR`, ends with exactly what an uninterrupted run records: same findings, no
duplicated or lost edits, probes or reasoning events. Real processes, real store, tiny toy benchmark."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aspire.store import RunStore

ASPIRE = str(Path(sys.executable).with_name("aspire"))
CONFIG = {"holdout": {"fraction": 1.0}, "agent": {"retrain_epochs": 1}, "generate": {"images_per_class": 12}}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny toy-waterbirds (32 px, 40 training images per class) and a smallcnn trained 4 epochs on it
    (which relies on the background: waterbirds on land are misclassified)."""
    from aspire.data.formats import load_dataset
    from aspire.data.toy.benchmark import write_benchmark
    from aspire.models.classifier import build_classifier, save_checkpoint
    from aspire.models.train import train_classifier

    root = tmp_path_factory.mktemp("toy")
    write_benchmark("toy-waterbirds", root / "data", seed=0, size_px=32, sizes={"train": 40, "val": 10, "test": 16})
    ds = load_dataset(root / "data")
    clf = build_classifier("smallcnn", ds.class_names, input_size=32, seed=0)
    # no validation split: the last epoch is kept, a model that has learnt the place shortcut
    train_classifier(clf, ds.split("train"), [], epochs=4, batch_size=16, lr=0.05, weight_decay=5e-4,
                     seed=0, augment=False, progress=False)
    save_checkpoint(clf, root / "model.pt")
    (root / "config.json").write_text(json.dumps(CONFIG))
    return root


def audit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([ASPIRE, "audit", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=timeout, env={**os.environ, "OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""})


def count(run_dir: Path, kind: str) -> int:
    db = run_dir / RunStore.DB_NAME
    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM records WHERE kind = ?", (kind,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0     # the tables are not created yet


def kill_when(cmd: list[str], run_dir: Path, ready, timeout: float = 240) -> None:
    """Start `cmd`, SIGKILL it as soon as `ready(run_dir)` holds; fail if it finishes first."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OPENAI_API_KEY": "", "OPENAI_BASE_URL": ""})
    deadline = time.monotonic() + timeout
    try:
        while not ready(run_dir):
            if proc.poll() is not None:
                pytest.fail(f"the audit finished before it could be killed: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the audit never reached the point to kill it at")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def trail(run_dir: Path) -> dict:
    store = RunStore(run_dir)
    ident = ("round", "class_index", "kind", "phrase")
    out = {kind: [tuple(e.get(k) for k in ident) for e in store.events(kind)] for kind in ("hypothesis", "outcome")}
    out["plans"] = sorted(store.keys("plan"))
    out["edits"] = store.count("edit")
    out["probes"] = store.count("probe")
    out["edit_files"] = len(list((run_dir / "edits").glob("*.json")))
    out["approvals"] = [(a["stage"], a["decision"]) for a in store.get_meta("approvals", [])]
    out["evaluation_before"] = store.get_meta("evaluation")["before"]
    store.close()
    return out


def test_killed_audit_resumes_to_the_same_result(toy, tmp_path):
    base = ["--data", str(toy / "data"), "--model", str(toy / "model.pt"), "--config", str(toy / "config.json"),
            "--offline"]
    # 1. the reference: one uninterrupted run
    ref = audit(*base, "--run-dir", str(tmp_path / "ref"), "--yes", "--json")
    assert ref.returncode == 0, ref.stderr[-2000:]
    expected = json.loads(ref.stdout)

    # 2. killed while editing, then killed again while probing (after the resume re-made nothing twice)
    run = tmp_path / "run"
    kill_when([ASPIRE, "audit", *base, "--run-dir", str(run)], run, lambda d: count(d, "edit") > 0)
    edits_at_kill = count(run, "edit")
    assert 0 < edits_at_kill < expected["counts"]["edits"] + expected["counts"]["control_edits"]
    kill_when([ASPIRE, "audit", "--resume", str(run)], run, lambda d: count(d, "probe") > 0)

    # 3. without --yes and a terminal the resumed audit stops at the approval, saying how to go on
    paused = audit("--resume", str(run), "--json")
    assert paused.returncode == 4   # its own exit code, with what was found so far
    assert f"waits for approval before generate; continue with `aspire audit --resume {run}" in paused.stderr
    so_far = json.loads(paused.stdout)
    assert so_far["status"] == "paused" and so_far["pending"]["stage"] == "generate" and so_far["findings"]

    # 4. approved: it ends as the uninterrupted run did
    done = audit("--resume", str(run), "--yes", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout)
    assert got["findings"] == expected["findings"]
    assert got["counts"] == expected["counts"]
    assert (got["rounds"], got["stop_reason"]) == (expected["rounds"], expected["stop_reason"])
    assert got["accuracy"]["before"] == expected["accuracy"]["before"]
    mine, theirs = trail(run), trail(tmp_path / "ref")
    assert mine == theirs
    assert len(set(mine["hypothesis"])) == len(mine["hypothesis"]) > 0
    assert mine["edits"] == mine["edit_files"] == mine["probes"]
    assert got["status"] == "done" and got["approvals"] == expected["approvals"]

    # 5. a finished run resumed again changes nothing
    again = audit("--resume", str(run), "--yes", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["findings"] == expected["findings"]
    assert trail(run) == mine


def test_resume_refuses_other_inputs_and_unknown_folders(toy, tmp_path):
    bad = audit("--resume", str(tmp_path / "nothing"))
    assert bad.returncode == 1 and "not a run folder" in bad.stderr
    both = audit("--resume", str(tmp_path), "--data", str(toy / "data"))
    assert both.returncode == 1 and "leave out --data" in both.stderr
    # a probe run is not turned into an audit, by --resume or by --run-dir
    new_audit(toy, tmp_path / "probe").pipeline.store.set_meta("kind", "probe")
    probe_run = audit("--resume", str(tmp_path / "probe"))
    assert probe_run.returncode == 1 and "a probe run, not an audit" in probe_run.stderr
    again = audit("--data", str(toy / "data"), "--model", str(toy / "model.pt"), "--run-dir", str(tmp_path / "probe"))
    assert again.returncode == 1 and "holds a probe run, not audit" in again.stderr


def test_a_probe_run_becomes_an_audit_only_with_from_probe(toy, tmp_path):
    run = tmp_path / "probe"
    probe = subprocess.run([ASPIRE, "probe", "--data", str(toy / "data"), "--model", str(toy / "model.pt"),
                            "--run-dir", str(run), "--config", str(toy / "config.json")],
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    before = {kind: count(run, kind) for kind in ("caption", "phrases", "edit")}
    recorded = RunStore(run).get_meta("record")
    refused = audit("--resume", str(run), "--offline")
    assert refused.returncode == 1 and f"aspire audit --from-probe {run}" in refused.stderr
    store = RunStore(run)
    assert store.get_meta("kind") == "probe" and store.get_meta("record") == recorded   # refusing changed nothing
    store.close()
    done = audit("--from-probe", str(run), "--yes", "--offline", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "auditing the probe run" in done.stderr and json.loads(done.stdout)["status"] == "done"
    store = RunStore(run)
    assert store.get_meta("kind") == "audit" and store.get_meta("record")["planner"] == "offline"
    assert store.get_meta("evaluation")["after"] and store.get_meta("audit")["thread_id"]
    store.close()
    # the probe's work was reused: no image captioned or phrased again, its edits kept
    assert {k: count(run, k) for k in ("caption", "phrases")} == {k: before[k] for k in ("caption", "phrases")}
    assert count(run, "edit") >= before["edit"]
    again = audit("--from-probe", str(run))
    assert again.returncode == 1 and "already" not in again.stderr and f"aspire audit --resume {run}" in again.stderr


def new_audit(toy: Path, run_dir: Path):
    """An in-process audit of the toy model in a new run folder, recorded as `aspire audit --offline` does."""
    from aspire.agent import audit_context
    from aspire.config import load_config
    from aspire.data.formats import load_dataset
    from aspire.models.classifier import load_checkpoint
    from aspire.provenance import run_record

    ann = str(toy / "data" / "annotations.jsonl")
    cfg = load_config(toy / "config.json", {"caption": {"annotations": ann}, "ground": {"annotations": ann},
                                            "agent": {"offline": True}})
    store = RunStore(run_dir)
    store.set_meta("kind", "audit")
    store.set_meta("args", {"data": str(toy / "data"), "format": "waterbirds", "model": str(toy / "model.pt"),
                            "classes": None, "seed": 0, "attr": None, "target": None})
    store.set_meta("record", run_record(cfg, seed=0, planner="offline"))
    return audit_context(load_dataset(toy / "data"), load_checkpoint(toy / "model.pt"), cfg, store,
                         model_path=str(toy / "model.pt"))


class Crash(BaseException):
    """Stands for kill -9 (a BaseException, so that no handler in the graph catches it)."""


def test_crash_after_every_checkpoint_resumes_to_the_same_result(toy, tmp_path, monkeypatch):
    """The deterministic complement of the kill -9 test: the audit dies right after its input checkpoint,
    and, in one chain of resumes, right after each step's checkpoint in turn (every node of every round,
    the approvals included); each time it is resumed from its folder, and it ends as the uninterrupted run."""
    import contextlib

    from langgraph.checkpoint.sqlite import SqliteSaver

    import aspire.agent.runner as agent

    crash_after: list[str] = []        # the checkpoint source ("input" | "loop") to die after, if any
    steps: list[int] = []              # each step's checkpoint, as written

    class CrashingSaver(SqliteSaver):
        def put(self, config, checkpoint, metadata, new_versions):
            out = super().put(config, checkpoint, metadata, new_versions)
            if metadata.get("source") == "loop":
                steps.append(metadata["step"])
            if metadata.get("source") in crash_after:
                raise Crash()
            return out

    @contextlib.contextmanager
    def crashing_checkpointer(run_dir):
        conn = sqlite3.connect(Path(run_dir) / agent.CHECKPOINTS, check_same_thread=False)
        try:
            yield CrashingSaver(conn)
        finally:
            conn.close()

    def resume_until_done(ctx, dies_after: list[str]) -> tuple[dict, int]:
        crashes = 0
        while True:
            crash_after[:] = dies_after
            try:
                return agent.run_audit(ctx, approve=agent.auto_approve).to_json(), crashes
            except Crash:
                crashes += 1
                assert crashes < 100, "the resumed audit makes no progress"
                ctx = agent.context_from_run(ctx.pipeline.store.run_dir)

    monkeypatch.setattr(agent, "checkpointer", crashing_checkpointer)
    expected, _ = resume_until_done(new_audit(toy, tmp_path / "ref"), [])
    reference, n_steps = trail(tmp_path / "ref"), len(steps)

    def same_as_uninterrupted(got: dict, run_dir: Path) -> None:
        assert got["status"] == "done"
        for key in ("findings", "counts", "rounds", "stop_reason", "features", "approvals", "accuracy"):
            assert got[key] == expected[key], key
        assert got["augmented"]["n_images"] == expected["augmented"]["n_images"]
        assert trail(run_dir) == reference

    # 1. killed right after the input checkpoint (before any step), then resumed
    with pytest.raises(Crash):
        crash_after[:] = ["input"]
        agent.run_audit(new_audit(toy, tmp_path / "input"), approve=agent.auto_approve)
    got, _ = resume_until_done(agent.context_from_run(tmp_path / "input"), [])
    same_as_uninterrupted(got, tmp_path / "input")

    # 2. killed after every step: each resume makes one step, then dies
    steps.clear()
    got, crashes = resume_until_done(new_audit(toy, tmp_path / "steps"), ["loop"])
    assert crashes == n_steps > 10 and steps == sorted(set(steps))   # each step once, none made twice
    same_as_uninterrupted(got, tmp_path / "steps")


def test_approve_generation_then_reject_retraining(toy, tmp_path):
    """In process: the second interrupt shows the generated set; rejecting it keeps the set, trains nothing."""
    from aspire.agent import run_audit

    ctx = new_audit(toy, tmp_path / "run")
    store = ctx.pipeline.store
    asked = []

    def decide(payload):
        asked.append(payload)
        return "approve" if payload["stage"] == "generate" else "reject"

    result = run_audit(ctx, approve=decide)
    assert [p["stage"] for p in asked] == ["generate", "retrain"]
    generate, retrain = asked
    assert generate["proposed"] and generate["cost"]["images_to_generate"] == 12 * len(generate["cost"]["edits_to_use"])
    assert retrain["augmented"]["n_images"] == result.state["augmented"]["n_images"] > 0
    assert retrain["cost"]["epochs"] == 1 and retrain["cost"]["method"] == "erm"
    assert Path(store.get_meta("augmented")["dir"]).is_dir()
    assert store.get_meta("models") is None and set(store.get_meta("evaluation")) == {"before"}
    assert [(a["stage"], a["decision"]) for a in store.get_meta("approvals")] == [("generate", "approve"),
                                                                                 ("retrain", "reject")]
    assert result.status == "done" and Path(result.state["report"]["html"]).is_file()


def test_resume_keeps_the_settings_and_reads_keys_only_from_the_environment_or_the_file(tmp_path):
    from aspire.config import load_config
    from aspire.provenance import run_record
    from aspire.workflows.runs import record_overrides, recorded_config

    toml = tmp_path / "real.toml"
    toml.write_text('[phrases]\nbackend = "llm"\napi_key = "sk-phrases"\nmodel = "local-model"\n'
                    '[agent]\napi_key = "sk-agent"\n')
    store = RunStore(tmp_path / "run")
    store.set_meta("record", run_record(load_config(toml), seed=0))
    assert "sk-" not in json.dumps(store.get_meta("record"))          # keys are never written
    resumed = recorded_config(store)
    assert resumed.phrases.backend == "llm" and resumed.phrases.model == "local-model"   # the TOML-only settings
    assert resumed.phrases.api_key is None                             # and no key without the file
    keyed = recorded_config(store, secrets_from=toml)
    assert keyed.phrases.api_key == "sk-phrases" and keyed.agent.api_key == "sk-agent"
    # a flag given on resume is recorded for the next resume, still without keys
    keyed.agent = keyed.agent.model_copy(update={"model": "other-planner"})
    record_overrides(store, keyed)
    assert recorded_config(store).agent.model == "other-planner" and "sk-" not in json.dumps(store.get_meta("record"))


def test_an_unreachable_planner_is_said_on_stderr(toy, tmp_path):
    base = ["--data", str(toy / "data"), "--model", str(toy / "model.pt"), "--config", str(toy / "config.json")]
    env = {**os.environ, "OPENAI_API_KEY": "x", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
           "ASPIRE_AGENT__MAX_RETRIES": "0", "ASPIRE_AGENT__MAX_ROUNDS": "1"}
    paused = subprocess.run([ASPIRE, "audit", *base, "--run-dir", str(tmp_path / "run")], capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=300, env=env)
    assert paused.returncode == 4, paused.stderr[-2000:]   # no terminal: it stops at the approval
    assert "warning: the LLM planner failed 1 time(s) (the first: llm request failed: OpenAIConnectionError" in paused.stderr
    assert "planned by the offline planner" in paused.stderr

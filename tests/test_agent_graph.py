"""The audit graph's logic on a hand-built world whose classifier rule is known, with the offline planner
and with a scripted chat model making tool calls (the LLM is the only fake: everything behind it is real).

The world: grey 64x64 images of "widget" (1) and "gizmo" (0). Widgets carry a red cube; both classes carry
a blue disk; a yellow star comes with widgets 75% of the time (gizmos 25%); a green bar with half of each.
The classifier looks at one thing: red pixels mean "widget". So the red cube is the one spurious feature.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage
from langgraph.runtime import Runtime
from PIL import Image

from aspire.agent import audit_context, run_audit
from aspire.agent import nodes
from aspire.agent.llm_planner import LLMPlanner
from aspire.agent.planner import OfflinePlanner, group_key
from aspire.config import load_config
from aspire.data.formats import load_dataset
from aspire.workflows.probe import ALL_CANDIDATES
from aspire.schemas import Edit, Probe
from aspire.store import RunStore
from known_classifier import RedMeansWidget

SIZE = 64
N = 16  # images per class


def _box(y0, x0, h, w):
    m = np.zeros((SIZE, SIZE), bool)
    m[y0:y0 + h, x0:x0 + w] = True
    return m


def make_world(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    rows, ann = ["img_filename,y,split"], []
    for i in range(2 * N + 8):
        y, j = i % 2, i // 2
        split = 0 if i < 2 * N else 2
        img = np.full((SIZE, SIZE, 3), 128, np.uint8) + rng.integers(0, 8, (SIZE, SIZE, 3), dtype=np.uint8)
        things = [("widget" if y else "gizmo", _box(24, 4, 16, 12), (90, 90, 90)),
                  ("blue disk", _box(int(rng.integers(8, 14)), 44, 9, 9), (30, 60, 200))]
        if y == 1:
            things.append(("red cube", _box(int(rng.integers(44, 50)), int(rng.integers(36, 48)), 7, 7), (220, 20, 20)))
        if (y == 1 and j % 4 != 0) or (y == 0 and j % 4 == 0):
            things.append(("yellow star", _box(54, 4, 6, 6), (230, 220, 30)))
        if j % 2 == 0:
            things.append(("green bar", _box(2, 20, 4, 18), (30, 160, 40)))
        entry = {"image": f"images/{i:03d}.png", "caption": "", "regions": []}
        for phrase, mask, color in things:
            img[mask] = color
            mpath = f"masks/{i:03d}_{phrase.replace(' ', '_')}.png"
            Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(root / mpath)
            entry["regions"].append({"phrase": phrase, "mask": mpath})
        entry["caption"] = f"a {things[0][0]} with " + " and ".join(f"a {t[0]}" for t in things[1:])
        Image.fromarray(img).save(root / entry["image"])
        ann.append(entry)
        rows.append(f"{entry['image']},{y},{split}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("gizmo\nwidget\n")
    (root / "annotations.jsonl").write_text("\n".join(json.dumps(a) for a in ann) + "\n")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("agent-world"))


def make_ctx(world: Path, run_dir: Path, planner=None, **agent: Any):
    ann = str(world / "annotations.jsonl")
    cfg = load_config(None, {"caption": {"annotations": ann}, "ground": {"annotations": ann},
                             "holdout": {"fraction": 1.0},
                             "agent": {"offline": True, "groups_per_round": 1, "max_retries": 1, "backoff_s": 0,
                                       **agent}})
    store = RunStore(run_dir)
    store.set_meta("kind", "audit")
    store.set_meta("args", {"data": str(world), "format": "waterbirds", "model": str(world / "model.pt"),
                            "classes": None, "seed": 0, "attr": None, "target": None})
    return audit_context(load_dataset(world), RedMeansWidget(min_red=0.005), cfg, store, model_path=str(world / "model.pt"),
                         planner=planner or OfflinePlanner())


class ScriptedChat(FakeMessagesListChatModel):
    """A scripted chat model that makes tool calls; bind_tools returns itself. Records the prompts."""

    prompts: list = []

    def bind_tools(self, tools, **kwargs):
        return self

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        self.prompts.append(messages)
        return super()._generate(messages, stop, run_manager, **kwargs)


def plan_call(hypotheses: list[dict], stop: bool = False, reason: str = "", call_id: str = "c") -> AIMessage:
    return AIMessage(content="", tool_calls=[{"name": "propose_hypotheses", "id": call_id, "type": "tool_call",
                                              "args": {"hypotheses": hypotheses, "stop": stop, "reason": reason}}])


# ---------------------------------------------------------------- the offline loop
def test_offline_planner_probes_by_lift_and_stops_when_findings_are_stable(world, tmp_path):
    ctx = make_ctx(world, tmp_path / "run")
    result = run_audit(ctx)               # no approver: pauses at the first interrupt

    assert result.status == "paused" and result.pending["stage"] == "generate"
    store = ctx.pipeline.store
    hyps = store.events("hypothesis")
    by_round = {}
    for h in hyps:
        by_round.setdefault(h["round"], []).append((h["class"], h["phrase"]))
        assert h["source"] == "planner" and h["reason"].startswith("lift")
    # round 1: each class's highest-lift group (widget: the red cube); round 2: the next ones; then stable
    assert by_round[1] == [("gizmo", "blue disk"), ("widget", "red cube")]
    assert by_round[2] == [("gizmo", "green bar"), ("widget", "yellow star")]
    assert sorted(by_round) == [1, 2]
    assert result.state["stop_reason"].startswith("findings stable")
    outcomes = {(o["class"], o["phrase"]): o for o in store.events("outcome")}
    assert outcomes[("widget", "red cube")]["result"] == "spurious"
    assert outcomes[("widget", "red cube")]["flip_rate"] == 1.0
    assert {k for k, o in outcomes.items() if o["result"] == "spurious"} == {("widget", "red cube")}
    # only the hypotheses' phrases were edited: nothing else was spent (insertion and joint tests name the
    # hypotheses' groups, or the class's joint pair of all of them)
    probes = store.all("probe", Probe)
    assert {(p.y, p.phrase) for p in probes if p.test == "removal"} == {
        (0, "blue disk"), (1, "red cube"), (0, "green bar"), (1, "yellow star")}
    assert {p.phrase for p in probes if p.test != "removal"} <= {
        "blue disk", "red cube", "green bar", "yellow star", ALL_CANDIDATES}
    # the approval payload: the proposed repair and its cost
    red = group_key(1, "foreground", "red cube")
    assert result.pending["proposed"] == [red]
    assert result.pending["cost"]["edits_to_use"] == {"widget": min(N, 35)}
    assert result.pending["cost"]["retrain"]["epochs"] == 1


def test_budgets_end_the_loop(world, tmp_path):
    one = run_audit(make_ctx(world, tmp_path / "rounds", max_rounds=1))
    assert one.state["stop_reason"] == "round budget spent (agent.max_rounds=1)"
    assert {h["round"] for h in RunStore(tmp_path / "rounds").events("hypothesis")} == {1}

    # 40 edits: round 1 (16 + 16 real and as many controls = 64 estimated) does not fit, a smaller one does
    ctx = make_ctx(world, tmp_path / "edits", max_edits=40)
    small = run_audit(ctx)
    assert "edit budget spent" in small.state["stop_reason"]
    assert ctx.pipeline.store.count("edit") <= 40


def test_hypothesize_is_idempotent_when_rerun_after_a_crash(world, tmp_path):
    calls = []

    class CountingPlanner(OfflinePlanner):
        def propose(self, request):
            calls.append(request.round)
            return super().propose(request)

    ctx = make_ctx(world, tmp_path / "run", planner=CountingPlanner())
    runtime = Runtime(context=ctx)
    for step in (nodes.select_holdout, nodes.caption, nodes.extract_phrases):
        step({}, runtime)
    state = {"round": 0, "tested": [], "spurious": []}
    first = nodes.hypothesize(state, runtime)
    again = nodes.hypothesize(state, runtime)  # the node re-run after a crash before its checkpoint
    assert calls == [1]                       # the recorded plan is reused: the planner is not asked again
    assert first["hypotheses"] == again["hypotheses"]
    assert len(ctx.pipeline.store.events("hypothesis")) == len(first["hypotheses"]) == 2


# ---------------------------------------------------------------- the LLM planner with a scripted chat model
def test_scripted_llm_plans_the_rounds_and_its_reasons_are_recorded(world, tmp_path):
    chat = ScriptedChat(responses=[
        plan_call([{"class": "widget", "kind": "foreground", "phrase": "red cubes", "reason": "only widgets have it"},
                   {"class": "gizmo", "kind": "foreground", "phrase": "green bar", "reason": "a control"}]),
        plan_call([], stop=True, reason="the red cube explains the widget predictions"),
    ])
    ctx = make_ctx(world, tmp_path / "run", planner=None, offline=False)
    ctx.planner = LLMPlanner(ctx.config.agent, chat_model=chat)
    result = run_audit(ctx, approve=lambda payload: {"decision": "reject"})

    store = ctx.pipeline.store
    hyps = store.events("hypothesis")
    assert [(h["class"], h["phrase"], h["source"], h["reason"]) for h in hyps] == [
        ("widget", "red cube", "llm", "only widgets have it"), ("gizmo", "green bar", "llm", "a control")]
    assert {(p.y, p.phrase) for p in store.all("probe", Probe)} == {(0, "green bar"), (1, "red cube")}
    assert result.state["stop_reason"] == "the red cube explains the widget predictions"
    assert result.state["llm_calls"] == 2 and not store.events("llm_failure")
    # the LLM saw the statistics and, in round 2, the outcome of round 1
    first_prompt = chat.prompts[0][-1].content
    assert 'foreground "red cube"' in first_prompt and "lift=" in first_prompt
    assert 'class widget, foreground "red cube": spurious' in chat.prompts[1][-1].content


def test_unusable_llm_answers_degrade_to_the_planner_and_are_recorded(world, tmp_path):
    chat = ScriptedChat(responses=[
        plan_call([{"class": "widget", "kind": "foreground", "phrase": "purple hat", "reason": "?"}]),
        AIMessage(content="I think the red cube matters."),
    ])
    ctx = make_ctx(world, tmp_path / "run", offline=False, max_rounds=1)
    ctx.planner = LLMPlanner(ctx.config.agent, chat_model=chat)
    result = run_audit(ctx, approve=lambda payload: "reject")

    failures = ctx.pipeline.store.events("llm_failure")
    assert [f["attempt"] for f in failures] == [1, 2]
    assert "not an untested candidate" in failures[0]["reason"] and "not valid JSON" in failures[1]["reason"]
    assert all(f["degraded_to_planner"] for f in failures)
    assert {h["source"] for h in ctx.pipeline.store.events("hypothesis")} == {"planner"}
    assert result.status == "done" and result.state["llm_failures"] == 2


# ---------------------------------------------------------------- approvals: reject, edit, resume
def test_reject_ends_the_run_without_generation(world, tmp_path):
    ctx = make_ctx(world, tmp_path / "run")
    result = run_audit(ctx, approve=lambda payload: {"decision": "reject"})
    store = ctx.pipeline.store
    assert result.status == "done"
    assert result.state["approvals"] == {"generate": "reject"} and result.state["features"] == []
    assert store.get_meta("augmented") is None and store.get_meta("models") is None
    approvals = store.get_meta("approvals")
    assert [(a["stage"], a["decision"]) for a in approvals] == [("generate", "reject")]
    assert [(e["stage"], e["decision"]) for e in store.events("approval")] == [("generate", "reject")]
    evaluation = store.get_meta("evaluation")     # evaluated before repair only
    assert set(evaluation) == {"before"} and evaluation["before"]["worst_group_accuracy"] == 1.0
    assert "after" not in result.state["accuracy"]


def test_edit_drops_and_adds_features_and_is_recorded(world, tmp_path):
    ctx = make_ctx(world, tmp_path / "run")
    paused = run_audit(ctx)
    red = group_key(1, "foreground", "red cube")
    star = group_key(1, "foreground", "yellow star")
    numbers = {f["key"]: f["n"] for f in paused.pending["findings"]}

    # resumed from the checkpoint in a fresh context (another process would do the same)
    ctx2 = make_ctx(world, tmp_path / "run")
    edits_before = ctx2.pipeline.store.count("edit")
    seen = []

    def decide(payload):
        seen.append(payload["stage"])
        if payload["stage"] == "generate":
            return {"decision": "approve", "drop": [numbers[red]], "add": ["widget:yellow star", "nosuch:thing"]}
        return {"decision": "reject"}

    result = run_audit(ctx2, approve=decide)
    store = ctx2.pipeline.store
    assert store.count("edit") == edits_before            # resuming did not probe again
    assert seen[0] == "generate"
    entry = store.get_meta("approvals")[0]
    assert (entry["stage"], entry["decision"], entry["dropped"], entry["added"]) == ("generate", "edit", [red], [star])
    assert [f["key"] for f in store.get_meta("approved_features")] == [star]
    assert result.state["features"] == [star]


def test_dropping_every_feature_skips_generation(world, tmp_path):
    ctx = make_ctx(world, tmp_path / "run")
    result = run_audit(ctx, approve=lambda p: {"decision": "approve", "drop": [group_key(1, "foreground", "red cube")]})
    assert result.status == "done" and result.state["features"] == []
    assert ctx.pipeline.store.get_meta("augmented") is None
    assert ctx.pipeline.store.get_meta("approvals")[0]["decision"] == "edit"


def test_a_finished_audit_returns_its_result_without_running_again(world, tmp_path):
    ctx = make_ctx(world, tmp_path / "run")
    first = run_audit(ctx, approve=lambda p: "reject")
    n_events = len(ctx.pipeline.store.events())
    again = run_audit(make_ctx(world, tmp_path / "run"), approve=lambda p: pytest.fail("asked again"))
    assert again.status == "done" and len(RunStore(tmp_path / "run").events()) == n_events
    assert [f.to_json() for f in again.findings] == [f.to_json() for f in first.findings]


def test_edits_store_matches_files(world, tmp_path):
    ctx = make_ctx(world, tmp_path / "run")
    run_audit(ctx, approve=lambda p: "reject")
    edits = ctx.pipeline.store.all("edit", Edit)
    files = list((tmp_path / "run" / "edits").glob("*.json"))
    assert len(edits) == len({e.edit_id for e in edits}) == len(files) == ctx.pipeline.store.count("probe")

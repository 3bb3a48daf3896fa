"""The audit graph's nodes (verbs) and routers (`route_*`). Nodes delegate to the probe pipeline, augment,
the training methods, evaluation and the report; what they produce lives in the run store, and the state
keeps ids, counts and summaries.

Every node is idempotent: the pipeline's steps skip recorded work, a round's plan is recorded before its
events (a re-run reuses it and never asks the LLM again), events are logged once per identity, and the
repair steps skip what their meta already records. So a run killed anywhere resumes without lost or
duplicated work. The approval nodes (`review`, `commit`) do nothing with side effects before `interrupt()`:
LangGraph runs an interrupted node again from its start on resume.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal, Optional

from langgraph.runtime import Runtime
from langgraph.types import interrupt

from aspire.agent.approval import (edits_to_use, finding_summary, parse_decision, qualifies_for_repair,
                                    record_approval, resolve_feature)
from aspire.agent.planner import Hypothesis, Plan, PlanRequest, finding_for, group_key, phrase_stats, trim_to_budget
from aspire.agent.state import AuditContext, AuditState
from aspire.schemas import Finding
from aspire.store_schema import Models
from aspire.tools.probe import rank_key
from aspire.workflows.retrain import retrain_plan as workflow_retrain_plan


# ---------------------------------------------------------------- helpers
def _stage(store, name: str, **info: Any) -> None:
    store.log_event("stage", {"stage": name, **info})


def current_stats(ctx: AuditContext):
    """Per probed class, the phrase groups of its hold-out images with their shares and lift."""
    p = ctx.pipeline
    sets = [s for s in (p.phrase_set(s.image) for s in p.holdout()) if s is not None]
    labels = {s.image: s.y for s in p.holdout()}
    return phrase_stats(sets, labels, p.class_names, p.class_ids, ctx.config.probe.merge_similarity)


def history(store) -> list[dict]:
    """The outcome events so far, in the prompt's terms."""
    return [{"round": e.get("round"), "class": e.get("class"), "kind": e.get("kind"), "phrase": e.get("phrase"),
             "reason": e.get("hypothesis_reason", ""), "result": e.get("result"),
             "occurrences": e.get("occurrences", 0), "flip_rate": e.get("flip_rate"),
             "control_flip_rate": e.get("control_flip_rate"), "effect": e.get("effect"),
             "effect_ci": e.get("effect_ci"), "q_value": None if e.get("q_value") is None else float(f"{e['q_value']:.3g}"),
             "joint_effect": e.get("joint_effect"),
             "p_value": None if e.get("p_value") is None else float(f"{e['p_value']:.3g}")}
            for e in store.events("outcome")]


def retrain_plan(ctx: AuditContext) -> dict[str, Any]:
    """The retraining the audit will run (workflows.retrain)."""
    return workflow_retrain_plan(ctx.config, ctx.pipeline.classifier, ctx.dataset)


# ---------------------------------------------------------------- steps 1-3
def select_holdout(state: AuditState, runtime: Runtime[AuditContext]) -> dict:
    held = runtime.context.pipeline.select_holdout()
    return {"counts": {"holdout": len(held)}}


def caption(state: AuditState, runtime: Runtime[AuditContext]) -> dict:
    captions = runtime.context.pipeline.caption()
    return {"counts": {**state.get("counts", {}), "captions": len(captions)}}


def extract_phrases(state: AuditState, runtime: Runtime[AuditContext]) -> dict:
    sets = runtime.context.pipeline.extract_phrases()
    return {"counts": {**state.get("counts", {}), "phrase_sets": len(sets),
                       "phrase_failures": sum(1 for s in sets if s is not None and s.failed)}}


# ---------------------------------------------------------------- the hypothesize → probe loop
def hypothesize(state: AuditState, runtime: Runtime[AuditContext]) -> dict:
    """Plan the next round: which phrase groups to probe on which class, and why (LLM or offline planner)."""
    ctx = runtime.context
    store = ctx.pipeline.store
    settings = ctx.config.agent
    started = time.monotonic()
    rnd = state.get("round", 0) + 1
    key = f"round-{rnd}"

    # 1. a plan recorded before a crash is reused as it is
    saved = store.get("plan", key, Plan)
    if saved is None:
        stats = current_stats(ctx)
        spent = _budget_spent(ctx, state, rnd)
        if spent:
            plan = Plan(hypotheses=[], stop=True, reason=spent, source="budget")
        else:
            request = PlanRequest(round=rnd, stats=stats, tested=set(state.get("tested", [])),
                                  history=history(store), groups_per_round=settings.groups_per_round,
                                  min_occurrences=ctx.config.probe.min_occurrences,
                                  similarity=ctx.config.probe.merge_similarity,
                                  llm_calls_left=max(0, settings.max_llm_calls - state.get("llm_calls", 0)))
            plan = ctx.planner.propose(request)
            # 2. keep to the edit budget
            edits_left = settings.max_edits - store.count("edit")
            kept = trim_to_budget(plan.hypotheses, stats, edits_left)
            if plan.hypotheses and not kept:
                plan = plan.model_copy(update={"stop": True, "reason": f"edit budget spent (agent.max_edits="
                                                                       f"{settings.max_edits})"})
            plan.hypotheses = kept
        saved = plan.model_copy(update={"round": rnd, "stop": plan.stop or not plan.hypotheses})
        store.put("plan", key, saved)

    # 3. the reasoning trail: LLM failures, then every hypothesis with its reason (each logged once)
    degraded = saved.source != "llm"
    seen = {tuple(e.get(k) for k in ("round", "attempt")) for e in store.events("llm_failure")}
    for i, reason in enumerate(saved.failures):
        store.log_event_once("llm_failure", {"stage": "hypothesize", "round": rnd, "attempt": i + 1,
                                             "reason": reason, "degraded_to_planner": degraded,
                                             "source": saved.source},
                             ("round", "attempt"), seen)
    seen = {tuple(e.get(k) for k in ("round", "class_index", "kind", "phrase")) for e in store.events("hypothesis")}
    for h in saved.hypotheses:
        store.log_event_once("hypothesis", {"round": rnd, "class": h["class_name"], "class_index": h["class_index"],
                                            "phrase": h["phrase"], "kind": h["kind"], "phrases": h["phrases"],
                                            "reason": h["reason"], "source": h["source"]},
                             ("round", "class_index", "kind", "phrase"), seen)
    return {"round": rnd if saved.hypotheses else rnd - 1,   # a round counts when it probes something
            "hypotheses": [Hypothesis(**h) for h in saved.hypotheses],
            "stop_reason": saved.reason if saved.stop else None, "llm_calls": saved.llm_calls,
            "llm_failures": len(saved.failures) if degraded else 0, "seconds": time.monotonic() - started}


def _budget_spent(ctx: AuditContext, state: AuditState, rnd: int) -> Optional[str]:
    s = ctx.config.agent
    if rnd > s.max_rounds:
        return f"round budget spent (agent.max_rounds={s.max_rounds})"
    if ctx.pipeline.store.count("edit") >= s.max_edits:
        return f"edit budget spent (agent.max_edits={s.max_edits})"
    if state.get("seconds", 0.0) >= s.max_seconds:
        return f"time budget spent (agent.max_seconds={s.max_seconds:g})"
    return None


def probe(state: AuditState, runtime: Runtime[AuditContext]) -> dict:
    """Edit the hypotheses' phrases (with controls), classify, aggregate findings, record each outcome."""
    ctx = runtime.context
    p = ctx.pipeline
    store = p.store
    started = time.monotonic()
    hyps = state.get("hypotheses", [])
    rnd = state.get("round", 0)

    # 1. edits restricted to the hypotheses, then the verdict over everything probed so far
    only: dict[int, set[str]] = defaultdict(set)
    for h in hyps:
        only[h["class_index"]].update(h["phrases"] or [h["phrase"]])
    p.make_edits(only_phrases=dict(only))
    p.probe()
    p.test_further(p.findings(), ctx.config.agent.max_edits)   # insertion and joint removal, within the budget
    findings = p.findings()

    # 2. each hypothesis's outcome (logged once)
    seen = {tuple(e.get(k) for k in ("round", "class_index", "kind", "phrase")) for e in store.events("outcome")}
    for h in hyps:
        f = finding_for(findings, h["class_index"], h["kind"], h["phrases"] or [h["phrase"]])
        outcome = {"round": rnd, "class": h["class_name"], "class_index": h["class_index"], "phrase": h["phrase"],
                   "kind": h["kind"], "source": h["source"], "hypothesis_reason": h["reason"]}
        if f is None:
            outcome.update(result="not probed", reason="no edit could be made (phrase not grounded or skipped)")
        else:
            outcome.update(result="spurious" if f.spurious else "not spurious", finding=f.phrase,
                           occurrences=f.occurrences, flips=f.flips, flip_rate=round(f.flip_rate, 4),
                           control_flip_rate=round(f.control_flip_rate, 4), p_value=f.p_value,
                           effect=round(f.effect, 4), effect_ci=[round(v, 4) for v in f.effect_ci],
                           q_value=f.q_value, tested_kind=f.kind, joint=f.joint, joint_effect=f.joint_effect,
                           joint_q_value=f.joint_q_value,
                           reason=(f"P({h['class_name']}) drops {f.effect:+.3f} "
                                   f"[{f.effect_ci[0]:+.3f}, {f.effect_ci[1]:+.3f}] beyond its controls over "
                                   f"{f.pairs} pairs (q={f.q_value:.2g}); {f.flips}/{f.occurrences} edits flip "
                                   f"vs {f.control_flips}/{f.control_occurrences} controls"))
        store.log_event_once("outcome", outcome, ("round", "class_index", "kind", "phrase"), seen)

    # 3. stable, or a budget spent?
    spurious = sorted(f.key for f in findings if f.spurious)
    unchanged = state.get("unchanged_rounds", 0) + 1 if rnd > 1 and spurious == state.get("spurious", []) else 0
    seconds = state.get("seconds", 0.0) + time.monotonic() - started
    s = ctx.config.agent
    stop = None
    if unchanged >= s.stable_rounds:
        stop = f"findings stable: no change in the spurious set for {unchanged} round{'s' * (unchanged > 1)}"
    elif rnd >= s.max_rounds:
        stop = f"round budget spent (agent.max_rounds={s.max_rounds})"
    elif store.count("edit") >= s.max_edits:
        stop = f"edit budget spent (agent.max_edits={s.max_edits})"
    elif seconds >= s.max_seconds:
        stop = f"time budget spent (agent.max_seconds={s.max_seconds:g})"
    counts = vars(p.counts())
    _stage(store, "probe", round=rnd, hypotheses=len(hyps), spurious=len(spurious), reason=stop)
    return {"tested": [group_key(h["class_index"], h["kind"], h["phrase"]) for h in hyps], "spurious": spurious,
            "unchanged_rounds": unchanged, "stop_reason": stop, "counts": counts,
            "seconds": time.monotonic() - started}


# ---------------------------------------------------------------- human approval
def review(state: AuditState, runtime: Runtime[AuditContext]) -> dict:
    """Interrupt before generation: the findings, the features proposed for repair, and the cost."""
    ctx = runtime.context
    p = ctx.pipeline
    store = p.store
    findings = store.all("finding", Finding)
    findings.sort(key=rank_key)
    if not findings:
        record_approval(store, "generate", {"decision": "reject", "note": "nothing was probed: no finding to repair",
                                            "auto": True}, [], [])
        return {"features": [], "approvals": {"generate": "skip"}}
    summaries = [finding_summary(i + 1, f) for i, f in enumerate(findings)]
    proposed = [f.key for f in findings if qualifies_for_repair(f, ctx.config)]
    payload = {"stage": "generate", "question": "generate images without these features?",
               "findings": summaries, "proposed": proposed, "stop_reason": state.get("stop_reason"),
               "max_edits_per_class": ctx.config.probe.max_edits_per_class,
               "cost": {"edits_to_use": edits_to_use(summaries, proposed, ctx.config.probe.max_edits_per_class),
                                        **generation_estimate(ctx, summaries, proposed), "retrain": retrain_plan(ctx)}}
    # nothing with side effects above this line: on resume the node runs again from its start
    decision = parse_decision(interrupt(payload))

    selected = list(proposed)
    dropped, added = [], []
    if decision["decision"] in ("approve", "edit"):
        for ref in decision["drop"]:
            f = resolve_feature(ref, findings, p.class_names)
            if f is not None and f.key in selected:
                selected.remove(f.key)
                dropped.append(f.key)
        for ref in decision["add"]:
            f = resolve_feature(ref, findings, p.class_names)
            if f is not None and f.key not in selected:
                selected.append(f.key)
                added.append(f.key)
        if dropped or added:
            decision["decision"] = "edit"
    else:
        selected = []
    record_approval(store, "generate", decision, dropped, added)
    by_key = {f.key: f for f in findings}
    store.set_meta("approved_features", [{"key": k, "class": by_key[k].class_, "class_index": by_key[k].class_index,
                                          "phrase": by_key[k].phrase, "kind": by_key[k].kind,
                                          "phrases": by_key[k].phrases, "flipped_edits": by_key[k].flipped_edits,
                                          "edits": by_key[k].evidence_edits}
                                         for k in selected])
    return {"features": selected, "approvals": {"generate": decision["decision"]}}


def generation_estimate(ctx: AuditContext, findings: list[dict], selected: list[str]) -> dict:
    """Images the generator will write: its per-class count for every class with flipped edits to use."""
    g = ctx.config.generate
    per_class = g.images_per_class if g.backend == "offline" else g.images_per_seed * len(g.seeds)
    classes = [c for c, n in edits_to_use(findings, selected, ctx.config.probe.max_edits_per_class).items() if n]
    return {"images_to_generate": per_class * len(classes), "images_per_class": per_class, "generator": g.backend}


def commit(state: AuditState, runtime: Runtime[AuditContext]) -> dict:
    """Interrupt before retraining: the generated set and the training it is about to pay for."""
    ctx = runtime.context
    payload = {"stage": "retrain", "question": "retrain the classifier with the generated images?",
               "augmented": state.get("augmented"), "cost": retrain_plan(ctx)}
    decision = parse_decision(interrupt(payload))  # nothing with side effects before this line
    if decision["decision"] == "edit":
        decision["decision"] = "approve"   # there is nothing to edit at this stage
    record_approval(ctx.pipeline.store, "retrain", decision, [], [])
    return {"approvals": {"retrain": decision["decision"]}}


# ---------------------------------------------------------------- repair
def augmented_dir(store) -> Path:
    """Where the audit commits its augmented set: inside its run folder, like everything it writes."""
    from aspire.workflows.repair import RUN_SET

    return store.run_dir / RUN_SET


def generate(state: AuditState, runtime: Runtime[AuditContext]) -> dict:
    """The augmented set: images without the approved spurious features (aspire.workflows.repair)."""
    from aspire.progress import step_progress

    ctx = runtime.context
    store = ctx.pipeline.store
    done = store.meta("augmented")
    if not (done and Path(done.dir).is_dir()):
        features = set(state.get("features", []))
        edits = sum(len(f.evidence_edits) for f in store.all("finding", Finding) if f.key in features)
        if not edits:
            reason = "the approved features have no edits to generate from"
            _stage(store, "generate", n_images=0, reason=reason)
            return {"augmented": {"dir": "", "n_images": 0, "per_class": {}, "reason": reason}}
        from aspire.workflows.repair import augment_run

        augment_run(store.run_dir, augmented_dir(store), ctx.config, ctx.seed, groups=sorted(features),
                    progress=step_progress if ctx.progress else None, pipeline=ctx.pipeline)
        done = store.meta("augmented")
    summary = {"dir": done.dir, "n_images": done.n_images, "per_class": done.per_class}
    _stage(store, "generate", n_images=summary["n_images"], reason=f"{summary['n_images']} images in {summary['dir']}")
    return {"augmented": summary}


def retrained(store) -> Optional[str]:
    """The retrained checkpoint of meta `models`, when its file is there."""
    after = store.meta("models", Models()).after
    return after if after and Path(after).is_file() else None


def retrain(state: AuditState, runtime: Runtime[AuditContext]) -> dict:
    """Re-train the classifier on the training split plus the generated images; skipped when already done."""
    ctx = runtime.context
    store = ctx.pipeline.store
    if retrained(store):
        return {"models": store.get_meta("models")}
    from aspire.data.augmented import load_augmented
    from aspire.models.classifier import save_checkpoint
    from aspire.models.methods import Augmentation
    from aspire.workflows.retrain import retrain as train

    # 1. how to train: the audited model's recipe unless the settings say otherwise
    plan = retrain_plan(ctx)
    augdir = state["augmented"]["dir"]
    augmentation = Augmentation(augdir, samples=list(load_augmented(augdir)), ratio=ctx.config.agent.augment_ratio)
    # 2. train and save atomically
    clf = train(ctx.pipeline.classifier, ctx.dataset, plan, augmentation, seed=ctx.seed,
                device=ctx.config.agent.device, progress=ctx.progress)
    after = save_checkpoint(clf, store.folder("models") / "after.pt")
    models = {"before": ctx.model_path, "after": str(after)}
    store.set_meta("models", models)
    _stage(store, "retrain", method=plan["method"], epochs=plan["epochs"], seconds=clf.train_info.get("total_seconds"))
    return {"models": models}


def evaluate(state: AuditState, runtime: Runtime[AuditContext]) -> dict:
    """Worst-group and average accuracy before (and after, when retrained) on the test split (else val)."""
    from aspire.models.classifier import load_checkpoint
    from aspire.models.evaluate import evaluate as evaluate_split

    ctx = runtime.context
    store = ctx.pipeline.store
    ds = ctx.dataset
    split = next((s for s in ("test", "val") if ds.split(s, allow_empty=True)), None)
    if split is None:
        _stage(store, "evaluate", reason=f"{ds.source}: no test or validation split to evaluate on")
        return {"accuracy": None}
    recorded = store.get_meta("evaluation") or {}
    results: dict[str, Any] = {}
    results["before"] = recorded.get("before") or evaluate_split(ctx.pipeline.classifier, ds, split).model_dump()
    after = retrained(store)
    if after:
        results["after"] = recorded.get("after") or evaluate_split(
            load_checkpoint(after, device=ctx.config.agent.device), ds, split).model_dump()
    store.set_meta("evaluation", results)
    summary = {"split": split, **{k: {"worst_group_accuracy": v["worst_group_accuracy"],
                                      "average_accuracy": v["average_accuracy"], "worst_group": v["worst_group"]}
                                  for k, v in results.items()}}
    return {"accuracy": summary}


def reprobe(state: AuditState, runtime: Runtime[AuditContext]) -> dict:
    """Did the repair remove the reliance? Every stored edit and control scored on the retrained model."""
    from aspire.models.classifier import load_checkpoint

    ctx = runtime.context
    store = ctx.pipeline.store
    path = store.meta("models").after
    findings = ctx.pipeline.reprobe(load_checkpoint(path, device=ctx.config.agent.device), path)
    verdicts = store.meta("reprobe").verdicts
    _stage(store, "reprobe", model=path, verdicts=verdicts)
    return {"reprobe": {"model": path, "verdicts": verdicts,
                        "still_spurious": sum(1 for f in findings if f.after and f.after.spurious)}}


def report(state: AuditState, runtime: Runtime[AuditContext]) -> dict:
    """The HTML / Markdown / JSON report from the run store (aspire.report)."""
    from aspire.report import build_report

    paths = build_report(runtime.context.pipeline.store.run_dir)
    return {"report": {k: str(v) for k, v in paths.items()}}


# ---------------------------------------------------------------- routers
def route_after_hypothesize(state: AuditState) -> Literal["probe", "review"]:
    return "review" if state.get("stop_reason") or not state.get("hypotheses") else "probe"


def route_after_probe(state: AuditState) -> Literal["hypothesize", "review"]:
    return "review" if state.get("stop_reason") else "hypothesize"


def route_after_review(state: AuditState) -> Literal["generate", "evaluate"]:
    return "generate" if state.get("features") else "evaluate"


def route_after_generate(state: AuditState) -> Literal["commit", "evaluate"]:
    return "commit" if (state.get("augmented") or {}).get("n_images") else "evaluate"


def route_after_evaluate(state: AuditState) -> Literal["reprobe", "report"]:
    after = (state.get("models") or {}).get("after")
    return "reprobe" if after and Path(after).is_file() else "report"


def route_after_commit(state: AuditState) -> Literal["retrain", "evaluate"]:
    return "retrain" if state.get("approvals", {}).get("retrain") == "approve" else "evaluate"

"""What a batch runs in its workers (in-process, a process pool, or Ray tasks): module-level functions of
picklable arguments that return plain dicts. An audit's ordinary failure is returned as
{"ok": False, "error": one line, "traceback": ...}, never raised: only a crashed worker raises.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from aspire.config import AspireConfig
from aspire.errors import AspireError, error_line

_CACHE: dict[tuple, Any] = {}   # a worker process loads the dataset and the classifier once


@dataclass
class Inputs:
    """What every task of a batch works on."""

    batch_dir: str
    data: str
    format: str
    model: str
    attr: Optional[str]
    target: Optional[str]
    seed: int
    config: AspireConfig
    threads: Optional[int] = None          # torch threads in a pool or Ray worker (None: torch's default)

    def run_args(self, classes: list[str]):
        """A class run's meta "args": exactly what `aspire audit --classes ...` records."""
        from aspire.workflows.runs import RunArgs

        return RunArgs(data=self.data, format=self.format, model=self.model, classes=classes, seed=self.seed,
                       attr=self.attr, target=self.target)


@dataclass
class UnitJob:
    inputs: Inputs
    unit: str
    classes: list[str]
    run_dir: str
    repair: bool = False
    evaluation_before: Optional[dict] = field(default=None, repr=False)


def _where() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _threads(n: Optional[int]) -> None:
    if n:
        import torch

        torch.set_num_threads(max(1, int(n)))


def load_inputs(inputs: Inputs, device: Optional[str] = None):
    """(dataset, classifier), cached per process by their paths and the checkpoint's modification time."""
    from aspire.data.formats import load_dataset
    from aspire.models.classifier import load_checkpoint

    key = (inputs.data, inputs.format, inputs.attr, inputs.target, inputs.model,
           Path(inputs.model).stat().st_mtime_ns if Path(inputs.model).is_file() else None, device)
    if key not in _CACHE:
        _CACHE.clear()
        dataset = load_dataset(inputs.data, inputs.format, attr=inputs.attr, target=inputs.target)
        _CACHE[key] = (dataset, load_checkpoint(inputs.model, device=device))
    return _CACHE[key]


def eval_split(dataset) -> Optional[str]:
    """The split the audit's evaluate node uses: test, else val (None: neither)."""
    return next((s for s in ("test", "val") if dataset.split(s, allow_empty=True)), None)


# ---------------------------------------------------------------- the audited classifier, evaluated once
def evaluate_before(inputs: Inputs) -> dict:
    """EvalResult (as JSON) of the audited classifier on the evaluation split; every class run reuses it."""
    from aspire.models.evaluate import evaluate

    _threads(inputs.threads)
    dataset, clf = load_inputs(inputs)   # as the audit's classifier (the evaluate node's 'before')
    split = eval_split(dataset)
    return {"result": None if split is None else evaluate(clf, dataset, split).model_dump(mode="json"), **_where()}


# ---------------------------------------------------------------- one audit: probe + review (+ generate)
def batch_approver(repair: bool):
    """A batch's approvals, recorded as automatic: with --repair the spurious findings are approved for
    generation (the class's augmented set) and retraining is declined (the batch retrains once, over the union);
    without it generation is declined too."""
    def approve(payload: dict) -> dict:
        if payload.get("stage") == "generate" and repair:
            return {"decision": "approve", "auto": True}
        return {"decision": "reject", "auto": True}
    return approve


def run_unit(job: UnitJob) -> dict:
    """Run or resume one audit in job.run_dir (the agent graph, checkpointed); never raises for its failure."""
    started = time.time()
    store = None
    try:
        from aspire.agent import audit_context, make_planner, run_audit, thread_id
        from aspire.agent.llm_planner import planner_record
        from aspire.provenance import run_record
        from aspire.workflows.runs import open_run

        # 1. inputs, and the class's run folder (new, or resumed from its store and checkpoints)
        _threads(job.inputs.threads)
        cfg = job.inputs.config
        dataset, clf = load_inputs(job.inputs)
        store = open_run(job.run_dir, "audit", job.inputs.run_args(job.classes),
                         hint="remove it or use another batch folder")
        if store.get_meta("record") is None:
            planner = planner_record(cfg.agent)
            store.set_meta("record", run_record(cfg, seed=job.inputs.seed, planner=planner,
                                                classifier={"arch": clf.arch, "classes": clf.class_names},
                                                batch={"dir": job.inputs.batch_dir, "unit": job.unit}))
        store.set_meta("batch", {"dir": job.inputs.batch_dir, "unit": job.unit, "repair": job.repair,
                                 "retraining": "deferred to the batch" if job.repair else "none"})
        if store.get_meta("evaluation") is None and job.evaluation_before:
            store.set_meta("evaluation", {"before": job.evaluation_before})   # the evaluate node reuses it
        thread_id(store)

        # 2. the audit graph, every interrupt answered by the batch
        ctx = audit_context(dataset, clf, cfg, store, model_path=job.inputs.model, classes=job.classes,
                            seed=job.inputs.seed, progress=False, planner=make_planner(cfg.agent)[0])
        result = run_audit(ctx, approve=batch_approver(job.repair))
        if result.status != "done":
            raise AspireError(f"{job.run_dir}: the audit stopped at {result.status}")
        state = result.state
        return {"ok": True, "unit": job.unit, "seconds": time.time() - started, **_where(),
                "findings": [f.to_json() for f in result.findings], "report": state.get("report") or {},
                "augmented": state.get("augmented"), "stop_reason": state.get("stop_reason"),
                "rounds": state.get("round", 0), "counts": state.get("counts", {})}
    except Exception as e:  # noqa: BLE001 - a failed audit is reported, never kills the batch
        return {"ok": False, "unit": job.unit, "seconds": time.time() - started, **_where(),
                "error": error_line(e), "traceback": traceback.format_exc()}
    finally:
        if store is not None:
            store.close()


# ---------------------------------------------------------------- --repair: one retraining over the union
def repair(inputs: Inputs, augmented_dirs: list[str], out_dir: str) -> dict:
    """Train one classifier on the training split plus every class's augmented set (the audited model's
    recipe unless agent.retrain_* say otherwise), save it to out_dir/after.pt and evaluate it. Skips a
    checkpoint already there."""
    from aspire.data.augmented import load_augmented
    from aspire.models.classifier import load_checkpoint, save_checkpoint
    from aspire.models.evaluate import evaluate
    from aspire.models.methods import Augmentation
    from aspire.workflows.retrain import retrain, retrain_plan

    _threads(inputs.threads)
    cfg = inputs.config
    device = cfg.agent.device
    dataset, before = load_inputs(inputs)
    # 1. the union of the augmented sets
    samples = []
    for d in augmented_dirs:
        samples += load_augmented(d, class_names=before.class_names)
    # 2. how to train: what the audit's retrain node does
    plan = retrain_plan(cfg, before, dataset)
    after_path = Path(out_dir) / "after.pt"
    seconds = None
    if not after_path.is_file():
        augmentation = Augmentation(str(Path(inputs.batch_dir) / "runs"), samples=samples,
                                    ratio=cfg.agent.augment_ratio)
        clf = retrain(before, dataset, plan, augmentation, seed=inputs.seed, device=device)
        seconds = clf.train_info.get("total_seconds")
        save_checkpoint(clf, after_path)
    # 3. evaluate on the split the audits used
    split = eval_split(dataset)
    after = None
    if split is not None:
        after = evaluate(load_checkpoint(after_path, device=device), dataset, split).model_dump(mode="json")
    return {"models": {"before": inputs.model, "after": str(after_path)}, "plan": plan, "after": after,
            "augmented": {"dirs": list(augmented_dirs), "n_images": len(samples)}, "train_seconds": seconds,
            **_where()}


# ---------------------------------------------------------------- --repair: each class run re-probed on the new model
def reprobe_unit(inputs: Inputs, run_dir: str, model: str) -> dict:
    """Score a class run's stored edits on the batch's retrained classifier (findings[].after), and render its
    report again; returns the verdicts, or {"error": one line} (never raises for the run's failure)."""
    store = None
    try:
        from aspire.models.classifier import load_checkpoint
        from aspire.report import build_report
        from aspire.workflows.probe import ProbePipeline
        from aspire.workflows.runs import existing_run, recorded_args

        _threads(inputs.threads)
        dataset, clf = load_inputs(inputs)
        store = existing_run(run_dir)
        pipeline = ProbePipeline(dataset, clf, inputs.config, store, classes=recorded_args(store).classes,
                                 seed=inputs.seed)
        pipeline.reprobe(load_checkpoint(model, device=inputs.config.agent.device), model)
        verdicts = store.meta("reprobe").verdicts
        store.close()
        store = None
        try:   # the scores are recorded: a report that cannot be rendered does not undo them
            build_report(run_dir)
            report_error = None
        except Exception as e:  # noqa: BLE001 - recorded beside the verdicts
            report_error = error_line(e)
        return {"ok": True, "verdicts": verdicts, "report_error": report_error, **_where()}
    except Exception as e:  # noqa: BLE001 - reported per class; the batch's other results stand
        return {"ok": False, "error": error_line(e), "traceback": traceback.format_exc(), **_where()}
    finally:
        if store is not None:
            store.close()

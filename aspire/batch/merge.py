"""The batch's results in one summary (BATCH_DIR/batch.json): per class its status, findings, accuracy before
(and after, when the batch retrained), run folder and report paths, ranked by the strongest finding.

Ranking: classes with a spurious finding first, by the effect of their top spurious finding (the mean paired drop
of the true class's probability, real edit minus its control), strongest first; then finished classes without one; then failed and unfinished classes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from aspire.batch.state import BatchStore, all_units
from aspire.errors import AspireError
from aspire.schemas import EvalResult, Finding
from aspire.store import RunStore
from aspire.tools.probe import rank_key


def class_accuracy(result: Optional[dict], class_index: int) -> Optional[dict]:
    """A class's accuracy (over its groups) and its worst group, from an EvalResult's groups."""
    if not result:
        return None
    r = EvalResult.model_validate(result)
    groups = [g for g in r.groups if g.y == class_index]
    n = sum(g.n for g in groups)
    if not n:
        return None
    worst = min(groups, key=lambda g: g.accuracy)
    return {"accuracy": sum(g.correct for g in groups) / n, "n": n, "worst_group": worst.key,
            "worst_group_accuracy": worst.accuracy}


def overall_accuracy(result: Optional[dict]) -> Optional[dict]:
    if not result:
        return None
    r = EvalResult.model_validate(result)
    return {"split": r.split, "worst_group_accuracy": r.worst_group_accuracy, "average_accuracy": r.average_accuracy,
            "weighted_average_accuracy": r.weighted_average_accuracy, "worst_group": r.worst_group, "n": r.n}


def _run_outputs(run_dir: Path) -> tuple[list[Finding], dict, Optional[dict]]:
    """(findings, report paths, meta "augmented") of a class run folder; empty when it has no store yet."""
    if not (run_dir / RunStore.DB_NAME).is_file():
        return [], {}, None
    store = RunStore(run_dir)
    try:
        findings = store.all("finding", Finding)
        augmented = store.get_meta("augmented")
    finally:
        store.close()
    report = {k: str(run_dir / "report" / f"report.{k}") for k in ("html", "md", "json")
              if (run_dir / "report" / f"report.{k}").is_file()}
    return findings, report, augmented if isinstance(augmented, dict) else None


def _rank_key(row: dict) -> tuple:
    top = row["top_finding"]
    finished = row["status"] == "done"
    return (not finished, top is None, -(top["effect"] if top else 0.0), row["class_index"])


def merge_batch(batch_dir: str | Path) -> dict[str, Any]:
    """The summary of the batch in `batch_dir`, from its store and its class runs (nothing is recomputed)."""
    batch_dir = Path(batch_dir).expanduser().resolve()
    if not (batch_dir / BatchStore.DB_NAME).is_file():
        raise AspireError(f"{batch_dir}: not a batch folder (no {BatchStore.DB_NAME}); run aspire batch first")
    store = BatchStore(batch_dir)
    try:
        args = store.get_meta("args") or {}
        record = store.get_meta("record") or {}
        names = list((record.get("classifier") or {}).get("classes") or [])
        units = all_units(store)
        before = store.get_meta("evaluation_before")
        repair = store.get_meta("repair")
        reprobe = store.get_meta("reprobe")
        status = store.get_meta("status") or "running"
        attempts = store.events("attempt")
    finally:
        store.close()
    after = (repair or {}).get("after") if isinstance(repair, dict) else None

    # 1. one row per class, from its unit's state and run folder
    rows, approved = [], []
    for u in units:
        findings, report, augmented = _run_outputs(Path(u.run_dir))
        for name in u.classes:
            index = names.index(name) if name in names else -1
            mine = sorted((f for f in findings if f.class_index == index), key=rank_key)
            spurious = [f for f in mine if f.spurious]
            top = spurious[0] if spurious else None
            approved += [f.key for f in spurious]
            rows.append({
                "class": name, "class_index": index, "unit": u.unit, "status": u.status, "attempts": u.attempts,
                "error": u.error, "run_dir": u.run_dir, "started": u.started, "finished": u.finished,
                "seconds": u.seconds, "host": u.host,
                "findings": [f.to_json() for f in mine], "n_findings": len(mine), "n_spurious": len(spurious),
                "top_finding": None if top is None else {
                    "phrase": top.phrase, "kind": top.kind, "flip_rate": top.flip_rate,
                    "control_flip_rate": top.control_flip_rate, "effect": top.effect, "effect_ci": top.effect_ci,
                    "q_value": top.q_value, "p_value": top.p_value,
                    "occurrences": top.occurrences, "after": None if top.after is None else top.after.model_dump()},
                "accuracy": {"before": class_accuracy(before, index), "after": class_accuracy(after, index)},
                "report": report,
                "augmented": None if augmented is None else {"dir": augmented.get("dir"),
                                                             "n_images": augmented.get("n_images")},
            })
    rows.sort(key=_rank_key)
    for i, row in enumerate(rows, 1):
        row["rank"] = i

    # 2. the batch as a whole
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in ("done", "failed", "running", "pending")}
    return {
        "batch_dir": str(batch_dir), "status": status, "generated": time.time(), "args": args,
        "counts": {**counts, "classes": len(rows), "findings": sum(r["n_findings"] for r in rows),
                   "spurious": sum(r["n_spurious"] for r in rows)},
        "classes": rows,
        "approved_findings": approved,
        "accuracy": {"before": overall_accuracy(before), "after": overall_accuracy(after)},
        "repair": repair,
        "reprobe": reprobe,
        "units": [u.model_dump(mode="json") for u in units],
        "attempts": attempts,
    }

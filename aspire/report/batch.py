"""The batch report: one overview across classes, ranked by their strongest spurious finding, a section per
class linking to its own run report, and the batch's retraining (--repair) when it ran.

    build_batch_report(summary, out_dir=None) -> {"html": .., "md": .., "json": ..}

From the batch's merged summary (aspire.batch.merge.merge_batch), writes BATCH_DIR/batch.json (the summary
plus the report paths) and, by default into
BATCH_DIR/report/, batch.html (self-contained: no images, links to the class reports) and batch.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from aspire.atomic import write_json, write_text
from aspire.report.text import fmt_acc, fmt_delta, fmt_p, fmt_rate, fmt_time, template_env

JSON_NAME = "batch.json"


def _link(target: Optional[str], base: Path) -> Optional[str]:
    """A path relative to the report folder (so a moved batch folder keeps its links)."""
    if not target:
        return None
    return Path(os.path.relpath(target, base)).as_posix()


def _acc_cell(acc: dict, key: str = "accuracy") -> dict:
    before, after = (acc.get("before") or {}).get(key), (acc.get("after") or {}).get(key)
    return {"before": fmt_acc(before), "after": fmt_acc(after) if after is not None else None,
            "delta": fmt_delta(before, after)}


def batch_context(summary: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """What the batch templates show, as display strings and relative links."""
    rows = []
    for r in summary["classes"]:
        top = r["top_finding"]
        anchor = f"class-{r['rank']}"
        findings = [{**f, "flip_rate_s": fmt_rate(f["flip_rate"]), "control_flip_rate_s": fmt_rate(f["control_flip_rate"]),
                     "effect_s": _effect(f), "q_value_s": fmt_p(f["q_value"])}
                    for f in r["findings"]]
        rows.append({
            **r, "anchor": anchor, "findings": findings,
            "top": None if top is None else {**top, "effect_s": _effect(top),
                                            "flip_rate_s": fmt_rate(top["flip_rate"]),
                                            "control_flip_rate_s": fmt_rate(top["control_flip_rate"]),
                                            "q_value_s": fmt_p(top["q_value"])},
            "acc": _acc_cell(r["accuracy"]),
            "report_html": _link(r["report"].get("html"), out_dir), "report_md": _link(r["report"].get("md"), out_dir),
            "run_link": _link(r["run_dir"], out_dir),
            "seconds_s": "" if r["seconds"] is None else f"{r['seconds']:.1f} s",
            "finished_s": fmt_time(r["finished"]),
        })
    acc = summary["accuracy"]
    overall = [{"metric": label, **_acc_cell(acc, key)}
               for key, label in (("worst_group_accuracy", "worst-group accuracy"), ("average_accuracy", "average accuracy"))]
    repair = summary.get("repair") if isinstance(summary.get("repair"), dict) else None
    args = summary["args"]
    return {
        "title": "ASPIRE batch report",
        "generated": fmt_time(summary["generated"]),
        "batch_dir": summary["batch_dir"], "status": summary["status"], "counts": summary["counts"],
        "args": [{"key": k, "value": ", ".join(v) if isinstance(v, list) else str(v)} for k, v in args.items()
                 if v is not None],
        "repair_requested": bool(args.get("repair")),
        "rows": rows,
        "overall": overall, "split": (acc.get("before") or acc.get("after") or {}).get("split"),
        "has_after": acc.get("after") is not None,
        "repair": repair,
        "repair_model": _link(((repair or {}).get("models") or {}).get("after"), out_dir),
    }


def _effect(f: dict) -> str:
    """A finding's effect, and after the batch's repair its effect on the retrained model and the verdict."""
    after = f.get("after")
    text = f"{f['effect']:+.3f}"
    if after:
        text += f" → {after['effect']:+.3f}" + (f" ({after['verdict']})" if after.get("verdict") else "")
    return text


def build_batch_report(summary: dict, out_dir: Optional[str | Path] = None) -> dict[str, Path]:
    """Write batch.json, batch.html and batch.md of a merged batch summary; returns their paths."""
    summary = dict(summary)
    root = Path(summary["batch_dir"])
    out = Path(out_dir).expanduser().resolve() if out_dir else root / "report"
    paths = {"html": out / "batch.html", "md": out / "batch.md", "json": root / JSON_NAME}
    summary["paths"] = {k: str(v) for k, v in paths.items()}
    ctx = batch_context(summary, out)
    write_text(paths["html"], template_env(html=True).get_template("batch.html.j2").render(**ctx))
    write_text(paths["md"], template_env(html=False).get_template("batch.md.j2").render(**ctx))
    write_json(paths["json"], summary)
    return paths


__all__ = ["build_batch_report", "batch_context"]

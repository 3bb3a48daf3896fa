"""What the commands print: results on stdout (tables, JSON), logs and warnings on stderr."""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import typer
from rich.console import Console

from aspire.cli.options import FAIL_EXIT

# results and logs; written to a file or a pipe, lines are not cut or wrapped at 80 columns (rich's default)
PIPE_WIDTH = 200
out = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)
err = Console(stderr=True, width=None if sys.stderr.isatty() else PIPE_WIDTH)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()



def eval_table(result: Any, title: str) -> None:
    """Per-group accuracy table and the three summaries, on stdout."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("group")
    table.add_column("n", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("train share", justify="right")
    for g in result.groups:
        share = "" if g.train_fraction is None else f"{g.train_fraction:.3f}"
        style = "bold red" if g.key == result.worst_group else None
        table.add_row(g.key, str(g.n), f"{g.accuracy:.4f}", share, style=style)
    out.print(table)
    out.print(f"worst-group accuracy  {result.worst_group_accuracy:.4f}  ({result.worst_group})", highlight=False)
    out.print(f"average accuracy      {result.average_accuracy:.4f}  (n={result.n})", highlight=False)
    out.print(f"weighted average      {result.weighted_average_accuracy:.4f}  (training-group shares)", highlight=False)


def findings_table(findings: list, title: str) -> None:
    """The findings; once re-probed after a repair, with the effect after and the verdict."""
    from rich.table import Table

    after = any(f.after is not None for f in findings)
    table = Table(title=title, title_justify="left")
    columns = [("class", "left"), ("phrase", "left"), ("kind", "left"), ("edits", "right"),
               ("effect [95% CI]", "right"), ("q", "right"), ("flips / ctrl", "right"), ("spurious", "left")]
    for col, justify in columns + ([("after", "right"), ("verdict", "left")] if after else []):
        table.add_column(col, justify=justify)
    for f in findings:
        lo, hi = f.effect_ci
        cells = [f.class_, f.phrase, "bg" if f.kind == "background" else "fg", str(f.occurrences),
                 f"{f.effect:+.2f} [{lo:+.2f},{hi:+.2f}]", f"{f.q_value:.1g}",
                 f"{f.flip_rate:.2f}/{f.control_flip_rate:.2f}", ("joint" if f.joint else "yes") if f.spurious else ""]
        if after:
            cells += ["" if f.after is None else f"{f.after.effect:+.2f}", (f.after and f.after.verdict) or ""]
        table.add_row(*cells, style="bold" if f.spurious or (f.after and f.after.spurious) else None)
    out.print(table)


def gate(findings: list, fail_on: Optional[str]) -> None:
    """--fail-on: exit FAIL_EXIT (after the results were printed) when a confirmed finding remains."""
    from aspire.tools.probe import remaining

    if fail_on is None:
        return
    left = remaining(findings, None if fail_on == "spurious" else float(fail_on))
    if left:
        names = ", ".join(f"{f.class_}: {f.phrase} {(f.after or f).effect:+.2f}" for f in left[:5])
        more = f" and {len(left) - 5} more" if len(left) > 5 else ""
        err.print(f"fail-on {fail_on}: {len(left)} confirmed spurious finding(s) remain ({names}{more})",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(FAIL_EXIT)


def accuracy_line(accuracy: Optional[dict]) -> str:
    if not accuracy:
        return "no evaluation (nothing to evaluate on)"
    before, after = accuracy.get("before") or {}, accuracy.get("after")
    text = f"worst-group accuracy ({accuracy['split']}): {before.get('worst_group_accuracy', float('nan')):.4f}"
    if after:
        text += (f" → {after['worst_group_accuracy']:.4f}; average {before['average_accuracy']:.4f} → "
                 f"{after['average_accuracy']:.4f}")
    else:
        text += f" (not retrained); average {before.get('average_accuracy', float('nan')):.4f}"
    return text


def verdict_line(verdicts: dict) -> str:
    order = ("removed", "reduced", "unchanged", "new")
    counts = ", ".join(f"{verdicts[v]} {v}" for v in order if verdicts.get(v)) or "no finding confirmed before or after"
    return f"re-probed on the repaired model: {counts}"


def audit_summary(result: Any, json_out: bool) -> None:
    """The audit's result on stdout: JSON, or the findings table and the repair's outcome."""
    s = result.to_json()
    if json_out:
        print_json(s)
        return
    spurious = [f for f in result.findings if f.spurious]
    findings_table(result.findings, f"findings ({len(spurious)} spurious)")
    out.print(f"{s['rounds']} planning rounds; stopped: {s['stop_reason']}", highlight=False, soft_wrap=True)
    out.print(f"approvals: {', '.join(f'{k} {v}' for k, v in (s['approvals'] or {}).items()) or 'none'}",
              highlight=False)
    if s["augmented"]:
        out.print(f"generated images: {s['augmented']['n_images']} in {s['augmented']['dir']}", highlight=False)
    out.print(accuracy_line(s["accuracy"]), highlight=False, soft_wrap=True)
    if s["reprobe"]:
        out.print(verdict_line(s["reprobe"]["verdicts"]), highlight=False, soft_wrap=True)
    if s["report"]:
        out.print(f"report: {s['report'].get('html')}", highlight=False, soft_wrap=True)
    out.print(f"run: {result.run_dir}", highlight=False, soft_wrap=True)

"""aspire batch: one audit per class, merged and ranked."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from aspire.cli.app import app
from aspire.cli.options import (Annotations, Attr, Classes, ConfigFile, Data, FailOn, Format, Json, Model, Offline,
                                Seed, Target, split_classes)
from aspire.cli.render import err, gate, out, print_json
from aspire.cli.runs import default_run_dir, probe_config


# ---------------------------------------------------------------- batch (aspire.batch)
@app.command("batch")
def batch_cmd(
    data: Data = ...,
    model: Model = ...,
    format: Format = "waterbirds",
    attr: Attr = None,
    target: Target = None,
    annotations: Annotations = None,
    classes: Classes = None,
    group_size: int = typer.Option(1, "--group-size", min=1, help="classes per audit (default 1: one audit per class)"),
    executor: Optional[Literal["local", "ray"]] = typer.Option(None, "--executor",
                                                               help="default: batch.executor (local)"),
    address: Optional[str] = typer.Option(None, "--address", help="ray: cluster address ('auto', 'ray://HOST:10001'); "
                                          "default: a local Ray"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="audits at a time; local: 1 runs them in-process, "
                                          "N > 1 in a process pool; ray: default the cluster's CPUs / batch.num_cpus"),
    retries: Optional[int] = typer.Option(None, "--retries", min=0, help="retries of a failed class (default: batch.retries, 1)"),
    repair: bool = typer.Option(False, "--repair", help="generate images per class from its spurious findings, then "
                                "retrain ONE classifier on the union and evaluate it"),
    out_dir: Optional[Path] = typer.Option(None, "--run-dir", "--out", help="batch folder (default: "
                                           "runs/batch-<time>); an existing one is resumed (--out: the old name)"),
    config_file: ConfigFile = None,
    seed: Seed = 0,
    offline: Offline = False,
    yes: bool = typer.Option(False, "--yes", "-y", help="accepted for symmetry with aspire audit: a batch never asks"),
    json_out: Json = False,
    fail_on: FailOn = None,
) -> None:
    """One audit per class (or per --group-size classes), each in its own resumable run folder
    OUT/runs/<class>/, merged into OUT/batch.json and OUT/report/batch.html, ranked by the strongest finding.

    A batch never asks: every approval is given automatically and recorded as automatic, with or without --yes.

    Each audit probes and reviews its class without retraining (a classifier per class would be wasted work).
    With --repair each audit also generates its class's images without its approved (spurious) features, and
    once every class is done the batch retrains ONE classifier on the union (OUT/repair/after.pt).

    A failed class is retried (--retries), then reported with its error while the others finish (exit code 1).
    Re-running the same command skips finished classes and resumes the others.

    --executor ray runs each audit as a Ray task with batch.num_cpus / batch.num_gpus (pip install ray): on a
    local Ray, or on a cluster (--address) whose nodes see the data, the model and OUT at the same paths.
    """
    from aspire.batch import run_batch
    from aspire.errors import ConfigError

    # 1. settings: the config file, then the flags
    cfg = probe_config(config_file, annotations, data)
    if offline:
        cfg.agent.offline = True
    for key, value in (("executor", executor), ("address", address), ("workers", workers), ("retries", retries)):
        if value is not None:
            try:
                setattr(cfg.batch, key, value)
            except ValueError:
                raise ConfigError(f"--{key} {value!r}: expected " + ("local or ray" if key == "executor" else "a valid value")) from None
    if address is not None and cfg.batch.executor != "ray":
        raise ConfigError("--address is for --executor ray")
    # 2. run (or resume), merge, report
    result = run_batch(out_dir or default_run_dir("batch"), data=data, model=model, format=format, attr=attr,
                       target=target, classes=split_classes(classes), group_size=group_size, seed=seed, config=cfg,
                       repair=repair, console=err)
    s = result.summary
    if json_out:
        print_json(s)
    else:
        from rich.table import Table

        table = Table(title=f"batch: {s['counts']['done']} of {s['counts']['classes']} classes done, "
                      f"{s['counts']['spurious']} spurious findings", title_justify="left")
        for col, justify in (("#", "right"), ("class", "left"), ("status", "left"), ("top spurious finding", "left"),
                             ("effect", "right"), ("spurious", "right"), ("attempts", "right"), ("error", "left")):
            table.add_column(col, justify=justify)
        for r in s["classes"]:
            top = r["top_finding"]
            effect = "" if not top else f"{top['effect']:.2f}" + (
                f" → {top['after']['effect']:.2f} {top['after']['verdict'] or ''}" if top.get("after") else "")
            table.add_row(str(r["rank"]), r["class"], r["status"], f"{top['phrase']} ({top['kind']})" if top else "",
                          effect, f"{r['n_spurious']}/{r['n_findings']}",
                          str(r["attempts"]), r["error"] or "", style="bold" if top else None)
        out.print(table)
        after = s["accuracy"].get("after")
        if after:
            before = s["accuracy"]["before"] or {}
            out.print(f"retrained once ({after['split']}): worst-group {before.get('worst_group_accuracy', float('nan')):.4f}"
                      f" → {after['worst_group_accuracy']:.4f}; average {before.get('average_accuracy', float('nan')):.4f}"
                      f" → {after['average_accuracy']:.4f}", highlight=False, soft_wrap=True)
        elif isinstance(s.get("repair"), dict) and s["repair"].get("reason"):
            out.print(f"repair: {s['repair']['reason']}", highlight=False, soft_wrap=True)
        out.print(f"report: {result.paths['html']}", highlight=False, soft_wrap=True)
        out.print(f"batch: {result.batch_dir}", highlight=False, soft_wrap=True)
    unprobed = (s.get("reprobe") or {}).get("errors") or {}
    if not result.failed and not unprobed:
        from aspire.schemas import Finding

        gate([Finding.model_validate(f) for r in s["classes"] for f in r["findings"]], fail_on)
    if result.failed:
        err.print(f"[red]error:[/red] {len(result.failed)} class(es) failed ({', '.join(result.failed)}); re-run the "
                  "same command to retry them", highlight=False, soft_wrap=True)
    for unit, error in unprobed.items():
        err.print(f"[red]error:[/red] the re-probe of {unit} on the retrained model failed ({error}); re-run the same "
                  "command to retry it", highlight=False, soft_wrap=True)
    if result.failed or unprobed:
        raise typer.Exit(1)

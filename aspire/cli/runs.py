"""Commands over a run folder without the agent: probe (steps 1-4), reprobe, report, augment (step 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from aspire.cli.app import app
from aspire.cli.options import (Annotations, Attr, Classes, ConfigFile, Data, Device, FailOn, Format, Json,
                                Model, RetrySkipped, RunDir, Seed, Target, split_classes)
from aspire.cli.render import err, findings_table, gate, out, print_json, verdict_line


# ---------------------------------------------------------------- run folders and settings
def probe_config(config_file: Optional[Path], annotations: Optional[Path], data: Path):
    """The run's settings: the annotations file feeds the offline caption and ground backends."""
    from aspire.config import load_config
    from aspire.errors import ConfigError, DataError

    if not Path(data).expanduser().is_dir():
        raise DataError(f"{Path(data).expanduser().resolve()}: dataset folder does not exist")
    cfg = load_config(config_file)
    ann = annotations or (data / "annotations.jsonl" if (data / "annotations.jsonl").is_file() else None)
    for concern in (cfg.caption, cfg.ground):
        if concern.backend == "annotations" and concern.annotations is None:
            if ann is None:
                raise ConfigError(f"the annotations backends need --annotations FILE (none in {data}); "
                                  "or choose real backends in --config")
            concern.annotations = str(Path(ann).resolve())
    return cfg


def default_run_dir(kind: str) -> Path:
    import time

    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def open_cli_run(run_dir: Path, kind: str, args: "Any") -> "Any":
    """Open (or resume) a run folder; a run of another kind or other inputs in the same folder is refused."""
    from aspire.store import RunStore
    from aspire.workflows.runs import open_run

    resuming = (run_dir / RunStore.DB_NAME).is_file()
    store = open_run(run_dir, kind, args)
    if resuming:
        err.print(f"resuming the run in {run_dir}", highlight=False)
    return store


# ---------------------------------------------------------------- probe (steps 1-4, no agent)
@app.command("probe")
def probe_cmd(
    data: Data = ...,
    format: Format = "waterbirds",
    attr: Attr = None,
    target: Target = None,
    model: Model = ...,
    annotations: Annotations = None,
    classes: Classes = None,
    run_dir: RunDir = None,
    config_file: ConfigFile = None,
    seed: Seed = 0,
    device: Device = None,
    json_out: Json = False,
    fail_on: FailOn = None,
    retry_skipped: RetrySkipped = False,
) -> None:
    """Steps 1-4 of the method as a plain pipeline: hold-out, caption, phrases, edits, probe with controls."""
    from aspire.data.formats import load_dataset
    from aspire.models.classifier import load_checkpoint
    from aspire.progress import step_progress
    from aspire.provenance import run_record
    from aspire.workflows.probe import ProbePipeline
    from aspire.workflows.runs import RunArgs, check_probe_inputs

    # 1. inputs and settings
    ds = load_dataset(data, format, attr=attr, target=target)
    cfg = probe_config(config_file, annotations, data)
    clf = load_checkpoint(model, device=device)
    classes = split_classes(classes)
    check_probe_inputs(ds, clf, cfg, classes)   # before anything is written
    run_dir = run_dir or default_run_dir("probe")
    args = RunArgs(data=str(data.resolve()), format=format, attr=attr, target=target, model=str(model.resolve()),
                   classes=classes, seed=seed)
    store = open_cli_run(run_dir, "probe", args)
    store.set_meta("record", run_record(cfg, seed=seed, classifier={"arch": clf.arch, "classes": clf.class_names}))
    # 2. run (resumes what the store already holds)
    pipeline = ProbePipeline(ds, clf, cfg, store, classes=classes, seed=seed,
                             progress=step_progress)
    if retry_skipped:
        err.print(f"retrying {pipeline.retry_failed()} recorded failure(s)", highlight=False)
    result = pipeline.run()
    # 3. report
    if json_out:
        print_json(result.to_json())
        gate(result.findings, fail_on)
        return
    c = result.counts
    err.print(f"{c.holdout} hold-out images, {c.edits} edits + {c.control_edits} controls, "
              f"{c.insertion_edits} insertion and {c.joint_edits} joint-removal edits, "
              f"{c.not_grounded} phrases not grounded, {c.phrase_failures} phrase failures, {c.failures} tool failures "
              f"(records `failure`), {c.skipped} edits not made (events `skipped`)", highlight=False, soft_wrap=True)
    findings_table(result.findings, f"findings ({len([f for f in result.findings if f.spurious])} spurious)")
    for name, j in result.joint.items():
        err.print(f"{name}: removing its {len(j['shares'])} candidate groups together drops P({name}) by "
                  f"{j['effect']:+.3f} [{j['effect_ci'][0]:+.3f}, {j['effect_ci'][1]:+.3f}] beyond their controls "
                  f"({j['pairs']} images, p={j['p_value']:.2g})", highlight=False)
    out.print(f"run: {result.run_dir}", highlight=False)
    gate(result.findings, fail_on)


# ---------------------------------------------------------------- reprobe (after repair)
@app.command("reprobe")
def reprobe_cmd(
    run_dir: Path = typer.Option(..., "--run-dir", help="run folder of a probe or audit"),
    model: Optional[Path] = typer.Option(None, "--model", help="checkpoint of the same classes (default: the run's "
                                         "model after repair)"),
    device: Device = None,
    json_out: Json = False,
    fail_on: FailOn = None,
) -> None:
    """Did the repair remove the reliance? The run's edits scored again on another model of the same classes.

    With the probe's statistics: per finding its effect, q-value and flip rate before -> after and a verdict
    (removed / reduced / unchanged / new). Costs classifier calls only; resumable."""
    from aspire.agent import context_from_run
    from aspire.errors import ConfigError
    from aspire.models.classifier import load_checkpoint
    from aspire.store_schema import Models

    pipeline = context_from_run(run_dir, device=device, progress=True).pipeline
    if model is None:
        recorded = pipeline.store.meta("models", Models()).after
        if not recorded:
            raise ConfigError(f"{run_dir}: the run has no model after repair; give --model MODEL.pt")
        model = Path(recorded)
    findings = pipeline.reprobe(load_checkpoint(model, device=device), str(model))
    verdicts = pipeline.store.meta("reprobe").verdicts
    if json_out:
        print_json({"run_dir": str(pipeline.store.run_dir), "model": str(model.resolve()), "verdicts": verdicts,
                    "findings": [f.to_json() for f in findings]})
    else:
        shown = [f for f in findings if f.after is not None and f.after.verdict]
        findings_table(shown, f"findings confirmed before or after ({len(shown)} of {len(findings)})")
        out.print(verdict_line(verdicts), highlight=False, soft_wrap=True)
        out.print(f"report: aspire report --run-dir {run_dir}", highlight=False, soft_wrap=True)
    gate(findings, fail_on)


# ---------------------------------------------------------------- report (aspire.report)
@app.command("report")
def report_cmd(
    run_dir: Path = typer.Option(..., "--run-dir", help="run folder of a probe or audit"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="output folder (default: RUN_DIR/report)"),
    device: Device = None,
    json_out: Json = False,
) -> None:
    """Render a run's audit report: self-contained HTML, Markdown with images beside it, and JSON."""
    from aspire.report import build_report

    paths = build_report(run_dir, out_dir, device=device)
    if json_out:
        print_json({key: str(path.resolve()) for key, path in paths.items()})
        return
    for key, path in paths.items():
        out.print(f"{key:5} {path.resolve()}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- augment (step 5, aspire.workflows.repair)
@app.command("augment")
def augment_cmd(
    run_dir: Path = typer.Option(..., "--run-dir", help="a finished probe or audit run folder"),
    out_dir: Path = typer.Option(..., "--out", help="folder to write the augmented set to (must not exist)"),
    config_file: ConfigFile = None,
    seed: Seed = 0,
    json_out: Json = False,
) -> None:
    """Step 5: generate images of each class without its spurious features, from the run's flipped edits."""
    from aspire.workflows.repair import augment_run, run_config
    from aspire.progress import step_progress

    cfg = run_config(run_dir, config_file)
    result = augment_run(run_dir, out_dir, cfg, seed, progress=step_progress,
                         on_message=lambda m: err.print(f"warning: {m}", highlight=False, soft_wrap=True))
    if json_out:
        print_json(result.to_json())
        return
    from rich.table import Table

    table = Table(title=f"augmented set ({result.generator.get('name', '')})", title_justify="left")
    for col, justify in (("class", "left"), ("images", "right"), ("dropped", "right"), ("skipped", "left")):
        table.add_column(col, justify=justify)
    for name in list(result.per_class) + [c for c in result.skipped if c not in result.per_class]:
        dropped = sum((result.dropped.get(name) or {}).values())
        table.add_row(name, str(result.per_class.get(name, 0)), str(dropped) if result.dropped else "",
                      result.skipped.get(name, ""))
    out.print(table)
    state = "already committed, verified" if result.reused else "committed"
    out.print(f"{result.n_images} images {state}: {result.out_dir}", highlight=False, soft_wrap=True)

"""The `aspire` command line. Thin: parse, call, render. Results on stdout, everything else on stderr.

Exit codes: 0 success, 1 a user error (one line naming what is wrong), 2 a usage error.
Tracebacks only with ASPIRE_DEBUG=1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Literal, Optional

import typer
from rich.console import Console

from aspire.errors import AspireError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find, name, prove and repair the spurious features an image classifier relies on.")
data_app = typer.Typer(no_args_is_help=True, help="Build the toy benchmarks.")
app.add_typer(data_app, name="data")

out = Console()                 # results
err = Console(stderr=True)      # logs, progress, errors


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


# Known exceptions → one-line messages (huggingface_hub's `hf` style).
def _one_line(e: BaseException) -> Optional[str]:
    if isinstance(e, AspireError):
        return str(e)
    if isinstance(e, PermissionError):
        return f"permission denied: {e.filename or e}"
    if isinstance(e, OSError) and getattr(e, "errno", None) == 28:
        return f"no space left on device while writing {e.filename or ''}".strip()
    if isinstance(e, FileNotFoundError):
        return f"file not found: {e.filename or e}"
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return None


def main() -> None:
    try:
        app()  # standalone: typer/click handle usage errors (exit 2) and Ctrl-C
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - the CLI boundary
        message = _one_line(e)
        if os.environ.get("ASPIRE_DEBUG") == "1" or message is None:
            raise
        err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 1)


# Commands live below, each a thin wrapper over the package.


# ---------------------------------------------------------------- train / eval (aspire.models)
ArchName = Literal["smallcnn", "resnet18", "resnet34", "resnet50"]  # = aspire.models.classifier.ARCHS
FormatName = Literal["waterbirds", "celeba", "imagefolder"]       # = aspire.data.formats.FORMATS
TRAIN_DEFAULTS = {  # per arch: epochs, batch size, lr, weight decay (resnets: the paper's Waterbirds setting)
    "smallcnn": {"epochs": 10, "batch_size": 64, "lr": 0.05, "weight_decay": 5e-4},
    "resnet": {"epochs": 100, "batch_size": 32, "lr": 1e-3, "weight_decay": 1e-3},
}
NOT_YET_METHODS = ("groupdro", "jtt", "dfr", "subg")


def _eval_table(result: Any, title: str) -> None:
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


@app.command("train")
def train_cmd(
    data: Path = typer.Option(..., "--data", help="dataset folder"),
    format: FormatName = typer.Option("waterbirds", "--format", help="dataset format"),
    attr: Optional[str] = typer.Option(None, "--attr", help="group attribute column (waterbirds: place; celeba: Male)"),
    target: Optional[str] = typer.Option(None, "--target", help="label attribute (celeba: Blond_Hair)"),
    arch: ArchName = typer.Option(..., "--arch", help="classifier architecture"),
    out_path: Path = typer.Option(..., "--out", help="checkpoint file to write (MODEL.pt)"),
    method: str = typer.Option("erm", "--method", help="training method: erm"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="default: smallcnn 10, resnets 100"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="default: smallcnn 64, resnets 32"),
    lr: Optional[float] = typer.Option(None, "--lr", help="SGD learning rate; default: smallcnn 0.05, resnets 1e-3"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="default: smallcnn 5e-4, resnets 1e-3"),
    seed: int = typer.Option(0, "--seed"),
    pretrained: Optional[str] = typer.Option(None, "--pretrained",
                                             help="resnets: 'imagenet' (torchvision weights) or a local ImageNet state dict file"),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="square input size in px; default: smallcnn 64, resnets 224"),
    crop_flip: bool = typer.Option(True, "--crop-flip/--no-crop-flip", help="random resized crop and horizontal flip while training"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps; default: the best available"),
    json_out: bool = typer.Option(False, "--json", help="print a JSON result on stdout"),
) -> None:
    """Train a classifier (ERM) and write it as one checkpoint file; prints the validation groups."""
    from aspire.data.formats import load_dataset
    from aspire.errors import ConfigError, DataError
    from aspire.models.classifier import build_classifier, save_checkpoint
    from aspire.models.evaluate import evaluate
    from aspire.models.train import train_classifier

    # 1. check the method and fill the arch's defaults
    if method.lower() in NOT_YET_METHODS:
        raise ConfigError(f"--method {method}: not implemented yet; use --method erm")
    if method.lower() != "erm":
        raise ConfigError(f"unknown --method {method!r}: expected erm")
    defaults = TRAIN_DEFAULTS["smallcnn" if arch == "smallcnn" else "resnet"]
    epochs = defaults["epochs"] if epochs is None else epochs
    batch_size = defaults["batch_size"] if batch_size is None else batch_size
    lr = defaults["lr"] if lr is None else lr
    weight_decay = defaults["weight_decay"] if weight_decay is None else weight_decay
    # 2. data and model
    ds = load_dataset(data, format, attr=attr, target=target)
    train_samples, val_samples = ds.split("train"), ds.split("val", allow_empty=True)
    clf = build_classifier(arch, ds.class_names, input_size=input_size, pretrained=pretrained, seed=seed)
    # 3. train, save, evaluate on validation
    info = train_classifier(clf, train_samples, val_samples, epochs=epochs, batch_size=batch_size, lr=lr,
                            weight_decay=weight_decay, seed=seed, augment=crop_flip, device=device, method="erm")
    path = save_checkpoint(clf, out_path)
    val = None
    if val_samples:
        try:
            val = evaluate(clf, ds, "val")
        except DataError as e:
            err.print(f"warning: no validation table: {e}", highlight=False, soft_wrap=True)
    # 4. report
    if json_out:
        print_json({"checkpoint": str(path.resolve()), "arch": arch, "method": "erm", "epochs": epochs,
                    "best_epoch": info["best_epoch"], "seconds": info["seconds"],
                    "val": val.model_dump() if val else None, "history": info["history"]})
        return
    val_text = (f"val average {val.average_accuracy:.4f}, worst-group {val.worst_group_accuracy:.4f}" if val
                else "no validation metrics")
    out.print(f"trained {arch} (erm) on {info['n_train']} images, {epochs} epochs in {info['seconds']:.1f} s; "
              f"best epoch {info['best_epoch']}: {val_text} -> {path}", highlight=False, soft_wrap=True)
    if val:
        _eval_table(val, "validation")


@app.command("eval")
def eval_cmd(
    data: Path = typer.Option(..., "--data", help="dataset folder"),
    format: FormatName = typer.Option("waterbirds", "--format", help="dataset format"),
    attr: Optional[str] = typer.Option(None, "--attr", help="group attribute column (waterbirds: place; celeba: Male)"),
    target: Optional[str] = typer.Option(None, "--target", help="label attribute (celeba: Blond_Hair)"),
    model: Path = typer.Option(..., "--model", help="checkpoint written by aspire train"),
    split: Literal["train", "val", "test"] = typer.Option("test", "--split"),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps; default: the best available"),
    json_out: bool = typer.Option(False, "--json", help="print the EvalResult as JSON on stdout"),
) -> None:
    """Per-group accuracy, worst-group accuracy, average and training-weighted average on one split."""
    from aspire.data.formats import load_dataset
    from aspire.models.classifier import load_checkpoint
    from aspire.models.evaluate import evaluate

    clf = load_checkpoint(model, device=device)
    ds = load_dataset(data, format, attr=attr, target=target)
    result = evaluate(clf, ds, split, batch_size=batch_size, progress=True)
    if json_out:
        print_json({**result.model_dump(), "model": str(model.resolve())})
    else:
        _eval_table(result, f"{split} ({clf.arch}, {model.name})")


# ---------------------------------------------------------------- probe (steps 1-4, no agent)
def _split_classes(classes: Optional[list[str]]) -> Optional[list[str]]:
    if not classes:
        return None
    return [c.strip() for item in classes for c in item.split(",") if c.strip()]


def _probe_config(config_file: Optional[Path], annotations: Optional[Path], data: Path):
    """The run's settings: the annotations file feeds the offline caption and ground backends."""
    from aspire.config import load_config
    from aspire.errors import ConfigError

    cfg = load_config(config_file)
    ann = annotations or (data / "annotations.jsonl" if (data / "annotations.jsonl").is_file() else None)
    for concern in (cfg.caption, cfg.ground):
        if concern.backend == "annotations" and concern.annotations is None:
            if ann is None:
                raise ConfigError(f"the annotations backends need --annotations FILE (none in {data}); "
                                  "or choose real backends in --config")
            concern.annotations = str(Path(ann).resolve())
    return cfg


def _default_run_dir(kind: str) -> Path:
    import time

    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def _open_run(run_dir: Path, kind: str, args: dict) -> "Any":
    """Open (or resume) a run folder; a run of other inputs in the same folder is refused."""
    from aspire.errors import AspireError
    from aspire.store import RunStore

    store = RunStore(run_dir)
    recorded = store.get_meta("args")
    if recorded is None:
        store.set_meta("kind", kind)
        store.set_meta("args", args)
    elif recorded != args:
        changed = sorted(k for k in set(recorded) | set(args) if recorded.get(k) != args.get(k))
        raise AspireError(f"{run_dir}: holds a run with other inputs ({', '.join(changed)}); "
                          "use another --run-dir to start a new run")
    else:
        err.print(f"resuming the run in {run_dir}", highlight=False)
    return store


def _findings_table(findings: list, title: str) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, justify in (("class", "left"), ("phrase", "left"), ("kind", "left"), ("edits", "right"),
                         ("flips", "right"), ("flip rate", "right"), ("control", "right"), ("p-value", "right"),
                         ("spurious", "left")):
        table.add_column(col, justify=justify)
    for f in findings:
        table.add_row(f.class_, f.phrase, f.kind, str(f.occurrences), str(f.flips), f"{f.flip_rate:.2f}",
                      f"{f.control_flip_rate:.2f}", f"{f.p_value:.2g}", "yes" if f.spurious else "",
                      style="bold" if f.spurious else None)
    out.print(table)


@app.command("probe")
def probe_cmd(
    data: Path = typer.Option(..., "--data", help="dataset folder"),
    format: FormatName = typer.Option("waterbirds", "--format", help="dataset format"),
    attr: Optional[str] = typer.Option(None, "--attr", help="group attribute column (not needed for probing)"),
    target: Optional[str] = typer.Option(None, "--target", help="label attribute (celeba)"),
    model: Path = typer.Option(..., "--model", help="checkpoint written by aspire train"),
    annotations: Optional[Path] = typer.Option(None, "--annotations",
                                               help="annotations.jsonl for the offline backends (default: DATA/annotations.jsonl)"),
    classes: Optional[list[str]] = typer.Option(None, "--classes", help="class names or indices, comma-separated (default: all)"),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="run folder; an existing one is resumed"),
    config_file: Optional[Path] = typer.Option(None, "--config", help="settings file (TOML or JSON)"),
    seed: int = typer.Option(0, "--seed"),
    device: Optional[str] = typer.Option(None, "--device", help="classifier device; default: the best available"),
    json_out: bool = typer.Option(False, "--json", help="print run_dir and findings as JSON on stdout"),
) -> None:
    """Steps 1-4 of the method as a plain pipeline: hold-out, caption, phrases, edits, probe with controls."""
    from aspire.data.formats import load_dataset
    from aspire.models.classifier import load_checkpoint
    from aspire.pipeline import ProbePipeline
    from aspire.progress import step_progress
    from aspire.provenance import run_record

    # 1. inputs and settings
    cfg = _probe_config(config_file, annotations, data)
    ds = load_dataset(data, format, attr=attr, target=target)
    clf = load_checkpoint(model, device=device)
    run_dir = run_dir or _default_run_dir("probe")
    args = {"data": str(data.resolve()), "format": format, "model": str(model.resolve()),
            "classes": _split_classes(classes), "seed": seed}
    store = _open_run(run_dir, "probe", args)
    store.set_meta("record", run_record(cfg, seed=seed, classifier={"arch": clf.arch, "classes": clf.class_names}))
    # 2. run (resumes what the store already holds)
    pipeline = ProbePipeline(ds, clf, cfg, store, classes=_split_classes(classes), seed=seed,
                             progress=step_progress)
    result = pipeline.run()
    # 3. report
    if json_out:
        print_json(result.to_json())
        return
    c = result.counts
    err.print(f"{c.holdout} hold-out images, {c.edits} edits + {c.control_edits} controls, "
              f"{c.not_grounded} phrases not grounded, {c.phrase_failures} phrase failures", highlight=False)
    _findings_table(result.findings, f"findings ({len([f for f in result.findings if f.spurious])} spurious)")
    out.print(f"run: {result.run_dir}", highlight=False)

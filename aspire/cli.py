"""The `aspire` command line. Thin: parse, call, render. Results on stdout, everything else on stderr.

Exit codes: 0 success, 1 a user error (one line naming what is wrong), 2 a usage error, 3 a confirmed spurious
finding remains (--fail-on). Tracebacks only with ASPIRE_DEBUG=1.
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
    except BaseException as e:  # the CLI boundary: known errors as one line, others re-raised
        message = _one_line(e)
        if os.environ.get("ASPIRE_DEBUG") == "1" or message is None:
            raise
        err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 1)


# Commands live below, each a thin wrapper over the package.


# ---------------------------------------------------------------- train / eval (aspire.models)
ArchName = Literal["smallcnn", "resnet18", "resnet34", "resnet50"]  # = aspire.models.classifier.ARCHS
FormatName = Literal["waterbirds", "celeba", "imagefolder"]       # = aspire.data.formats.FORMATS


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
    arch: Optional[ArchName] = typer.Option(None, "--arch", help="classifier architecture (required unless "
                                            "--method dfr --init MODEL.pt)"),
    out_path: Path = typer.Option(..., "--out", help="checkpoint file to write (MODEL.pt)"),
    method: str = typer.Option("erm", "--method", help="erm | groupdro | jtt | dfr | subg (see above)"),
    init: Optional[Path] = typer.Option(None, "--init", help="dfr: the trained checkpoint whose last layer is "
                                        "retrained (default: train ERM first)"),
    augment_dir: Optional[Path] = typer.Option(None, "--augment", help="AUGDIR of generated images (aspire augment) "
                                               "mixed into the training set"),
    augment_ratio: Optional[float] = typer.Option(None, "--augment-ratio",
                                                  help="add round(R x the training set's size) generated images, "
                                                  "drawn by --seed (default: all of them, as the paper does)"),
    groupdro_eta: float = typer.Option(0.01, "--groupdro-eta", help="groupdro: step size of the group weights"),
    groupdro_adjustment: float = typer.Option(0.0, "--groupdro-adjustment", help="groupdro: C of C/sqrt(n_group)"),
    jtt_epochs: int = typer.Option(2, "--jtt-epochs", help="jtt: T, stage-1 ERM epochs (paper: Waterbirds 60)"),
    jtt_upweight: int = typer.Option(20, "--jtt-upweight", help="jtt: lambda, times each stage-1 error appears "
                                     "(paper: Waterbirds 100)"),
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
    """Train a classifier and write it as one checkpoint file; prints the validation groups.

    \b
    Methods (group labels: --attr; all but erm need them on train and val):
      erm       cross-entropy; selection by validation average accuracy
      groupdro  online GroupDRO (Sagawa et al. 2020), group-balanced batches; synthetic images: a group per class
      jtt       JTT (Liu et al. 2021): ERM for T epochs, retrain with its errors upsampled lambda times
      dfr       DFR (Kirichenko et al. 2023): L1 logistic last layer on group-balanced validation features
      subg      SUBG (Idrissi et al. 2022): every group subsampled to the smallest, then ERM
    groupdro, jtt and subg select the epoch by validation worst-group accuracy.
    """
    from aspire.config import TrainSettings
    from aspire.data.formats import load_dataset
    from aspire.errors import ConfigError, DataError
    from aspire.models.classifier import build_classifier, load_checkpoint, save_checkpoint
    from aspire.models.evaluate import evaluate
    from aspire.models.methods import METHODS, Augmentation, MethodSettings, OptimSettings, train_with_method

    # 1. check the method, the model to start from, and fill the arch's defaults
    method = method.lower()
    if method not in METHODS:
        raise ConfigError(f"unknown --method {method!r}: expected one of {', '.join(METHODS)}")
    if init is not None and method != "dfr":
        raise ConfigError(f"--init is for --method dfr (last-layer retraining), not --method {method}")
    init_clf = load_checkpoint(init, device=device) if init is not None else None
    if init_clf is not None:
        for flag, given, found in (("--arch", arch, init_clf.arch), ("--input-size", input_size, init_clf.input_size)):
            if given is not None and given != found:
                raise ConfigError(f"{flag} {given} conflicts with --init {init} ({found})")
        arch = init_clf.arch
    if arch is None:
        raise typer.BadParameter("required unless --method dfr --init MODEL.pt", param_hint="--arch")
    given = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay}
    recipe = TrainSettings.for_arch(arch).model_copy(update={k: v for k, v in given.items() if v is not None})
    epochs, batch_size, lr, weight_decay = recipe.epochs, recipe.batch_size, recipe.lr, recipe.weight_decay
    # 2. data and model
    ds = load_dataset(data, format, attr=attr, target=target)
    val_samples = ds.split("val", allow_empty=True)
    augmentation = None
    if augment_dir is not None:
        from aspire.data.augmented import load_augmented

        augmentation = Augmentation(str(augment_dir.resolve()), load_augmented(augment_dir, class_names=ds.class_names),
                                    augment_ratio)
    elif augment_ratio is not None:
        raise ConfigError("--augment-ratio needs --augment AUGDIR")
    # 3. train, save, evaluate on validation
    optim = OptimSettings(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
                          crop_flip=crop_flip, device=device)
    settings = MethodSettings(groupdro_eta=groupdro_eta, groupdro_adjustment=groupdro_adjustment,
                              jtt_epochs=jtt_epochs, jtt_upweight=jtt_upweight)
    clf = train_with_method(method, ds, lambda: build_classifier(arch, ds.class_names, input_size=input_size,
                                                                 pretrained=pretrained, seed=seed),
                            optim, settings, augmentation=augmentation, init=init_clf)
    info = clf.train_info
    path = save_checkpoint(clf, out_path)
    val = None
    if val_samples:
        try:
            val = evaluate(clf, ds, "val")
        except DataError as e:
            err.print(f"warning: no validation table: {e}", highlight=False, soft_wrap=True)
    # 4. report
    if json_out:
        print_json({"checkpoint": str(path.resolve()), "arch": arch, "method": method, "epochs": info.get("epochs"),
                    "best_epoch": info.get("best_epoch"), "seconds": info["total_seconds"],
                    "val": val.model_dump() if val else None, "history": info.get("history", []),
                    "augmentation": info.get("augmentation"), method: info.get(method)})
        return
    val_text = (f"val average {val.average_accuracy:.4f}, worst-group {val.worst_group_accuracy:.4f}" if val
                else "no validation metrics")
    if method == "dfr":
        fit = info["dfr"]
        out.print(f"retrained the last layer of {arch} (dfr) on {fit['n_train_per_refit']} features x {fit['refits']} "
                  f"refits, C {fit['c']}, class weights {fit['class_weight']}, in {info['total_seconds']:.1f} s: "
                  f"{val_text} (validation fitted the last layer) -> {path}", highlight=False, soft_wrap=True)
    else:
        out.print(f"trained {arch} ({method}) on {info['n_train']} images, {epochs} epochs in "
                  f"{info['total_seconds']:.1f} s; best epoch {info['best_epoch']}: {val_text} -> {path}",
                  highlight=False, soft_wrap=True)
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


def _open_run(run_dir: Path, kind: str, args: "Any") -> "Any":
    """Open (or resume) a run folder; a run of another kind or other inputs in the same folder is refused."""
    from aspire.store import RunStore
    from aspire.workflows.runs import open_run

    resuming = (run_dir / RunStore.DB_NAME).is_file()
    store = open_run(run_dir, kind, args)
    if resuming:
        err.print(f"resuming the run in {run_dir}", highlight=False)
    return store


def _findings_table(findings: list, title: str) -> None:
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


# ---------------------------------------------------------------- --fail-on: the CI gate
FAIL_EXIT = 3
FAIL_ON_HELP = ("exit 3 when a confirmed spurious finding remains (on the repaired model when the run retrained): "
                "'spurious', or a minimum effect such as 0.1")


def _check_fail_on(value: Optional[str]) -> Optional[str]:
    if value is None or value == "spurious":
        return value
    try:
        threshold = float(value)
    except ValueError:
        threshold = -1.0
    if not 0.0 <= threshold <= 1.0:
        raise typer.BadParameter(f"expected 'spurious' or an effect between 0 and 1, got {value!r}")
    return value


def _gate(findings: list, fail_on: Optional[str]) -> None:
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
    fail_on: Optional[str] = typer.Option(None, "--fail-on", help=FAIL_ON_HELP, callback=_check_fail_on),
) -> None:
    """Steps 1-4 of the method as a plain pipeline: hold-out, caption, phrases, edits, probe with controls."""
    from aspire.data.formats import load_dataset
    from aspire.models.classifier import load_checkpoint
    from aspire.progress import step_progress
    from aspire.provenance import run_record
    from aspire.workflows.probe import ProbePipeline
    from aspire.workflows.runs import RunArgs

    # 1. inputs and settings
    cfg = _probe_config(config_file, annotations, data)
    ds = load_dataset(data, format, attr=attr, target=target)
    clf = load_checkpoint(model, device=device)
    run_dir = run_dir or _default_run_dir("probe")
    args = RunArgs(data=str(data.resolve()), format=format, attr=attr, target=target, model=str(model.resolve()),
                   classes=_split_classes(classes), seed=seed)
    store = _open_run(run_dir, "probe", args)
    store.set_meta("record", run_record(cfg, seed=seed, classifier={"arch": clf.arch, "classes": clf.class_names}))
    # 2. run (resumes what the store already holds)
    pipeline = ProbePipeline(ds, clf, cfg, store, classes=_split_classes(classes), seed=seed,
                             progress=step_progress)
    result = pipeline.run()
    # 3. report
    if json_out:
        print_json(result.to_json())
        _gate(result.findings, fail_on)
        return
    c = result.counts
    err.print(f"{c.holdout} hold-out images, {c.edits} edits + {c.control_edits} controls, "
              f"{c.insertion_edits} insertion and {c.joint_edits} joint-removal edits, "
              f"{c.not_grounded} phrases not grounded, {c.phrase_failures} phrase failures", highlight=False)
    _findings_table(result.findings, f"findings ({len([f for f in result.findings if f.spurious])} spurious)")
    for name, j in result.joint.items():
        err.print(f"{name}: removing its {len(j['shares'])} candidate groups together drops P({name}) by "
                  f"{j['effect']:+.3f} [{j['effect_ci'][0]:+.3f}, {j['effect_ci'][1]:+.3f}] beyond their controls "
                  f"({j['pairs']} images, p={j['p_value']:.2g})", highlight=False)
    out.print(f"run: {result.run_dir}", highlight=False)
    _gate(result.findings, fail_on)


# ---------------------------------------------------------------- reprobe (after repair)
@app.command("reprobe")
def reprobe_cmd(
    run_dir: Path = typer.Option(..., "--run-dir", help="run folder of a probe or audit"),
    model: Optional[Path] = typer.Option(None, "--model", help="checkpoint of the same classes (default: the run's "
                                         "model after repair)"),
    device: Optional[str] = typer.Option(None, "--device", help="classifier device; default: the best available"),
    json_out: bool = typer.Option(False, "--json", help="print run_dir, model, verdicts and findings as JSON"),
    fail_on: Optional[str] = typer.Option(None, "--fail-on", help=FAIL_ON_HELP, callback=_check_fail_on),
) -> None:
    """Did the repair remove the reliance? Score the run's stored edits and controls on another checkpoint of the
    same classes, with the probe's statistics: per finding its effect, q-value and flip rate before -> after and a
    verdict (removed / reduced / unchanged / new). Costs classifier calls only; resumable."""
    from aspire.agent import context_from_run
    from aspire.errors import ConfigError
    from aspire.models.classifier import load_checkpoint

    pipeline = context_from_run(run_dir, device=device, progress=True).pipeline
    if model is None:
        recorded = (pipeline.store.get_meta("models") or {}).get("after")
        if not recorded:
            raise ConfigError(f"{run_dir}: the run has no model after repair; give --model MODEL.pt")
        model = Path(recorded)
    findings = pipeline.reprobe(load_checkpoint(model, device=device), str(model))
    verdicts = (pipeline.store.get_meta("reprobe") or {}).get("verdicts", {})
    if json_out:
        print_json({"run_dir": str(pipeline.store.run_dir), "model": str(model.resolve()), "verdicts": verdicts,
                    "findings": [f.to_json() for f in findings]})
    else:
        shown = [f for f in findings if f.after is not None and f.after.verdict]
        _findings_table(shown, f"findings confirmed before or after ({len(shown)} of {len(findings)})")
        out.print(_verdict_line(verdicts), highlight=False, soft_wrap=True)
        out.print(f"report: aspire report --run-dir {run_dir}", highlight=False, soft_wrap=True)
    _gate(findings, fail_on)


# ---------------------------------------------------------------- report (aspire.report)
@app.command("report")
def report_cmd(
    run_dir: Path = typer.Option(..., "--run-dir", help="run folder of a probe or audit"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="output folder (default: RUN_DIR/report)"),
    device: Optional[str] = typer.Option(None, "--device", help="device for Grad-CAM; default: the best available"),
    json_out: bool = typer.Option(False, "--json", help="print the report's paths as JSON on stdout"),
) -> None:
    """Render a run's audit report: self-contained HTML, Markdown with images beside it, and JSON."""
    from aspire.report import build_report

    paths = build_report(run_dir, out_dir, device=device)
    if json_out:
        print_json({key: str(path.resolve()) for key, path in paths.items()})
        return
    for key, path in paths.items():
        out.print(f"{key:5} {path.resolve()}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- audit / chat / demo (aspire.agent)
def _accuracy_line(accuracy: Optional[dict]) -> str:
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


def _verdict_line(verdicts: dict) -> str:
    order = ("removed", "reduced", "unchanged", "new")
    counts = ", ".join(f"{verdicts[v]} {v}" for v in order if verdicts.get(v)) or "no finding confirmed before or after"
    return f"re-probed on the repaired model: {counts}"


def _audit_summary(result: Any, json_out: bool) -> None:
    """The audit's result on stdout: JSON, or the findings table and the repair's outcome."""
    s = result.to_json()
    if json_out:
        print_json(s)
        return
    spurious = [f for f in result.findings if f.spurious]
    _findings_table(result.findings, f"findings ({len(spurious)} spurious)")
    out.print(f"{s['rounds']} planning rounds; stopped: {s['stop_reason']}", highlight=False, soft_wrap=True)
    out.print(f"approvals: {', '.join(f'{k} {v}' for k, v in (s['approvals'] or {}).items()) or 'none'}",
              highlight=False)
    if s["augmented"]:
        out.print(f"generated images: {s['augmented']['n_images']} in {s['augmented']['dir']}", highlight=False)
    out.print(_accuracy_line(s["accuracy"]), highlight=False, soft_wrap=True)
    if s["reprobe"]:
        out.print(_verdict_line(s["reprobe"]["verdicts"]), highlight=False, soft_wrap=True)
    if s["report"]:
        out.print(f"report: {s['report'].get('html')}", highlight=False, soft_wrap=True)
    out.print(f"run: {result.run_dir}", highlight=False, soft_wrap=True)


@app.command("audit")
def audit_cmd(
    data: Optional[Path] = typer.Option(None, "--data", help="dataset folder (not with --resume)"),
    format: FormatName = typer.Option("waterbirds", "--format", help="dataset format"),
    attr: Optional[str] = typer.Option(None, "--attr", help="group attribute column (evaluation only)"),
    target: Optional[str] = typer.Option(None, "--target", help="label attribute (celeba)"),
    model: Optional[Path] = typer.Option(None, "--model", help="checkpoint written by aspire train (not with --resume)"),
    annotations: Optional[Path] = typer.Option(None, "--annotations",
                                               help="annotations.jsonl for the offline backends (default: DATA/annotations.jsonl)"),
    classes: Optional[list[str]] = typer.Option(None, "--classes", help="class names or indices, comma-separated (default: all)"),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="run folder; an existing one is resumed"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue the audit in this run folder (killed or paused)"),
    config_file: Optional[Path] = typer.Option(None, "--config", help="settings file (TOML or JSON)"),
    seed: int = typer.Option(0, "--seed"),
    llm_model: Optional[str] = typer.Option(None, "--llm-model", help="the planner's chat model (agent.model)"),
    offline: bool = typer.Option(False, "--offline", help="plan with the deterministic planner, even with an LLM configured"),
    yes: bool = typer.Option(False, "--yes", "-y", help="approve every stage as proposed (non-interactive)"),
    device: Optional[str] = typer.Option(None, "--device", help="classifier device; default: the best available"),
    json_out: bool = typer.Option(False, "--json", help="print run_dir, findings, accuracy and report paths as JSON"),
    fail_on: Optional[str] = typer.Option(None, "--fail-on", help=FAIL_ON_HELP, callback=_check_fail_on),
) -> None:
    """The investigation agent: probe hypotheses until the findings are stable, then (approved) generate
    images without the spurious features, retrain, evaluate and report. Resumable (--resume RUN_DIR)."""
    from aspire.agent import audit_context, auto_approve, context_from_run, make_planner, run_audit, thread_id
    from aspire.agent.chat import terminal_approver
    from aspire.agent.llm import llm_record
    from aspire.errors import ConfigError

    overrides = {k: v for k, v in (("offline", True if offline else None), ("model", llm_model)) if v is not None}
    # 1. a new run, or the recorded one
    if resume is not None:
        if data is not None or model is not None or run_dir is not None:
            raise ConfigError("--resume RUN_DIR continues with the inputs the run recorded: "
                              "leave out --data, --model and --run-dir")
        ctx = context_from_run(resume, agent_overrides=overrides, device=device, progress=True)
        err.print(f"resuming the audit in {resume}", highlight=False)
    else:
        if data is None or model is None:
            raise ConfigError("aspire audit needs --data DIR and --model MODEL.pt (or --resume RUN_DIR)")
        from aspire.data.formats import load_dataset
        from aspire.models.classifier import load_checkpoint
        from aspire.provenance import run_record
        from aspire.workflows.runs import RunArgs

        cfg = _probe_config(config_file, annotations, data)
        for key, value in overrides.items():
            setattr(cfg.agent, key, value)
        ds = load_dataset(data, format, attr=attr, target=target)
        clf = load_checkpoint(model, device=device)
        run_dir = run_dir or _default_run_dir("audit")
        args = RunArgs(data=str(data.resolve()), format=format, model=str(model.resolve()),
                       classes=_split_classes(classes), seed=seed, attr=attr, target=target)
        store = _open_run(run_dir, "audit", args)
        if store.get_meta("record") is None:
            planner = "offline" if cfg.agent.offline else llm_record(cfg.agent)
            store.set_meta("record", run_record(cfg, seed=seed, classifier={"arch": clf.arch, "classes": clf.class_names},
                                                planner=planner))
        thread_id(store)
        planner_obj, _ = make_planner(cfg.agent)
        ctx = audit_context(ds, clf, cfg, store, model_path=str(model.resolve()), classes=_split_classes(classes),
                            seed=seed, progress=True, planner=planner_obj)
    err.print(make_planner(ctx.config.agent)[1], highlight=False, soft_wrap=True)
    # 2. run until done, asking for approvals (or approving them with --yes)
    approve = auto_approve if yes else (terminal_approver(err) if sys.stdin.isatty() else None)
    result = run_audit(ctx, approve=approve)
    if result.status == "paused":
        stage = (result.pending or {}).get("stage", "?")
        raise AspireError(f"{result.run_dir}: the audit waits for approval before {stage}; continue with "
                          f"`aspire audit --resume {result.run_dir} --yes`, or in a terminal")
    _audit_summary(result, json_out)
    _gate(result.findings, fail_on)


@app.command("chat")
def chat_cmd(
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="run folder (default: the latest under ./runs)"),
    config_file: Optional[Path] = typer.Option(None, "--config", help="settings file (TOML or JSON): agent.*"),
    llm_model: Optional[str] = typer.Option(None, "--llm-model", help="chat model (agent.model)"),
    device: Optional[str] = typer.Option(None, "--device", help="classifier device for probe; default: the best available"),
) -> None:
    """Talk with the agent about a run: which features flip a class, the edits of a phrase, probe a phrase,
    approve and retrain. Without an LLM configured it explains how to configure one and answers the
    offline commands (findings, stats, edits, probe, approve). Ctrl-C cancels an answer; Ctrl-D exits."""
    from aspire.agent.chat import ChatSession, OfflineSession, RunTools
    from aspire.agent.llm import llm_configured
    from aspire.config import load_config
    from aspire.errors import ConfigError

    if run_dir is None:
        runs = sorted((p.parent for p in Path("runs").glob("*/run.sqlite")), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise ConfigError("no run folder under ./runs: pass --run-dir DIR (a folder written by aspire audit or probe)")
        run_dir = runs[-1]
    settings = load_config(config_file).agent
    if llm_model:
        settings.model = llm_model
    tools = RunTools(run_dir, device=device)
    session = ChatSession(tools, settings, console=out) if llm_configured(settings) else OfflineSession(tools, out)
    raise typer.Exit(session.run())


@app.command("demo")
def demo_cmd(
    out_dir: Path = typer.Option(Path("demo-out"), "--out", help="folder for the toy data, the model and the run"),
    seed: int = typer.Option(0, "--seed"),
    size_px: int = typer.Option(64, "--size", help="toy image size in px"),
    train_per_class: Optional[int] = typer.Option(None, "--train-per-class",
                                                  help="toy training images per class (default: the benchmark's 800)"),
    epochs: int = typer.Option(10, "--epochs", help="ERM epochs of the audited smallcnn"),
    retrain_epochs: Optional[int] = typer.Option(None, "--retrain-epochs", help="default: as --epochs"),
    json_out: bool = typer.Option(False, "--json", help="print the result as JSON on stdout"),
) -> None:
    """The whole pipeline offline on toy-waterbirds: toy data → ERM smallcnn → audit (offline planner,
    approved) → generate → retrain → report; prints the findings and worst-group accuracy before → after."""
    from aspire.workflows.demo import run_demo

    sizes = None
    if train_per_class is not None:
        n = max(1, train_per_class)
        sizes = {"train": n, "val": max(1, n // 4), "test": max(1, n // 2)}
    summary = run_demo(out_dir, seed=seed, size_px=size_px, sizes=sizes, epochs=epochs, retrain_epochs=retrain_epochs,
                       log=lambda msg: err.print(msg, highlight=False))
    if json_out:
        print_json(summary)
        return
    from aspire.schemas import Finding

    findings = [Finding.model_validate(f) for f in summary["findings"]]
    _findings_table(findings, f"findings ({sum(f.spurious for f in findings)} spurious)")
    out.print(_accuracy_line(summary["accuracy"]), highlight=False, soft_wrap=True)
    report = (summary.get("report") or {}).get("html")
    out.print(f"report: {report}" if report else "report: not written (aspire.report is not available)",
              highlight=False, soft_wrap=True)
    out.print(f"run: {summary['run_dir']} ({summary['seconds']:.0f} s)", highlight=False)


# ---------------------------------------------------------------- augment (step 5, aspire.workflows.repair)
@app.command("augment")
def augment_cmd(
    run_dir: Path = typer.Option(..., "--run-dir", help="a finished probe or audit run folder"),
    out_dir: Path = typer.Option(..., "--out", help="folder to write the augmented set to (must not exist)"),
    config_file: Optional[Path] = typer.Option(None, "--config", help="settings file (TOML or JSON): generate, augment"),
    seed: int = typer.Option(0, "--seed"),
    json_out: bool = typer.Option(False, "--json", help="print the result as JSON on stdout"),
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


# ---------------------------------------------------------------- toy benchmarks and reliance (aspire.data.toy)
def _parse_sizes(sizes: Optional[str]) -> Optional[dict[str, int]]:
    if sizes is None:
        return None
    parts = sizes.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise typer.BadParameter(f"expected three positive integers TRAIN,VAL,TEST, got {sizes!r}", param_hint="--sizes")
    return dict(zip(("train", "val", "test"), (int(p) for p in parts)))


def _write_toy(name: str, out_dir: Path, seed: int, scale: int, size_px: int, sizes: Optional[str], json_out: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from aspire.data.toy import write_benchmark

    per_class = _parse_sizes(sizes)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(f"rendering {name}", total=None)
        summary = write_benchmark(name, out_dir, seed=seed, scale=scale, size_px=size_px, sizes=per_class,
                                  progress=lambda done, total: bar.update(task, completed=done, total=total))
    if json_out:
        print_json(summary)
        return
    counts = ", ".join(f"{n} {s}" for s, n in summary["images"].items())
    out.print(f"wrote {name} (seed {seed}): {counts} images, {summary['counterfactuals']} test counterfactuals, "
              f"{len(summary['classes'])} classes in {summary['seconds']:.1f} s -> {summary['out']}",
              highlight=False, soft_wrap=True)


_TOY_SIZES_HELP = "images per class as TRAIN,VAL,TEST (overrides --scale; e.g. 60,20,20 for a quick test set)"


@data_app.command("toy-waterbirds")
def toy_waterbirds_cmd(
    out_dir: Path = typer.Option(..., "--out", help="folder to create (refused if it exists and is not empty)"),
    seed: int = typer.Option(0, "--seed", help="same seed, byte-identical files"),
    scale: int = typer.Option(1, "--scale", min=1, help="multiply the number of images (default 1600/400/800)"),
    size_px: int = typer.Option(64, "--size", min=16, help="image size in px"),
    sizes: Optional[str] = typer.Option(None, "--sizes", help=_TOY_SIZES_HELP),
    json_out: bool = typer.Option(False, "--json", help="print a JSON summary on stdout"),
) -> None:
    """Landbirds and waterbirds (shape carries the label) on land or water: 95% on their usual place in
    train, balanced groups in val/test; boats planted with waterbirds, fences with landbirds; sun and clouds
    with both. Writes metadata.csv (attribute `place`), captions with masks, ground truth and exact test
    counterfactuals."""
    _write_toy("toy-waterbirds", out_dir, seed, scale, size_px, sizes, json_out)


@data_app.command("toy-multiclass")
def toy_multiclass_cmd(
    out_dir: Path = typer.Option(..., "--out", help="folder to create (refused if it exists and is not empty)"),
    seed: int = typer.Option(0, "--seed", help="same seed, byte-identical files"),
    scale: int = typer.Option(1, "--scale", min=1, help="multiply the number of images (default 1600/400/800)"),
    size_px: int = typer.Option(64, "--size", min=16, help="image size in px"),
    sizes: Optional[str] = typer.Option(None, "--sizes", help=_TOY_SIZES_HELP),
    json_out: bool = typer.Option(False, "--json", help="print a JSON summary on stdout"),
) -> None:
    """Eight shapes; six with their own planted element at their own strength (one a background: snow),
    two controls with none. Group attribute column `attr` (use --attr attr): 1 when the image shows its own
    class's planted element. Same files as toy-waterbirds."""
    _write_toy("toy-multiclass", out_dir, seed, scale, size_px, sizes, json_out)


@app.command("reliance")
def reliance_cmd(
    data: Path = typer.Option(..., "--data", help="dataset folder with counterfactuals.csv (the toy benchmarks write one)"),
    model: Path = typer.Option(..., "--model", help="checkpoint written by aspire train"),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps; default: the best available"),
    json_out: bool = typer.Option(False, "--json", help="print the rows as JSON on stdout"),
) -> None:
    """True reliance per class and element: accuracy on the test images showing the element, and on the same
    images with only that element removed (or the place swapped); drop = original - counterfactual."""
    from rich.table import Table

    from aspire.data.toy import measure_reliance
    from aspire.models.classifier import load_checkpoint

    clf = load_checkpoint(model, device=device)
    rows = measure_reliance(clf, data, batch_size=batch_size)
    if json_out:
        print_json({"data": str(data.resolve()), "model": str(model.resolve()), "reliance": [r.to_json() for r in rows]})
        return
    table = Table(title=f"reliance ({clf.arch}, {model.name})")
    for col in ("class", "element", "change", "n", "acc orig", "acc cf", "drop", "P(y) drop"):
        table.add_column(col, justify="left" if col in ("class", "element", "change") else "right", no_wrap=True)
    for r in rows:
        table.add_row(r.class_, r.element, r.change, str(r.n), f"{r.accuracy_original:.3f}",
                      f"{r.accuracy_counterfactual:.3f}", f"{r.drop:+.3f}", f"{r.mean_prob_drop:+.3f}",
                      style="bold" if r.drop >= 0.1 else None)
    out.print(table)


# ---------------------------------------------------------------- batch (aspire.batch)
@app.command("batch")
def batch_cmd(
    data: Path = typer.Option(..., "--data", help="dataset folder"),
    model: Path = typer.Option(..., "--model", help="checkpoint written by aspire train"),
    format: FormatName = typer.Option("waterbirds", "--format", help="dataset format"),
    attr: Optional[str] = typer.Option(None, "--attr", help="group attribute column (evaluation only)"),
    target: Optional[str] = typer.Option(None, "--target", help="label attribute (celeba)"),
    annotations: Optional[Path] = typer.Option(None, "--annotations",
                                               help="annotations.jsonl for the offline backends (default: DATA/annotations.jsonl)"),
    classes: Optional[list[str]] = typer.Option(None, "--classes", help="'all' (default) or class names or indices, comma-separated"),
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
    out_dir: Optional[Path] = typer.Option(None, "--out", help="batch folder (default: runs/batch-<time>); an existing "
                                           "one is resumed"),
    config_file: Optional[Path] = typer.Option(None, "--config", help="settings file (TOML or JSON): batch.*, agent.*, ..."),
    seed: int = typer.Option(0, "--seed"),
    offline: bool = typer.Option(False, "--offline", help="plan with the deterministic planner, even with an LLM configured"),
    yes: bool = typer.Option(False, "--yes", "-y", help="accepted for symmetry with aspire audit: a batch never asks"),
    json_out: bool = typer.Option(False, "--json", help="print batch.json on stdout"),
    fail_on: Optional[str] = typer.Option(None, "--fail-on", help=FAIL_ON_HELP, callback=_check_fail_on),
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
    cfg = _probe_config(config_file, annotations, data)
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
    result = run_batch(out_dir or _default_run_dir("batch"), data=data, model=model, format=format, attr=attr,
                       target=target, classes=_split_classes(classes), group_size=group_size, seed=seed, config=cfg,
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
            for unit, error in ((s.get("reprobe") or {}).get("errors") or {}).items():
                err.print(f"warning: re-probe of {unit} failed: {error}", highlight=False, soft_wrap=True)
        elif isinstance(s.get("repair"), dict) and s["repair"].get("reason"):
            out.print(f"repair: {s['repair']['reason']}", highlight=False, soft_wrap=True)
        out.print(f"report: {result.paths['html']}", highlight=False, soft_wrap=True)
        out.print(f"batch: {result.batch_dir}", highlight=False, soft_wrap=True)
    if not result.failed:
        from aspire.schemas import Finding

        _gate([Finding.model_validate(f) for r in s["classes"] for f in r["findings"]], fail_on)
    if result.failed:
        err.print(f"[red]error:[/red] {len(result.failed)} class(es) failed ({', '.join(result.failed)}); re-run the "
                  "same command to retry them", highlight=False, soft_wrap=True)
        raise typer.Exit(1)

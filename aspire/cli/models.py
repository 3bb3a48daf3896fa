"""Commands over datasets and classifiers: train, eval, reliance, and the toy benchmarks (aspire data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from aspire.cli.app import app, data_app
from aspire.cli.options import ArchName, Attr, Data, Device, Format, Json, Model, Seed, Target
from aspire.cli.render import err, eval_table, out, print_json


# ---------------------------------------------------------------- train / eval (aspire.models)
@app.command("train")
def train_cmd(
    data: Data = ...,
    format: Format = "waterbirds",
    attr: Attr = None,
    target: Target = None,
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
    seed: Seed = 0,
    pretrained: Optional[str] = typer.Option(None, "--pretrained",
                                             help="resnets: 'imagenet' (torchvision weights) or a local ImageNet state dict file"),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="square input size in px; default: smallcnn 64, resnets 224"),
    crop_flip: bool = typer.Option(True, "--crop-flip/--no-crop-flip", help="random resized crop and horizontal flip while training"),
    device: Device = None,
    json_out: Json = False,
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
    from aspire.atomic import check_writable
    from aspire.config import TrainSettings
    from aspire.data.formats import load_dataset
    from aspire.errors import ConfigError, DataError
    from aspire.models.classifier import build_classifier, load_checkpoint, save_checkpoint
    from aspire.models.evaluate import evaluate
    from aspire.models.methods import METHODS, Augmentation, MethodSettings, OptimSettings, train_with_method

    # 1. check the output, the method, the model to start from, and fill the arch's defaults
    check_writable(out_path, "checkpoint")
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
    trained_on = {s.y for s in ds.split("train")}
    untrained = [name for y, name in enumerate(ds.class_names) if y not in trained_on]
    if untrained and init is None:
        raise DataError(f"{ds.root}: class {untrained[0]!r} has no training images (a model cannot learn it)")
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
        eval_table(val, "validation")


@app.command("eval")
def eval_cmd(
    data: Data = ...,
    format: Format = "waterbirds",
    attr: Attr = None,
    target: Target = None,
    model: Model = ...,
    split: Literal["train", "val", "test"] = typer.Option("test", "--split"),
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    device: Device = None,
    json_out: Json = False,
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
        eval_table(result, f"{split} ({clf.arch}, {model.name})")


# ---------------------------------------------------------------- toy benchmarks and reliance (aspire.data.toy)
def _parse_sizes(sizes: Optional[str]) -> Optional[dict[str, int]]:
    if sizes is None:
        return None
    parts = sizes.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise typer.BadParameter(f"expected three positive integers TRAIN,VAL,TEST, got {sizes!r}", param_hint="--sizes")
    return dict(zip(("train", "val", "test"), (int(p) for p in parts)))


def _write_toy(name: str, out_dir: Path, seed: int, scale: int, size_px: int, sizes: Optional[str], json_out: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from aspire.progress import progress_bars

    from aspire.data.toy import write_benchmark

    per_class = _parse_sizes(sizes)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with progress_bars(*columns, console=err, transient=True) as bar:
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


ToyOut = Annotated[Path, typer.Option("--out", help="folder to create (refused if it exists and is not empty)")]
ToySeed = Annotated[int, typer.Option("--seed", help="same seed, byte-identical files")]
ToyScale = Annotated[int, typer.Option("--scale", min=1, help="multiply the number of images (default 1600/400/800)")]
ToySize = Annotated[int, typer.Option("--size", min=16, help="image size in px")]
ToySizes = Annotated[Optional[str], typer.Option("--sizes", help="images per class as TRAIN,VAL,TEST (overrides "
                                                 "--scale; e.g. 60,20,20 for a quick test set)")]


@data_app.command("toy-waterbirds")
def toy_waterbirds_cmd(
    out_dir: ToyOut = ...,
    seed: ToySeed = 0,
    scale: ToyScale = 1,
    size_px: ToySize = 64,
    sizes: ToySizes = None,
    json_out: Json = False,
) -> None:
    """Landbirds and waterbirds (shape carries the label) on land or water: 95% on their usual place in
    train, balanced groups in val/test; boats planted with waterbirds, fences with landbirds; sun and clouds
    with both. Writes metadata.csv (attribute `place`), captions with masks, ground truth and exact test
    counterfactuals."""
    _write_toy("toy-waterbirds", out_dir, seed, scale, size_px, sizes, json_out)


@data_app.command("toy-multiclass")
def toy_multiclass_cmd(
    out_dir: ToyOut = ...,
    seed: ToySeed = 0,
    scale: ToyScale = 1,
    size_px: ToySize = 64,
    sizes: ToySizes = None,
    json_out: Json = False,
) -> None:
    """Eight shapes; six with their own planted element at their own strength (one a background: snow),
    two controls with none. Group attribute column `attr` (use --attr attr): 1 when the image shows its own
    class's planted element. Same files as toy-waterbirds."""
    _write_toy("toy-multiclass", out_dir, seed, scale, size_px, sizes, json_out)


@app.command("reliance")
def reliance_cmd(
    data: Path = typer.Option(..., "--data", help="dataset folder with counterfactuals.csv (the toy benchmarks write one)"),
    model: Model = ...,
    batch_size: int = typer.Option(128, "--batch-size", min=1),
    device: Device = None,
    json_out: Json = False,
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

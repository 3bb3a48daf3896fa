"""Shared by the evals: toy data, a trained ERM model per seed, mean ± std, JSON + Markdown output."""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

from aspire.atomic import write_json, write_text

BENCHMARKS = ("toy-waterbirds", "toy-multiclass")
TRUTH_TEST_PER_CLASS = 1000  # test images per class of the reliance measurement (evals' --truth-test-per-class)
DEBUG_SIZES = {"train": 40, "val": 12, "test": 12}  # images per class per split in --debug runs
# ERM epochs per benchmark when --epochs is not given: enough for smallcnn to learn the task. At 10 epochs it
# underfits toy-multiclass (42 % average test accuracy, seed 0); at 30 it learns the shapes (81 %).
EPOCHS = {"toy-waterbirds": 10, "toy-multiclass": 30}
WORLD_EPOCHS = 10  # the worlds of evals/worlds.py are toy-waterbirds variants


def eval_parser(doc: str, debug_help: str) -> argparse.ArgumentParser:
    """The arguments every eval takes; an eval adds its own."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--benchmarks", nargs="*", default=list(BENCHMARKS), choices=BENCHMARKS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help=f"default per benchmark: {EPOCHS}")
    ap.add_argument("--workdir", type=Path, default=Path("evals/work"))
    ap.add_argument("--out", type=Path, default=Path("evals/results"))
    ap.add_argument("--debug", action="store_true", help=debug_help)
    ap.add_argument("--truth-test-per-class", type=int, default=TRUTH_TEST_PER_CLASS,
                    help="test images per class of the counterfactual set the true reliance is measured on (the "
                         "same training images; 0: the benchmark's own test split)")
    return ap


def device_name() -> str:
    """Where the models of this run train: the GPU's name, else the CPU's core count."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"


def toy_data(bench: str, seed: int, workdir: Path, debug: bool, test_per_class: int = 0) -> Path:
    """The benchmark for a seed, built once under workdir; `test_per_class` > 0: with that many test images per
    class (train and validation unchanged: scenes are drawn per split)."""
    from aspire.data.toy.benchmark import BENCHMARKS as SPECS
    from aspire.data.toy.benchmark import write_benchmark
    from aspire.data.toy.scenes import split_sizes

    from evals.worlds import WORLDS

    spec = (WORLDS.get(bench) or SPECS[bench])()
    sizes = DEBUG_SIZES if debug else None
    suffix = "-debug" if debug else ""
    if test_per_class > 0:
        sizes = {**split_sizes(spec, 1, sizes), "test": test_per_class}
        suffix += f"-test{test_per_class}"
    root = workdir / f"{bench}-seed{seed}{suffix}"
    if not (root / "metadata.csv").is_file():
        write_benchmark(spec, root, seed=seed, sizes=sizes)
    return root


def truth_data(bench: str, seed: int, workdir: Path, debug: bool, test_per_class: int) -> Path:
    """The counterfactual set true reliance is measured on: the benchmark with `test_per_class` test images per
    class. A benchmark's own test split can be small (toy-multiclass: 100 per class, so an element shown with a
    class at the base rate has 8 images, and one flip reads as a 0.125 accuracy drop)."""
    import csv

    probed = toy_data(bench, seed, workdir, debug)
    if test_per_class <= 0:
        return probed
    truth = toy_data(bench, seed, workdir, debug, test_per_class)

    def train_rows(root: Path) -> list[dict]:
        with open(root / "metadata.csv", newline="", encoding="utf-8") as f:
            return [r for r in csv.DictReader(f) if r["split"] != "2"]

    if train_rows(truth) != train_rows(probed):  # the same training images, or the truth is another model's
        raise RuntimeError(f"{truth}: its training and validation images differ from {probed}'s")
    return truth


def erm_model(data: Path, seed: int, workdir: Path, epochs: int, arch: str = "smallcnn") -> Path:
    """An ERM classifier for the dataset and seed, trained once and cached as a checkpoint."""
    from aspire.data.formats import load_dataset
    from aspire.models.classifier import build_classifier, save_checkpoint
    from aspire.models.train import train_classifier

    path = workdir / f"{data.name}-{arch}-erm-e{epochs}.pt"
    if not path.is_file():
        ds = load_dataset(data)
        clf = build_classifier(arch, ds.class_names, seed=seed)
        train_classifier(clf, ds.split("train"), ds.split("val"), epochs=epochs, seed=seed, augment=True,
                         progress=False, **recipe(arch))
        save_checkpoint(clf, path)
    return path


def recipe(arch: str = "smallcnn") -> dict[str, float]:
    """The architecture's default batch size, lr and weight decay (config.TrainSettings), as keyword arguments."""
    from aspire.config import TrainSettings

    return TrainSettings.for_arch(arch).model_dump(exclude={"epochs"})


def mean_std(values: Iterable[float]) -> dict[str, float]:
    v = [float(x) for x in values if x is not None]
    return {"mean": statistics.fmean(v) if v else float("nan"),
            "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}


def fmt(ms: dict[str, float], pct: bool = True) -> str:
    k = 100.0 if pct else 1.0
    if ms["n"] == 0:
        return "n/a"
    return f"{ms['mean'] * k:.1f} ± {ms['std'] * k:.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def args_json(args: argparse.Namespace) -> dict[str, Any]:
    """An eval's arguments as the results file records them (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def finish(args: argparse.Namespace, name: str, summary: dict, runs: list, markdown: str, *also: Path) -> dict:
    """An eval's end: {args, summary, runs} as <name>.json and the Markdown beside it, both printed."""
    results = {"args": args_json(args), "summary": summary, "runs": runs}
    written = [*write_results(args.out, name, results, markdown), *also]
    print(markdown)
    print("wrote " + ", ".join(str(p) for p in written))
    return results


def write_results(out_dir: Path, name: str, results: dict, markdown: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_json(out_dir / f"{name}.json", results), write_text(out_dir / f"{name}.md", markdown)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2)

"""The paper's table on the toy benchmarks: does ASPIRE's augmentation raise every method's worst-group accuracy?

For each toy benchmark and seed (data seed = model seed): build the benchmark, train ERM (smallcnn) once,
probe it (`ProbePipeline`, offline backends, the benchmark's annotations.jsonl) and build two augmented sets
from the probe run:

- aspire: `augment_run` with augment.select = "spurious" (the default). When no class has a spurious group
  with flipped edits, it falls back to "significant", then "flipping"; the rule used and why the earlier
  ones gave nothing are recorded per seed (`aspire.select`, `aspire.fallback`) and shown under the table.
- generic (the paper's "Azizi et al." row): augment.select = "generic", capped at the aspire set's images per
  class (same classes, same count): the class's hold-out images on backgrounds of its own training images.

Then every method x {none, generic, aspire} is trained (aspire.models.methods.train_with_method, the CLI's
smallcnn settings) and evaluated on the test split with the benchmark's groups (GROUP_ATTR). ERM without
augmentation is the ERM model itself; DFR retrains the last layer of that ERM model (--init). Every
benchmark, model, probe run, augmented set and cell result (and its checkpoint) is cached under --workdir: a
re-run resumes.
Results are written after every seed, so a partial run leaves a partial table.

Each benchmark's results go to their own files (evals/results/toy_table_<benchmark>.json and .md), so one
benchmark can be run (or re-run) without touching the other's.

    python -m evals.toy_table_eval [--benchmarks ...] [--seeds 0 1 2] [--methods ...] [--epochs N] [--debug]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

from evals.common import (EPOCHS, args_json, device_name, erm_model, eval_parser, fmt, markdown_table, mean_std,
                          recipe, toy_data, write_results)
from evals.erm_eval import GROUP_ATTR

METHODS = ("erm", "groupdro", "jtt", "dfr", "subg")
AUGMENTATIONS = ("none", "generic", "aspire")
ASPIRE_SELECTS = ("spurious", "significant", "flipping")  # the default first, then the fallbacks
DEBUG_IMAGES_PER_CLASS = 40
DEBUG_EPOCHS = 3  # 1 epoch leaves a constant predictor on the debug data: nothing flips, no aspire set
DEBUG_METHOD_SETTINGS = {"jtt_upweight": 3, "dfr_refits": 2}  # JTT's lambda 20 makes a tiny run's stage 2 the slowest


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------- probe and augmented sets
def probe_pipeline(data: Path, model: Path, seed: int, run_dir: Path):
    """The probe pipeline of the ERM model in run_dir (offline backends), recorded as `aspire probe` does."""
    from aspire.config import load_config
    from aspire.data.formats import load_dataset
    from aspire.models.classifier import load_checkpoint
    from aspire.workflows.probe import ProbePipeline
    from aspire.provenance import run_record
    from aspire.workflows.runs import RunArgs, open_run

    ann = str((data / "annotations.jsonl").resolve())
    cfg = load_config(None, {"caption": {"annotations": ann}, "ground": {"annotations": ann}})
    clf = load_checkpoint(model)
    store = open_run(run_dir, "probe", RunArgs(data=str(data.resolve()), model=str(model.resolve()), seed=seed))
    if store.get_meta("record") is None:
        store.set_meta("record", run_record(cfg, seed=seed, classifier={"arch": clf.arch, "classes": clf.class_names}))
    return ProbePipeline(load_dataset(data), clf, cfg, store, seed=seed)


def probe_run(data: Path, model: Path, seed: int, run_dir: Path) -> dict:
    """A finished probe run of the ERM model (resumed when run_dir holds one)."""
    started = time.perf_counter()
    result = probe_pipeline(data, model, seed, run_dir).run()
    return {"run_dir": str(run_dir), "seconds": round(time.perf_counter() - started, 1), "counts": vars(result.counts),
            "findings": len(result.findings), "spurious": sum(1 for f in result.findings if f.spurious)}


def _set_config(run_dir: Path, select: str, images_per_class: Optional[int]):
    from aspire.workflows.repair import run_config

    cfg = run_config(run_dir)
    cfg.augment.select = select
    if images_per_class is not None:
        cfg.generate.images_per_class = images_per_class
    return cfg


def aspire_set(run_dir: Path, out_root: Path, seed: int, images_per_class: Optional[int]) -> tuple[Optional[dict], list]:
    """(the aspire set: spurious, else the first fallback rule with flipped edits, or None; the rules that gave
    nothing, with why)."""
    from aspire.workflows.repair import augment_run, select_edits
    from aspire.store import RunStore

    def config(select: str):
        return _set_config(run_dir, select, images_per_class)

    # the first rule under which some class has flipped edits (never a silent fallback)
    store = RunStore(run_dir)
    class_names = list(store.get_meta("record")["classifier"]["classes"])
    fallback, chosen = [], None
    for select in ASPIRE_SELECTS:
        selections, skipped = select_edits(store, class_names, range(len(class_names)), config(select))
        if selections:
            chosen = select
            break
        fallback.append({"select": select, "skipped": skipped})
    store.close()
    if chosen is None:
        return None, fallback
    started = time.perf_counter()
    r = augment_run(run_dir, out_root / f"aspire-{chosen}", config(chosen), seed, on_message=lambda m: None)
    return {"select": chosen, "dir": str(r.out_dir), "n_images": r.n_images, "per_class": r.per_class,
            "skipped": r.skipped, "notes": r.notes, "seconds": round(time.perf_counter() - started, 1)}, fallback


def augmented_sets(run_dir: Path, out_root: Path, seed: int, images_per_class: Optional[int]) -> dict:
    """The aspire set and the generic set of the same size per class. A set that cannot be made is None, with
    the reason recorded."""
    from aspire.workflows.repair import augment_run

    aspire, fallback = aspire_set(run_dir, out_root, seed, images_per_class)
    # generic: the aspire set's images per class; without an aspire set, the generator's count for every class
    started = time.perf_counter()
    counts = aspire["per_class"] if aspire else None
    cfg = _set_config(run_dir, "generic", images_per_class)
    r = augment_run(run_dir, out_root / "generic", cfg, seed, counts=counts, on_message=lambda m: None)
    generic = {"select": "generic", "dir": str(r.out_dir), "n_images": r.n_images, "per_class": r.per_class,
               "skipped": r.skipped, "notes": r.notes, "seconds": round(time.perf_counter() - started, 1),
               "counts_from": "aspire" if aspire else "generate.images_per_class"}
    return {"aspire": aspire, "aspire_fallback": fallback, "generic": generic}


# ---------------------------------------------------------------- one cell of the table
def train_cell(method: str, aug: str, bench: str, data: Path, erm_path: Path, augdir: Optional[str], seed: int,
               epochs: int, method_settings: dict, checkpoint: Optional[Path] = None) -> dict:
    """Train `method` with augmentation `aug` (none: augdir None) and evaluate it on test (and save it to
    `checkpoint` when given)."""
    from aspire.data.augmented import load_augmented
    from aspire.data.formats import load_dataset
    from aspire.models.classifier import build_classifier, load_checkpoint, save_checkpoint
    from aspire.models.evaluate import evaluate
    from aspire.models.methods import Augmentation, MethodSettings, OptimSettings, train_with_method

    ds = load_dataset(data, attr=GROUP_ATTR[bench])
    started = time.perf_counter()
    if method == "erm" and aug == "none":
        clf = load_checkpoint(erm_path)  # the seed's ERM model, trained once
        seconds = clf.train_info.get("total_seconds") or clf.train_info.get("seconds")
    else:
        augmentation = None if augdir is None else \
            Augmentation(augdir, load_augmented(augdir, class_names=ds.class_names), None)
        optim = OptimSettings(epochs=epochs, seed=seed, crop_flip=True, progress=False, **recipe())
        init = load_checkpoint(erm_path) if method == "dfr" else None
        clf = train_with_method(method, ds, lambda: build_classifier("smallcnn", ds.class_names, seed=seed), optim,
                                MethodSettings(**method_settings), augmentation=augmentation, init=init)
        seconds = round(time.perf_counter() - started, 1)
    if checkpoint is not None:
        save_checkpoint(clf, checkpoint)
    r = evaluate(clf, ds, "test")
    return {"worst_group_accuracy": r.worst_group_accuracy, "average_accuracy": r.average_accuracy,
            "weighted_average_accuracy": r.weighted_average_accuracy, "worst_group": r.worst_group,
            "train_seconds": seconds, "n_added": (clf.train_info.get("augmentation") or {}).get("n_added", 0)}


def run_seed(bench: str, seed: int, epochs: int, args: argparse.Namespace) -> dict:
    from aspire.atomic import write_json

    started = time.perf_counter()
    data = toy_data(bench, seed, args.workdir, args.debug)
    erm_path = erm_model(data, seed, args.workdir, epochs)
    root = args.workdir / "toy_table" / f"{data.name}-e{epochs}"
    root.mkdir(parents=True, exist_ok=True)
    log(f"{bench} seed {seed}: probing the ERM model")
    probe = probe_run(data, erm_path, seed, root / "probe")
    log(f"{bench} seed {seed}: {probe['findings']} findings ({probe['spurious']} spurious) in {probe['seconds']} s; "
        "generating the augmented sets")
    sets = augmented_sets(root / "probe", root / f"aug-n{args.images_per_class or 'default'}", seed,
                          args.images_per_class)
    cells: dict[str, dict[str, Optional[dict]]] = {}
    for method in args.methods:
        cells[method] = {}
        for aug in AUGMENTATIONS:
            augset = None if aug == "none" else sets[aug]
            if aug != "none" and augset is None:
                cells[method][aug] = None  # no set of this kind could be made (reason in the run's sets)
                continue
            cache = root / "cells" / f"{method}-{aug}-n{args.images_per_class or 'default'}.json"
            if cache.is_file():
                cells[method][aug] = json.loads(cache.read_text())
                continue
            log(f"{bench} seed {seed}: training {method} + {aug}")
            cell = train_cell(method, aug, bench, data, erm_path, augset["dir"] if augset else None, seed, epochs,
                              args.method_settings, checkpoint=cache.with_suffix(".pt"))
            write_json(cache, cell)
            cells[method][aug] = cell
            log(f"{bench} seed {seed}: {method} + {aug}: worst-group {cell['worst_group_accuracy']:.3f}, "
                f"average {cell['average_accuracy']:.3f} ({cell['train_seconds']} s)")
    return {"benchmark": bench, "seed": seed, "device": device_name(), "probe": probe, "sets": sets, "cells": cells,
            "wall_seconds": round(time.perf_counter() - started, 1)}


# ---------------------------------------------------------------- the table
def summarize(runs: list[dict], benchmarks: list[str], methods: list[str]) -> dict:
    summary: dict = {}
    for b in benchmarks:
        mine = [r for r in runs if r["benchmark"] == b]
        if not mine:
            continue
        summary[b] = {m: {a: {k: mean_std(r["cells"][m][a][k] for r in mine if r["cells"][m][a] is not None)
                              for k in ("worst_group_accuracy", "average_accuracy")}
                          for a in AUGMENTATIONS} for m in methods}
    return summary


def markdown(runs: list[dict], summary: dict, epochs: int, wall_seconds: float) -> str:
    md = ""
    for b, per_method in summary.items():
        mine = [r for r in runs if r["benchmark"] == b]
        md += (f"### {b}: worst-group / average test accuracy with and without augmentation (smallcnn, {epochs} "
               f"epochs; groups: {GROUP_ATTR[b]}; seeds: {', '.join(str(r['seed']) for r in mine)})\n\n")
        rows = [[m] + [fmt(per_method[m][a]["worst_group_accuracy"]) for a in AUGMENTATIONS]
                + [fmt(per_method[m][a]["average_accuracy"]) for a in AUGMENTATIONS] for m in per_method]
        md += markdown_table(["method"] + [f"worst-group % ({a})" for a in AUGMENTATIONS]
                             + [f"average % ({a})" for a in AUGMENTATIONS], rows) + "\n"
        for r in mine:
            a, g = r["sets"]["aspire"], r["sets"]["generic"]
            if a is None:
                aspire = "aspire: no set (no class has flipped edits under any rule)"
            else:
                aspire = f"aspire: {a['n_images']} images {a['per_class']}, augment.select = {a['select']}"
                if r["sets"]["aspire_fallback"]:
                    tried = ", ".join(f["select"] for f in r["sets"]["aspire_fallback"])
                    aspire += f" (fallback: nothing under {tried})"
            md += (f"- seed {r['seed']}: {aspire}; generic: {g['n_images']} images {g['per_class']}; probe "
                   f"{r['probe']['findings']} findings, {r['probe']['spurious']} spurious; wall "
                   f"{r['wall_seconds'] / 60:.1f} min on {r.get('device', 'cpu')}\n")
        md += "\n"
    md += (f"Mean ± std over seeds, in %. none: the real training split only; generic: the class's hold-out images "
           f"recombined onto backgrounds of its own training images (no spurious feature targeted; same images per "
           f"class as aspire); aspire: the probe's flipped edits recombined onto backgrounds without the class's "
           f"spurious features (offline generator). Total wall time {wall_seconds / 60:.1f} min.\n")
    return md


def merge(files: list[Path], out: Path) -> dict:
    """One benchmark's table from results files holding different seeds of it (same epochs and methods)."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    keys = {(p["args"]["benchmarks"][0], p["args"]["epochs"], tuple(p["args"]["methods"])) for p in parts}
    runs = sorted((r for p in parts for r in p["runs"]), key=lambda r: r["seed"])
    seeds = [r["seed"] for r in runs]
    if len(keys) != 1 or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--merge: the files must hold one benchmark, epochs and methods, each seed once "
                         f"(got {sorted(keys)}, seeds {seeds})")
    (bench, epochs, methods), = keys
    wall = sum(p["wall_seconds"] for p in parts)
    summary = summarize(runs, [bench], list(methods))
    results = {"args": {**parts[0]["args"], "seeds": seeds, "merged_from": [str(f) for f in files]},
               "complete": all(p["complete"] for p in parts), "wall_seconds": wall, "summary": summary, "runs": runs}
    md = markdown(runs, summary, epochs, wall)
    json_path, md_path = write_results(out, f"toy_table_{bench}", results, md)
    print(md)
    print(f"wrote {json_path} and {md_path}")
    return {bench: results}


def main(argv: Optional[list[str]] = None) -> dict:
    ap = eval_parser(__doc__, f"tiny data, 1 seed, {DEBUG_EPOCHS} epochs, {DEBUG_IMAGES_PER_CLASS} generated "
                     "images per class, JTT lambda and DFR refits cut")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--images-per-class", type=int, default=None,
                    help="offline generator's images per class (default: the generator's, 800; --debug: 40)")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="RESULTS_JSON",
                    help="combine the seeds of results files of one benchmark (seeds run on separate machines) "
                         "into --out; trains nothing")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    if args.debug:
        args.seeds, args.epochs = args.seeds[:1], args.epochs or DEBUG_EPOCHS
        args.images_per_class = args.images_per_class or DEBUG_IMAGES_PER_CLASS
    args.method_settings = DEBUG_METHOD_SETTINGS if args.debug else {}
    every: dict[str, dict] = {}
    for b in args.benchmarks:
        started, epochs, runs = time.perf_counter(), args.epochs or EPOCHS[b], []
        name = f"toy_table_{b}{'_debug' if args.debug else ''}"
        for s in args.seeds:
            runs.append(run_seed(b, s, epochs, args))
            # results after every seed: a partial run leaves a partial table
            wall = time.perf_counter() - started
            summary = summarize(runs, [b], args.methods)
            md = markdown(runs, summary, epochs, wall)
            every[b] = {"args": {**args_json(args),
                                 "benchmarks": [b], "epochs": epochs},
                        "complete": len(runs) == len(args.seeds), "wall_seconds": round(wall, 1),
                        "summary": summary, "runs": runs}
            json_path, md_path = write_results(args.out, name, every[b], md)
        print(md)
        print(f"wrote {json_path} and {md_path}")
    return every


if __name__ == "__main__":
    main()

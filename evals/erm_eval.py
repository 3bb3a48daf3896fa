"""ERM baselines on the toy benchmarks: worst-group, plain and weighted average test accuracy, train time.

    python -m evals.erm_eval [--seeds 0 1 2] [--epochs N (default per benchmark: common.EPOCHS)] [--debug]

Each seed builds its own benchmark (data seed = model seed) and trains smallcnn with the CLI defaults.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from evals.common import EPOCHS, eval_parser, finish, fmt, markdown_table, mean_std, recipe, toy_data

GROUP_ATTR = {"toy-waterbirds": "place", "toy-multiclass": "attr"}


def run_seed(bench: str, seed: int, workdir: Path, debug: bool, epochs: int) -> dict:
    from aspire.data.formats import load_dataset
    from aspire.models.classifier import build_classifier
    from aspire.models.evaluate import evaluate
    from aspire.models.train import train_classifier

    data = toy_data(bench, seed, workdir, debug)
    ds = load_dataset(data, attr=GROUP_ATTR[bench])
    clf = build_classifier("smallcnn", ds.class_names, seed=seed)
    started = time.perf_counter()
    train_classifier(clf, ds.split("train"), ds.split("val"), epochs=epochs, seed=seed, augment=True, progress=False,
                     **recipe())
    seconds = time.perf_counter() - started
    r = evaluate(clf, ds, "test")
    return {"benchmark": bench, "seed": seed, "epochs": epochs, "train_seconds": round(seconds, 1),
            "worst_group_accuracy": r.worst_group_accuracy, "average_accuracy": r.average_accuracy,
            "weighted_average_accuracy": r.weighted_average_accuracy, "worst_group": r.worst_group}


def main(argv: Optional[list[str]] = None) -> dict:
    ap = eval_parser(__doc__, "tiny data, 1 seed, 1 epoch")
    args = ap.parse_args(argv)
    if args.debug:
        args.seeds, args.epochs = args.seeds[:1], 1
    runs = [run_seed(b, s, args.workdir, args.debug, args.epochs or EPOCHS[b]) for b in args.benchmarks for s in args.seeds]
    rows, summary = [], {}
    for b in args.benchmarks:
        mine = [r for r in runs if r["benchmark"] == b]
        s = {k: mean_std(r[k] for r in mine) for k in
             ("worst_group_accuracy", "average_accuracy", "weighted_average_accuracy", "train_seconds")}
        summary[b] = s
        rows.append([b, args.epochs or EPOCHS[b], len(mine), fmt(s["worst_group_accuracy"]), fmt(s["average_accuracy"]),
                     fmt(s["weighted_average_accuracy"]), fmt(s["train_seconds"], pct=False)])
    md = ("## ERM (smallcnn), test split\n\n"
          + markdown_table(["benchmark", "epochs", "seeds", "worst-group %", "average %", "weighted average %", "train s"], rows)
          + "\nMean ± std over seeds.\n")
    return finish(args, "erm_debug" if args.debug else "erm", summary, runs, md)


if __name__ == "__main__":
    main()

"""Calibration: does the probe's effect track the model's true reliance, before and after the repair?

For each toy benchmark and seed: the ERM model, its probe run and its aspire set (evals/toy_table_eval.py, which
shares this eval's cache under --workdir), ERM retrained with that set (the toy table's ERM + aspire cell), and
the exact counterfactual reliance of both models (`aspire reliance`). The probe run is then re-probed on the
repaired model (`ProbePipeline.reprobe`: the same stored edits and controls).

Every probed (class, element) with counterfactuals is one point per model: the probe's effect (the finding whose
member phrases name the element, the one with the most pairs when several do) against the measured accuracy drop
and the mean drop of P(true class) on the counterfactuals. Reported: Spearman's rho over all points of a
benchmark (seeds pooled, and per seed), before, after, and both; a scatter plot; and for every finding the repair
targeted (spurious before, its class given generated images), its effect before -> after and the verdict.

    python -m evals.calibration_eval [--benchmarks ...] [--seeds 0 1 2] [--min-counterfactuals 20] [--debug]
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from evals.common import EPOCHS, erm_model, eval_parser, finish, markdown_table, mean_std, toy_data, truth_data
from evals.discovery_eval import match_element
from evals.toy_table_eval import DEBUG_EPOCHS, DEBUG_IMAGES_PER_CLASS, aspire_set, probe_pipeline, train_cell

MEASURES = ("mean_prob_drop", "drop")  # the counterfactual's probability drop and accuracy drop


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def repaired_model(bench: str, data: Path, erm_path: Path, augdir: str, seed: int, epochs: int, root: Path,
                   images_per_class: Optional[int]) -> Path:
    """ERM retrained with the aspire set: the toy table's ERM + aspire cell, trained once and cached."""
    from aspire.atomic import write_json

    cache = root / "cells" / f"erm-aspire-n{images_per_class or 'default'}.json"
    path = cache.with_suffix(".pt")
    if not path.is_file():
        log(f"{bench} seed {seed}: training ERM + aspire")
        write_json(cache, train_cell("erm", "aspire", bench, data, erm_path, augdir, seed, epochs, {}, checkpoint=path))
    return path


def points(findings, reliance, elements: dict, after: bool) -> list[dict]:
    """One point per (class, element) with counterfactuals and a probed finding naming it."""
    best: dict[tuple[int, str], object] = {}
    for f in findings:
        element = match_element([f.phrase, *f.phrases], elements)
        key = (f.class_index, element)
        if element is not None and (key not in best or f.pairs > best[key].pairs):
            best[key] = f
    out = []
    for r in reliance:
        f = best.get((r.class_index, r.element))
        if f is None or (after and f.after is None):
            continue
        out.append({"class": r.class_, "element": r.element, "n": r.n, "drop": r.drop,
                    "mean_prob_drop": r.mean_prob_drop, "effect": (f.after if after else f).effect,
                    "phrase": f.phrase, "pairs": f.pairs, "spurious": (f.after if after else f).spurious})
    return out


def correlation(rows: list[dict], measure: str, method: str = "spearman") -> Optional[float]:
    """Spearman's rho (or Pearson's r) of the probe's effect and the measured drop; None where undefined."""
    from scipy.stats import pearsonr, spearmanr

    x, y = [r["effect"] for r in rows], [r[measure] for r in rows]
    if len(rows) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float((spearmanr if method == "spearman" else pearsonr)(x, y).statistic)



def sample(run: dict, when: str) -> list[dict]:
    """A run's points before or after the repair, or both."""
    return run["before"] + run["after"] if when == "both" else run[when]


def run_seed(bench: str, seed: int, epochs: int, args) -> dict:
    from aspire.data.toy.reliance import measure_reliance
    from aspire.models.classifier import load_checkpoint

    started = time.perf_counter()
    data = toy_data(bench, seed, args.workdir, args.debug)
    erm_path = erm_model(data, seed, args.workdir, epochs)
    root = args.workdir / "toy_table" / f"{data.name}-e{epochs}"
    # 1. the probe run of the ERM model, its aspire set, the repaired model
    log(f"{bench} seed {seed}: probing the ERM model")
    pipeline = probe_pipeline(data, erm_path, seed, root / "probe")
    pipeline.run()
    aspire, _ = aspire_set(root / "probe", root / f"aug-n{args.images_per_class or 'default'}", seed,
                           args.images_per_class)
    if aspire is None:
        return {"benchmark": bench, "seed": seed, "repaired": None, "before": [], "after": [], "targeted": []}
    after_path = repaired_model(bench, data, erm_path, aspire["dir"], seed, epochs, root, args.images_per_class)
    after_clf = load_checkpoint(after_path)
    # 2. re-probe on the repaired model; true reliance of both
    log(f"{bench} seed {seed}: re-probing on the repaired model")
    findings = pipeline.reprobe(after_clf, str(after_path))
    elements = json.loads((data / "ground_truth.json").read_text())["elements"]
    truth = truth_data(bench, seed, args.workdir, args.debug, args.truth_test_per_class)
    reliance_before = measure_reliance(pipeline.classifier, truth)
    reliance_after = measure_reliance(after_clf, truth)
    targeted = [{"class": f.class_, "phrase": f.phrase, "kind": f.kind, "effect": f.effect,
                 "after": f.after.effect, "verdict": f.after.verdict}
                for f in findings if f.spurious and f.after is not None and aspire["per_class"].get(f.class_)]
    return {"benchmark": bench, "seed": seed, "repaired": str(after_path), "aspire": aspire,
            "before": points(findings, reliance_before, elements, after=False),
            "after": points(findings, reliance_after, elements, after=True),
            "targeted": targeted, "verdicts": pipeline.store.get_meta("reprobe").get("verdicts", {}),
            "seconds": round(time.perf_counter() - started, 1)}


def scatter(runs: list[dict], benchmarks: list[str], measure: str, path: Path) -> Path:
    """Probe effect vs the measured drop, one panel per benchmark; before (circles) and after the repair (crosses)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * len(benchmarks), 4.4), dpi=100)
    FigureCanvasAgg(fig)
    for i, b in enumerate(benchmarks, 1):
        ax = fig.add_subplot(1, len(benchmarks), i)
        for when, marker, colour in (("before", "o", "#2e86c1"), ("after", "x", "#c0392b")):
            rows = [p for r in runs if r["benchmark"] == b for p in r[when]]
            ax.scatter([p[measure] for p in rows], [p["effect"] for p in rows], marker=marker, color=colour,
                       alpha=0.75, label=f"{when} repair (n={len(rows)})")
        ax.axhline(0, color="#b3b6b7", linewidth=0.8)
        ax.axvline(0, color="#b3b6b7", linewidth=0.8)
        ax.set_title(b)
        ax.set_xlabel("counterfactual " + ("P(true class) drop" if measure == "mean_prob_drop" else "accuracy drop"))
        ax.set_ylabel("probe effect (paired drop of P(true class))")
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def main(argv: Optional[list[str]] = None) -> dict:
    ap = eval_parser(__doc__, f"tiny data, 1 seed, {DEBUG_EPOCHS} epochs, {DEBUG_IMAGES_PER_CLASS} generated images per class")
    ap.add_argument("--images-per-class", type=int, default=None,
                    help="offline generator's images per class (default: the generator's; --debug: 40)")
    ap.add_argument("--min-counterfactuals", type=int, default=20,
                    help="also report rho over the points with at least this many counterfactual images")
    ap.add_argument("--plot", type=Path, default=Path("docs/img/calibration.png"))
    args = ap.parse_args(argv)
    if args.debug:
        args.seeds, args.epochs = args.seeds[:1], args.epochs or DEBUG_EPOCHS
        args.images_per_class = args.images_per_class or DEBUG_IMAGES_PER_CLASS
        args.plot = args.out / "calibration_debug.png"
    runs = [run_seed(b, s, args.epochs or EPOCHS[b], args) for b in args.benchmarks for s in args.seeds]

    # 1. rho per benchmark and measure, before / after / both: pooled over seeds, per seed (mean ± std), on the
    #    points with enough counterfactuals; Pearson's r beside it (how linear, not only how monotone)
    def cell(value: Optional[float]) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    summary, rows = {}, []
    for b in args.benchmarks:
        mine = [r for r in runs if r["benchmark"] == b]
        s = {}
        for measure in MEASURES:
            for when in ("before", "after", "both"):
                pooled = [p for r in mine for p in sample(r, when)]
                large = [p for p in pooled if p["n"] >= args.min_counterfactuals]
                x = s[f"{measure}_{when}"] = {
                    "pooled": correlation(pooled, measure), "points": len(pooled),
                    "per_seed": mean_std(correlation(sample(r, when), measure) for r in mine),
                    "pooled_large": correlation(large, measure), "points_large": len(large),
                    "pearson": correlation(pooled, measure, "pearson")}
                per_seed = x["per_seed"]
                rows.append([b, "P(true) drop" if measure == "mean_prob_drop" else "accuracy drop", when,
                             f"{cell(x['pooled'])} (n={x['points']})",
                             "n/a" if not per_seed["n"] else f"{per_seed['mean']:.2f} ± {per_seed['std']:.2f}",
                             f"{cell(x['pooled_large'])} (n={x['points_large']})", cell(x["pearson"])])
        targeted = [t for r in mine for t in r["targeted"]]
        s["targeted"] = {"n": len(targeted), "dropped": sum(t["after"] < t["effect"] for t in targeted),
                         "verdicts": {v: sum(t["verdict"] == v for t in targeted)
                                      for v in ("removed", "reduced", "unchanged")}}
        summary[b] = s
    plot = scatter(runs, args.benchmarks, "mean_prob_drop", args.plot)

    # 2. the findings the repair targeted
    target_rows = [[r["benchmark"], r["seed"], t["class"], t["phrase"], t["kind"], f"{t['effect']:+.3f}",
                    f"{t['after']:+.3f}", t["verdict"]] for r in runs for t in r["targeted"]]
    md = ("## Calibration: probe effect vs exact-counterfactual reliance\n\n"
          + markdown_table(["benchmark", "measured", "model", "Spearman rho (pooled)", "rho per seed",
                            f"rho (n ≥ {args.min_counterfactuals} counterfactuals)", "Pearson r (pooled)"], rows)
          + "\nPoints: probed (class, element) pairs with counterfactuals, seeds pooled; model: the ERM model, the "
          + f"repaired one, or both. Per seed: mean ± std of rho. Scatter plot: {plot}.\n\n"
          + "Findings the repair targeted (spurious before, class given generated images):\n\n"
          + markdown_table(["benchmark", "seed", "class", "phrase", "kind", "effect before", "effect after",
                            "verdict"], target_rows or [["-"] * 8]))
    return finish(args, "calibration_debug" if args.debug else "calibration", summary, runs, md, plot)


if __name__ == "__main__":
    main()

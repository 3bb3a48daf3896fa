"""Discovery: are the spurious features aspire finds the ones the model relies on (and the ones planted)?

For each toy benchmark or world (evals/worlds.py) and seed: build it, train ERM (smallcnn), measure the model's
true reliance on every element from the exact counterfactual set, run `aspire probe` (offline backends, default
probe settings) and score its spurious findings per class:

- against reliance: an element is relied upon by a class when removing it (or swapping the place) drops that
  class's accuracy by at least --reliance-threshold on the counterfactual test set;
- against the planted correlations in ground_truth.json (the class's `spurious` elements).

A finding counts for the element most of its member phrases name (the eval's matching, by phrase: the probe
itself never sees the element names); a flagged finding that matches no element, or the wrong one, is a false
positive. Per class the probed groups are ranked by effect: precision@k and average precision (Domino's metrics)
against reliance. Also recorded per run: findings by joint removal, insertion results, and the probe's cost
(edits and classifier calls per tested group, removal alone vs with the insertion and joint tests).

The null world trains on balanced data: its runs report how many findings are flagged (the false-discovery
check: at most alpha of runs should flag anything).

    python -m evals.discovery_eval [--benchmarks ...] [--worlds ...] [--seeds 0 1 2] [--debug]
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Optional

from evals.common import (EPOCHS, WORLD_EPOCHS, erm_model, eval_parser, finish, fmt, markdown_table, mean_std,
                          toy_data, truth_data)
from evals.worlds import WORLDS
from aspire.config import ProbeSettings


def match_element(phrases: list[str], elements: dict) -> Optional[str]:
    """The element named by most of a finding's member phrases (None when none is)."""
    from aspire.tools import lexicon

    votes = Counter(name for p in phrases for name, el in elements.items()
                    if any(lexicon.same_phrase(p, q) for q in el["phrases"]))
    return votes.most_common(1)[0][0] if votes else None


def score(found: set[str], truth: set[str]) -> dict[str, float]:
    tp = len(found & truth)
    return {"tp": tp, "flagged": len(found), "relevant": len(truth),
            "precision": tp / len(found) if found else None,  # undefined when nothing is flagged
            "recall": tp / len(truth) if truth else None}


def precision_at_k(ranked: list[Optional[str]], truth: set[str], k: int) -> Optional[float]:
    top = ranked[:k]
    return sum(1 for e in top if e in truth) / len(top) if top else None


def average_precision(ranked: list[Optional[str]], truth: set[str]) -> Optional[float]:
    """Mean of precision@i at each rank i holding a not yet seen relied-upon element; missed ones count 0."""
    if not truth:
        return None
    seen, hits, total = set(), 0, 0.0
    for i, e in enumerate(ranked, 1):
        if e in truth and e not in seen:
            seen.add(e)
            hits += 1
            total += hits / i
    return total / len(truth)


def run_seed(bench: str, seed: int, workdir: Path, debug: bool, epochs: int, threshold: float, k: int,
             truth_per_class: int = 0) -> dict:
    import json

    from aspire.config import load_config
    from aspire.data.formats import load_dataset
    from aspire.data.toy.reliance import measure_reliance
    from aspire.models.classifier import load_checkpoint
    from aspire.workflows.probe import ProbePipeline
    from aspire.schemas import Edit
    from aspire.store import RunStore

    data = toy_data(bench, seed, workdir, debug)
    clf = load_checkpoint(erm_model(data, seed, workdir, epochs))
    truth = json.loads((data / "ground_truth.json").read_text())
    elements = truth["elements"]
    reliance = measure_reliance(clf, truth_data(bench, seed, workdir, debug, truth_per_class))

    ann = str(data / "annotations.jsonl")
    cfg = load_config(None, {"caption": {"annotations": ann}, "ground": {"annotations": ann}})
    run_dir = workdir / f"{data.name}-probe-e{epochs}"
    started = time.perf_counter()
    result = ProbePipeline(load_dataset(data), clf, cfg, RunStore(run_dir), seed=seed).run()
    probe_s = time.perf_counter() - started

    per_class = {}
    for c, name in enumerate(clf.class_names):
        relied = {r.element for r in reliance if r.class_index == c and r.drop >= threshold}
        planted = {s["element"] for s in truth["classes"][name]["spurious"]}
        findings = [f for f in result.findings if f.class_index == c]
        flagged = {match_element([f.phrase, *f.phrases], elements) or f"?{f.phrase}" for f in findings if f.spurious}
        ranked = [match_element([f.phrase, *f.phrases], elements) for f in sorted(findings, key=lambda f: -f.effect)]
        per_class[name] = {
            "flagged": sorted(flagged), "relied_upon": sorted(relied), "planted": sorted(planted),
            "joint": sorted(f.phrase for f in findings if f.joint),
            "vs_reliance": score(flagged, relied), "vs_planted": score(flagged, planted),
            "precision_at_k_reliance": precision_at_k(ranked, relied, k),
            "average_precision_reliance": average_precision(ranked, relied),
        }

    def overall(key: str) -> dict[str, float]:
        tp = sum(v[key]["tp"] for v in per_class.values())
        flagged = sum(v[key]["flagged"] for v in per_class.values())
        relevant = sum(v[key]["relevant"] for v in per_class.values())
        return {"precision": tp / flagged if flagged else None, "recall": tp / relevant if relevant else None}

    # the ceiling of a probability test: the exact counterfactual P(true) drop itself, thresholded, vs reliance
    relied_all = {(r.class_index, r.element) for r in reliance if r.drop >= threshold}

    def exact_test(at: float) -> dict[str, Optional[float]]:
        said = {(r.class_index, r.element) for r in reliance if r.mean_prob_drop >= at}
        tp = len(said & relied_all)
        return {"at": at, "precision": tp / len(said) if said else None,
                "recall": tp / len(relied_all) if relied_all else None}

    # the probe's cost: edits and classifier calls per tested group, removal alone vs every test
    store = RunStore(run_dir)
    edits = Counter(e.test for e in store.all("edit", Edit))
    tested = max(1, sum(1 for f in result.findings if f.pairs))
    holdout = result.counts.holdout
    aps = [v["average_precision_reliance"] for v in per_class.values() if v["average_precision_reliance"] is not None]
    return {"benchmark": bench, "seed": seed, "probe_seconds": round(probe_s, 1), "per_class": per_class,
            "vs_reliance": overall("vs_reliance"), "vs_planted": overall("vs_planted"),
            "exact_prob_drop": {"min_effect": exact_test(cfg.probe.min_effect), "threshold": exact_test(threshold)},
            "mean_average_precision": sum(aps) / len(aps) if aps else None,
            "n_flagged": sum(f.spurious for f in result.findings), "n_joint": sum(f.joint for f in result.findings),
            "cost": {"tested_groups": tested, "edits": dict(edits),
                     "removal_edits_per_group": edits["removal"] / tested,
                     "all_edits_per_group": sum(edits.values()) / tested,
                     "classifier_calls_per_group_removal": (edits["removal"] + holdout) / tested,
                     "classifier_calls_per_group_all": (sum(edits.values()) + holdout) / tested},
            "reliance": [r.to_json() for r in reliance], "counts": vars(result.counts), "joint": result.joint}


def main(argv: Optional[list[str]] = None) -> dict:
    ap = eval_parser(__doc__, "tiny data, 1 seed, 1 epoch")
    ap.add_argument("--worlds", nargs="*", default=[], choices=list(WORLDS))
    ap.add_argument("--reliance-threshold", type=float, default=0.1)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--name", default=None, help="results file name (default: discovery)")
    args = ap.parse_args(argv)
    if args.debug:
        args.seeds, args.epochs = args.seeds[:1], 1
    names = list(args.benchmarks) + list(args.worlds)

    def epochs(b: str) -> int:
        return args.epochs or EPOCHS.get(b, WORLD_EPOCHS)

    runs = [run_seed(b, s, args.workdir, args.debug, epochs(b), args.reliance_threshold, args.k,
                     args.truth_test_per_class) for b in names for s in args.seeds]
    summary, rows, cost_rows, exact_rows = {}, [], [], []
    for b in names:
        mine = [r for r in runs if r["benchmark"] == b]
        s = {f"{vs}_{m}": mean_std(r[vs][m] for r in mine)
             for vs in ("vs_reliance", "vs_planted") for m in ("precision", "recall")}
        s["mean_average_precision"] = mean_std(r["mean_average_precision"] for r in mine)
        s["runs_flagging_anything"] = sum(1 for r in mine if r["n_flagged"])
        s["joint_findings"] = sum(r["n_joint"] for r in mine)
        for at in ("min_effect", "threshold"):
            for m in ("precision", "recall"):
                s[f"exact_{at}_{m}"] = mean_std(r["exact_prob_drop"][at][m] for r in mine)
        summary[b] = s
        exact_rows.append([b, *(fmt(s[f"exact_{at}_{m}"]) for at in ("min_effect", "threshold")
                                for m in ("precision", "recall"))])
        rows.append([b, epochs(b), len(mine), fmt(s["vs_reliance_precision"]), fmt(s["vs_reliance_recall"]),
                     fmt(s["vs_planted_precision"]), fmt(s["vs_planted_recall"]), fmt(s["mean_average_precision"]),
                     f"{s['runs_flagging_anything']}/{len(mine)}", s["joint_findings"]])
        c = [r["cost"] for r in mine]
        cost_rows.append([b, fmt(mean_std(x["removal_edits_per_group"] for x in c), pct=False),
                          fmt(mean_std(x["all_edits_per_group"] for x in c), pct=False),
                          fmt(mean_std(x["classifier_calls_per_group_removal"] for x in c), pct=False),
                          fmt(mean_std(x["classifier_calls_per_group_all"] for x in c), pct=False),
                          fmt(mean_std(r["probe_seconds"] for r in mine), pct=False)])
    md = ("## Discovery: spurious findings of `aspire probe` (offline backends, ERM smallcnn)\n\n"
          + markdown_table(["benchmark", "epochs", "seeds", "precision vs reliance", "recall vs reliance",
                            "precision vs planted", "recall vs planted", "mAP vs reliance", "runs flagging",
                            "joint findings"], rows)
          + f"\nReliance threshold: accuracy drop ≥ {args.reliance_threshold} on the counterfactual test set "
          + (f"({args.truth_test_per_class} test images per class, the same training images). "
             if args.truth_test_per_class > 0 else "(the benchmark's own test split). ")
          + "Mean ± std over seeds, in %; n/a where no seed defines it (nothing flagged, or nothing relied upon).\n\n"
          + "Probe cost per tested group (mean ± std over seeds): edits and classifier calls (hold-out "
            "predictions + one per edit), removal alone vs with the insertion and joint tests; probe seconds per run.\n\n"
          + markdown_table(["benchmark", "edits/group (removal)", "edits/group (all tests)",
                            "calls/group (removal)", "calls/group (all tests)", "probe s"], cost_rows)
          + "\nThe ceiling of any test on the probability: the exact counterfactual drop of P(true class) (on the "
            "same counterfactual set as the reliance) as the verdict, at the probe's `min_effect` "
            f"({ProbeSettings().min_effect}) and at the reliance threshold, vs the reliance (accuracy drop):\n\n"
          + markdown_table(["benchmark", "precision at min_effect", "recall at min_effect",
                            "precision at the threshold", "recall at the threshold"], exact_rows)
          + "\nPer class (first seed):\n\n")
    for r in runs:
        if r["seed"] != args.seeds[0]:
            continue
        md += f"{r['benchmark']}:\n\n" + markdown_table(
            ["class", "flagged", "relied upon", "planted", "joint", f"p@{args.k} reliance", "AP reliance"],
            [[c, ", ".join(v["flagged"]) or "-", ", ".join(v["relied_upon"]) or "-", ", ".join(v["planted"]) or "-",
              ", ".join(v["joint"]) or "-",
              "-" if v["precision_at_k_reliance"] is None else f"{v['precision_at_k_reliance']:.2f}",
              "-" if v["average_precision_reliance"] is None else f"{v['average_precision_reliance']:.2f}"]
             for c, v in r["per_class"].items()]) + "\n"
    return finish(args, args.name or ("discovery_debug" if args.debug else "discovery"), summary, runs, md)


if __name__ == "__main__":
    main()

"""Discovery: are the spurious features aspire finds the ones the model relies on (and the ones planted)?

For each toy benchmark and seed: build the benchmark, train ERM (smallcnn), measure the model's true
reliance on every element from the exact counterfactual set, run `aspire probe` (offline backends) and
score its spurious findings per class:

- against reliance: an element is relied upon by a class when removing it (or swapping the place) drops
  that class's accuracy by at least --reliance-threshold on the counterfactual test set;
- against the planted correlations in ground_truth.json (the class's `spurious` elements).

A finding counts for the element whose phrases (or, for backgrounds, scene category) it matches; a
finding that matches no element, or the wrong one, is a false positive. precision@k ranks every probed
group of a class by flip rate minus control flip rate.

    python -m evals.discovery_eval [--debug] [--seeds 0 1 2] [--out evals/results]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from evals.common import EPOCHS, erm_model, eval_parser, fmt, markdown_table, mean_std, toy_data, write_results


def match_element(phrase: str, kind: str, elements: dict) -> Optional[str]:
    from aspire.tools import lexicon

    for name, el in elements.items():
        if any(lexicon.same_phrase(phrase, p) for p in el["phrases"]):
            return name
    if kind == "background":
        scene = lexicon.scene_category(phrase)
        for name, el in elements.items():
            if el["kind"] == "background" and scene and any(lexicon.scene_category(p) == scene for p in el["phrases"]):
                return name
    return None


def score(found: set[str], truth: set[str]) -> dict[str, float]:
    tp = len(found & truth)
    return {"tp": tp, "flagged": len(found), "relevant": len(truth),
            "precision": tp / len(found) if found else None,  # undefined when nothing is flagged
            "recall": tp / len(truth) if truth else 1.0}


def precision_at_k(ranked: list[Optional[str]], truth: set[str], k: int) -> Optional[float]:
    top = ranked[:k]
    return sum(1 for e in top if e in truth) / len(top) if top else None


def run_seed(bench: str, seed: int, workdir: Path, debug: bool, epochs: int, threshold: float, k: int) -> dict:
    import json

    from aspire.config import load_config
    from aspire.data.formats import load_dataset
    from aspire.data.toy.reliance import measure_reliance
    from aspire.models.classifier import load_checkpoint
    from aspire.pipeline import ProbePipeline
    from aspire.store import RunStore

    data = toy_data(bench, seed, workdir, debug)
    clf = load_checkpoint(erm_model(data, seed, workdir, epochs))
    truth = json.loads((data / "ground_truth.json").read_text())
    elements = truth["elements"]
    reliance = measure_reliance(clf, data)

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
        flagged = {match_element(f.phrase, f.kind, elements) or f"?{f.phrase}" for f in findings if f.spurious}
        ranked = [match_element(f.phrase, f.kind, elements)
                  for f in sorted(findings, key=lambda f: -(f.flip_rate - f.control_flip_rate))]
        per_class[name] = {
            "flagged": sorted(flagged), "relied_upon": sorted(relied), "planted": sorted(planted),
            "vs_reliance": score(flagged, relied), "vs_planted": score(flagged, planted),
            "precision_at_k_reliance": precision_at_k(ranked, relied, k),
            "precision_at_k_planted": precision_at_k(ranked, planted, k),
        }

    def overall(key: str) -> dict[str, float]:
        tp = sum(v[key]["tp"] for v in per_class.values())
        flagged = sum(v[key]["flagged"] for v in per_class.values())
        relevant = sum(v[key]["relevant"] for v in per_class.values())
        return {"precision": tp / flagged if flagged else None, "recall": tp / relevant if relevant else None}

    return {"benchmark": bench, "seed": seed, "probe_seconds": round(probe_s, 1), "per_class": per_class,
            "vs_reliance": overall("vs_reliance"), "vs_planted": overall("vs_planted"),
            "reliance": [r.to_json() for r in reliance], "counts": vars(result.counts)}


def main(argv: Optional[list[str]] = None) -> dict:
    ap = eval_parser(__doc__, "tiny data, 1 seed, 1 epoch")
    ap.add_argument("--reliance-threshold", type=float, default=0.1)
    ap.add_argument("--k", type=int, default=2)
    args = ap.parse_args(argv)
    if args.debug:
        args.seeds, args.epochs = args.seeds[:1], 1

    runs = [run_seed(b, s, args.workdir, args.debug, args.epochs or EPOCHS[b], args.reliance_threshold, args.k)
            for b in args.benchmarks for s in args.seeds]
    summary = {}
    rows = []
    for b in args.benchmarks:
        mine = [r for r in runs if r["benchmark"] == b]
        s = {f"{vs}_{m}": mean_std(r[vs][m] for r in mine)
             for vs in ("vs_reliance", "vs_planted") for m in ("precision", "recall")}
        summary[b] = s
        rows.append([b, args.epochs or EPOCHS[b], len(mine), fmt(s["vs_reliance_precision"]), fmt(s["vs_reliance_recall"]),
                     fmt(s["vs_planted_precision"]), fmt(s["vs_planted_recall"])])
    md = ("## Discovery: spurious findings of `aspire probe` (offline backends, ERM smallcnn)\n\n"
          + markdown_table(["benchmark", "epochs", "seeds", "precision vs reliance", "recall vs reliance",
                            "precision vs planted", "recall vs planted"], rows)
          + f"\nReliance threshold: accuracy drop ≥ {args.reliance_threshold} on the counterfactual test set. "
          + "Mean ± std over seeds, in %.\n\nPer class (first seed):\n\n")
    for r in runs:
        if r["seed"] != args.seeds[0]:
            continue
        md += markdown_table(["class", "flagged", "relied upon", "planted", f"p@{args.k} reliance"],
                             [[c, ", ".join(v["flagged"]) or "-", ", ".join(v["relied_upon"]) or "-",
                               ", ".join(v["planted"]) or "-",
                               "-" if v["precision_at_k_reliance"] is None else f"{v['precision_at_k_reliance']:.2f}"]
                              for c, v in r["per_class"].items()]) + "\n"
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "summary": summary, "runs": runs}
    name = "discovery_debug" if args.debug else "discovery"
    json_path, md_path = write_results(args.out, name, results, md)
    print(md)
    print(f"wrote {json_path} and {md_path}")
    return results


if __name__ == "__main__":
    main()

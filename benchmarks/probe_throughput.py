"""Probing throughput vs the classifier's raw forward throughput, measured side by side in one run.

Probing = what `Prober.probe` does per edit: read the edited PNG, preprocess, classify, record (source
predictions cached, as the pipeline has them from the hold-out step). Raw = the classifier's forward on
the same images already decoded and preprocessed into one tensor, at the same batch size. The ratio
(probing edits/s ÷ raw images/s) is the share of the classifier's speed that probing keeps.

    python benchmarks/probe_throughput.py --run-dir RUN [--model M.pt --data DIR] [--batch-size 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, required=True, help="a finished probe run (its model and edits)")
    ap.add_argument("--model", help="checkpoint (default: the run's recorded model)")
    ap.add_argument("--data", help="dataset folder (default: the run's recorded data)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--limit", type=int, default=1024, help="edits to use")
    args = ap.parse_args()

    from aspire.data.formats import load_dataset
    from aspire.data.images import load_image
    from aspire.models.classifier import load_checkpoint
    from aspire.schemas import Edit
    from aspire.store import RunStore
    from aspire.tools.probe import Prediction, Prober
    from aspire.config import ProbeSettings

    store = RunStore(args.run_dir)
    run_args = store.get_meta("args") or {}
    clf = load_checkpoint(args.model or run_args["model"])
    ds = load_dataset(args.data or run_args["data"], run_args.get("format", "waterbirds"))
    samples = ds.by_image()
    edits = store.all("edit", Edit)[: args.limit]
    prober = Prober(clf, ProbeSettings(batch_size=args.batch_size))
    originals = {e.image: Prediction(pred=samples[e.image].y, prob_true=1.0) for e in edits}

    # raw: the same images, decoded and preprocessed once, forward only
    x = clf.preprocess([load_image(e.edited_png) for e in edits])  # (N, 3, S, S)
    clf.eval()

    def raw() -> None:
        with torch.no_grad():
            for i in range(0, len(x), args.batch_size):
                clf(x[i:i + args.batch_size])

    def probe() -> None:
        prober.probe(edits, samples, dict(originals))

    raw()
    probe()  # warm-up
    raw_s, probe_s = [], []
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        t = time.perf_counter()
        raw()
        raw_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        probe()
        probe_s.append(time.perf_counter() - t)
    n = len(edits)
    raw_rate, probe_rate = n / statistics.median(raw_s), n / statistics.median(probe_s)
    print(f"edits: {n}, batch size {args.batch_size}, arch {clf.arch} at {clf.input_size} px, "
          f"torch threads {torch.get_num_threads()}")
    print(f"raw forward     {raw_rate:9.1f} images/s (median of {args.repeats})")
    print(f"probing         {probe_rate:9.1f} edits/s  (median of {args.repeats})")
    print(f"ratio           {probe_rate / raw_rate:9.2f}")


if __name__ == "__main__":
    main()

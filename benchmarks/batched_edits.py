"""Diffusion edits per second at edit.batch_size 8 vs 1, side by side in one run (tiny random-weight pipelines).

The probe pipeline hands the editor all of an image's removals (each with its control) in one call, and the
editor runs diffusion in batches of `edit.batch_size`. This measures what batching buys: the same N removals
(sd-inpaint) and N background instructions (instruct-pix2pix) made at batch 1 and at batch 8, interleaved over
repeats (so drift hits both alike), into fresh folders each time (no cache hits). Tiny models from
tests/tiny_diffusers.py (64 px, 2 inference steps): the ratio says how much per-call overhead batching removes,
not what a real 512 px model gains on a GPU.

    python benchmarks/batched_edits.py [--n 16] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="edits per backend and measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_diffusers import IMAGE_PX, build_tiny_pix2pix, build_tiny_sd_inpaint

    from aspire.config import EditSettings
    from aspire.tools.edit import BackgroundRequest, Editor, RemoveRequest

    root = Path(tempfile.mkdtemp(prefix="aspire-batched-"))
    inpaint, pix2pix = build_tiny_sd_inpaint(root / "inpaint"), build_tiny_pix2pix(root / "pix2pix")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (IMAGE_PX, IMAGE_PX, 3), dtype=np.uint8)) for _ in range(args.n)]
    mask = np.zeros((IMAGE_PX, IMAGE_PX), bool)
    mask[20:36, 20:36] = True

    def editor(batch: int) -> Editor:
        return Editor(EditSettings(remove_backend="sd-inpaint", background_backend="instruct-pix2pix",
                                   inpaint_model_id=str(inpaint), pix2pix_model_id=str(pix2pix),
                                   num_inference_steps=2, working_size_px=IMAGE_PX, batch_size=batch,
                                   device=args.device))

    editors = {1: editor(1), 8: editor(8)}
    removals = [RemoveRequest(f"img{i}.png", im, mask, "box", seed=i) for i, im in enumerate(images)]
    changes = [BackgroundRequest(f"img{i}.png", im, mask, "grass", "water", i) for i, im in enumerate(images)]
    runs = {"sd-inpaint": lambda e, out: e.remove_many(removals, out),
            "instruct-pix2pix": lambda e, out: e.change_background_many(changes, out)}
    for backend, run in runs.items():   # warm-up: load the pipelines
        for e in editors.values():
            run(e, root / f"warm-{backend}-{id(e)}")
    seconds: dict[tuple[str, int], list[float]] = {(b, k): [] for b in runs for k in editors}
    for r in range(args.repeats):
        for backend, run in runs.items():
            for k, e in editors.items():
                t = time.perf_counter()
                run(e, root / f"{backend}-{k}-{r}")
                seconds[(backend, k)].append(time.perf_counter() - t)
    print(f"| backend | edits/s batch 1 | edits/s batch 8 | ratio | n = {args.n}, median of {args.repeats} |")
    print("|---|---|---|---|---|")
    for backend in runs:
        one, eight = (args.n / statistics.median(seconds[(backend, k)]) for k in (1, 8))
        print(f"| {backend} | {one:.1f} | {eight:.1f} | {eight / one:.2f}x | |")


if __name__ == "__main__":
    main()

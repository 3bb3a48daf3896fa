"""Memory per stage of an audit with the real backends: which models are alive, their weights, and the peak.

Two worlds, one run of the audit's stages each (caption → phrases and propagation → edits → probe and the further
tests → generation → retraining):
- `--sizes tiny` (default): the real-backend test's world (tests/test_real_backends.py `build_world`): tiny
  random-weight models saved to folders, a 32 px toy-waterbirds and its smallcnn. Seconds; the table says what is
  alive when.
- `--sizes real`: the same backends with the default models' architectures at their real sizes and random weights
  (benchmarks/real_sizes.py: GIT-large, GroundingDINO-tiny + SAM ViT-B, SD 1.5 inpainting, InstructPix2Pix and
  SD 1.5 for textual inversion), a 512 px toy-waterbirds and a ResNet-50; one diffusion step per call. Its bytes
  are the real ones.
A sampler thread looks at every live torch module every few milliseconds (the garbage collector's view: a released
model that something still references is counted) and keeps, per stage, the largest sum of their weights and the
model classes alive then; the weights are also given at 2 bytes a parameter (what float16 holds on a GPU). On CUDA
it reports torch.cuda.max_memory_allocated per stage (reset at each stage's start); on the CPU the process's peak
resident set size after the stage (it only grows).

    python benchmarks/gpu_memory.py [--device cpu|cuda] [--sizes tiny|real] [--models DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path


def alive() -> dict[str, tuple[int, int]]:
    """{model class: (bytes of its weights, their number)} over the live torch modules that are no other module's
    part."""
    import warnings

    import torch

    with warnings.catch_warnings():   # isinstance on some lazy module attributes warns of deprecations
        warnings.simplefilter("ignore")
        modules = [o for o in gc.get_objects() if isinstance(o, torch.nn.Module)]
    parts = {id(c) for m in modules for c in m.children()}
    out: dict[str, tuple[int, int]] = {}
    seen: set[int] = set()
    for m in modules:
        if id(m) in parts:
            continue
        n = count = 0
        for t in [*m.parameters(), *m.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                n += t.numel() * t.element_size()
                count += t.numel()
        if n:
            had = out.get(type(m).__name__, (0, 0))
            out[type(m).__name__] = (had[0] + n, had[1] + count)
    return out


class Sampler:
    """Per stage: the largest sum of live weights, and the model classes alive at that moment."""

    def __init__(self, every_s: float = 0.01, on_row=None):
        self.stage, self.rows, self.every_s, self.on_row = None, [], every_s, on_row
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            stage = self.stage
            if stage is not None:
                now = alive()
                held = sum(b for b, _ in now.values())
                if held >= stage["bytes"]:
                    stage.update(bytes=held, numel=sum(n for _, n in now.values()), alive=now)
            time.sleep(self.every_s)

    @contextlib.contextmanager
    def measure(self, name: str):
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        self.stage = {"stage": name, "bytes": 0, "numel": 0, "alive": {}}
        started = time.perf_counter()
        yield
        time.sleep(3 * self.every_s)   # at least one sample after the stage's last step
        row, self.stage = self.stage, None
        row.update(seconds=round(time.perf_counter() - started, 1),
                   cuda_peak_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
                   rss_peak_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
        self.rows.append(row)
        if self.on_row:
            self.on_row(row)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: the best available)")
    ap.add_argument("--sizes", choices=("tiny", "real"), default="tiny")
    ap.add_argument("--models", type=Path, default=None,
                    help="--sizes real: folder of the built models (kept and reused; default: a temporary one)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    if args.sizes == "real":
        import real_sizes

        def build_world(root: Path):
            return real_sizes.build_world(root, args.models or root / "models")
    else:
        from test_real_backends import build_world

    unit, scale = ("MiB", 2**20) if args.sizes == "real" else ("KiB", 2**10)
    print(f"| stage | models alive at the stage's peak ({unit} as held) | {unit} as held | {unit} at float16 | "
          "peak CUDA MiB | peak RSS MiB | s |")
    print("|---|---|---|---|---|---|---|")

    def row(r: dict) -> None:   # printed as each stage ends: a later stage's failure keeps the earlier rows
        names = ", ".join(f"{k} {b / scale:.0f}" for k, (b, _) in sorted(r["alive"].items(), key=lambda kv: -kv[1][0]))
        cuda = r["cuda_peak_mib"] if r["cuda_peak_mib"] is not None else "n/a"
        print(f"| {r['stage']} | {names} | {r['bytes'] / scale:.0f} | {2 * r['numel'] / scale:.0f} | {cuda} | "
              f"{r['rss_peak_mib']} | {r['seconds']} |", flush=True)

    with tempfile.TemporaryDirectory(prefix="aspire-memory-") as tmp:
        measure(build_world, Path(tmp), args.device, row)


def measure(build_world, tmp: Path, device, on_row=None) -> list[dict]:
    """The stages of the audit in the real-backend world under `tmp`, measured; `on_row(row)` as each ends."""
    from aspire.config import load_config
    from aspire.models.classifier import build_classifier
    from aspire.models.train import train_classifier
    from aspire.workflows.probe import ProbePipeline
    from aspire.workflows.repair import augment_run
    from aspire.workflows.runs import RunArgs, load_inputs, open_run

    root, _, server = build_world(tmp)
    config = json.loads((root / "config.json").read_text())
    for concern in ("caption", "ground", "edit", "generate"):
        config[concern]["device"] = device
    cfg = load_config(None, config)
    inputs = RunArgs(data=str(root / "data"), model=str(root / "model.pt"))
    dataset, clf = load_inputs(inputs, device=device)
    pipeline = ProbePipeline(dataset, clf, cfg, open_run(root / "run", "probe", inputs), seed=0)
    sampler = Sampler(on_row=on_row)
    try:
        with sampler.measure("caption"):
            pipeline.caption()
        with sampler.measure("phrases + propagation"):
            pipeline.phrase_sets()
        with sampler.measure("edits"):
            pipeline.make_edits()
        with sampler.measure("probe + insertion + joint"):
            pipeline.probe()
            pipeline.test_further(pipeline.findings())
        with sampler.measure("generation"):   # from every finding with edits to use, as an approved audit would
            groups = [f.key for f in pipeline.findings() if f.evidence_edits] or None   # None: augment.select's rule
            augment_run(root / "run", root / "augmented", cfg, 0, groups=groups, pipeline=pipeline,
                        on_message=lambda m: None)
        with sampler.measure("retraining"):
            model = build_classifier(clf.arch, dataset.class_names, input_size=clf.input_size, seed=0)
            train_classifier(model, dataset.split("train"), [], epochs=1, batch_size=8, lr=0.05, weight_decay=5e-4,
                             seed=0, augment=False, progress=False)
    finally:
        sampler.close()
        server.__exit__(None, None, None)
    return sampler.rows


if __name__ == "__main__":
    main()

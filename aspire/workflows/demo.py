"""`aspire demo`: the whole method offline on toy-waterbirds, in minutes on a laptop CPU.

    run_demo(out_dir, seed=0, size_px=64, sizes=None, epochs=10, retrain_epochs=None) -> dict

1. data:    toy-waterbirds (aspire.data.toy.benchmark.write_benchmark) into OUT/data
2. model:   ERM smallcnn into OUT/model.pt
3. audit:   the agent with the offline planner and every approval given (--yes), in OUT/run:
            hold-out → captions and masks from the annotations → phrases → hypothesize ⇄ probe →
            generate (augment, augment.select = "significant") → retrain → evaluate → report
Each step skips what OUT already holds, so an interrupted demo re-run continues where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from aspire.errors import ConfigError

BENCHMARK = "toy-waterbirds"
# The demo repairs the spurious findings (augment.select's default): with the graded, paired evidence the
# background a model relies on is confirmed even where changing it flips few images.
REPAIR_SELECT = "spurious"


def run_demo(out_dir: str | Path, *, seed: int = 0, size_px: int = 64, sizes: Optional[dict[str, int]] = None,
             epochs: int = 10, retrain_epochs: Optional[int] = None, progress: bool = True,
             log=None) -> dict[str, Any]:
    """Run the demo into `out_dir`; returns run_dir, findings, accuracy before/after, report paths, seconds."""
    from aspire.agent import audit_context, auto_approve, run_audit, thread_id
    from aspire.config import TrainSettings, load_config
    from aspire.data.formats import load_dataset
    from aspire.data.toy.benchmark import write_benchmark
    from aspire.models.classifier import build_classifier, load_checkpoint, save_checkpoint
    from aspire.models.train import train_classifier
    from aspire.provenance import run_record
    from aspire.workflows.runs import RunArgs, open_run

    # 1. check inputs
    if epochs < 1 or (retrain_epochs is not None and retrain_epochs < 1):
        raise ConfigError(f"epochs must be at least 1 (got {epochs}, retrain {retrain_epochs})")
    say = log or (lambda msg: None)
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    # 2. toy data
    data = out / "data"
    t0 = time.perf_counter()
    if not (data / "metadata.csv").is_file():
        say(f"writing {BENCHMARK} into {data}")
        write_benchmark(BENCHMARK, data, seed=seed, size_px=size_px, sizes=sizes)
    timings["data"] = time.perf_counter() - t0
    dataset = load_dataset(data, "waterbirds")

    # 3. the classifier to audit (ERM smallcnn)
    model = out / "model.pt"
    t0 = time.perf_counter()
    if not model.is_file():
        say(f"training an ERM smallcnn for {epochs} epochs")
        clf = build_classifier("smallcnn", dataset.class_names, input_size=size_px, seed=seed)
        train_classifier(clf, dataset.split("train"), dataset.split("val", allow_empty=True), epochs=epochs,
                         seed=seed, augment=True, progress=progress, method="erm",
                         **TrainSettings.for_arch("smallcnn").model_dump(exclude={"epochs"}))
        save_checkpoint(clf, model)
    timings["train"] = time.perf_counter() - t0
    clf = load_checkpoint(model)

    # 4. the audit, offline and approved
    annotations = str(data / "annotations.jsonl")
    agent = {"offline": True, **({"retrain_epochs": retrain_epochs} if retrain_epochs else {})}
    config = load_config(None, {"caption": {"annotations": annotations}, "ground": {"annotations": annotations},
                                "agent": agent, "augment": {"select": REPAIR_SELECT}})
    store = open_run(out / "run", "audit", RunArgs(data=str(data), model=str(model), seed=seed), hint="use another --out")
    if store.get_meta("record") is None:
        store.set_meta("record", run_record(config, seed=seed, classifier={"arch": clf.arch, "classes": clf.class_names},
                                            planner="offline", demo={"benchmark": BENCHMARK, "size_px": size_px,
                                                                     "sizes": sizes, "epochs": epochs,
                                                                     "augment_select": REPAIR_SELECT}))
    thread_id(store)
    say("auditing with the offline planner (every stage approved)")
    t0 = time.perf_counter()
    ctx = audit_context(dataset, clf, config, store, model_path=str(model), seed=seed, progress=progress)
    result = run_audit(ctx, approve=auto_approve)
    timings["audit"] = time.perf_counter() - t0
    summary = result.to_json()
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["timings"] = {k: round(v, 1) for k, v in timings.items()}
    summary["data"] = str(data)
    summary["model"] = str(model)
    return summary

"""The batch driver: plan the units, run them on an executor, retry, repair once, merge (see aspire/batch)."""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from rich.console import Console

from aspire.batch.progress import BatchProgress
from aspire.batch.state import BatchStore, UnitState, all_units, batch_lock, get_unit, log_attempt, put_unit
from aspire.batch.tasks import Inputs, UnitJob, evaluate_before, repair as repair_task, reprobe_unit, run_unit
from aspire.config import AspireConfig
from aspire.errors import AspireError, ConfigError, error_line
from aspire.workflows.runs import check_probe_inputs, resolve_classes

RUNS = "runs"
REPAIR = "repair"
MAX_UNIT_CHARS = 80


@dataclass
class BatchResult:
    batch_dir: Path
    summary: dict[str, Any]                               # batch.json's content
    paths: dict[str, Path] = field(default_factory=dict)  # html, md, json
    failed: list[str] = field(default_factory=list)       # classes whose audit failed


# ---------------------------------------------------------------- planning
def plan_units(class_names: Sequence[str], group_size: int = 1) -> list[tuple[str, list[str]]]:
    """The batch's audits: consecutive groups of `group_size` classes, each named by its classes' slugs."""
    from aspire.tools.generate import class_slug

    if group_size < 1:
        raise ConfigError(f"--group-size must be at least 1, got {group_size}")
    slugs = [class_slug(n) for n in class_names]
    seen: dict[str, int] = {}
    for s in slugs:   # two names with one slug ("a b", "a-b") get the class's position too
        seen[s] = seen.get(s, 0) + 1
    slugs = [f"{s}-{i}" if seen[s] > 1 else s for i, s in enumerate(slugs)]
    units = []
    for start in range(0, len(class_names), group_size):
        names, parts = list(class_names[start:start + group_size]), slugs[start:start + group_size]
        unit = "+".join(parts)
        if len(unit) > MAX_UNIT_CHARS:
            digest = hashlib.sha256(unit.encode()).hexdigest()[:8]
            unit = f"{parts[0]}+{len(parts) - 1}-more-{digest}"
        units.append((unit, names))
    return units


def _inputs_config(config: AspireConfig) -> dict:
    """The settings that change what an audit finds (everything but the batch's execution settings)."""
    return config.model_dump(mode="json", exclude={"caption": {"api_key"}, "phrases": {"api_key"}, "batch": True})


# ---------------------------------------------------------------- the batch
def run_batch(batch_dir: str | Path, *, data: str | Path, model: str | Path, format: str = "waterbirds",
              attr: Optional[str] = None, target: Optional[str] = None, classes: Optional[Sequence[str]] = None,
              group_size: int = 1, seed: int = 0, config: Optional[AspireConfig] = None, repair: bool = False,
              progress: bool = True, console: Optional[Console] = None) -> BatchResult:
    """Run (or resume) the batch in `batch_dir`; see the module docstring. Returns the merged summary."""
    from aspire.agent.llm_planner import planner_record
    from aspire.data.formats import load_dataset
    from aspire.models.classifier import load_checkpoint
    from aspire.provenance import run_record

    # 1. check inputs: dataset, classifier, classes
    config = config or AspireConfig()
    batch_dir = Path(batch_dir).expanduser().resolve()
    data, model = Path(data).expanduser().resolve(), Path(model).expanduser().resolve()
    dataset = load_dataset(data, format, attr=attr, target=target)   # a bad dataset fails here, not in every task
    clf = load_checkpoint(model, device="cpu")   # class names and the record only
    check_probe_inputs(dataset, clf, config, classes)   # what every task would fail on, before the batch folder
    names = [clf.class_names[i] for i in resolve_classes(classes, clf.class_names)]
    units = plan_units(names, group_size)
    args = {"data": str(data), "format": format, "model": str(model), "attr": attr, "target": target,
            "classes": names, "group_size": group_size, "seed": seed, "repair": repair}

    with batch_lock(batch_dir):
        # 2. the batch store: new, or the same inputs resumed
        store = BatchStore(batch_dir)
        try:
            recorded, record = store.get_meta("args"), store.get_meta("record")
            if recorded is None:
                store.set_meta("kind", "batch")
                store.set_meta("args", args)
            if record is None:
                planner = planner_record(config.agent)
                store.set_meta("record", run_record(config, seed=seed, planner=planner,
                                                    classifier={"arch": clf.arch, "classes": clf.class_names}))
            if recorded is not None:
                changed = sorted(k for k in set(recorded) | set(args) if recorded.get(k) != args.get(k))
                if record is not None:
                    old = {k: v for k, v in (record.get("config") or {}).items() if k != "batch"}
                    new = _inputs_config(config)
                    changed += [f"config {k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
                if changed:
                    raise AspireError(f"{batch_dir}: holds a batch with other inputs ({', '.join(changed)}); "
                                      "use another --out to start a new batch")
            store.set_meta("units", [u for u, _ in units])
            states = []
            for unit, unit_classes in units:
                state = get_unit(store, unit) or UnitState(unit=unit, classes=unit_classes,
                                                           run_dir=str(batch_dir / RUNS / unit))
                if state.status in ("running", "failed"):   # killed, or failed before: tried again
                    state = put_unit(store, state.model_copy(update={"status": "pending"}))
                states.append(put_unit(store, state))
            store.set_meta("status", "running")
            return _run(store, batch_dir, states, args, config, repair, progress, console)
        finally:
            store.close()


def _run(store: BatchStore, batch_dir: Path, states: list[UnitState], args: dict, config: AspireConfig,
         repair: bool, progress: bool, console: Optional[Console]) -> BatchResult:
    from aspire.batch.executors import make_executor
    from aspire.batch.merge import merge_batch
    from aspire.report.batch import build_batch_report

    console = console or Console(stderr=True)
    settings = config.batch
    executor = make_executor(settings, batch_dir)
    inputs = Inputs(batch_dir=str(batch_dir), data=args["data"], format=args["format"], model=args["model"],
                    attr=args["attr"], target=args["target"], seed=args["seed"], config=config,
                    threads=executor.threads)
    label = {s.unit: ", ".join(s.classes) for s in states}
    if progress:
        console.print(f"batch of {len(states)} audit(s) on {executor.kind}: {batch_dir}", highlight=False,
                      soft_wrap=True)
    try:
        # 3. the audited classifier's evaluation, once for every class run
        before = store.get_meta("evaluation_before")
        if before is None:
            try:
                before = executor.submit(evaluate_before, inputs).result()["result"]
                store.set_meta("evaluation_before", before)
            except Exception as e:  # noqa: BLE001 - each class run then evaluates on its own
                console.print(f"warning: the classifier's evaluation failed ({error_line(e)}); each class run "
                              "evaluates it itself", highlight=False, soft_wrap=True)
        # 4. the audits, at most executor.slots at a time; failures retried, then reported
        todo = deque(s.unit for s in states if s.status != "done")
        tries = {u: 0 for u in todo}
        inflight: dict[Future, str] = {}
        with BatchProgress(len(states), console=console, enabled=progress) as bar:
            bar.skip(len(states) - len(todo))
            try:
                while todo or inflight:
                    while todo and len(inflight) < executor.slots:
                        unit = todo.popleft()
                        state = get_unit(store, unit)
                        state = put_unit(store, state.model_copy(update={
                            "status": "running", "attempts": state.attempts + 1, "started": time.time(),
                            "finished": None, "seconds": None}))
                        log_attempt(store, state, "start")
                        tries[unit] += 1
                        bar.start(unit, label[unit], tries[unit])
                        job = UnitJob(inputs, unit, state.classes, state.run_dir, repair, before)
                        inflight[executor.submit(run_unit, job)] = unit
                    finished, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                    for future in finished:
                        unit = inflight.pop(future)
                        _record(store, unit, future, tries[unit], 1 + settings.retries, todo, bar, label[unit])
            except BaseException:
                for unit in inflight.values():   # interrupted: those runs resume on the next invocation
                    state = get_unit(store, unit)
                    put_unit(store, state.model_copy(update={"status": "pending", "error": "interrupted"}))
                store.set_meta("status", "interrupted")
                raise
        # 5. --repair: one retraining over the union of the classes' augmented sets
        failed_units = [s for s in all_units(store) if s.status != "done"]
        repaired = _repair(store, batch_dir, inputs, executor, failed_units, console, progress) if repair else True
        if repair and repaired:
            repaired = _reprobe(store, inputs, executor, console, progress)
        store.set_meta("status", "failed" if failed_units or not repaired else "done")
    finally:
        executor.close()
    # 6. merge and report
    paths = build_batch_report(merge_batch(batch_dir))
    summary = json.loads(Path(paths["json"]).read_text(encoding="utf-8"))
    failed = [c for s in failed_units for c in s.classes]
    return BatchResult(batch_dir, summary, paths, failed)


def _record(store: BatchStore, unit: str, future: Future, tries: int, allowed: int, todo: deque,
            bar: BatchProgress, label: str) -> None:
    """A finished attempt into the batch store: done, retried (back in the queue) or failed."""
    state = get_unit(store, unit)
    try:
        outcome = future.result()
    except Exception as e:  # noqa: BLE001 - a crashed worker (pool or Ray): one failed attempt
        outcome = {"ok": False, "error": f"worker failed: {error_line(_cause(e))}"}
    update: dict[str, Any] = {"seconds": round(time.time() - (state.started or time.time()), 3),
                              "host": outcome.get("host"), "pid": outcome.get("pid")}
    if outcome.get("ok"):
        findings = outcome.get("findings") or []
        update.update(status="done", error=None, finished=time.time(), findings=len(findings),
                      spurious=sum(1 for f in findings if f.get("spurious")))
        state = put_unit(store, state.model_copy(update=update))
        log_attempt(store, state, "done")
        bar.finish(unit, label, state.seconds or 0.0, state.findings, state.spurious)
        return
    error = str(outcome.get("error") or "unknown error")
    if tries < allowed:
        state = put_unit(store, state.model_copy(update={**update, "status": "pending", "error": error}))
        log_attempt(store, state, "retry", traceback=outcome.get("traceback"))
        bar.retry(unit, label, error, tries, allowed)
        todo.append(unit)
        return
    state = put_unit(store, state.model_copy(update={**update, "status": "failed", "error": error,
                                                     "finished": time.time()}))
    log_attempt(store, state, "failed", traceback=outcome.get("traceback"))
    bar.fail(unit, label, error, tries)


def _cause(e: BaseException) -> BaseException:
    """The original exception of a Ray task error."""
    return getattr(e, "cause", None) or e


def _repair(store: BatchStore, batch_dir: Path, inputs: Inputs, executor, failed: list[UnitState],
            console: Console, progress: bool) -> bool:
    """The batch's retraining (recorded in meta "repair"); False when it failed or waits for failed classes."""
    from aspire.store import RunStore

    say = (lambda m: console.print(m, highlight=False, soft_wrap=True)) if progress else (lambda m: None)
    done = store.meta("repair")
    if done and done.status == "done":
        return True
    if failed:
        reason = (f"waits until every class is done ({len(failed)} not done); re-run the batch to retry them")
        store.set_meta("repair", {"status": "waiting", "reason": reason})
        say(f"repair {reason}")
        return False
    # 1. the classes' augmented sets
    dirs, per_class = [], {}
    for state in all_units(store):
        run = RunStore(state.run_dir)
        try:
            meta = run.meta("augmented")
        finally:
            run.close()
        if meta and meta.n_images > 0:
            dirs.append(meta.dir)
            per_class.update(meta.per_class)
    if not dirs:
        store.set_meta("repair", {"status": "done", "reason": "no class had approved findings with flipped edits: "
                                  "nothing generated, nothing retrained", "after": None})
        say("repair: nothing to retrain (no augmented images)")
        return True
    # 2. one retraining (a task of the executor: on a cluster it runs where the resources are)
    say(f"repair: retraining one classifier with {sum(per_class.values())} generated images from {len(dirs)} set(s)")
    started = time.time()
    out = batch_dir / REPAIR
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = executor.submit(repair_task, inputs, dirs, str(out)).result()
    except Exception as e:  # noqa: BLE001 - recorded and reported; the audits' results stand
        reason = error_line(_cause(e))
        store.set_meta("repair", {"status": "failed", "reason": reason})
        store.log_event("repair", {"status": "failed", "error": reason})
        say(f"repair failed: {reason}")
        return False
    store.set_meta("repair", {"status": "done", **result, "per_class": per_class,
                              "seconds": round(time.time() - started, 1)})
    store.log_event("repair", {"status": "done", "after": result["models"]["after"]})
    return True


def _reprobe(store: BatchStore, inputs: Inputs, executor, console: Console, progress: bool) -> bool:
    """Every class run re-probed on the retrained classifier (recorded in meta "reprobe"); False when one failed."""
    repair, done = store.meta("repair"), store.meta("reprobe")
    after = (repair.models or {}).get("after") if repair else None
    if not after or (done and done.model == after and done.status == "done"):
        return True
    say = (lambda m: console.print(m, highlight=False, soft_wrap=True)) if progress else (lambda m: None)
    units = all_units(store)
    say(f"re-probing {len(units)} class run(s) on {after}")
    futures = {u.unit: executor.submit(reprobe_unit, inputs, u.run_dir, after) for u in units}
    results = {}
    for unit, future in futures.items():
        try:
            results[unit] = future.result()
        except Exception as e:  # noqa: BLE001 - a crashed worker: that class's re-probe failed
            results[unit] = {"ok": False, "error": f"worker failed: {error_line(_cause(e))}"}
    failed = {u: r["error"] for u, r in results.items() if not r.get("ok")}
    for unit, error in failed.items():
        say(f"re-probe of {unit} failed: {error}")
    reports = {u: r["report_error"] for u, r in results.items() if r.get("report_error")}
    for unit, error in reports.items():
        say(f"warning: the report of {unit} was not rendered again: {error}")
    store.set_meta("reprobe", {"status": "failed" if failed else "done", "model": after, "errors": failed,
                               "report_errors": reports,
                               "verdicts": {u: r.get("verdicts", {}) for u, r in results.items() if r.get("ok")}})
    return not failed

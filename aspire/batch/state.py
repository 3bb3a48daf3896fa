"""The batch's own state: BATCH_DIR/batch.sqlite (a RunStore of kind "batch"), written by the driver only.

What it holds is `BatchStore.META` / `EVENTS` (docs/RUN_STORE.md).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Literal, Optional

from pydantic import BaseModel

from aspire.errors import AspireError
from aspire.schemas import EvalResult
from aspire.store import RunStore
from aspire.store_schema import Entry, Meta, Payload, RunRecord

Status = Literal["pending", "running", "done", "failed"]
LOCK_NAME = ".batch.lock"


class BatchArgs(Meta):
    """The batch's inputs: a batch folder refuses others."""

    data: str
    format: str
    model: str
    attr: Optional[str] = None
    target: Optional[str] = None
    classes: list[str]
    group_size: int
    seed: int
    repair: bool


class BatchRepair(Payload):
    """The batch's one retraining; when done, also what the repair task returned (models, plan, augmented, ...)."""

    status: Literal["waiting", "done", "failed"]
    reason: Optional[str] = None
    models: Optional[dict[str, Optional[str]]] = None


class BatchReprobe(Meta):
    status: Literal["done", "failed"]
    model: str
    verdicts: dict[str, dict[str, int]] = {}
    errors: dict[str, str] = {}
    report_errors: dict[str, str] = {}


class UnitState(BaseModel):
    """One audit of the batch: a class, or a group of classes (--group-size)."""

    unit: str                              # the run folder's name under BATCH_DIR/runs
    classes: list[str]
    run_dir: str
    status: Status = "pending"
    attempts: int = 0                      # attempts started, over every invocation of the batch
    error: Optional[str] = None            # the last attempt's error (one line)
    started: Optional[float] = None        # the current / last attempt's start (epoch seconds)
    finished: Optional[float] = None       # when it ended (done or failed)
    seconds: Optional[float] = None        # wall time of the last attempt
    host: Optional[str] = None             # where the last attempt ran (host name, process id)
    pid: Optional[int] = None
    findings: int = 0
    spurious: int = 0


class Attempt(Payload):
    unit: str
    attempt: int
    phase: Literal["start", "done", "retry", "failed"]
    status: Status


class BatchRepairEvent(Payload):
    status: Literal["done", "failed"]


class BatchStore(RunStore):
    DB_NAME = "batch.sqlite"
    META = (
        Entry("kind", "batch", "`batch`", Literal["batch"]),
        Entry("args", "batch", "the batch's inputs: a folder refuses others", BatchArgs),
        Entry("record", "batch", "reproducibility record", RunRecord),
        Entry("units", "batch", "unit ids in plan order", list[str]),
        Entry("unit:<id>", "batch", "one UnitState each, replaced on every change", UnitState),
        Entry("evaluation_before", "batch", "the audited classifier on the test split, computed once", EvalResult),
        Entry("repair", "batch --repair", "the batch's one retraining", BatchRepair),
        Entry("reprobe", "batch --repair", "every class run re-probed on the retrained model (`verdicts` per unit)",
              BatchReprobe),
        Entry("status", "batch", "the batch's state", Literal["running", "done", "failed", "interrupted"]),
    )
    RECORDS = ()
    EVENTS = (
        Entry("attempt", "batch", "every start and end of a unit's attempt (with the failure's traceback)", Attempt),
        Entry("repair", "batch --repair", "the retraining ended (`after` or `error`)", BatchRepairEvent),
    )


def get_unit(store: RunStore, unit: str) -> Optional[UnitState]:
    raw = store.get_meta(f"unit:{unit}")
    return None if raw is None else UnitState.model_validate(raw)


def put_unit(store: RunStore, state: UnitState) -> UnitState:
    store.set_meta(f"unit:{state.unit}", state.model_dump(mode="json"))
    return state


def all_units(store: RunStore) -> list[UnitState]:
    return [u for u in (get_unit(store, k) for k in store.get_meta("units", []) or []) if u is not None]


def log_attempt(store: RunStore, state: UnitState, phase: str, **extra) -> None:
    """One `attempt` event: start, done, retry or failed (with the failure's traceback)."""
    store.log_event("attempt", {"unit": state.unit, "attempt": state.attempts, "phase": phase,
                                "status": state.status, "error": state.error, "seconds": state.seconds,
                                "host": state.host, "pid": state.pid, **extra})


@contextlib.contextmanager
def batch_lock(batch_dir: Path) -> Iterator[None]:
    """One batch process per folder (an advisory lock, released by the OS when the process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    batch_dir.mkdir(parents=True, exist_ok=True)
    with open(batch_dir / LOCK_NAME, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AspireError(f"{batch_dir}: another aspire batch is running in this folder") from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

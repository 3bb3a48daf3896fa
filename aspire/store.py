"""The run store: one SQLite database per run folder, with the run's artifacts on disk beside it.

Records (captions, phrase sets, regions, edits, probes, findings, ...) are stored as JSON keyed by a
natural id, so writing the same record twice is a no-op: a node re-run after a crash neither loses nor
duplicates work. Images live under the run folder (`edits/`, `masks/`), named by content or by id.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional, Sequence, Type, TypeVar

from pydantic import BaseModel

from aspire.errors import AspireError

M = TypeVar("M", bound=BaseModel)

class Entry(NamedTuple):
    """A documented meta key, record kind or event kind: its name (`<x>` marks a variable part), who writes it,
    what it holds."""

    name: str
    writer: str
    value: str

    def matches(self, key: str) -> bool:
        return key == self.name or ("<" in self.name and key.startswith(self.name.split("<")[0]))


# What a run store may hold. Writing anything else raises (a typo or an undocumented addition);
# docs/RUN_STORE.md's tables are generated from these (`python -m aspire.store`, and a test checks they agree).
RUN_META = (
    Entry("kind", "CLI", "`probe`, `audit` (a probe run becomes an audit with `aspire audit --from-probe`)"),
    Entry("args", "CLI", "workflows.runs.RunArgs `{data, format, model, classes, seed, attr, target}`: a run folder "
                         "refuses other inputs and another kind"),
    Entry("record", "CLI", "reproducibility record (aspire/provenance.py): python, platform, packages, prompt hashes, "
                           "config, seed, classifier"),
    Entry("holdout", "probe step 1", "list of image keys (D_hold)"),
    Entry("holdout_extension", "probe step 1b", "`{class: [image keys]}`: training images that joined the hold-out "
                                                 "because they show a group too rare in it"),
    Entry("background_groups", "probe step 4b", "`{background phrase: group}`: near-duplicates merged, then groups "
                                                "whose regions look alike (colour histograms); donors and findings use it"),
    Entry("joint_sets", "probe joint removal", "`{class index: tag}`: the candidate set whose joint pairs the findings "
                                               "read"),
    Entry("joint", "probe findings", "per class: `{effect, effect_ci, p_value, pairs, shares}` of removing every "
                                     "candidate group together"),
    Entry("reprobe", "probe reprobe", "`{model, digest, verdicts, edits}`: the checkpoint the edits were re-scored on "
                                      "(by sha256: another one starts over), the count of each verdict"),
    Entry("augmented", "repair", "`{dir, n_images, per_class, manifest, generator}`"),
    Entry("augmented-generic", "repair", "the same for a generic (baseline) set"),
    Entry("models", "retrain", "`{before: checkpoint path, after: checkpoint path}`"),
    Entry("evaluation", "evaluate", "`{before: EvalResult, after: EvalResult}` (JSON of schemas.EvalResult)"),
    Entry("approvals", "agent review", "list of `{stage, decision, dropped, added, time}`"),
    Entry("approved_features", "agent review", "the features approved for repair: `{key: \"class_index|kind|phrase\", "
                                               "class, ...}`"),
    Entry("audit", "agent", "`{thread_id, status}`: the LangGraph thread in `checkpoints.sqlite` beside the store"),
    Entry("batch", "batch", "`{dir, unit, repair, retraining}`: the class run belongs to a batch"),
)
RUN_RECORDS = (
    Entry("prediction", "probe step 1", "tools.probe.Prediction: the classifier on a source image"),
    Entry("caption", "probe step 2", "Caption"),
    Entry("phrases", "probe step 3", "PhraseSet"),
    Entry("propagated", "probe step 3b", "Propagated: the frequent phrases the image's caption left out, grounded in it"),
    Entry("region", "probe step 4a", "Region (`image|phrase`; mask PNG under `masks/`)"),
    Entry("edit", "probe steps 4a-4e", "Edit (PNGs and JSON under `edits/`; `test`: removal, insertion or joint; "
                                       "`pair`: the real edit a control belongs to; intermediate steps of joint "
                                       "edits under `joint-steps/`)"),
    Entry("edited", "probe step 4a", "marker `image|phrase filter`: all edits of an image are done"),
    Entry("inserted", "probe step 4d", "marker `class index|kind|phrase`: the group's insertion pastes are done"),
    Entry("joint", "probe step 4e", "marker `class index|kind:phrase,...`: the class's joint removals are done"),
    Entry("failure", "probe steps 1, 2, 4", "Failure (key `stage|image|phrase`): a tool failed on one image or phrase "
                                            "(`holdout`: the image could not be read; never retried); it was "
                                            "skipped, and is not retried on resume unless `--retry-skipped`"),
    Entry("probe", "probe step 4c", "Probe (key: edit id)"),
    Entry("reprobe", "probe reprobe", "Probe: the same edit scored on the model of meta `reprobe`"),
    Entry("reprobe_prediction", "probe reprobe", "tools.probe.Prediction: that model on a source image"),
    Entry("plan", "agent hypothesize", "agent.planner.Plan (key `round-N`): the planner's hypotheses of a round"),
    Entry("finding", "probe findings", "Finding (key `class index|kind|phrase`; replaced whole on each "
                                       "aggregation; also `findings.json`)"),
)
RUN_EVENTS = (
    Entry("holdout", "probe step 1", "`{n, classes}`"),
    Entry("holdout_extended", "probe step 1b", "`{class: images added}`"),
    Entry("phrase_failure", "probe step 3", "`{image, reason}`"),
    Entry("not_grounded", "probe step 4a", "`{image, phrase, reason}`"),
    Entry("kind_from_mask", "probe step 4a", "`{image, phrase, extractor, mask}`: the mask decided another kind "
                                             "than the extractor's word"),
    Entry("skipped", "probe step 4", "`{image, phrase, reason}`: an edit not made"),
    Entry("reprobe", "probe reprobe", "`{model, digest}`: scoring on a new model began"),
    Entry("hypothesis", "agent", "`{round, class, phrase, kind, reason, source: llm|planner}`"),
    Entry("outcome", "agent", "a hypothesis's result with its evidence (effect, q, flips)"),
    Entry("llm_failure", "agent", "`{round, reason}`"),
    Entry("approval", "agent", "`{stage, decision, ...}`"),
    Entry("stage", "agent", "`{stage, ...}`: a stage ran (`reprobe` with the verdicts)"),
    Entry("chat", "aspire chat", "the conversation, turn by turn"),
)


def store_docs(sections: Iterable[tuple[str, Sequence[Entry]]]) -> str:
    """Markdown tables of documented entries (docs/RUN_STORE.md's generated part)."""
    out = []
    for title, entries in sections:
        out += [f"### {title}", "", "| name | written by | value |", "|---|---|---|"]
        out += [f"| `{e.name}` | {e.writer} | {e.value.replace('|', chr(92) + '|')} |" for e in entries]
        out.append("")
    return "\n".join(out)


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL, key TEXT NOT NULL, json TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (kind, key));
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, kind TEXT NOT NULL, json TEXT NOT NULL);
"""


class RunStore:
    DB_NAME = "run.sqlite"
    META, RECORDS, EVENTS = RUN_META, RUN_RECORDS, RUN_EVENTS

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir).expanduser().resolve()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.run_dir / self.DB_NAME, check_same_thread=False, timeout=30)
            self._conn.executescript(SCHEMA)
            self._conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as e:
            raise AspireError(f"{self.run_dir / self.DB_NAME}: cannot open the run store ({e})") from None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ paths
    def path(self, *parts: str) -> Path:
        p = self.run_dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def folder(self, name: str) -> Path:
        p = self.run_dir / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    # ------------------------------------------------------------ meta
    def _documented(self, what: str, entries: Sequence[Entry], name: str) -> None:
        if not any(e.matches(name) for e in entries):
            raise KeyError(f"{what} {name!r} is not documented (aspire/store.py, docs/RUN_STORE.md)")

    def set_meta(self, key: str, value: Any) -> None:
        self._documented("meta key", self.META, key)
        with self._lock, self._conn:
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    # ------------------------------------------------------------ records
    def put(self, kind: str, key: str, record: BaseModel | dict) -> None:
        self.put_many(kind, [(key, record)])

    def put_many(self, kind: str, items: Iterable[tuple[str, BaseModel | dict]]) -> None:
        self._documented("record kind", self.RECORDS, kind)
        rows = [(kind, key, _dump(rec), time.time()) for key, rec in items]
        with self._lock, self._conn:
            # keep the first write of a key: re-running a node never changes what was recorded
            self._conn.executemany("INSERT OR IGNORE INTO records VALUES (?, ?, ?, ?)", rows)

    def replace_all(self, kind: str, items: Iterable[tuple[str, BaseModel | dict]]) -> None:
        """Replace every record of a kind in one transaction (derived results such as findings)."""
        self._documented("record kind", self.RECORDS, kind)
        rows = [(kind, key, _dump(rec), time.time()) for key, rec in items]
        with self._lock, self._conn:
            self._conn.execute("DELETE FROM records WHERE kind = ?", (kind,))
            self._conn.executemany("INSERT INTO records VALUES (?, ?, ?, ?)", rows)

    def delete(self, kind: str, keys: Iterable[str]) -> None:
        """Remove records of a kind by key (markers whose work is to be done again)."""
        with self._lock, self._conn:
            self._conn.executemany("DELETE FROM records WHERE kind = ? AND key = ?", [(kind, k) for k in keys])

    def has(self, kind: str, key: str) -> bool:
        return self._conn.execute("SELECT 1 FROM records WHERE kind = ? AND key = ?", (kind, key)).fetchone() is not None

    def get(self, kind: str, key: str, model: Type[M]) -> Optional[M]:
        row = self._conn.execute("SELECT json FROM records WHERE kind = ? AND key = ?", (kind, key)).fetchone()
        return None if row is None else model.model_validate_json(row[0])

    def all(self, kind: str, model: Type[M]) -> list[M]:
        rows = self._conn.execute("SELECT json FROM records WHERE kind = ? ORDER BY created, key", (kind,)).fetchall()
        return [model.model_validate_json(r[0]) for r in rows]

    def keys(self, kind: str) -> set[str]:
        return {r[0] for r in self._conn.execute("SELECT key FROM records WHERE kind = ?", (kind,))}

    def count(self, kind: str) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM records WHERE kind = ?", (kind,)).fetchone()[0]

    # ------------------------------------------------------------ events (the run's log and reasoning trail)
    def log_event(self, kind: str, payload: dict) -> None:
        self._documented("event kind", self.EVENTS, kind)
        with self._lock, self._conn:
            self._conn.execute("INSERT INTO events (time, kind, json) VALUES (?, ?, ?)",
                               (time.time(), kind, json.dumps(payload)))

    def events(self, kind: Optional[str] = None) -> list[dict]:
        sql = "SELECT time, kind, json FROM events" + (" WHERE kind = ?" if kind else "") + " ORDER BY id"
        # the event's kind is under "event": a payload may have a "kind" of its own
        return [{**json.loads(j), "time": t, "event": k} for t, k, j in self._conn.execute(sql, (kind,) if kind else ())]

    def close(self) -> None:
        self._conn.close()


def _dump(record: BaseModel | dict) -> str:
    if isinstance(record, BaseModel):
        return record.model_dump_json(by_alias=True)
    return json.dumps(record)


def run_store_docs() -> str:
    """The generated part of docs/RUN_STORE.md: the run store's and the batch store's documented entries."""
    from aspire.batch.state import BatchStore

    return store_docs([("Run store: meta keys (`store.get_meta(key)`)", RunStore.META),
                       ("Run store: record kinds (`store.all(kind, Model)`)", RunStore.RECORDS),
                       ("Run store: events (`store.events(kind)`), in order", RunStore.EVENTS),
                       ("Batch store (`batch.sqlite`): meta keys", BatchStore.META),
                       ("Batch store: events", BatchStore.EVENTS)])


GENERATED_BEGIN = "<!-- generated by `python -m aspire.store`: edit aspire/store.py, not this part -->"
GENERATED_END = "<!-- end of the generated part -->"


if __name__ == "__main__":   # rewrite the generated part of docs/RUN_STORE.md
    doc = Path(__file__).resolve().parent.parent / "docs" / "RUN_STORE.md"
    text = doc.read_text(encoding="utf-8")
    head, rest = text.split(GENERATED_BEGIN)
    doc.write_text(head + GENERATED_BEGIN + "\n" + run_store_docs() + GENERATED_END + rest.split(GENERATED_END)[1],
                   encoding="utf-8")
    print(f"wrote {doc}")

"""The run store: one SQLite database per run folder, with the run's artifacts on disk beside it.

Records (captions, phrase sets, regions, edits, probes, findings, ...) are stored as JSON keyed by a
natural id, so writing the same record twice is a no-op: a node re-run after a crash neither loses nor
duplicates work. Images live under the run folder (`edits/`, `masks/`), named by content or by id.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Type, TypeVar, get_args, get_origin

from pydantic import BaseModel, TypeAdapter, ValidationError

from aspire.errors import AspireError
from aspire.store_schema import RUN_EVENTS, RUN_META, Entry

M = TypeVar("M", bound=BaseModel)

# What a run store may hold. Writing anything else raises (a typo or an undocumented addition); meta values and
# event payloads are checked against their types (aspire/store_schema.py). docs/RUN_STORE.md's tables are generated
# from these (`python -m aspire.store`, and a test checks they agree).
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
def store_docs(sections: Iterable[tuple[str, Sequence[Entry]]]) -> str:
    """Markdown tables of documented entries (docs/RUN_STORE.md's generated part), with each type's fields."""
    out = []
    for title, entries in sections:
        typed = any(e.type is not Any for e in entries)   # records are typed by their pydantic models, named in value
        out += [f"### {title}", "", "| name | written by | value |" + " type |" * typed, "|---|---|---|" + "---|" * typed]
        out += [f"| `{e.name}` | {e.writer} | {_cell(e.value)} |" + f" {_cell(describe_type(e.type))} |" * typed
                for e in entries]
        out.append("")
    return "\n".join(out)


def describe_type(t: Any) -> str:
    """A type as the docs show it: a model as `Name {field: type, ...}` (`…` when it takes more), else its name."""
    if isinstance(t, type) and issubclass(t, BaseModel):
        fields = ", ".join(f"{f.alias or name}: {_type_name(f.annotation)}" + ("" if f.is_required() else "?")
                           for name, f in t.model_fields.items())
        more = ", …" if t.model_config.get("extra") == "allow" else ""
        return f"`{t.__name__} {{{fields}{more}}}`"
    inner = [a for a in get_args(t) if isinstance(a, type) and issubclass(a, BaseModel)]   # list[M], dict[str, M]
    return "any" if t is Any else ", ".join([f"`{_type_name(t)}`"] + [describe_type(m) for m in inner])


def _type_name(t: Any) -> str:
    text = repr(t) if get_origin(t) is not None else getattr(t, "__name__", repr(t))
    return text.replace("typing.", "").replace("aspire.schemas.", "").replace("aspire.store_schema.", "")


def _cell(text: str) -> str:
    return text.replace("|", chr(92) + "|")


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
    def _documented(self, what: str, entries: Sequence[Entry], name: str) -> Entry:
        entry = next((e for e in entries if e.matches(name)), None)
        if entry is None:
            raise KeyError(f"{what} {name!r} is not documented (aspire/store_schema.py, docs/RUN_STORE.md)")
        return entry

    def set_meta(self, key: str, value: Any) -> None:
        """Write meta `key`: a model or plain JSON, checked against the key's type (ValueError naming the key)."""
        text = json.dumps(_checked(self._documented("meta key", self.META, key), value, f"meta {key!r}"))
        with self._lock, self._conn:
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, text))

    def get_meta(self, key: str, default: Any = None) -> Any:
        """Meta `key` as plain JSON (`meta` reads it typed)."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def meta(self, key: str, default: Any = None) -> Any:
        """Meta `key` as its type (store_schema: a model with its defaults filled in), or `default` if unset."""
        raw = self.get_meta(key)
        return default if raw is None else _adapter(self._documented("meta key", self.META, key).type).validate_python(raw)

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
    def log_event(self, kind: str, payload: dict | BaseModel) -> None:
        """Append an event, its payload checked against the kind's type (ValueError naming the kind)."""
        text = json.dumps(_checked(self._documented("event kind", self.EVENTS, kind), payload, f"event {kind!r}"))
        with self._lock, self._conn:
            self._conn.execute("INSERT INTO events (time, kind, json) VALUES (?, ?, ?)", (time.time(), kind, text))

    def events(self, kind: Optional[str] = None) -> list[dict]:
        sql = "SELECT time, kind, json FROM events" + (" WHERE kind = ?" if kind else "") + " ORDER BY id"
        # the event's kind is under "event": a payload may have a "kind" of its own
        return [{**json.loads(j), "time": t, "event": k} for t, k, j in self._conn.execute(sql, (kind,) if kind else ())]

    def close(self) -> None:
        self._conn.close()


@functools.lru_cache(maxsize=None)
def _adapter(t: Any) -> TypeAdapter:
    return TypeAdapter(t)


def _checked(entry: Entry, value: Any, what: str) -> Any:
    """`value` validated as the entry's type, as JSON (aliases, `class` for `class_`, as written)."""
    adapter = _adapter(entry.type)
    try:
        return adapter.dump_python(adapter.validate_python(value), mode="json", by_alias=True, exclude_unset=True)
    except ValidationError as e:
        raise ValueError(f"{what} does not match its type {describe_type(entry.type)}: {e.errors()[0]['loc']} "
                         f"{e.errors()[0]['msg']}") from None


def _dump(record: BaseModel | dict) -> str:
    if isinstance(record, BaseModel):
        return record.model_dump_json(by_alias=True)
    return json.dumps(record)


def run_store_docs() -> str:
    """The generated part of docs/RUN_STORE.md: the run store's and the batch store's documented entries."""
    from aspire.batch.state import BatchStore

    return store_docs([("Run store: meta keys (`store.meta(key)`: typed; `store.get_meta(key)`: JSON)", RunStore.META),
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

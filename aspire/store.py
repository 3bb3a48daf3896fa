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
from aspire.store_schema import RUN_EVENTS, RUN_META, RUN_RECORDS, Entry

M = TypeVar("M", bound=BaseModel)

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
    META: tuple[Entry, ...] = RUN_META
    RECORDS: tuple[Entry, ...] = RUN_RECORDS
    EVENTS: tuple[Entry, ...] = RUN_EVENTS

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
        if raw is None:
            return default
        entry = self._documented("meta key", self.META, key)
        try:
            return _adapter(entry.type).validate_python(raw)
        except ValidationError as e:
            raise AspireError(f"{self.run_dir / self.DB_NAME}: meta {key!r} does not match its type "
                              f"{describe_type(entry.type)}: {e.errors()[0]['loc']} {e.errors()[0]['msg']} (a run "
                              "written by another version of aspire, or damaged)") from None

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

    def log_event_once(self, kind: str, payload: dict, identity: Sequence[str], seen: Optional[set] = None) -> None:
        """Log an event unless one with the same `identity` field values is recorded (`seen`: those identities,
        when the caller logs many)."""
        if seen is None:
            seen = {tuple(e.get(k) for k in identity) for e in self.events(kind)}
        ident = tuple(payload.get(k) for k in identity)
        if ident not in seen:
            self.log_event(kind, payload)
            seen.add(ident)

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

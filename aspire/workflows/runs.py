"""Run folders, in one place: open a new or resumed run, refuse one of another kind or other inputs, and load
what a run recorded (its arguments, settings, dataset and classifier).

    open_run(run_dir, kind, args, hint=...) -> RunStore         new or resumed; another kind, other inputs or a
                                                                folder of other files: refused
    existing_run(run_dir) -> RunStore                           a run folder that must exist (never creates one)
    recorded_args(store) -> RunArgs                             meta "args", typed
    recorded_config(store, secrets_from=None) -> AspireConfig   meta "record"'s settings (keys: env or the file)
    load_inputs(args, device=None) -> (Dataset, classifier)     what the run probed
    resolve_classes(classes, class_names) -> [index]            --classes (names or indices; None or "all": all)
    class_index(ref, class_names, loose=False) -> int           one class by name or index (loose: its singular too)
    check_probe_inputs(dataset, classifier, config, classes)    before a run folder is written: classes, annotations
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from pydantic import ValidationError

from aspire.config import AspireConfig
from aspire.errors import AspireError, ConfigError, DataError
from aspire.store import RunStore
from aspire.store_schema import RunArgs
from aspire.tools import lexicon


def open_run(run_dir: str | Path, kind: str, args: RunArgs, *,
             hint: str = "use another --run-dir to start a new run") -> RunStore:
    """The run store in run_dir: created with `kind` and `args` (in a new or empty folder), or resumed when it
    holds a run of the same kind and inputs; anything else is refused with a line naming what differs and `hint`."""
    folder = Path(run_dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise AspireError(f"{run_dir}: is a file, not a run folder; {hint}")
    if folder.is_dir() and not (folder / RunStore.DB_NAME).is_file() and any(folder.iterdir()):
        raise AspireError(f"{run_dir}: exists and is not a run folder (it holds other files); {hint}")
    store = RunStore(run_dir)
    recorded, recorded_kind = store.get_meta("args"), store.get_meta("kind")
    if recorded is None:
        store.set_meta("kind", kind)
        store.set_meta("args", args.model_dump())
        return store
    given = args.model_dump()
    changed = sorted(k for k in set(recorded) | set(given) if recorded.get(k) != given.get(k))
    if changed or recorded_kind != kind:
        store.close()
        what = f"other inputs ({', '.join(changed)})" if changed else f"a {recorded_kind} run, not {kind}"
        raise AspireError(f"{run_dir}: holds {what}; {hint}")
    return store


def existing_run(run_dir: str | Path) -> RunStore:
    """The store of a run folder written by aspire probe, audit or batch; never creates one."""
    run_dir = Path(run_dir).expanduser().resolve()
    if not (run_dir / RunStore.DB_NAME).is_file():
        raise DataError(f"{run_dir}: not a run folder (no {RunStore.DB_NAME}); run aspire probe or aspire audit first")
    return RunStore(run_dir)


def recorded_args(store: RunStore) -> RunArgs:
    try:
        return RunArgs.model_validate(store.get_meta("args"))
    except ValidationError:
        raise DataError(f"{store.run_dir}: the run records no dataset and model (meta 'args')") from None


SECRETS = ("caption", "phrases", "agent")   # the concerns whose `api_key` is never recorded


def recorded_config(store: RunStore, secrets_from: Optional[str | Path] = None) -> AspireConfig:
    """The settings a run was started with (its reproducibility record, which holds no API keys). The keys come
    from the environment, or from the config file named again (`secrets_from`: only its keys are read)."""
    from aspire.config import load_config

    record = store.get_meta("record") or {}
    if not isinstance(record.get("config"), dict):
        raise AspireError(f"{store.run_dir}: the run records no settings (meta 'record'); it cannot be resumed")
    try:
        config = AspireConfig.model_validate(record["config"])
    except ValueError as e:
        raise AspireError(f"{store.run_dir}: the recorded settings are not valid for this aspire ({e})") from None
    if secrets_from is not None:
        given = load_config(secrets_from)
        for concern in SECRETS:
            key = getattr(given, concern).api_key
            if key:
                setattr(config, concern, getattr(config, concern).model_copy(update={"api_key": key}))
    return config


def record_overrides(store: RunStore, config: AspireConfig) -> None:
    """Flags given on resume (the planner's model, --offline) into the run's record, so that the next resume
    keeps them; API keys stay out."""
    record = store.get_meta("record") or {}
    dumped = config.model_dump(mode="json", exclude={c: {"api_key"} for c in SECRETS})
    store.set_meta("record", {**record, "config": dumped})


def load_inputs(args: RunArgs, device: Optional[str] = None):
    """(dataset, classifier) of a run's arguments."""
    from aspire.data.formats import load_dataset
    from aspire.models.classifier import load_checkpoint

    dataset = load_dataset(args.data, args.format, attr=args.attr, target=args.target)
    return dataset, load_checkpoint(args.model, device=device)


def class_index(ref: object, class_names: Sequence[str], *, loose: bool = False) -> int:
    """The index of a class given by its name or its index; `loose` (a person typing): quotes stripped, and a
    plural or singular of the name accepted."""
    names = list(class_names)
    name = str(ref).strip().strip("'\"") if loose else str(ref).strip()
    if name in names:
        return names.index(name)
    if name.isdigit() and int(name) < len(names):
        return int(name)
    if loose:
        hit = {lexicon.lemma(n.lower()): i for i, n in enumerate(names)}.get(lexicon.lemma(name.lower()))
        if hit is not None:
            return hit
    raise DataError(f"unknown class {name!r}: the classifier's classes are {', '.join(names)}")


def resolve_classes(classes: Optional[Sequence[str]], class_names: Sequence[str]) -> list[int]:
    """The indices of --classes, in their order without repeats; None or ["all"]: every class."""
    if not classes or list(classes) == ["all"]:
        return list(range(len(class_names)))
    return list(dict.fromkeys(class_index(c, class_names) for c in classes))


def check_probe_inputs(dataset, classifier, config: AspireConfig, classes: Optional[Sequence[str]]) -> None:
    """What a probe or audit would fail on later, checked before its run folder is created: a classifier of other
    classes than the data's, an unknown --classes or probe.label_objects class, an annotations file with a bad line
    or a missing mask."""
    from aspire.data.annotations import read_annotations
    from aspire.models.evaluate import check_classes

    check_classes(classifier, dataset)
    resolve_classes(classes, list(classifier.class_names))
    unknown = sorted(set(config.probe.label_objects) - set(classifier.class_names))
    if unknown:
        raise ConfigError(f"probe.label_objects names {unknown[0]!r}, not a class of the classifier "
                          f"({', '.join(classifier.class_names)})")
    files = {c.annotations for c in (config.caption, config.ground) if c.backend == "annotations" and c.annotations}
    for path in sorted(files):
        read_annotations(path)

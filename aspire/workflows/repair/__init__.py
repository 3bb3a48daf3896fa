"""Step 5 of the method, the repair: flipped edits → many training images without the spurious features.

`augment_run(run_dir, out_dir)` works from a finished probe or audit run folder (the store's `args` meta
names the dataset, its format and the classifier):

1. select (select.py), per probed class, the flipped (non-control) edits of its top phrase groups, strongest first, at
   most `probe.max_edits_per_class` (35) edited images; `augment.select` says which groups qualify: "spurious"
   (findings marked spurious, the default), "significant" (p_value < probe.alpha) or "flipping" (any group
   with a flip: the paper's ranking by flip rate), or the caller names the groups (`groups`: the agent's
   approved features). A class with none is skipped with its reason (stderr and the result); the others go on.
   `augment.select = "generic"` is the baseline of generic augmentation (the paper's "Azizi et al." row):
   no phrase group is targeted; per class, up to `probe.max_edits_per_class` of its hold-out images (unedited,
   in a seeded order) are the sources, and their backgrounds are the class's own training images (the
   training distribution, spurious features included), not filtered. Committed like any set; recorded in the
   run store's meta `augmented-generic`, so the run's own `augmented` record stays the method's.
   `counts` ({class: n}) caps the images per class and skips the classes it does not name (e.g. the per_class
   of an aspire set, for a generic set of the same size).
2. generate (tools/generate/, from what sources.py builds). The offline backend needs each edit's label-object
   mask (the inverse of a background edit's mask, else the region of `ProbePipeline.object_phrases(class)`,
   eroded by the grounder's dilation) and donor backgrounds: images of the run whose recorded phrases (store `phrases` records, then
   annotations.jsonl regions) name a background and none of the class's spurious phrase groups (same phrase,
   or for background groups the same scene category), with their own label object inpainted away by the
   run's Editor (cached under the run's `augment-cache/`). No such donor: the edits' own backgrounds, with
   their object inpainted away, and a note in the result.
3. optionally filter (filter.py; `augment.filter`, off by default; beyond the paper): drop near-duplicates (RMS distance
   of 16x16 grey thumbnails < `duplicate_rms`) and images whose classifier features lie farther from the
   centroid of the class's real training images than mean + `outlier_std`·std of the real images' distances.
   Caveat: the audited classifier's features encode its spurious features, so with a background-reliant
   classifier the second rule drops the very images that lack them (toy-waterbirds, seed-0 smallcnn:
   1411 of 1600 offline images); it guards against broken generations, with a classifier fit for that.
4. commit (here): the set is built in a temporary sibling folder and renamed onto `out_dir` (aspire.atomic.atomic_dir),
   in the format of aspire/data/augmented.py, with manifest.json. A commit never overwrites: an existing
   `out_dir` is refused with a one-line error, unless it already holds exactly this commit (same inputs and
   seed: `inputs_sha256`), which is then verified and returned (`reused`). A killed commit leaves no partial
   set (temporary folders of a killed run are removed by the next commit to the same `out_dir`); re-running
   gives the same set, byte for byte (offline backend; diffusion up to GPU non-determinism).
5. record `{dir, n_images, per_class, manifest, generator}` in the run store's meta `augmented`.

Settings: the run's recorded settings for what the run did (grounding, editing, probing), the current
`generate` and `augment` settings (`run_config`).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, ContextManager, Mapping, Optional, Sequence

from PIL import Image
from pydantic import ValidationError

from aspire.atomic import atomic_dir
from aspire.config import AspireConfig, load_config
from aspire.data.augmented import IMAGE_DIR, FORMAT, VERSION, read_manifest, verify_manifest, write_set_files
from aspire.errors import AspireError, ConfigError, DataError
from aspire.store import RunStore
from aspire.tools.generate import GeneratedImage, Generator, class_slug, derive_seed
from aspire.workflows.runs import existing_run, load_inputs, recorded_args
from aspire.workflows.repair.filter import filter_generated
from aspire.workflows.repair.select import ClassSelection, select_edits, select_originals
from aspire.workflows.repair.sources import CACHE, Sources

__all__ = ["AugmentResult", "ClassSelection", "RUN_SET", "augment_run", "filter_generated", "run_config",
           "select_edits", "select_originals"]

Progress = Callable[[str, int], ContextManager[Callable[[int], None]]]
RUN_CONCERNS = ("holdout", "caption", "phrases", "ground", "edit", "probe")  # taken from the run's record


@dataclass
class AugmentResult:
    out_dir: Path
    n_images: int
    per_class: dict[str, int]
    skipped: dict[str, str] = field(default_factory=dict)  # class → why no images were generated
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)  # class → {reason: count} (filter)
    notes: list[str] = field(default_factory=list)
    generator: dict[str, Any] = field(default_factory=dict)
    manifest: Optional[Path] = None
    reused: bool = False

    def to_json(self) -> dict:
        return {"out_dir": str(self.out_dir), "n_images": self.n_images, "per_class": self.per_class,
                "skipped": self.skipped, "dropped": self.dropped, "notes": self.notes, "generator": self.generator,
                "manifest": str(self.manifest) if self.manifest else None, "reused": self.reused}


# ---------------------------------------------------------------- settings
def run_config(run_dir: str | Path, config_file: Optional[str | Path] = None) -> AspireConfig:
    """`config_file` (and environment) settings, with the run's recorded settings for what the run did."""
    store = existing_run(run_dir)
    try:
        base = load_config(config_file)
        recorded = (store.get_meta("record") or {}).get("config") or {}
        update = {}
        for concern in RUN_CONCERNS:
            if concern in recorded:
                cls = type(getattr(base, concern))
                try:
                    update[concern] = cls.model_validate(recorded[concern])
                except ValidationError as e:
                    raise ConfigError(f"{store.run_dir}: the run's recorded {concern} settings are invalid "
                                      f"({e.errors()[0]['msg']})") from None
        return base.model_copy(update=update)
    finally:
        store.close()


# ---------------------------------------------------------------- 4. commit
def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _write_file(path: Path, data: bytes) -> None:
    """Write one file of the set being built (the whole folder is renamed into place at the end)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _row(g: GeneratedImage, rel: str, data: bytes, class_name: str, generator: str) -> dict[str, Any]:
    return {"img_filename": rel, "y": g.class_index, "class": class_name, "sha256": hashlib.sha256(data).hexdigest(),
            "generator": generator, "seed": g.seed, "sources": g.sources, "edits": g.edits, **g.info}


def _inputs_digest(store: RunStore, args: dict, selections: Sequence[ClassSelection], config: AspireConfig,
                   seed: int, counts: Optional[Mapping[str, int]] = None) -> str:
    payload = {"run_dir": str(store.run_dir), "args": args, "seed": seed,
               "selection": {s.class_name: [e.edit_id for e in s.edits] for s in selections},
               "avoid": {s.class_name: [f.phrase for f in s.avoid] for s in selections},
               **{k: getattr(config, k).model_dump(mode="json") for k in ("generate", "augment", "edit", "ground")}}
    if any(s.originals for s in selections):  # generic mode (absent otherwise: earlier digests stay valid)
        payload["originals"] = {s.class_name: s.originals for s in selections}
    if counts is not None:
        payload["counts"] = dict(sorted(counts.items()))
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


RUN_SET = "augmented"  # the one folder inside a run an augmented set may be committed to (the audit's own)


def _remove_stale(out_dir: Path) -> None:
    """Temporary folders of a commit to `out_dir` that was killed (atomic_dir names them `.NAME.*.tmp`)."""
    if out_dir.parent.is_dir():
        for stale in out_dir.parent.glob(f".{out_dir.name}.*.tmp"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)


def augment_run(run_dir: str | Path, out_dir: str | Path, config: Optional[AspireConfig] = None, seed: int = 0, *,
                groups: Optional[Collection[str]] = None, counts: Optional[Mapping[str, int]] = None,
                progress: Optional[Progress] = None,
                on_message: Optional[Callable[[str], None]] = None, pipeline=None) -> AugmentResult:
    """Generate and commit the augmented set of a finished probe or audit run (see the module docstring).

    `groups`: finding keys (`class index|kind|phrase`) to generate from instead of `augment.select`'s rule
    (the agent passes the approved features). `counts`: {class name: at most this many images}; classes it
    does not name (or names with 0) are skipped. Messages (skipped classes, notes) go to `on_message`
    (default: stderr); `progress(label, total)` is a context manager giving `advance(n)`. `pipeline`: the
    run's ProbePipeline when the caller holds one (the agent): its classifier and tools are used, not loaded again.

    One stage's models at a time: the probe's tools are released before generation starts, the editor (which
    inpaints a class's backgrounds) before the class's images are generated, and Stable Diffusion after each
    class."""
    from aspire.progress import step_progress
    from aspire.workflows.probe import ProbePipeline

    say = on_message or (lambda m: print(m, file=sys.stderr))
    progress = progress or (lambda label, total: step_progress(label, total, enabled=False))
    # 1. check inputs: the run, its arguments and findings, the output folder
    config = config or run_config(run_dir)
    store = existing_run(run_dir)
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir != store.run_dir / RUN_SET and (out_dir == store.run_dir or store.run_dir in out_dir.parents):
        raise ConfigError(f"{out_dir}: --out must be outside the run folder {store.run_dir} (or its {RUN_SET}/)")
    args = recorded_args(store)
    if store.count("finding") == 0:
        raise DataError(f"{store.run_dir}: the run has no findings yet; finish aspire probe or aspire audit first")

    # 2. the run's dataset, classifier and tools (the caller's, when it holds them); the selection
    if pipeline is None:
        dataset, clf = load_inputs(args, device=config.generate.device)
        pipeline = ProbePipeline(dataset, clf, config, store, classes=args.classes, seed=args.seed)
    dataset, clf = pipeline.dataset, pipeline.classifier
    generic = groups is None and config.augment.select == "generic"
    if generic:
        selections, skipped = select_originals(store, pipeline.samples, clf.class_names, pipeline.class_ids,
                                               config, seed)
    else:
        selections, skipped = select_edits(store, clf.class_names, pipeline.class_ids, config, groups)
    if counts is not None:
        bad = sorted(set(counts) - set(clf.class_names))
        if bad or any(int(n) < 0 for n in counts.values()):
            raise ConfigError(f"counts: {'unknown class ' + repr(bad[0]) if bad else 'negative count'} "
                              f"(classes: {', '.join(clf.class_names)})")
        for sel in selections:
            if not counts.get(sel.class_name):
                skipped[sel.class_name] = "no images requested for the class (counts)"
        selections = [sel for sel in selections if counts.get(sel.class_name)]
    record_key = "augmented-generic" if generic else "augmented"
    digest = _inputs_digest(store, args.model_dump(), selections, config, seed, counts)
    generator = Generator(config.generate)
    described = generator.describe()

    # 3. an existing output folder: this very commit (verified, reused) or a refusal
    if out_dir.exists():
        try:
            existing = read_manifest(out_dir)
        except DataError:
            existing = None
        if existing is None or existing.get("inputs_sha256") != digest:
            raise AspireError(f"{out_dir}: already exists; a commit never overwrites an earlier one "
                              "(choose another --out)")
        verify_manifest(out_dir)
        result = AugmentResult(out_dir, len(existing["images"]), existing["per_class"], existing["skipped"],
                               existing.get("dropped", {}), existing.get("notes", []), existing["generator"],
                               out_dir / "manifest.json", reused=True)
        _record(store, result, record_key)
        return result
    for name, why in skipped.items():
        say(f"class {name!r} skipped: {why}")
    if not selections:
        what = "hold-out images" if generic else "flipped edits"
        raise AspireError(f"{store.run_dir}: no class has {what} to generate from "
                          f"(skipped: {', '.join(skipped)}; reasons above)")

    # 4. generate, filter and commit in one temporary folder renamed into place
    _remove_stale(out_dir)
    sources = Sources(pipeline, config, seed)
    work = store.folder(f"{CACHE}/tokens")
    notes: list[str] = []
    rows: list[dict[str, Any]] = []
    per_class, dropped, filters = {}, {}, {}
    per_image = (config.generate.images_per_class if config.generate.backend == "offline"
                 else config.generate.images_per_seed * len(config.generate.seeds))
    with atomic_dir(out_dir) as tmp:
        pipeline.release()
        for sel in selections:
            job = sources.job(sel, notes)
            pipeline.release()   # the backgrounds are inpainted: the editor's memory goes to Stable Diffusion
            sub = f"{IMAGE_DIR}/{sel.class_index:03d}-{class_slug(sel.class_name)}"
            class_rows = []
            limit = per_image if counts is None else min(per_image, int(counts[sel.class_name]))
            with progress(f"generating {sel.class_name}", limit) as advance:
                for i, g in enumerate(itertools.islice(generator.generate(job, work), limit)):
                    if sel.originals:
                        g.edits = []  # generic mode: made from unedited images
                    data = _png_bytes(g.image)
                    rel = f"{sub}/{i:05d}.png"
                    _write_file(tmp / rel, data)
                    class_rows.append(_row(g, rel, data, sel.class_name, described["name"]))
                    advance(1)
            if config.augment.filter:
                real = [s for s in dataset.split("train") if s.y == sel.class_index and not s.synthetic]
                class_rows, dropped[sel.class_name], filters[sel.class_name] = filter_generated(
                    class_rows, tmp, real, clf, config, derive_seed(seed, "filter", sel.class_index))
                kept = {r["img_filename"] for r in class_rows}
                for path in sorted((tmp / sub).glob("*.png")):
                    if f"{sub}/{path.name}" not in kept:
                        path.unlink()
                if sum(dropped[sel.class_name].values()):
                    say(f"class {sel.class_name!r}: filter dropped {dropped[sel.class_name]}")
            generator.release()   # the next class's backgrounds (the editor) do not share the GPU with it
            per_class[sel.class_name] = len(class_rows)
            rows += class_rows
        if not rows:
            raise DataError(f"{out_dir}: the filter dropped every generated image ({dropped}); nothing committed. "
                            "Loosen augment.duplicate_rms / augment.outlier_std, or set augment.filter = false")
        for note in notes:
            say(note)
        for name in sorted({r["embedding_file"] for r in rows if "embedding_file" in r}):
            _write_file(tmp / "tokens" / name, (work / name).read_bytes())
        manifest = {"format": FORMAT, "version": VERSION, "inputs_sha256": digest, "seed": seed,
                    "run_dir": str(store.run_dir), "run_kind": store.get_meta("kind"), "dataset": args.model_dump(),
                    "classes": list(clf.class_names), "generator": described,
                    "selection": {s.class_name: {"groups": s.groups, "edits": [e.edit_id for e in s.edits],
                                                 "avoid": [f.phrase for f in s.avoid],
                                                 **({"originals": s.originals} if s.originals else {})}
                                  for s in selections},
                    "select": "given" if groups is not None else config.augment.select,
                    "per_class": per_class, "skipped": skipped, "dropped": dropped, "filter": filters or None,
                    "notes": notes, "images": rows}
        write_set_files(tmp, clf.class_names, manifest)

    # 5. record in the run store
    result = AugmentResult(out_dir, len(rows), per_class, skipped, dropped, notes, described,
                           out_dir / "manifest.json")
    _record(store, result, record_key)
    return result


def _record(store: RunStore, result: AugmentResult, key: str = "augmented") -> None:
    store.set_meta(key, {"dir": str(result.out_dir), "n_images": result.n_images,
                                 "per_class": result.per_class, "manifest": str(result.manifest),
                                 "generator": result.generator})

"""Step 5 of the method, the repair: flipped edits → many training images without the spurious features.

`augment_run(run_dir, out_dir)` works from a finished probe or audit run folder (the store's `args` meta
names the dataset, its format and the classifier):

1. select, per probed class, the flipped (non-control) edits of its top phrase groups, strongest first, at
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
2. generate (tools/generate/). The offline backend needs each edit's label-object mask (the inverse of a
   background edit's mask, else the region of `ProbePipeline.object_phrases(class)`, eroded by the grounder's
   dilation) and donor backgrounds: images of the run whose recorded phrases (store `phrases` records, then
   annotations.jsonl regions) name a background and none of the class's spurious phrase groups (same phrase,
   or for background groups the same scene category), with their own label object inpainted away by the
   run's Editor (cached under the run's `augment-cache/`). No such donor: the edits' own backgrounds, with
   their object inpainted away, and a note in the result.
3. optionally filter (`augment.filter`, off by default; beyond the paper): drop near-duplicates (RMS distance
   of 16x16 grey thumbnails < `duplicate_rms`) and images whose classifier features lie farther from the
   centroid of the class's real training images than mean + `outlier_std`·std of the real images' distances.
   Caveat: the audited classifier's features encode its spurious features, so with a background-reliant
   classifier the second rule drops the very images that lack them (toy-waterbirds, seed-0 smallcnn:
   1411 of 1600 offline images); it guards against broken generations, with a classifier fit for that.
4. commit: the set is built in a temporary sibling folder and renamed onto `out_dir` (aspire.atomic.atomic_dir),
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
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, ContextManager, Mapping, Optional, Sequence

import numpy as np
from PIL import Image
from pydantic import ValidationError

from aspire.atomic import atomic_dir
from aspire.config import AspireConfig, load_config
from aspire.data.augmented import IMAGE_DIR, FORMAT, VERSION, read_manifest, verify_manifest, write_set_files
from aspire.data.images import erode, load_image, load_mask
from aspire.errors import AspireError, ConfigError, DataError
from aspire.schemas import Edit, Finding, PhraseSet, Sample
from aspire.store import RunStore
from aspire.tools import lexicon
from aspire.tools.generate import Background, ClassJob, GeneratedImage, Generator, SourceEdit, class_slug, derive_seed
from aspire.tools.probe import rank_key
from aspire.workflows.runs import existing_run, load_inputs, recorded_args

Progress = Callable[[str, int], ContextManager[Callable[[int], None]]]
RUN_CONCERNS = ("holdout", "caption", "phrases", "ground", "edit", "probe")  # taken from the run's record
CACHE = "augment-cache"
THUMB_PX = 16


@dataclass
class ClassSelection:
    """One class's flipped edits to generate from, and the phrase groups its backgrounds must not show."""

    class_index: int
    class_name: str
    groups: list[str]
    edits: list[Edit]
    avoid: list[Finding]
    originals: list[str] = field(default_factory=list)  # generic mode: hold-out image keys (no edits, no groups)


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


# ---------------------------------------------------------------- 1. selection
def finding_key(f: Finding) -> str:
    """The store key of a finding: `class index|kind|phrase`."""
    return f"{f.class_index}|{f.kind}|{f.phrase}"


def select_edits(store: RunStore, class_names: Sequence[str], class_ids: Sequence[int], config: AspireConfig,
                 groups: Optional[Collection[str]] = None) -> tuple[list[ClassSelection], dict[str, str]]:
    """Per class, the flipped edits of its qualifying groups, strongest first, up to max_edits_per_class.
    `groups` (finding keys, e.g. the agent's approved features) replaces `augment.select` when given."""
    mode, limit = ("given" if groups is not None else config.augment.select), config.probe.max_edits_per_class
    if mode == "generic":
        raise ConfigError("augment.select = generic uses hold-out images, not edits (select_originals)")
    chosen = set(groups or ())
    findings = store.all("finding", Finding)
    selections, skipped = [], {}
    for y in class_ids:
        name = class_names[y]
        mine = sorted((f for f in findings if f.class_index == y), key=rank_key)
        qualifies = {"spurious": lambda f: f.spurious, "significant": lambda f: min(f.q_value, f.joint_q_value or 1.0) < config.probe.alpha,
                     "flipping": lambda f: bool(f.flipped_edits), "given": lambda f: finding_key(f) in chosen}[mode]
        top = [f for f in mine if qualifies(f) and f.evidence_edits]
        if not top:
            what = {"spurious": "no spurious phrase group", "significant": "no phrase group flipping significantly "
                    "more often than its controls", "flipping": "no phrase group",
                    "given": "none of the chosen phrase groups"}[mode]
            rule = "chosen groups" if mode == "given" else f"augment.select = {mode}"
            skipped[name] = (f"{what} with edits that lower the class's probability ({rule}; {len(mine)} groups probed)"
                             if mine else "no findings: the class was not probed in this run")
            continue
        edits: list[Edit] = []
        used: list[str] = []
        for f in top:
            if len(edits) >= limit:
                break
            used.append(f.phrase)
            for edit_id in f.evidence_edits:
                if len(edits) >= limit:
                    break
                edit = store.get("edit", edit_id, Edit)
                if edit is None or edit.control or any(e.edit_id == edit_id for e in edits):
                    continue
                if not Path(edit.edited_png).is_file():
                    raise DataError(f"{edit.edited_png}: edited image of edit {edit_id} is missing from the run")
                edits.append(edit)
        if not edits:
            skipped[name] = f"the flipped edits of {', '.join(used)} are missing from the run store"
            continue
        avoid = {f.phrase: f for f in mine if f.spurious}
        avoid.update({f.phrase: f for f in top if f.phrase in used})
        selections.append(ClassSelection(y, name, used, edits, list(avoid.values())))
    return selections, skipped


def select_originals(store: RunStore, samples: dict[str, Sample], class_names: Sequence[str],
                     class_ids: Sequence[int], config: AspireConfig,
                     seed: int) -> tuple[list[ClassSelection], dict[str, str]]:
    """Generic mode: per class, up to max_edits_per_class of its hold-out images in a seeded order (no edits,
    no phrase groups, nothing to avoid)."""
    holdout = [samples[k] for k in store.get_meta("holdout", []) if k in samples]
    selections, skipped = [], {}
    for y in class_ids:
        keys = sorted(s.image for s in holdout if s.y == y)
        if not keys:
            skipped[class_names[y]] = "no hold-out images: the class was not probed in this run"
            continue
        random.Random(derive_seed(seed, "generic", y)).shuffle(keys)
        selections.append(ClassSelection(y, class_names[y], [], [], [], keys[:config.probe.max_edits_per_class]))
    return selections, skipped


# ---------------------------------------------------------------- 2. what the generator starts from
def _mentions(phrase: str, groups: Sequence[Finding], threshold: float) -> bool:
    """Whether `phrase` names one of the phrase groups (background groups: also any phrase of their scene)."""
    for g in groups:
        for name in [g.phrase, *g.phrases]:
            if lexicon.same_phrase(phrase, name, threshold):
                return True
            if g.kind == "background":
                scene = lexicon.scene_category(name)
                if scene is not None and scene == lexicon.scene_category(phrase):
                    return True
    return False


class _Sources:
    """Builds a class's ClassJob from the run: edits with object masks, and donor backgrounds."""

    def __init__(self, pipeline, config: AspireConfig, seed: int):
        self.pipeline = pipeline
        self.store: RunStore = pipeline.store
        self.config = config
        self.seed = seed
        self._phrases: Optional[dict[str, list[str]]] = None

    def job(self, sel: ClassSelection, notes: list[str]) -> ClassJob:
        if sel.originals:
            return self._generic_job(sel)
        offline = self.config.generate.backend == "offline"  # textual inversion needs the edited images only
        sources, dilated = [], []
        for e in sel.edits:
            edited = np.array(load_image(e.edited_png))  # (H, W, 3) uint8
            mask = self._object_mask(e, edited.shape[:2]) if offline else None
            dilated.append(mask)
            sources.append(SourceEdit(e.edit_id, e.image, edited, None if mask is None else self._erode(mask)))
        backgrounds: list[Background] = []
        if offline:
            backgrounds = self._donors(sel)
            if not backgrounds:
                backgrounds = self._own_backgrounds(sel, sources, dilated)
                avoid = ", ".join(f.phrase for f in sel.avoid)
                notes.append(f"class {sel.class_name!r}: no image of the run shows a background without its spurious "
                             f"features ({avoid}); the edits' own backgrounds are used")
        return ClassJob(sel.class_index, sel.class_name, sources, backgrounds, seed=self.seed)

    def _generic_job(self, sel: ClassSelection) -> ClassJob:
        """Generic mode: the hold-out images themselves (their object masks: offline), on backgrounds of the
        class's own training images (any of them: not filtered)."""
        offline = self.config.generate.backend == "offline"
        sources = []
        for key in sel.originals:
            sample = self.pipeline.samples[key]
            image = np.array(load_image(sample.path))  # (H, W, 3) uint8
            mask = self.pipeline.object_mask(sample) if offline else None
            if mask is not None and (mask.shape != image.shape[:2] or mask.all() or not mask.any()):
                mask = None
            sources.append(SourceEdit(key, key, image, None if mask is None else self._erode(mask)))
        backgrounds: list[Background] = []
        if offline:
            keys = sorted(k for k, s in self.pipeline.samples.items()
                          if s.split == "train" and not s.synthetic and s.y == sel.class_index)
            random.Random(derive_seed(self.seed, "generic-backgrounds", sel.class_index)).shuffle(keys)
            backgrounds = self._inpainted(keys)
        return ClassJob(sel.class_index, sel.class_name, sources, backgrounds, seed=self.seed)

    # -- object masks
    def _object_mask(self, edit: Edit, shape_hw: tuple[int, int]) -> Optional[np.ndarray]:
        """The label object in the edited image: what a background edit kept, else the grounded object."""
        if edit.kind == "background" and edit.mask_png:
            mask = ~load_mask(edit.mask_png, (shape_hw[1], shape_hw[0]))
        else:
            sample = self.pipeline.samples.get(edit.image)
            if sample is None:
                raise DataError(f"edit {edit.edit_id}: source image {edit.image!r} is not in the dataset")
            mask = self.pipeline.object_mask(sample)
            if mask is not None and mask.shape != tuple(shape_hw):
                raise DataError(f"edit {edit.edit_id}: object mask {mask.shape[::-1]} differs from the edited image "
                                f"{shape_hw[::-1]}")
        return mask if mask is not None and mask.any() and not mask.all() else None

    def _erode(self, mask: np.ndarray) -> np.ndarray:
        """Undo the grounder's dilation, so no ring of the old background comes along with the object."""
        eroded = erode(mask, self.pipeline.tool("grounder").dilation_radius(mask.shape))
        return eroded if eroded.any() else mask

    # -- backgrounds
    def _phrase_table(self) -> dict[str, list[str]]:
        """{image key: phrases} for training images with a known background: store phrases, then annotations
        (never validation or test images: their pixels must not reach training)."""
        if self._phrases is None:
            samples = {k: s for k, s in self.pipeline.samples.items() if s.split == "train" and not s.synthetic}
            table: dict[str, list[str]] = {}
            for p in self.store.all("phrases", PhraseSet):
                if not p.failed and p.background and p.image in samples:
                    table[p.image] = [*p.foreground, *p.background]
            path = self.config.ground.annotations or self.config.caption.annotations
            if path and Path(path).is_file():
                from aspire.data.annotations import read_annotations

                for key, ann in read_annotations(path, check_files=False).items():
                    phrases = [r.phrase for r in ann.regions]
                    if key not in table and key in samples and \
                            any(lexicon.scene_category(p) for p in phrases):
                        table[key] = phrases
            self._phrases = table
        return self._phrases

    def _donors(self, sel: ClassSelection) -> list[Background]:
        threshold = self.config.probe.merge_similarity
        keys = sorted(k for k, phrases in self._phrase_table().items()
                      if not any(_mentions(p, sel.avoid, threshold) for p in phrases))
        random.Random(derive_seed(self.seed, "backgrounds", sel.class_index)).shuffle(keys)
        return self._inpainted(keys)

    def _inpainted(self, keys: Sequence[str]) -> list[Background]:
        """Backgrounds from the images `keys` in turn (their own label object inpainted away), up to
        max_backgrounds; images whose object is not found are passed over."""
        editor, out = self.pipeline.tool("editor"), self.store.folder(f"{CACHE}/backgrounds")
        found: list[Background] = []
        for key in keys:
            if len(found) >= self.config.generate.max_backgrounds:
                break
            sample = self.pipeline.samples[key]
            mask = self.pipeline.object_mask(sample)  # its own object: inpainted away
            if mask is None or mask.all():
                continue
            image = load_image(sample.path)
            if mask.shape != (image.height, image.width):
                continue
            edit = editor.remove(key, image, mask, self._object_name(sample.y),
                                 derive_seed(self.seed, "background", key), out)
            found.append(Background(key, np.array(load_image(edit.edited_png))))
        return found

    def _object_name(self, y: int) -> str:
        """What a removal of class y's own object is recorded as: its first name, else the class name."""
        return (self.pipeline.object_phrases(y) or [lexicon.normalize(self.pipeline.class_names[y])])[0]

    def _own_backgrounds(self, sel: ClassSelection, sources: Sequence[SourceEdit],
                         dilated: Sequence[Optional[np.ndarray]]) -> list[Background]:
        editor, out = self.pipeline.tool("editor"), self.store.folder(f"{CACHE}/backgrounds")
        found = []
        for src, mask in zip(sources, dilated):
            if mask is None:
                continue
            edit = editor.remove(f"edit {src.edit_id}", Image.fromarray(src.edited), mask,
                                 self._object_name(sel.class_index), derive_seed(self.seed, "own", src.edit_id), out)
            found.append(Background(src.image_key, np.array(load_image(edit.edited_png))))
        return found


# ---------------------------------------------------------------- 3. filter
def _thumbnails(paths: Sequence[Path]) -> np.ndarray:
    """(N, 256) grey 16x16 thumbnails in [0, 1]."""
    return np.stack([np.asarray(Image.open(p).convert("L").resize((THUMB_PX, THUMB_PX), Image.BILINEAR),
                                np.float32).ravel() / 255.0 for p in paths])


def _features(clf, paths: Sequence[str | Path]) -> np.ndarray:
    """Classifier features (N, D) of images on disk."""
    import torch

    from aspire.devices import map_batches

    def run(batch: Sequence[str | Path]) -> list[np.ndarray]:
        with torch.no_grad():
            return list(clf.features(clf.preprocess([load_image(p) for p in batch])).float().cpu().numpy())

    clf.eval()
    return np.stack(map_batches(run, list(paths), 64))


def filter_generated(rows: Sequence[dict], folder: Path, real: Sequence[Sample], clf, config: AspireConfig,
                     seed: int) -> tuple[list[dict], dict[str, int], dict[str, Any]]:
    """(kept rows, {reason: dropped count}, what the filter measured) for one class's generated images."""
    settings = config.augment
    paths = [folder / r["img_filename"] for r in rows]
    drop: dict[int, str] = {}
    # 1. near-duplicates of an earlier kept image
    thumbs = _thumbnails(paths)  # (N, 256)
    kept: list[int] = []
    for i in range(len(rows)):
        if kept and float(np.sqrt(((thumbs[kept] - thumbs[i]) ** 2).mean(1)).min()) < settings.duplicate_rms:
            drop[i] = "near_duplicate"
        else:
            kept.append(i)
    # 2. far from the class's real images in the classifier's feature space
    info: dict[str, Any] = {"duplicate_rms": settings.duplicate_rms, "outlier_std": settings.outlier_std}
    pool = sorted(real, key=lambda s: s.image)
    random.Random(seed).shuffle(pool)
    pool = pool[:settings.reference_images]
    if len(pool) >= 2 and kept:
        ref = _features(clf, [s.path for s in pool])  # (R, D)
        centroid = ref.mean(0)
        d_ref = np.linalg.norm(ref - centroid, axis=1)
        limit = float(d_ref.mean() + settings.outlier_std * d_ref.std())
        d_gen = np.linalg.norm(_features(clf, [paths[i] for i in kept]) - centroid, axis=1)
        for i, d in zip(kept, d_gen):
            if d > limit:
                drop[i] = "far_from_class"
        info.update(reference_images=len(pool), distance_limit=limit)
    else:
        info.update(reference_images=len(pool), distance_limit=None)
    counts = {"near_duplicate": 0, "far_from_class": 0}
    for reason in drop.values():
        counts[reason] += 1
    return [r for i, r in enumerate(rows) if i not in drop], counts, info


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
    sources = _Sources(pipeline, config, seed)
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

"""Steps 1-4 of the method as a plain pipeline (no agent): hold-out → caption → phrases → edit → probe.

`ProbePipeline` is what `aspire probe` runs and what the agent's nodes call step by step. Every step
reads what earlier steps recorded in the run store and writes its own records there, skipping work that
is already recorded: a killed run resumes where it stopped, and re-running a step neither loses nor
duplicates anything. Given a seed the whole pipeline is deterministic.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Optional, Sequence

import numpy as np

from aspire.atomic import write_json
from aspire.config import AspireConfig
from aspire.data.formats import Dataset
from aspire.data.images import load_image, load_mask
from aspire.errors import DataError
from aspire.schemas import Caption, Edit, Finding, PhraseSet, Probe, Region, Sample
from aspire.progress import step_progress
from aspire.store import RunStore
from aspire.tools import lexicon
from aspire.tools.probe import Prediction, Prober, aggregate_findings

Progress = Callable[[str, int], ContextManager[Callable[[int], None]]]


@dataclass
class ProbeCounts:
    holdout: int = 0
    captions: int = 0
    phrase_failures: int = 0
    regions: int = 0
    not_grounded: int = 0
    edits: int = 0
    control_edits: int = 0
    skipped: int = 0
    probes: int = 0


@dataclass
class ProbeResult:
    run_dir: Path
    findings: list[Finding]
    counts: ProbeCounts = field(default_factory=ProbeCounts)

    def to_json(self) -> dict:
        return {"run_dir": str(self.run_dir), "findings": [f.to_json() for f in self.findings],
                "counts": vars(self.counts)}


def edit_seed(seed: int, *parts: str) -> int:
    """A per-edit seed that depends only on the run seed and what is edited (stable across resumes)."""
    digest = hashlib.sha256("|".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def object_phrases(class_name: str) -> list[str]:
    """Phrases that name the label's own object: the class name and its head noun ("waterbird" → "bird")."""
    names = [lexicon.normalize(class_name)]
    head = lexicon.head(class_name)
    if head and head not in names:
        names.append(head)
    return [n for n in names if n]


class ProbePipeline:
    """The method's steps 1-4 over one dataset and classifier, recorded in a run store."""

    def __init__(self, dataset: Dataset, classifier, config: AspireConfig, store: RunStore, *,
                 classes: Optional[Sequence[str]] = None, seed: int = 0,
                 progress: Optional[Progress] = None):
        self.dataset = dataset
        self.classifier = classifier
        self.config = config
        self.store = store
        self.seed = seed
        self.progress = progress or (lambda label, total: step_progress(label, total, enabled=False))
        self.class_names = list(classifier.class_names)
        if len(self.class_names) < dataset.num_classes:
            raise DataError(f"{dataset.source}: labels go up to {dataset.num_classes - 1} but the classifier "
                            f"has {len(self.class_names)} classes")
        self.class_ids = self._resolve_classes(classes)
        self.samples = dataset.by_image()
        self._tools: dict[str, object] = {}

    # ------------------------------------------------------------ helpers
    def _resolve_classes(self, classes: Optional[Sequence[str]]) -> list[int]:
        if not classes or list(classes) == ["all"]:
            return list(range(len(self.class_names)))
        out = []
        for c in classes:
            if c in self.class_names:
                out.append(self.class_names.index(c))
            elif c.isdigit() and int(c) < len(self.class_names):
                out.append(int(c))
            else:
                raise DataError(f"unknown class {c!r}: the classifier's classes are {', '.join(self.class_names)}")
        return sorted(set(out))

    def tool(self, name: str):
        """Tools are built once, and their models load lazily on first use."""
        if name not in self._tools:
            if name == "captioner":
                from aspire.tools.caption import Captioner
                self._tools[name] = Captioner(self.config.caption)
            elif name == "extractor":
                from aspire.tools.phrases import PhraseExtractor
                self._tools[name] = PhraseExtractor(self.config.phrases)
            elif name == "grounder":
                from aspire.tools.ground import Grounder
                self._tools[name] = Grounder(self.config.ground)
            elif name == "editor":
                from aspire.tools.edit import Editor
                self._tools[name] = Editor(self.config.edit)
            elif name == "prober":
                self._tools[name] = Prober(self.classifier, self.config.probe)
        return self._tools[name]

    def holdout(self) -> list[Sample]:
        return [self.samples[k] for k in self.store.get_meta("holdout", [])]

    # ------------------------------------------------------------ 1. D_hold
    def select_holdout(self) -> list[Sample]:
        """Per probed class, a random p% of its training images that the classifier gets right."""
        if self.store.get_meta("holdout") is not None:
            return self.holdout()
        settings = self.config.holdout
        rng = random.Random(settings.seed + self.seed)
        train = self.dataset.split("train")
        chosen: list[str] = []
        prober: Prober = self.tool("prober")
        for y in self.class_ids:
            pool = [s for s in train if s.y == y and not s.synthetic]
            if not pool:
                raise DataError(f"class {self.class_names[y]!r} has no training images")
            rng.shuffle(pool)
            want = min(settings.max_per_class, max(1, math.ceil(settings.fraction * len(pool))))
            # Predict in chunks until enough correct images are found: no full pass over a large train set.
            step = max(want, self.config.probe.batch_size)
            kept: list[str] = []
            for start in range(0, len(pool), step):
                chunk = pool[start:start + step]
                preds = prober.predict([s.path for s in chunk], [s.y for s in chunk])
                self.store.put_many("prediction", [(s.image, p) for s, p in zip(chunk, preds)])
                kept += [s.image for s, p in zip(chunk, preds) if p.pred == s.y]
                if len(kept) >= want:
                    break
            chosen += sorted(kept[:want])
        self.store.set_meta("holdout", chosen)
        self.store.log_event("holdout", {"n": len(chosen), "classes": [self.class_names[y] for y in self.class_ids]})
        return self.holdout()

    # ------------------------------------------------------------ 2. captions
    def caption(self) -> list[Caption]:
        self.select_holdout()
        todo = [s for s in self.holdout() if not self.store.has("caption", s.image)]
        if todo:
            captioner = self.tool("captioner")
            with self.progress("captioning", len(todo)) as advance:
                for start in range(0, len(todo), 64):
                    batch = todo[start:start + 64]
                    captions = captioner.caption(batch)
                    self.store.put_many("caption", [(c.image, c) for c in captions])
                    advance(len(batch))
        return [self.store.get("caption", s.image, Caption) for s in self.holdout()]

    # ------------------------------------------------------------ 3. phrases
    def extract_phrases(self) -> list[PhraseSet]:
        captions = [c for c in self.caption() if not self.store.has("phrases", c.image)]
        if captions:
            extractor = self.tool("extractor")
            class_of = {c.image: self.class_names[self.samples[c.image].y] for c in captions}
            with self.progress("extracting phrases", len(captions)) as advance:
                for start in range(0, len(captions), 64):
                    batch = captions[start:start + 64]
                    sets = extractor.extract(batch, class_of)
                    for p in sets:
                        if p.failed:
                            self.store.log_event("phrase_failure", {"image": p.image, "reason": p.failed})
                    self.store.put_many("phrases", [(p.image, p) for p in sets])
                    advance(len(batch))
        return [self.store.get("phrases", s.image, PhraseSet) for s in self.holdout()]

    # ------------------------------------------------------------ 4a/4b. ground and edit
    def ground(self, image_key: str, phrases: Sequence[str]) -> list[Region]:
        """Regions for phrases in one image, cached in the store by (image, phrase)."""
        todo = [p for p in dict.fromkeys(phrases) if not self.store.has("region", f"{image_key}|{p}")]
        if todo:
            image = load_image(self.samples[image_key].path)
            regions = self.tool("grounder").ground(image_key, image, todo, self.store.folder("masks"))
            self.store.put_many("region", [(f"{image_key}|{r.phrase}", r) for r in regions])
        return [self.store.get("region", f"{image_key}|{p}", Region) for p in phrases]

    def object_mask(self, sample: Sample) -> Optional[np.ndarray]:
        """The label object's mask in an image (for background changes), or None when it is not found."""
        for region in self.ground(sample.image, object_phrases(self.class_names[sample.y])):
            if region.grounded and region.mask_png:
                return load_mask(region.mask_png)
        return None

    def make_edits(self, only_phrases: Optional[dict[int, set[str]]] = None) -> list[Edit]:
        """Removal of every foreground phrase and a change of the background, each with its control.

        `only_phrases` restricts the edits to {class index: phrase groups} (the agent's hypotheses)."""
        sets = {p.image: p for p in self.extract_phrases()}
        holdout = [s for s in self.holdout() if s.y in self.class_ids]
        with self.progress("editing", len(holdout)) as advance:
            for sample in holdout:
                marker = f"{sample.image}|{_phrase_filter_key(only_phrases, sample.y)}"
                if not self.store.has("edited", marker):
                    self._edit_image(sample, sets.get(sample.image), only_phrases, sets)
                    self.store.put("edited", marker, {"image": sample.image})
                advance(1)
        return self.store.all("edit", Edit)

    def _wanted(self, phrase: str, y: int, only: Optional[dict[int, set[str]]]) -> bool:
        if only is None:
            return True
        return any(lexicon.same_phrase(phrase, p, self.config.probe.merge_similarity) for p in only.get(y, ()))

    def _edit_image(self, sample: Sample, phrases: Optional[PhraseSet], only, all_sets: dict[str, PhraseSet]) -> None:
        if phrases is None or phrases.failed:
            return
        editor = self.tool("editor")
        out_dir = self.store.folder("edits")
        image = load_image(sample.path)
        edits: list[Edit] = []

        # 4a. foreground removal, and a control of the same area elsewhere
        foreground = [p for p in phrases.foreground if self._wanted(p, sample.y, only)]
        for region in self.ground(sample.image, foreground):
            if not region.grounded:
                self.store.log_event("not_grounded", {"image": sample.image, "phrase": region.phrase,
                                                      "reason": region.reason})
                continue
            mask = load_mask(region.mask_png, image.size)
            seed = edit_seed(self.seed, sample.image, region.phrase)
            for control in (False, True):
                edit = editor.remove(sample.image, image, mask, region.phrase, seed, out_dir, control=control)
                if edit is not None:
                    edits.append(edit)
                else:
                    self.store.log_event("skipped", {"image": sample.image, "phrase": region.phrase,
                                                     "reason": "no room for a control edit"})

        # 4b. background change to the alternative, and a control keeping the kind of background
        if phrases.background and phrases.alt and self._wanted(phrases.background[0], sample.y, only):
            bg, alt = phrases.background[0], phrases.alt[0]
            fg_mask = self.object_mask(sample)
            needs_mask = self.config.edit.background_backend == "replace"
            if fg_mask is None and needs_mask:
                self.store.log_event("skipped", {"image": sample.image, "phrase": bg,
                                                 "reason": "the label's object was not found for a background change"})
            else:
                seed = edit_seed(self.seed, sample.image, "background", bg)
                for control, target in ((False, alt), (True, bg)):
                    donor = self._donor(sample, target, all_sets, seed) if needs_mask else None
                    edits.append(editor.change_background(sample.image, image, fg_mask, bg, alt, seed, out_dir,
                                                          donor=donor, control=control))
        self.store.put_many("edit", [(e.edit_id, e) for e in edits])

    def _donor(self, sample: Sample, background: str, all_sets: dict[str, PhraseSet], seed: int):
        """An image whose background is `background` (and a different image), with its object's mask."""
        if self.config.edit.background_fill != "other-image":
            return None
        candidates = sorted(k for k, p in all_sets.items()
                            if k != sample.image and p.background and lexicon.same_phrase(p.background[0], background))
        rng = random.Random(seed)
        rng.shuffle(candidates)
        for key in candidates[:8]:
            mask = self.object_mask(self.samples[key])
            if mask is not None:
                return load_image(self.samples[key].path), mask
        return None

    # ------------------------------------------------------------ 4c. classify and decide
    def probe(self) -> list[Probe]:
        edits = [e for e in self.store.all("edit", Edit) if not self.store.has("probe", e.edit_id)]
        if edits:
            prober: Prober = self.tool("prober")
            # source images were classified when the hold-out was chosen
            originals = {e.image: p for e in edits
                         if (p := self.store.get("prediction", e.image, Prediction)) is not None}
            step = self.config.probe.batch_size * 4
            with self.progress("probing", len(edits)) as advance:
                for start in range(0, len(edits), step):
                    batch = edits[start:start + step]
                    probes = prober.probe(batch, self.samples, originals)
                    self.store.put_many("probe", [(p.edit_id, p) for p in probes])
                    advance(len(batch))
        return self.store.all("probe", Probe)

    def findings(self) -> list[Finding]:
        findings = aggregate_findings(self.store.all("probe", Probe), self.class_names, self.config.probe)
        self.store.replace_all("finding", [(f"{f.class_index}|{f.kind}|{f.phrase}", f) for f in findings])
        write_json(self.store.run_dir / "findings.json", [f.to_json() for f in findings])
        return findings

    def counts(self) -> ProbeCounts:
        regions = self.store.all("region", Region)
        edits = self.store.all("edit", Edit)
        return ProbeCounts(
            holdout=len(self.store.get_meta("holdout", [])), captions=self.store.count("caption"),
            phrase_failures=sum(1 for p in self.store.all("phrases", PhraseSet) if p.failed),
            regions=len(regions), not_grounded=sum(1 for r in regions if not r.grounded),
            edits=sum(1 for e in edits if not e.control), control_edits=sum(1 for e in edits if e.control),
            skipped=len({(e["image"], e["phrase"]) for e in self.store.events("skipped")}),
            probes=self.store.count("probe"))

    def run(self) -> ProbeResult:
        self.make_edits()  # each step first runs the steps before it (skipping recorded work)
        self.probe()
        findings = self.findings()
        return ProbeResult(self.store.run_dir, findings, self.counts())


def _phrase_filter_key(only: Optional[dict[int, set[str]]], y: int) -> str:
    return "all" if only is None else ",".join(sorted(only.get(y, ())))

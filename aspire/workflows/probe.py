"""Steps 1-4 of the method as a plain pipeline (no agent): hold-out → caption → phrases → edit → probe.

Editing (4a/4b): every phrase of a caption is grounded, and its mask, not its word, says whether it is an
object (removed, with a same-area control, else the same mask on a matched image) or the background (its
region laid over with the background of a hold-out image of another group, with a same-group control).
Background groups come from how the regions look. Then, for the groups that can be tested, the insertion
(sufficiency) test and joint removal (redundant shortcuts): `test_further`.

`ProbePipeline` is what `aspire probe` runs and what the agent's nodes call step by step. Every step
reads what earlier steps recorded in the run store and writes its own records there, skipping work that
is already recorded: a killed run resumes where it stopped, and re-running a step neither loses nor
duplicates anything. Given a seed the whole pipeline is deterministic.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Optional, Sequence

import numpy as np

from aspire.atomic import write_json
from aspire.config import AspireConfig
from aspire.data.formats import Dataset
from aspire.data.images import load_image, load_mask
from aspire.errors import AspireError, DataError, error_line
from aspire.schemas import Caption, Edit, Failure, Finding, PhraseSet, Probe, Propagated, Region, Sample
from aspire.progress import step_progress
from aspire.store import RunStore
from aspire.tools import lexicon
from aspire.tools.edit import PasteRequest, RemoveRequest, find_control
from aspire.tools.generate import derive_seed
from aspire.tools.ground import region_kind
from aspire.tools.probe import (Prediction, Prober, aggregate_findings, colour_histogram, compare_findings,
                                joint_summary, merge_by_appearance, merge_phrase_groups, min_testable_pairs)
from aspire.workflows.runs import resolve_classes

Progress = Callable[[str, int], ContextManager[Callable[[int], None]]]
# A tool's failure on one item (a bad mask, an edit that cannot be made, a model error or out-of-memory at the
# smallest batch): recorded and skipped. Settings and model-loading errors (ConfigError, ModelLoadError) and
# programming errors still stop the run.
ITEM_ERRORS = (DataError, RuntimeError, ValueError, OSError)


@dataclass
class ProbeCounts:
    holdout: int = 0
    captions: int = 0
    phrase_failures: int = 0
    regions: int = 0
    not_grounded: int = 0
    edits: int = 0
    control_edits: int = 0
    skipped: int = 0   # edits not made: no control possible, or a tool failed (the failures also in `failures`)
    propagated: int = 0  # phrases found by grounding in images whose captions left them out (step 3b)
    failures: int = 0  # images or phrases a tool failed on (records `failure`; `--retry-skipped` tries them again)
    probes: int = 0
    insertion_edits: int = 0  # real and control pastes
    joint_edits: int = 0      # real and control joint removals


@dataclass
class ProbeResult:
    run_dir: Path
    findings: list[Finding]
    counts: ProbeCounts = field(default_factory=ProbeCounts)

    joint: dict = field(default_factory=dict)  # per class: the combined effect of removing every candidate group

    def to_json(self) -> dict:
        return {"run_dir": str(self.run_dir), "findings": [f.to_json() for f in self.findings],
                "counts": vars(self.counts), "joint": self.joint}


def edit_seed(seed: int, *parts: str) -> int:
    """A per-edit seed that depends only on the run seed and what is edited (stable across resumes)."""
    return derive_seed(seed, *parts)


ALL_CANDIDATES = "all candidates"  # the phrase of a class's joint-removal pair of every candidate group


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
        self.class_ids = sorted(resolve_classes(classes, self.class_names))
        self.samples = dataset.by_image()
        self._tools: dict[str, object] = {}
        self._backgrounds: dict[str, Optional[tuple[str, Optional[np.ndarray]]]] = {}
        self._object_masks: dict[str, Optional[np.ndarray]] = {}   # per image: the label object's mask
        self._object_unions: dict[str, np.ndarray] = {}             # per image: its other objects' masks
        self._bg_groups: Optional[dict[str, str]] = None
        self._key_groups: dict[str, Optional[str]] = {}              # per image: its background group

    # ------------------------------------------------------------ helpers
    def release(self, *names: str) -> None:
        """Drop the models of the tools `names` (default: every tool but the classifier's prober), so that the
        next stage has their memory; a tool loads its models again if it is used again."""
        for name in names or [n for n in self._tools if n != "prober"]:
            tool = self._tools.get(name)
            if hasattr(tool, "release"):
                tool.release()

    def resident(self) -> list[str]:
        """The tools whose models are loaded now (the classifier, shared by every stage, not counted)."""
        return sorted(n for n, t in self._tools.items() if getattr(t, "resident", False))

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
        for y in self.class_ids:
            pool = [s for s in train if s.y == y and not s.synthetic]
            if not pool:
                raise DataError(f"class {self.class_names[y]!r} has no training images")
            rng.shuffle(pool)
            want = min(settings.max_per_class, len(pool),
                       max(1, settings.min_per_class, math.ceil(settings.fraction * len(pool))))
            # Predict in chunks until enough correct images are found: no full pass over a large train set.
            step = max(want, self.config.probe.batch_size)
            kept: list[str] = []
            for start in range(0, len(pool), step):
                kept += [s.image for s in self._correct(pool[start:start + step])]
                if len(kept) >= want:
                    break
            chosen += sorted(kept[:want])
        self.store.set_meta("holdout", chosen)
        self.store.log_event("holdout", {"n": len(chosen), "classes": [self.class_names[y] for y in self.class_ids]})
        return self.holdout()

    def _correct(self, samples: Sequence[Sample]) -> list[Sample]:
        """The samples the classifier gets right; its predictions are recorded (records `prediction`)."""
        preds = self.tool("prober").predict([s.path for s in samples], [s.y for s in samples])
        self.store.put_many("prediction", [(s.image, p) for s, p in zip(samples, preds)])
        return [s for s, p in zip(samples, preds) if p.pred == s.y]

    # ------------------------------------------------------------ 2. captions
    def caption(self) -> list[Caption]:
        """Captions of the hold-out images. A batch that fails is captioned image by image; an image that fails
        alone is a recorded failure (not retried on resume unless `retry_failed`); all of them failing is an error."""
        holdout = self.select_holdout()
        todo = [s for s in holdout if not self.store.has("caption", s.image)
                and not self.store.has("failure", f"caption|{s.image}|")]
        if todo:
            captioner = self.tool("captioner")
            with self.progress("captioning", len(todo)) as advance:
                for start in range(0, len(todo), 64):
                    batch = todo[start:start + 64]
                    try:
                        captions = captioner.caption(batch)
                    except ITEM_ERRORS:
                        captions = []
                        for sample in batch:
                            try:
                                captions += captioner.caption([sample])
                            except ITEM_ERRORS as e:
                                self._failed("caption", sample, "", e)
                    self.store.put_many("caption", [(c.image, c) for c in captions])
                    advance(len(batch))
            self.release("captioner")   # the later steps never caption: its memory goes to grounding and editing
        captions = [c for c in (self.store.get("caption", s.image, Caption) for s in holdout) if c is not None]
        if holdout and not captions:
            raise AspireError(f"captioning failed for every hold-out image ({self._first_failure('caption')})")
        return captions

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
        sets = [self.store.get("phrases", s.image, PhraseSet) for s in self.holdout()]
        failed = [p for p in sets if p is not None and p.failed]
        if sets and len(failed) == len(sets):   # e.g. an LLM endpoint that never answered: not a clean result
            raise AspireError(f"phrase extraction failed for every hold-out image ({len(failed)}; the first: "
                              f"{failed[0].failed}); fix the phrases backend, then run again with --retry-skipped")
        return sets

    # ------------------------------------------------------------ 3b. what the captions left out
    def phrase_sets(self) -> dict[str, PhraseSet]:
        """{image: phrases} of the hold-out, each with the frequent phrases its caption left out.

        A caption names about half of what an image shows, so a group's tests would see only the images that
        happen to mention it, and a background change would paint over the objects nobody named. So every phrase
        group named in at least probe.min_occurrences hold-out images (its most frequent phrase; the label
        objects excepted) is grounded in each probed hold-out image that names none of the group. Where the
        grounder finds it, in a region the image does not already name under another phrase, it joins the
        image's phrases; its mask decides its kind, as for every phrase. Recorded per image (record
        `propagated`); `probe.propagate = false` turns it off. Then groups still too rare in a class get more
        images (`_extend_holdout`)."""
        sets = {p.image: p for p in self.extract_phrases() if p is not None}
        if not self.config.probe.propagate:
            return sets
        usable = {k: p for k, p in sets.items() if not p.failed}
        named = {k: list(dict.fromkeys([*p.foreground, *p.background[:1]])) for k, p in usable.items()}
        group_of = merge_phrase_groups([q for qs in named.values() for q in qs], self.config.probe.merge_similarity)
        groups_in = {k: {group_of[lexicon.normalize(q)] for q in qs} for k, qs in named.items()}
        images = Counter(g for gs in groups_in.values() for g in gs)
        labels = [o for c in self.class_names for o in object_phrases(c)]
        frequent = [g for g, n in sorted(images.items(), key=lambda t: (-t[1], t[0]))
                    if n >= self.config.probe.min_occurrences and not any(lexicon.same_phrase(g, o) for o in labels)]
        todo = {k: [g for g in frequent if g not in groups_in[k] and g not in self._propagated(k).tried]
                for k in usable if self.samples[k].y in self.class_ids and not self.store.has("failure", f"edit|{k}|")}
        todo = {k: v for k, v in todo.items() if v}
        if todo:
            with self.progress("grounding what captions left out", len(todo)) as advance:
                for key, phrases in todo.items():
                    before = self._propagated(key)
                    try:
                        now = self._ground_missing(self.samples[key], named[key], phrases)
                        self.store.put("propagated", key, Propagated(
                            image=key, tried=sorted({*before.tried, *now.tried}), found=[*before.found, *now.found],
                            same={**before.same, **now.same}))
                    except ITEM_ERRORS as e:   # the image's edits will meet the same failure; --retry-skipped
                        self._failed("edit", self.samples[key], "", e)
                    advance(1)
        if self._extend_holdout(frequent, group_of):   # the new images are captioned and grounded like the others
            return self.phrase_sets()
        return {k: self.phrase_set(k) or p for k, p in sets.items()}

    def _extend_holdout(self, frequent: Sequence[str], group_of: dict[str, str]) -> bool:
        """Step 1b, once per run: a frequent phrase group named in some but fewer than holdout.min_group_images of a
        class's hold-out images is too rare there for its test to reach significance. So the class's other
        correctly classified training images are searched for it (its phrase grounded in them, in shuffled order),
        and those that show it join the hold-out, until each such group has its images, the class has
        holdout.max_per_class images, or the class has no more. Which images join depends only on what they
        show, never on an edit's outcome. Recorded in meta `holdout_extension`; returns whether any joined."""
        target = self.config.holdout.min_group_images
        if target <= 0 or self.store.get_meta("holdout_extension") is not None:
            return False
        chosen = list(self.store.get_meta("holdout", []))
        taken = set(chosen)
        added: dict[str, list[str]] = {}
        for y in self.class_ids:
            mine = [k for k in chosen if self.samples[k].y == y]
            shown = Counter(g for k in mine if (p := self.phrase_set(k)) is not None and not p.failed
                            for g in {group_of.get(lexicon.normalize(q), lexicon.normalize(q))
                                      for q in [*p.foreground, *p.background[:1]]})
            need = {g: target - shown[g] for g in frequent if 0 < shown[g] < target}
            room = self.config.holdout.max_per_class - len(mine)
            pool = sorted(s.image for s in self.dataset.split("train")
                          if s.y == y and not s.synthetic and s.image not in taken)
            random.Random(derive_seed(self.config.holdout.seed + self.seed, "extend", y)).shuffle(pool)
            step = self.config.probe.batch_size
            for start in range(0, len(pool), step):
                if not need or room <= 0:
                    break
                for sample in self._correct([self.samples[k] for k in pool[start:start + step]]):
                    if not need or room <= 0:
                        break
                    try:
                        found = self._ground_missing(sample, [], list(need)).found
                    except ITEM_ERRORS:
                        continue
                    if found:
                        added.setdefault(self.class_names[y], []).append(sample.image)
                        room -= 1
                        for g in found:
                            need[g] -= 1
                        need = {g: n for g, n in need.items() if n > 0}
        extension = {name: sorted(keys) for name, keys in added.items()}
        self.store.set_meta("holdout", chosen + [k for keys in extension.values() for k in keys])
        self.store.set_meta("holdout_extension", extension)
        if extension:
            self.store.log_event("holdout_extended", {c: len(k) for c, k in extension.items()})
        return bool(extension)

    def phrase_set(self, key: str) -> Optional[PhraseSet]:
        """An image's recorded phrases with those grounded in it by `phrase_sets` (as foreground: the mask decides)."""
        phrases = self.store.get("phrases", key, PhraseSet)
        if phrases is None or phrases.failed:
            return phrases
        extra = [q for q in self._propagated(key).found if q not in phrases.foreground]
        return phrases.model_copy(update={"foreground": [*phrases.foreground, *extra]}) if extra else phrases

    def _propagated(self, key: str) -> Propagated:
        return self.store.get("propagated", key, Propagated) or Propagated(image=key)

    def _ground_missing(self, sample: Sample, named: Sequence[str], phrases: Sequence[str]) -> Propagated:
        """`phrases` looked for in the image: `found`, those in a region of their own (the best-scored first); `same`,
        those that landed on a region the image names under another phrase (or on one found before), with it.
        A phrase that lands mostly on the label's object is neither."""
        own = [(r.phrase, load_mask(r.mask_png)) for r in self.ground(sample.image, named) if r.grounded and r.mask_png]
        fg = self.object_mask(sample)
        hits = sorted(((max(r.scores, default=0.0), i, r) for i, r in enumerate(self.ground(sample.image, phrases,
                                                                                             exact=True))
                       if r.grounded and r.mask_png), key=lambda t: (-t[0], t[1]))
        found, same = [], {}
        for _, _, region in hits:
            mask = load_mask(region.mask_png)
            if fg is not None and _overlap(mask, fg):
                continue
            match = next((phrase for phrase, m in own if _overlap(mask, m)), None)
            if match is None:
                found.append(region.phrase)
                own.append((region.phrase, mask))
            else:
                same[region.phrase] = match
        return Propagated(image=sample.image, tried=list(phrases), found=found, same=same)

    def phrase_aliases(self) -> dict[str, str]:
        """{phrase: alias group}: phrases that name the same thing by where the grounder finds them, whatever the
        words. Two phrases are aliases when, looked for in images that name the other, each landed on the
        other's region at least half the times it was looked for (and together at least probe.min_occurrences
        times): "hut" finds the cottage, "cottage" the hut. A group is named by its most often named phrase."""
        records = self.store.all("propagated", Propagated)
        tries: Counter = Counter()
        hits: Counter = Counter()
        named: Counter = Counter()
        norm = lexicon.normalize
        for rec in records:
            phrases = self.phrase_set(rec.image)
            if phrases is None or phrases.failed:
                continue
            here = {norm(q) for q in [*phrases.foreground, *phrases.background[:1]]} - {norm(q) for q in rec.found}
            named.update(here)
            tries.update((norm(a), b) for a in rec.tried for b in here)
            hits.update((norm(a), norm(b)) for a, b in rec.same.items())
        parent: dict[str, str] = {}

        def root(x: str) -> str:
            while parent.get(x, x) != x:
                x = parent[x]
            return x

        for a, b in sorted({tuple(sorted(k)) for k in hits}):
            both = [(x, y) for x, y in ((a, b), (b, a)) if tries[(x, y)]]
            if (hits[(a, b)] + hits[(b, a)] >= self.config.probe.min_occurrences and both
                    and all(hits[(x, y)] >= 0.5 * tries[(x, y)] for x, y in both)):
                ra, rb = root(a), root(b)
                if ra != rb:
                    parent[max(ra, rb, key=lambda r: (-named[r], r))] = min(ra, rb, key=lambda r: (-named[r], r))
        return {x: root(x) for x in parent}

    # ------------------------------------------------------------ 4a/4b. ground and edit
    def ground(self, image_key: str, phrases: Sequence[str], exact: bool = False) -> list[Region]:
        """Regions for phrases in one image, cached in the store by (image, phrase)."""
        todo = [p for p in dict.fromkeys(phrases) if not self.store.has("region", f"{image_key}|{p}")]
        if todo:
            image = load_image(self.samples[image_key].path)
            regions = self.tool("grounder").ground(image_key, image, todo, self.store.folder("masks"), exact=exact)
            self.store.put_many("region", [(f"{image_key}|{r.phrase}", r) for r in regions])
        return [self.store.get("region", f"{image_key}|{p}", Region) for p in phrases]

    def object_mask(self, sample: Sample) -> Optional[np.ndarray]:
        """The label object's mask in an image (for background changes), or None when it is not found. Cached."""
        if sample.image not in self._object_masks:
            regions = self.ground(sample.image, object_phrases(self.class_names[sample.y]))
            found = next((r for r in regions if r.grounded and r.mask_png), None)
            self._object_masks[sample.image] = None if found is None else load_mask(found.mask_png)
        return self._object_masks[sample.image]

    def make_edits(self, only_phrases: Optional[dict[int, set[str]]] = None) -> list[Edit]:
        """Removal of every foreground phrase and a change of the background, each with its control.

        `only_phrases` restricts the edits to {class index: phrase groups} (the agent's hypotheses)."""
        sets = self.phrase_sets()
        holdout = [s for s in self.holdout() if s.y in self.class_ids]
        with self.progress("editing", len(holdout)) as advance:
            for sample in holdout:
                marker = f"{sample.image}|{_phrase_filter_key(only_phrases, sample.y)}"
                if not self.store.has("edited", marker):
                    self._edit_image(sample, sets.get(sample.image), only_phrases, sets)
                    self.store.put("edited", marker, {"image": sample.image})
                advance(1)
        edits = self.store.all("edit", Edit)
        if holdout and not edits and any(f.stage == "edit" for f in self.store.all("failure", Failure)):
            raise AspireError(f"editing failed for every hold-out image ({self._first_failure('edit')})")
        return edits

    def _wanted(self, phrase: str, y: int, only: Optional[dict[int, set[str]]]) -> bool:
        if only is None:
            return True
        return any(lexicon.same_phrase(phrase, p, self.config.probe.merge_similarity) for p in only.get(y, ()))

    def _regions(self, sample: Sample, phrases: PhraseSet, candidates: Sequence[str],
                 log: bool = True) -> list[tuple[str, str, Optional[np.ndarray]]]:
        """(phrase, kind, mask) of the candidate phrases, the kind decided by the mask's geometry.

        A background the extractor named but grounding did not find keeps its word's kind and no mask (the
        whole image outside the object changes). Objects that are not grounded are dropped (and logged)."""
        fg_mask = self.object_mask(sample)
        out = []
        for region in self.ground(sample.image, candidates):
            said = "background" if region.phrase in phrases.background else "foreground"
            if not region.grounded or not region.mask_png:
                if said == "background":
                    out.append((region.phrase, said, None))
                elif log:
                    self.store.log_event("not_grounded", {"image": sample.image, "phrase": region.phrase,
                                                          "reason": region.reason})
                continue
            mask = load_mask(region.mask_png)
            kind = region_kind(mask, fg_mask, self.config.probe.background_min_share)
            if kind != said and log:
                self.store.log_event("kind_from_mask", {"image": sample.image, "phrase": region.phrase,
                                                        "extractor": said, "mask": kind})
            out.append((region.phrase, kind, mask))
        return out

    def _background_of(self, key: str) -> Optional[tuple[str, Optional[np.ndarray]]]:
        """A hold-out image's background: (phrase, region mask or None), the largest background-like region
        among its phrases, else the extractor's background word; None when it has neither. Cached."""
        if key not in self._backgrounds:
            sample = self.samples[key]
            phrases = self.phrase_set(key)
            found = None
            if phrases is not None and not phrases.failed:
                candidates = [*phrases.foreground, *phrases.background[:1]]
                regions = [r for r in self._regions(sample, phrases, candidates, log=False) if r[1] == "background"]
                regions.sort(key=lambda r: -1 if r[2] is None else -int(r[2].sum()))
                if regions:
                    region = regions[0][2]
                    found = (regions[0][0], None if region is None else region & ~self._objects(sample, phrases))
            self._backgrounds[key] = found
        return self._backgrounds[key]

    def _objects(self, sample: Sample, phrases: PhraseSet) -> np.ndarray:
        """The union of an image's object regions (every phrase whose mask says object): a background change and a
        donor's background leave them out, so changing the background neither removes nor adds an object. Cached."""
        if sample.image not in self._object_unions:
            masks = [m for _, kind, m in self._regions(sample, phrases, [*phrases.foreground, *phrases.background[:1]],
                                                        log=False) if kind == "foreground" and m is not None]
            # no object: a (1, 1) False mask broadcasts to "nothing to leave out"
            self._object_unions[sample.image] = np.logical_or.reduce(masks) if masks else np.zeros((1, 1), bool)
        return self._object_unions[sample.image]

    def background_groups(self) -> dict[str, str]:
        """{background phrase: group} over the hold-out's backgrounds. Phrases whose regions were found are grouped
        by how their regions look (colour histograms, `merge_by_appearance`): "pond" joins "lake" because pond
        images look like lake images, whatever the words; the others by text (near-duplicate phrases). Computed
        once, kept in the store (meta `background_groups`): the donors and the findings use the same groups."""
        if self._bg_groups is None:
            self._bg_groups = self.store.get_meta("background_groups")
        if self._bg_groups is None:
            found = {k: b for k in self.store.get_meta("holdout", []) if (b := self._background_of(k)) is not None}
            by_text = merge_phrase_groups([b[0] for b in found.values()], self.config.probe.merge_similarity,
                                          by_scene=True)
            hists: dict[str, list[np.ndarray]] = {}
            for key, (phrase, region) in sorted(found.items()):
                if region is not None and region.any():
                    image = np.asarray(load_image(self.samples[key].path))
                    hists.setdefault(lexicon.normalize(phrase), []).append(colour_histogram(image, region))
            looks = merge_by_appearance(hists)
            self._bg_groups = {p: looks.get(p, looks.get(g, g)) for p, g in by_text.items()}
            self.store.set_meta("background_groups", self._bg_groups)
        return self._bg_groups

    def _group_of(self, key: str) -> Optional[str]:
        """A hold-out image's background group (None: no background). Cached: donors are drawn for every edit."""
        if key not in self._key_groups:
            bg = self._background_of(key)
            self._key_groups[key] = None if bg is None else self._background_group(bg[0])
        return self._key_groups[key]

    def _background_group(self, phrase: str) -> str:
        key = lexicon.normalize(phrase)
        groups = self.background_groups()
        if key in groups:
            return groups[key]
        near = next((p for p in sorted(groups) if lexicon.same_phrase(key, p, self.config.probe.merge_similarity)), None)
        return groups[near] if near is not None else key

    def _edit_image(self, sample: Sample, phrases: Optional[PhraseSet], only, all_sets: dict[str, PhraseSet]) -> None:
        if phrases is None or phrases.failed:
            return
        editor = self.tool("editor")
        out_dir = self.store.folder("edits")
        image = load_image(sample.path)
        edits: list[Edit] = []
        candidates = [p for p in dict.fromkeys([*phrases.foreground, *phrases.background[:1]])
                      if self._wanted(p, sample.y, only)]
        try:   # grounding the image's phrases and its label object
            fg_mask = self.object_mask(sample)
            regions = self._regions(sample, phrases, candidates)
        except ITEM_ERRORS as e:
            self._failed("edit", sample, "", e)
            return
        # removals in one call (diffusion batches them: edit.batch_size); a failure there is retried phrase by
        # phrase, so that it skips only its own phrase
        removals = [(phrase, mask) for phrase, kind, mask in regions if kind == "foreground"]
        try:
            made = self._removals(sample, image, removals, editor, out_dir)
        except ITEM_ERRORS:
            made = {}
        for phrase, kind, mask in regions:
            try:
                if kind == "foreground":
                    edits += self._removal(sample, image, phrase, mask, all_sets, editor, out_dir, made.get(phrase))
                else:
                    region = None if mask is None else mask & ~self._objects(sample, phrases)
                    edits += self._background_change(sample, image, phrase, region, fg_mask, phrases, editor,
                                                     out_dir)
            except ITEM_ERRORS as e:
                self._failed("edit", sample, phrase, e)
        self.store.put_many("edit", [(e.edit_id, e) for e in edits])

    def _skip(self, sample: Sample, phrase: str, reason: str) -> None:
        self.store.log_event("skipped", {"image": sample.image, "phrase": phrase, "reason": reason})

    def _failed(self, stage: str, sample: Sample, phrase: str, error: BaseException) -> None:
        """A tool failure on one image or phrase: recorded (record `failure`, event `skipped`), never fatal."""
        reason = f"{stage} failed: {error_line(error)}"
        self.store.put("failure", f"{stage}|{sample.image}|{phrase}",
                       Failure(stage=stage, image=sample.image, phrase=phrase, reason=reason))
        self._skip(sample, phrase, reason)

    def _first_failure(self, stage: str) -> str:
        reasons = [f.reason for f in self.store.all("failure", Failure) if f.stage == stage]
        return f"{len(reasons)} failed; the first: {reasons[0]}" if reasons else "no reason recorded"

    def retry_failed(self) -> int:
        """Forget the recorded failures (`--retry-skipped`): their images are captioned, their phrases extracted
        (a failed phrase set) or their edits made again on the next step; what succeeded before is kept.
        Returns how many there were."""
        failures = self.store.all("failure", Failure)
        phrase_failures = [p.image for p in self.store.all("phrases", PhraseSet) if p.failed]
        images = {f.image for f in failures if f.stage == "edit"} | set(phrase_failures)
        self.store.replace_all("failure", [])
        self.store.delete("phrases", phrase_failures)
        self.store.delete("edited", [k for k in self.store.keys("edited") if k.split("|")[0] in images])
        return len(failures) + len(phrase_failures)

    # 4a. foreground removal, and a control of the same area elsewhere (or the same mask on a matched image)
    def _removals(self, sample: Sample, image, removals: list[tuple[str, np.ndarray]], editor,
                  out_dir: Path) -> dict[str, tuple[Edit, Optional[Edit]]]:
        """{phrase: (real edit, same-area control or None)} for an image's objects, made in one editor call."""
        requests = [RemoveRequest(sample.image, image, mask, phrase, edit_seed(self.seed, sample.image, phrase),
                                  control=control) for phrase, mask in removals for control in (False, True)]
        made = editor.remove_many(requests, out_dir) if requests else []
        return {phrase: (made[2 * i], made[2 * i + 1]) for i, (phrase, _) in enumerate(removals)}

    def _removal(self, sample: Sample, image, phrase: str, mask: np.ndarray, all_sets: dict[str, PhraseSet],
                 editor, out_dir: Path, made: Optional[tuple[Edit, Optional[Edit]]] = None) -> list[Edit]:
        """The phrase's removal and its control (`made`: already made by `_removals`); with no room for a
        same-area control, the same mask on a matched image."""
        seed = edit_seed(self.seed, sample.image, phrase)
        if made is None:
            real = editor.remove(sample.image, image, mask, phrase, seed, out_dir)
            control = editor.remove(sample.image, image, mask, phrase, seed, out_dir, control=True)
        else:
            real, control = made
        if control is None:
            control = self._matched_control(sample, phrase, mask, all_sets, editor, out_dir, seed, real.pair_key)
        if control is None:
            self._skip(sample, phrase, "no room for a control edit and no matched image of the class without it")
            return [real]
        return [real, control]

    def _matched_control(self, sample: Sample, phrase: str, mask: np.ndarray, all_sets: dict[str, PhraseSet],
                         editor, out_dir: Path, seed: int, pair: str) -> Optional[Edit]:
        """The phrase's mask inpainted on another hold-out image of the class that does not name the phrase."""
        threshold = self.config.probe.merge_similarity
        pool = sorted(k for k, p in all_sets.items()
                      if k != sample.image and self.samples[k].y == sample.y and not p.failed
                      and not any(lexicon.same_phrase(phrase, q, threshold) for q in [*p.foreground, *p.background]))
        random.Random(seed).shuffle(pool)
        for key in pool[:8]:
            other = load_image(self.samples[key].path)
            if other.size != (mask.shape[1], mask.shape[0]):
                continue
            return editor.remove(key, other, mask, phrase, seed, out_dir, control=True, relocate=False, pair=pair)
        return None

    # 4b. background change: the region laid over with another group's background; the control, a background
    # of the same group (another image's, else the image's own)
    def _background_change(self, sample: Sample, image, phrase: str, region: Optional[np.ndarray],
                           fg_mask: Optional[np.ndarray], phrases: PhraseSet, editor, out_dir: Path) -> list[Edit]:
        replace = self.config.edit.background_backend == "replace"
        if region is not None and (region.all() or (fg_mask is not None and not (region & ~fg_mask).any())):
            self._skip(sample, phrase, "the background region leaves nothing of the label's object to keep")
            return []
        if fg_mask is None and region is not None:
            fg_mask = ~region  # the label's object was not found: everything but the region is kept
        if fg_mask is None and replace:
            self._skip(sample, phrase, "the label's object was not found for a background change")
            return []
        seed = edit_seed(self.seed, sample.image, "background", phrase)
        group = self._background_group(phrase)
        if not replace or self.config.edit.background_fill != "other-image":
            alt = phrases.alt[0] if phrases.alt else self._alternative(group)
            if alt is None:
                self._skip(sample, phrase, "no alternative background in the hold-out images")
                return []
            return [editor.change_background(sample.image, image, fg_mask, phrase, alt, seed, out_dir,
                                             control=control, region_mask=region) for control in (False, True)]
        other = self._donor(sample, seed, lambda g: g != group, whole=region is None)
        if other is None:
            self._skip(sample, phrase, "no hold-out image with another background to take one from")
            return []
        same = self._donor(sample, seed, lambda g: g == group, whole=region is None)
        if same is None and region is not None:  # a region copied onto itself would change nothing
            self._skip(sample, phrase, "no other hold-out image with a background of the same group for a control")
            return []
        if same is None:  # the image's whole background, its object inpainted: the compositing artefacts alone
            same, kind = (image, fg_mask, ~fg_mask), "self-donor"
        else:
            kind = "same-group-donor"
        real = editor.change_background(sample.image, image, fg_mask, phrase, other[3], seed, out_dir,
                                        donor=other[:3] if region is not None else other[:2], region_mask=region)
        control = editor.change_background(sample.image, image, fg_mask, phrase, phrase, seed, out_dir,
                                           donor=same[:3] if region is not None else same[:2], control=True,
                                           region_mask=region, control_kind=kind)
        return [real, control]

    def _alternative(self, group: str) -> Optional[str]:
        """The most frequent other background group of the hold-out (for instruction editing)."""
        counts = Counter(self._background_group(b[0]) for k in self.store.get_meta("holdout", [])
                         if (b := self._background_of(k)) is not None)
        others = [(n, g) for g, n in counts.items() if g != group]
        return max(others, key=lambda t: (t[0], t[1]))[1] if others else None

    def _donor(self, sample: Sample, seed: int, wanted: Callable[[str], bool], whole: bool = False):
        """(image, object mask, background region, phrase) of another hold-out image whose background group is
        `wanted`; its object must be found when its region is not, or when its `whole` background is wanted
        (its object is inpainted away then). None when there is none.

        The group is drawn first, each wanted group alike (among those of at least probe.min_occurrences images,
        when there are such), then an image of it: a background change goes to another kind of background,
        not to whatever kind the probed classes' images happen to show most."""
        rng = random.Random(seed)
        keys = sorted(k for k in self.store.get_meta("holdout", []) if k != sample.image)
        rng.shuffle(keys)
        by_group: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            group = self._group_of(key)
            if group is not None and wanted(group):
                by_group[group].append(key)
        large = [g for g in sorted(by_group) if len(by_group[g]) >= self.config.probe.min_occurrences]
        rng.shuffle(large)
        order = large + sorted(g for g in by_group if g not in large)
        for key in (k for g in order for k in by_group[g]):
            bg = self._background_of(key)
            mask = self.object_mask(self.samples[key])
            if mask is None and (bg[1] is None or whole):
                continue
            region = bg[1] if bg[1] is not None else ~mask
            if not region.any() or (mask is not None and not (region & ~mask).any()):
                continue
            return load_image(self.samples[key].path), mask, region, bg[0]
        return None

    def test_further(self, findings: Sequence[Finding], max_edits: Optional[int] = None) -> None:
        """The tests beyond single removal, for the testable groups of `findings`: insertion and joint removal,
        within `max_edits` edits in the run (the agent's budget; a group or image that would pass it is left out)."""
        self.insert_regions(findings, max_edits)
        self.remove_jointly(findings, max_edits)
        self.probe()

    def _fits(self, max_edits: Optional[int], more: int) -> bool:
        return max_edits is None or self.store.count("edit") + more <= max_edits

    # ------------------------------------------------------------ 4d. insertion (sufficiency)
    def insert_regions(self, findings: Sequence[Finding], max_edits: Optional[int] = None) -> list[Edit]:
        """For every testable group, its region pasted into hold-out images of the other classes (at the same place,
        their own object kept), each with a control paste: for an object, a region of the same area from elsewhere in
        the source image; for a background, the same region from an image of another background group. The test
        reads the rise of the source class's probability. `probe.insertion_images` pastes per group (0: off)."""
        n = self.config.probe.insertion_images
        if n <= 0:
            return []
        real = [e for e in self.store.all("edit", Edit) if e.test == "removal" and not e.control and e.mask_png]
        holdout = self.holdout()
        out_dir = self.store.folder("edits")
        for f in findings:
            marker = f"{f.class_index}|{f.kind}|{f.phrase}"
            if (f.pairs < min_testable_pairs(self.config.probe) or self.store.has("inserted", marker)
                    or not self._fits(max_edits, 2 * n)):
                continue
            members = set(f.phrases) | {f.phrase}
            sources = sorted((e for e in real if e.kind == f.kind and self.samples[e.image].y == f.class_index
                              and lexicon.normalize(e.phrase) in members), key=lambda e: e.edit_id)
            targets = [s for s in holdout if s.y != f.class_index and s.y in self.class_ids]
            seed = edit_seed(self.seed, "insertion", marker)
            random.Random(seed).shuffle(targets)
            requests = []
            for i, target in enumerate(targets[:n] if sources else []):
                source = sources[i % len(sources)]
                try:
                    requests += self._paste_pair(f, source, target, seed + i, holdout)
                except ITEM_ERRORS as e:
                    self._failed("edit", target, f.phrase, e)
            if not requests:  # no source or no other class yet: a later call (more classes) may test it
                continue
            made = self.tool("editor").paste_many(requests, out_dir)
            self.store.put_many("edit", [(e.edit_id, e) for e in made if e is not None])
            self.store.put("inserted", marker, {"edits": sum(e is not None for e in made)})
        return [e for e in self.store.all("edit", Edit) if e.test == "insertion"]

    def _paste_pair(self, f: Finding, source: Edit, target: Sample, seed: int, holdout: Sequence[Sample]) -> list:
        """The real paste of `source`'s region into `target` and its control paste (none when none can be made)."""
        src_image = load_image(self.samples[source.image].path)
        mask = load_mask(source.mask_png)
        keep = self.object_mask(target)
        image = load_image(target.path)
        pair = f"{target.image}|insertion|{f.kind}|{f.phrase}|{source.image}"
        common = dict(image_key=target.image, image=image, phrase=f.phrase, kind=f.kind, score_class=f.class_index,
                      pair=pair, seed=seed, keep_mask=keep)
        if f.kind == "foreground":
            control_mask, _ = find_control(mask, seed, self.config.edit.control_gap_px)
            src_object = self.object_mask(self.samples[source.image])
            if control_mask is not None and src_object is not None:
                control_mask = control_mask & ~src_object  # never paste the source's own class object
            control = None if control_mask is None or not control_mask.any() else PasteRequest(
                source=src_image, mask=control_mask, control=True, control_kind="same-area", **common)
        else:
            group = self._background_group(f.phrase)
            donors = [s for s in holdout if s.image not in (source.image, target.image)
                      and (b := self._background_of(s.image)) is not None and self._background_group(b[0]) != group]
            donors.sort(key=lambda s: (s.y != target.y, edit_seed(seed, s.image)))
            control = None
            for donor in donors[:8]:  # the donor's background only: its own object is never pasted
                d_object = self.object_mask(donor)
                d_mask = mask & ~d_object if d_object is not None and d_object.shape == mask.shape else None
                if d_mask is not None and d_mask.any():
                    control = PasteRequest(source=load_image(donor.path), mask=d_mask, control=True,
                                           control_kind="other-group-donor", **common)
                    break
        if control is None:
            self._skip(target, f.phrase, "no control paste for an insertion test")
            return []
        return [PasteRequest(source=src_image, mask=mask, **common), control]

    # ------------------------------------------------------------ 4e. joint removal (redundant shortcuts)
    def remove_jointly(self, findings: Sequence[Finding], max_edits: Optional[int] = None) -> list[Edit]:
        """Per class, its candidate groups (testable, and removing each alone does not clearly raise the class's
        probability: effect_ci's upper end >= 0) removed together from hold-out images showing at least two.

        In each such image: the real edit removes every candidate ("all"); per group g, its control removes the
        others and applies g's control instead (the same area elsewhere; for a background, a donor of the same
        group), so the pair reads whether g matters once the others are gone (a shortcut seen through several
        elements at once flips nothing when one is removed alone). A class-level pair ("all candidates") compares
        "all" with every candidate replaced by its control: the class's combined shortcut effect.
        `probe.joint_images` images per class (0: off)."""
        n = self.config.probe.joint_images
        if n <= 0:
            return []
        least = min_testable_pairs(self.config.probe)
        real = [e for e in self.store.all("edit", Edit) if e.test == "removal" and not e.control and e.mask_png]
        for y in self.class_ids:
            candidates = sorted((f for f in findings if f.class_index == y and f.pairs >= least and f.effect_ci[1] >= 0),
                                key=lambda f: (f.kind, f.phrase))
            marker = f"{y}|" + ",".join(f"{f.kind}:{f.phrase}" for f in candidates)
            if len(candidates) < 2 or self.store.has("joint", marker):
                continue
            tag = hashlib.sha256(marker.encode()).hexdigest()[:10]  # the candidate set, in every pair key
            member = {(f.kind, p): f for f in candidates for p in {f.phrase, *f.phrases}}
            parts: dict[str, dict[str, tuple[Finding, Edit]]] = defaultdict(dict)  # image -> group -> (finding, edit)
            for e in sorted(real, key=lambda e: e.edit_id):
                f = member.get((e.kind, lexicon.normalize(e.phrase)))
                mine = parts[e.image]
                if f is None or self.samples[e.image].y != y:
                    continue
                if f.kind == "background" and any(g.kind == "background" and g is not f for g, _ in mine.values()):
                    continue  # one background change per image
                mine.setdefault(f"{f.kind}|{f.phrase}", (f, e))
            images = sorted(k for k, v in parts.items() if len(v) >= 2)
            random.Random(edit_seed(self.seed, "joint", marker)).shuffle(images)
            made: list[Edit] = []
            complete = True
            for key in images[:n]:
                if not self._fits(max_edits, len(made) + 2 * (len(parts[key]) + 1)):
                    complete = False
                    break
                try:
                    made += self._joint_edits(self.samples[key], list(parts[key].values()), tag)
                except ITEM_ERRORS as e:
                    self._failed("edit", self.samples[key], ALL_CANDIDATES, e)
            self.store.put_many("edit", [(e.edit_id, e) for e in made])
            if made:  # the findings read this candidate set's pairs only
                self.store.set_meta("joint_sets", {**(self.store.get_meta("joint_sets") or {}), str(y): tag})
            if complete:
                self.store.put("joint", marker, {"images": min(n, len(images)), "edits": len(made), "tag": tag})
        return [e for e in self.store.all("edit", Edit) if e.test == "joint"]

    def _joint_edits(self, sample: Sample, parts: list[tuple[Finding, Edit]], tag: str) -> list[Edit]:
        """The "all" edit (one per group, and one for the class), each group's control, the class control."""
        image = load_image(sample.path)
        fg_mask = self.object_mask(sample)
        ops = []  # (finding, real op, control op); an op: ("remove", mask) or ("background", phrase, region, donor, kind)
        for f, e in parts:
            mask = load_mask(e.mask_png)
            if f.kind == "foreground":
                seed = edit_seed(self.seed, sample.image, e.phrase)
                control, _ = find_control(mask, seed, self.config.edit.control_gap_px)
                ops.append((f, ("remove", mask), None if control is None else ("remove", control)))
                continue
            seed = edit_seed(self.seed, sample.image, "background", e.phrase)  # the donors of its own test
            group = self._background_group(e.phrase)
            other = self._donor(sample, seed, lambda g, group=group: g != group)
            same = self._donor(sample, seed, lambda g, group=group: g == group)
            if other is None:
                continue
            fg = fg_mask if fg_mask is not None else ~mask
            same_op = (("background", e.phrase, mask, same[:3], "same-group-donor") if same is not None
                       else ("background", e.phrase, mask, (image, fg, mask), "self-donor"))
            ops.append((f, ("background", e.phrase, mask, other[:3], None), same_op))
        if len(ops) < 2:
            return []
        everything = [real for _, real, _ in ops]
        edits = []
        for f, _, control in ops:
            pair = f"{sample.image}|joint|{tag}|{f.kind}|{f.phrase}"
            edits.append(self._compose(sample, image, fg_mask, everything, f.phrase, f.kind, pair, None))
            if control is not None:
                ops_g = [control if g is f else real for g, real, _ in ops]
                edits.append(self._compose(sample, image, fg_mask, ops_g, f.phrase, f.kind, pair,
                                           control[4] if control[0] == "background" else "same-area"))
        if all(c is not None for _, _, c in ops):
            pair = f"{sample.image}|joint|{tag}|{ALL_CANDIDATES}"
            edits.append(self._compose(sample, image, fg_mask, everything, ALL_CANDIDATES, "foreground", pair, None))
            edits.append(self._compose(sample, image, fg_mask, [c for _, _, c in ops], ALL_CANDIDATES, "foreground",
                                       pair, "same-area"))
        return edits

    def _compose(self, sample: Sample, image, fg_mask, ops: list, phrase: str, kind: str, pair: str,
                 control_kind: Optional[str]) -> Edit:
        """One joint edit: the union of the removal masks inpainted, then the background operation (if any)."""
        editor = self.tool("editor")
        control = control_kind is not None
        seed = edit_seed(self.seed, sample.image, "joint", phrase)
        masks = [op[1] for op in ops if op[0] == "remove"]
        backgrounds = [op for op in ops if op[0] == "background"]
        common = dict(control=control, test="joint", pair=pair)
        if masks:
            union = np.logical_or.reduce(masks)
            out_dir = self.store.folder("joint-steps" if backgrounds else "edits")
            edit = editor.remove(sample.image, image, union, phrase, seed, out_dir, relocate=False,
                                 control_kind=control_kind, **common)
            image = load_image(edit.edited_png)
            if not backgrounds:
                return edit
        _, bg_phrase, region, donor, _ = backgrounds[0]
        fg = fg_mask if fg_mask is not None else ~region
        return editor.change_background(sample.image, image, fg, bg_phrase, bg_phrase, seed, self.store.folder("edits"),
                                        donor=donor, region_mask=region, control_kind=control_kind, label=phrase,
                                        label_kind=kind, **common)

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

    def _current(self, probes: list[Probe]) -> list[Probe]:
        """The probes the findings read: joint-removal pairs of each class's current candidate set only."""
        sets = self.store.get_meta("joint_sets") or {}
        return [p for p in probes if p.test != "joint" or f"|joint|{sets.get(str(p.y))}|" in p.pair]

    def findings(self) -> list[Finding]:
        """Findings from every probe (and, once `reprobe` scored every edit on another model, `after`)."""
        probes = self._current(self.store.all("probe", Probe))
        groups = {**self.phrase_aliases(), **(self.store.get_meta("background_groups") or {})}
        findings = aggregate_findings(probes, self.class_names, self.config.probe, groups)
        self.store.set_meta("joint", joint_summary(probes, findings, self.class_names, ALL_CANDIDATES, self.seed))
        rescored = {p.edit_id: p for p in self.store.all("reprobe", Probe)}
        if rescored and all(p.edit_id in rescored for p in probes):
            after = [rescored[p.edit_id] for p in probes]
            findings = compare_findings(probes, after, findings,
                                        aggregate_findings(after, self.class_names, self.config.probe, groups),
                                        self.config.probe, groups)
            verdicts = Counter(f.after.verdict for f in findings if f.after and f.after.verdict)
            self.store.set_meta("reprobe", {**(self.store.get_meta("reprobe") or {}), "verdicts": dict(verdicts),
                                            "edits": len(after)})
        self.store.replace_all("finding", [(f"{f.class_index}|{f.kind}|{f.phrase}", f) for f in findings])
        write_json(self.store.run_dir / "findings.json", [f.to_json() for f in findings])
        return findings

    # ------------------------------------------------------------ after repair: the same edits, another model
    def reprobe(self, classifier, model_path: str) -> list[Finding]:
        """Score every stored edit and its control on `classifier` (the repaired model; the same classes) and
        return the findings with `after` filled in. Scores are recorded (kind `reprobe`) and reused on resume;
        another checkpoint (by content) starts over."""
        # 1. the same classes, and the model's identity
        if list(classifier.class_names) != self.class_names:
            raise DataError(f"{model_path}: a classifier of classes {', '.join(classifier.class_names)}; the run "
                            f"probed {', '.join(self.class_names)}")
        digest = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()
        if (self.store.get_meta("reprobe") or {}).get("digest") != digest:
            for kind in ("reprobe", "reprobe_prediction"):
                self.store.replace_all(kind, [])
            self.store.set_meta("reprobe", {"model": str(Path(model_path).resolve()), "digest": digest})
            self.store.log_event("reprobe", {"model": str(Path(model_path).resolve()), "digest": digest})
            self.findings()   # the stored findings drop the other model's `after` now, not when scoring ends
        # 2. score what is not scored yet (the originals once per image, as the probe does)
        edits = [e for e in self.store.all("edit", Edit) if not self.store.has("reprobe", e.edit_id)]
        if edits:
            prober = Prober(classifier, self.config.probe)
            originals = {k: p for k in {e.image for e in edits}
                         if (p := self.store.get("reprobe_prediction", k, Prediction)) is not None}
            step = self.config.probe.batch_size * 4
            with self.progress("re-probing", len(edits)) as advance:
                for start in range(0, len(edits), step):
                    batch = edits[start:start + step]
                    known = set(originals)
                    probes = prober.probe(batch, self.samples, originals)
                    self.store.put_many("reprobe_prediction", [(k, originals[k]) for k in set(originals) - known])
                    self.store.put_many("reprobe", [(p.edit_id, p) for p in probes])
                    advance(len(batch))
        return self.findings()

    def counts(self) -> ProbeCounts:
        # the regions of the hold-out's phrases: not the searches for what captions left out (step 1b, 3b)
        propagated = self.store.all("propagated", Propagated)
        searched = {f"{p.image}|{q}" for p in propagated for q in p.tried if q not in p.found}
        holdout = set(self.store.get_meta("holdout", []))
        regions = [r for r in self.store.all("region", Region)
                   if r.image in holdout and f"{r.image}|{r.phrase}" not in searched]
        edits = self.store.all("edit", Edit)
        return ProbeCounts(
            holdout=len(holdout), captions=self.store.count("caption"),
            phrase_failures=sum(1 for p in self.store.all("phrases", PhraseSet) if p.failed),
            regions=len(regions), not_grounded=sum(1 for r in regions if not r.grounded),
            propagated=sum(len(p.found) for p in propagated),
            edits=sum(1 for e in edits if not e.control and e.test == "removal"),
            control_edits=sum(1 for e in edits if e.control and e.test == "removal"),
            insertion_edits=sum(1 for e in edits if e.test == "insertion"),
            joint_edits=sum(1 for e in edits if e.test == "joint"),
            skipped=len({(e["image"], e["phrase"]) for e in self.store.events("skipped")}),
            failures=self.store.count("failure"),
            probes=self.store.count("probe"))

    def run(self) -> ProbeResult:
        self.make_edits()  # each step first runs the steps before it (skipping recorded work)
        self.probe()
        self.test_further(self.findings())
        findings = self.findings()
        return ProbeResult(self.store.run_dir, findings, self.counts(), self.store.get_meta("joint", {}))


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two masks are mostly one region (intersection over union above one half)."""
    return bool(np.logical_and(a, b).sum() > 0.5 * np.logical_or(a, b).sum())


def _phrase_filter_key(only: Optional[dict[int, set[str]]], y: int) -> str:
    return "all" if only is None else ",".join(sorted(only.get(y, ())))

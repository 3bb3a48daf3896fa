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

The class is written in four parts, one per stage:
    pipeline.py   the tools, steps 1-3 (hold-out, captions, phrases), scoring (4c), findings, re-probe, failures
    phrases.py    steps 1b and 3b: the hold-out extension, propagation, aliases by grounding
    edits.py      steps 4a and 4b: grounding, removals and background changes with their controls
    further.py    steps 4d and 4e: insertion and joint removal
base.py holds what they share (counts, result, seeds).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from aspire.atomic import write_json
from aspire.config import AspireConfig
from aspire.data.formats import Dataset
from aspire.errors import AspireError, DataError, error_line
from aspire.schemas import Caption, Edit, Failure, Finding, PhraseSet, Probe, Propagated, Region, Sample
from aspire.progress import step_progress
from aspire.store import RunStore
from aspire.tools.generate import derive_seed
from aspire.tools.probe import Prediction, Prober, aggregate_findings, compare_findings, joint_summary
from aspire.workflows.probe.base import ALL_CANDIDATES, ITEM_ERRORS, ProbeCounts, ProbeResult, Progress, object_phrases
from aspire.workflows.probe.edits import EditSteps
from aspire.workflows.probe.further import FurtherTests
from aspire.workflows.probe.phrases import PhraseDiscovery
from aspire.workflows.runs import resolve_classes


class ProbePipeline(PhraseDiscovery, EditSteps, FurtherTests):
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

    def object_phrases(self, y: int) -> list[str]:
        """The names of class y's own object (its name, and probe.label_objects)."""
        name = self.class_names[y]
        return object_phrases(name, self.config.probe.label_objects.get(name, ()))

    def holdout(self) -> list[Sample]:
        return [self.samples[k] for k in self.store.get_meta("holdout", [])]

    def described_keys(self) -> list[str]:
        """The images that are captioned and grounded: the hold-out, then the donors (other classes' training images
        that lend their backgrounds and take insertion pastes; their own features are not tested)."""
        return [*self.store.get_meta("holdout", []), *self.store.meta("donors", [])]

    def described(self) -> list[Sample]:
        return [self.samples[k] for k in self.described_keys()]

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
            unreadable = [] if kept else \
                [f.reason for s in pool if (f := self.store.get("failure", f"holdout|{s.image}|", Failure))]
            if unreadable and len(unreadable) == len(pool):   # every item of the stage failed: an error, not an empty class
                raise DataError(f"class {self.class_names[y]!r}: none of its {len(pool)} training images could be "
                                f"read (the first: {unreadable[0]})")
            chosen += sorted(kept[:want])
        self.store.set_meta("donors", self._pick_donors(train))
        self.store.set_meta("holdout", chosen)
        self.store.log_event("holdout", {"n": len(chosen), "classes": [self.class_names[y] for y in self.class_ids]})
        return self.holdout()

    def _pick_donors(self, train: Sequence[Sample]) -> list[str]:
        """`holdout.donor_images` training images of the classes not probed that the classifier gets right (so they
        are readable, and an insertion into one starts from another class), drawn in turn from each class (seeded):
        none when every class is probed (their hold-out images lend each other their backgrounds)."""
        want = self.config.holdout.donor_images
        others = [y for y in range(len(self.class_names)) if y not in self.class_ids]
        if not want or not others:
            return []
        pools = {y: sorted((s for s in train if s.y == y and not s.synthetic), key=lambda s: s.image) for y in others}
        rng = random.Random(derive_seed(self.config.holdout.seed + self.seed, "donors"))
        for pool in pools.values():
            rng.shuffle(pool)
        rng.shuffle(others)
        order = [pools[y][i] for i in range(max(len(p) for p in pools.values())) for y in others if i < len(pools[y])]
        picked: list[str] = []
        step = max(want, self.config.probe.batch_size)
        for start in range(0, len(order), step):   # predicted in chunks until enough are right
            picked += [s.image for s in self._correct(order[start:start + step])]
            if len(picked) >= want:
                break
        return sorted(picked[:want])

    def _correct(self, samples: Sequence[Sample]) -> list[Sample]:
        """The samples the classifier gets right; its predictions are recorded (records `prediction`). An image
        that cannot be read is left out, recorded as a failure (stage `holdout`: the hold-out is chosen once, so
        `--retry-skipped` does not bring it back)."""
        prober = self.tool("prober")
        try:
            preds = prober.predict([s.path for s in samples], [s.y for s in samples])
        except DataError:   # which image: one by one
            readable, preds = [], []
            for s in samples:
                try:
                    preds += prober.predict([s.path], [s.y])
                    readable.append(s)
                except DataError as e:   # recorded as a failure, not as an edit skipped
                    self.store.put("failure", f"holdout|{s.image}|", Failure(
                        stage="holdout", image=s.image, reason=f"holdout failed: {error_line(e)}"))
            samples = readable
        self.store.put_many("prediction", [(s.image, p) for s, p in zip(samples, preds)])
        return [s for s, p in zip(samples, preds) if p.pred == s.y]

    # ------------------------------------------------------------ 2. captions
    def caption(self) -> list[Caption]:
        """Captions of the hold-out images (the donors are captioned too; not returned). A batch that fails is
        captioned image by image; an image that fails alone is a recorded failure (not retried on resume unless
        `retry_failed`); all of them failing is an error."""
        holdout = self.select_holdout()
        todo = [s for s in self.described() if not self.store.has("caption", s.image)
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
        self.caption()
        captions = [c for c in (self.store.get("caption", s.image, Caption) for s in self.described())
                    if c is not None and not self.store.has("phrases", c.image)]
        if captions:
            extractor = self.tool("extractor")
            class_of = {c.image: self.class_names[self.samples[c.image].y] for c in captions}
            with self.progress("extracting phrases", len(captions)) as advance:
                for start in range(0, len(captions), 64):
                    batch = captions[start:start + 64]
                    sets = extractor.extract(batch, class_of, synonyms=self.config.probe.label_objects)
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

    # ------------------------------------------------------------ failures and skips
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
        recorded = self.store.all("failure", Failure)
        failures = [f for f in recorded if f.stage != "holdout"]
        phrase_failures = [p.image for p in self.store.all("phrases", PhraseSet) if p.failed]
        images = {f.image for f in failures if f.stage == "edit"} | set(phrase_failures)
        self.store.replace_all("failure", [(f"holdout|{f.image}|", f) for f in recorded if f.stage == "holdout"])
        self.store.delete("phrases", phrase_failures)
        self.store.delete("edited", [k for k in self.store.keys("edited") if k.split("|")[0] in images])
        return len(failures) + len(phrase_failures)

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
        sets = self.store.meta("joint_sets", {})
        return [p for p in probes if p.test != "joint" or f"|joint|{sets.get(str(p.y))}|" in p.pair]

    def findings(self) -> list[Finding]:
        """Findings from every probe (and, once `reprobe` scored every edit on another model, `after`)."""
        probes = self._current(self.store.all("probe", Probe))
        groups = {**self.phrase_aliases(), **self.store.meta("background_groups", {})}
        findings = aggregate_findings(probes, self.class_names, self.config.probe, groups)
        self.store.set_meta("joint", joint_summary(probes, findings, self.class_names, ALL_CANDIDATES, self.seed))
        rescored = {p.edit_id: p for p in self.store.all("reprobe", Probe)}
        if rescored and all(p.edit_id in rescored for p in probes):
            after = [rescored[p.edit_id] for p in probes]
            findings = compare_findings(probes, after, findings,
                                        aggregate_findings(after, self.class_names, self.config.probe, groups),
                                        self.config.probe, groups)
            verdicts = Counter(f.after.verdict for f in findings if f.after and f.after.verdict)
            self.store.set_meta("reprobe", self.store.meta("reprobe").model_copy(
                update={"verdicts": dict(verdicts), "edits": len(after)}))
        self.store.replace_all("finding", [(f.key, f) for f in findings])
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
        if getattr(self.store.meta("reprobe"), "digest", None) != digest:
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
            holdout=len(holdout), donors=len(self.store.meta("donors", [])),
            captions=sum(self.store.has("caption", k) for k in holdout),
            phrase_failures=sum(1 for p in self.store.all("phrases", PhraseSet) if p.failed and p.image in holdout),
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

"""Steps 4a and 4b: ground every phrase and edit it by what its mask is: an object is removed (with a
same-area control, else the same mask on a matched image), a background is laid over with the background of a
hold-out image of another group (with a same-group control)."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from aspire.data.images import load_image, load_mask
from aspire.errors import AspireError
from aspire.schemas import Edit, Failure, PhraseSet, Region, Sample
from aspire.tools import lexicon
from aspire.tools.edit import RemoveRequest
from aspire.tools.ground import region_kind
from aspire.tools.groups import colour_histogram, merge_by_appearance, merge_phrase_groups
from aspire.workflows.probe.base import ITEM_ERRORS, edit_seed, phrase_filter_key


class EditSteps:
    """ProbePipeline's steps 4a and 4b (a part of ProbePipeline: it uses its store, settings and tools)."""

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
            regions = self.ground(sample.image, self.object_phrases(sample.y))
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
                marker = f"{sample.image}|{phrase_filter_key(only_phrases, sample.y)}"
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
        return lexicon.same_as_any(phrase, only.get(y, ()), self.config.probe.merge_similarity)

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
        """{background phrase: group} over the backgrounds of the hold-out and the donors. Phrases whose regions were
        found are grouped by how their regions look (colour histograms, `merge_by_appearance`): "pond" joins "lake"
        because pond images look like lake images, whatever the words; the others by text (near-duplicate phrases).
        Computed once, kept in the store (meta `background_groups`): the donors and the findings use the same groups."""
        if self._bg_groups is None:
            self._bg_groups = self.store.get_meta("background_groups")
        if self._bg_groups is None:
            found = {k: b for k in self.described_keys() if (b := self._background_of(k)) is not None}
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
        candidates = [p for p in phrases.named() if self._wanted(p, sample.y, only)]
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
                      and not lexicon.same_as_any(phrase, [*p.foreground, *p.background], threshold))
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
            self._skip(sample, phrase, "no hold-out or donor image with another background to take one from")
            return []
        same = self._donor(sample, seed, lambda g: g == group, whole=region is None)
        if same is None and region is not None:  # a region copied onto itself would change nothing
            self._skip(sample, phrase,
                       "no other hold-out or donor image with a background of the same group for a control")
            return []
        if same is None:  # the image's whole background, its object inpainted: the compositing artefacts alone
            same, kind = (image, fg_mask, ~fg_mask, phrase, sample.image), "self-donor"
        else:
            kind = "same-group-donor"
        real = editor.change_background(sample.image, image, fg_mask, phrase, other[3], seed, out_dir,
                                        donor=other[:3] if region is not None else other[:2], region_mask=region)
        control = editor.change_background(sample.image, image, fg_mask, phrase, phrase, seed, out_dir,
                                           donor=same[:3] if region is not None else same[:2], control=True,
                                           region_mask=region, control_kind=kind)
        return [edit.model_copy(update={"donor": donor[4], "donor_background": donor[3]})
                for edit, donor in ((real, other), (control, same))]

    def described_backgrounds(self) -> dict[str, list[str]]:
        """{image key: every phrase known to be in it} of the hold-out and donor images whose background is known
        (the largest region its mask calls a background, else the extractor's background word): the phrases it
        names, those grounded in it that its caption left out, and those that landed on a region it names under
        another phrase. The repair's background donors are chosen among them."""
        out = {}
        for key in self.described_keys():
            phrases = self.phrase_set(key)
            if phrases is not None and not phrases.failed and self._background_of(key) is not None:
                out[key] = list(dict.fromkeys([*phrases.named(), *self._propagated(key).same]))
        return out

    def _alternative(self, group: str) -> Optional[str]:
        """The most frequent other background group of the hold-out and the donors (for instruction editing)."""
        counts = Counter(self._background_group(b[0]) for k in self.described_keys()
                         if (b := self._background_of(k)) is not None)
        others = [(n, g) for g, n in counts.items() if g != group]
        return max(others, key=lambda t: (t[0], t[1]))[1] if others else None

    def _donor(self, sample: Sample, seed: int, wanted: Callable[[str], bool], whole: bool = False):
        """(image, object mask, background region, phrase, key) of another hold-out or donor image whose background
        group is `wanted`; its object must be found when its region is not, or when its `whole` background is wanted
        (its object is inpainted away then). None when there is none.

        The group is drawn first, each wanted group alike (among those of at least probe.min_occurrences images,
        when there are such), then an image of it: a background change goes to another kind of background,
        not to whatever kind the probed classes' images happen to show most."""
        rng = random.Random(seed)
        keys = sorted(k for k in self.described_keys() if k != sample.image)
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
            return load_image(self.samples[key].path), mask, region, bg[0], key
        return None

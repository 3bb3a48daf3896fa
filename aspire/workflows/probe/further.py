"""Steps 4d and 4e, for the groups that can be tested: insertion (is the region sufficient: pasted into
other classes' images, does it raise the class's probability?) and joint removal (redundant shortcuts: every
candidate group of a class removed together, against all but one)."""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from typing import Optional, Sequence

import numpy as np

from aspire.data.images import load_image, load_mask
from aspire.schemas import Edit, Finding, Sample
from aspire.tools import lexicon
from aspire.tools.edit import PasteRequest, find_control
from aspire.tools.probe import min_testable_pairs
from aspire.workflows.probe.base import ALL_CANDIDATES, ITEM_ERRORS, edit_seed


class FurtherTests:
    """ProbePipeline's steps 4d and 4e (a part of ProbePipeline: it uses its store, settings and tools)."""

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
        """For every testable group, its region pasted into hold-out (or donor) images of the other classes (at the
        same place, their own object kept), each with a control paste: for an object, a region of the same area from
        elsewhere in the source image; for a background, the same region from an image of another background group.
        The test reads the rise of the source class's probability. `probe.insertion_images`: pastes per group
        (0: off)."""
        n = self.config.probe.insertion_images
        if n <= 0:
            return []
        real = [e for e in self.store.all("edit", Edit) if e.test == "removal" and not e.control and e.mask_png]
        holdout = self.described()   # the donors (other classes' images, when some classes are probed) too
        out_dir = self.store.folder("edits")
        for f in findings:
            marker = f.key
            if (f.pairs < min_testable_pairs(self.config.probe) or self.store.has("inserted", marker)
                    or not self._fits(max_edits, 2 * n)):
                continue
            members = set(f.phrases) | {f.phrase}
            sources = sorted((e for e in real if e.kind == f.kind and self.samples[e.image].y == f.class_index
                              and lexicon.normalize(e.phrase) in members), key=lambda e: e.edit_id)
            targets = [s for s in holdout if s.y != f.class_index]
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
                self.store.set_meta("joint_sets", {**self.store.meta("joint_sets", {}), str(y): tag})
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

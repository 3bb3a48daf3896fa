"""Steps 1b and 3b: what the captions left out. Phrase groups named often are grounded in the images whose
captions do not name them (propagation); a group too rare in a class's hold-out gets more images (the hold-out
extension); two phrases that keep landing on each other's regions are aliases."""

from __future__ import annotations

import random
from collections import Counter
from typing import Optional, Sequence


from aspire.data.images import load_mask
from aspire.schemas import PhraseSet, Propagated, Sample
from aspire.tools import lexicon
from aspire.tools.generate import derive_seed
from aspire.tools.groups import merge_phrase_groups
from aspire.workflows.probe.base import ITEM_ERRORS, masks_overlap


class PhraseDiscovery:
    """ProbePipeline's steps 1b and 3b (a part of ProbePipeline: it uses its store, settings and tools)."""

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
        named = {k: p.named() for k, p in usable.items()}
        group_of = merge_phrase_groups([q for qs in named.values() for q in qs], self.config.probe.merge_similarity)
        groups_in = {k: {group_of[lexicon.normalize(q)] for q in qs} for k, qs in named.items()}
        images = Counter(g for gs in groups_in.values() for g in gs)
        labels = [o for y in range(len(self.class_names)) for o in self.object_phrases(y)]
        frequent = [g for g, n in sorted(images.items(), key=lambda t: (-t[1], t[0]))
                    if n >= self.config.probe.min_occurrences and not lexicon.same_as_any(g, labels, self.config.probe.merge_similarity)]
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
                                      for q in p.named()})
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
            if fg is not None and masks_overlap(mask, fg):
                continue
            match = next((phrase for phrase, m in own if masks_overlap(mask, m)), None)
            if match is None:
                found.append(region.phrase)
                own.append((region.phrase, mask))
            else:
                same[region.phrase] = match
        return Propagated(image=sample.image, tried=list(phrases), found=found, same=same)

    def look_for(self, y: int, phrase: str) -> tuple[int, int]:
        """A concept the captions may never have named (asked for in chat): `phrase` grounded in each of class y's
        hold-out images whose phrases do not name it. Where it is found in a region of its own, it joins the
        image's phrases, recorded as propagation records it, so the next edits test it like any phrase.
        Returns (the class's images looked at, those that show it: named, or found now or before)."""
        phrase = lexicon.normalize(phrase)
        keys = [k for k in self.store.get_meta("holdout", []) if self.samples[k].y == y]
        shown = 0
        with self.progress(f"looking for {phrase!r}", len(keys)) as advance:
            for key in keys:
                advance(1)
                phrases = self.phrase_set(key)
                if phrases is None or phrases.failed:
                    continue
                named = phrases.named()
                before = self._propagated(key)
                if lexicon.same_as_any(phrase, named, self.config.probe.merge_similarity):
                    shown += 1
                    continue
                if phrase in before.tried:
                    continue
                try:
                    now = self._ground_missing(self.samples[key], named, [phrase])
                except ITEM_ERRORS as e:
                    self._failed("edit", self.samples[key], phrase, e)
                    continue
                self.store.put("propagated", key, Propagated(
                    image=key, tried=sorted({*before.tried, phrase}), found=[*before.found, *now.found],
                    same={**before.same, **now.same}))
                shown += bool(now.found)
        return len(keys), shown

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
            here = {norm(q) for q in phrases.named()} - {norm(q) for q in rec.found}
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

"""Step 4's verdict: classify originals and edits, and turn flips into findings with controls and a test.

For every real edit there is a control edit of the same area at a random place off the phrase's mask
(backgrounds: the same operation keeping the kind of background). Per (class, phrase group):

    flip_rate          = flips / occurrences                 (the method's score)
    control_flip_rate  = control flips / control edits
    p_value            = one-sided Fisher exact test: real edits flip more often than controls
    spurious           = occurrences >= min_occurrences and p_value < alpha
                         and flip_rate - control_flip_rate >= min_effect

A group with no control edits cannot be separated from "any edit flips the model": its p-value is 1 and
it is never marked spurious. Near-duplicate phrases (same lemma, or similarity >= merge_similarity) are
merged into one group named by its most frequent phrase; background phrases of one scene category
("lake", "pond", "sea") merge too.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import numpy as np
from scipy.stats import fisher_exact

from aspire.config import ProbeSettings
from aspire.data.images import load_image
from aspire.errors import DataError
from aspire.schemas import Edit, Finding, Probe, Record, Sample
from aspire.tools import lexicon


class Prediction(Record):
    """The classifier's top-1 class and its probability of the true class, for one image."""

    pred: int
    prob_true: float


class Prober:
    """Classifies original and edited images in batches and records a Probe per edit."""

    def __init__(self, classifier, settings: ProbeSettings | None = None):
        self.classifier = classifier
        self.settings = settings or ProbeSettings()

    def predict(self, paths: Sequence[str], labels: Sequence[int]) -> list[Prediction]:
        """Top-1 prediction and true-class probability for images on disk.

        Images are read one batch ahead on a worker thread, so decoding overlaps the classifier."""
        if len(paths) != len(labels):
            raise ValueError("paths and labels differ in length")
        n_classes = len(self.classifier.class_names)
        bad = [y for y in labels if not 0 <= y < n_classes]
        if bad:
            raise DataError(f"label {bad[0]} out of range for a classifier of {n_classes} classes")
        size = self.settings.batch_size
        batches = [list(paths[i:i + size]) for i in range(0, len(paths), size)]
        out: list[Prediction] = []
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(_load_all, batches[0]) if batches else None
            for i in range(len(batches)):
                images = pending.result()
                pending = pool.submit(_load_all, batches[i + 1]) if i + 1 < len(batches) else None
                probs = self.classifier.predict_proba(images, batch_size=size)  # (B, C)
                ys = labels[i * size:i * size + len(images)]
                out += [Prediction(pred=int(p.argmax()), prob_true=float(p[y])) for p, y in zip(probs, ys)]
        return out

    def probe(self, edits: Sequence[Edit], samples: dict[str, Sample],
              originals: dict[str, Prediction] | None = None) -> list[Probe]:
        """One Probe per edit. `originals` caches predictions on source images (filled in place)."""
        originals = {} if originals is None else originals
        missing = sorted({e.image for e in edits if e.image not in originals})
        for e in edits:
            if e.image not in samples:
                raise DataError(f"edit {e.edit_id}: source image {e.image!r} is not in the dataset")
        if missing:
            preds = self.predict([samples[i].path for i in missing], [samples[i].y for i in missing])
            originals.update(zip(missing, preds))
        edited = self.predict([e.edited_png for e in edits], [samples[e.image].y for e in edits])
        out = []
        for e, after in zip(edits, edited):
            before, y = originals[e.image], samples[e.image].y
            out.append(Probe(edit_id=e.edit_id, image=e.image, phrase=e.phrase, kind=e.kind, control=e.control, y=y,
                             pred_original=before.pred, pred_edited=after.pred,
                             prob_true_original=before.prob_true, prob_true_edited=after.prob_true,
                             flipped=after.pred != y))
        return out


def _load_all(paths: Sequence[str]) -> list:
    return [load_image(p) for p in paths]


def merge_phrase_groups(phrases: Iterable[str], similarity: float = 0.7, *, by_scene: bool = False) -> dict[str, str]:
    """Map each phrase to its group's name: greedy clustering, most frequent phrases first.

    With `by_scene` (background phrases) phrases of one scene category ("lake", "pond", "sea" → water) also
    merge: changing the background to the alternative removes them all alike."""
    counts = Counter(lexicon.normalize(p) for p in phrases)
    names: list[str] = []
    mapping: dict[str, str] = {}

    def same(a: str, b: str) -> bool:
        if by_scene and lexicon.scene_category(a) is not None and lexicon.scene_category(a) == lexicon.scene_category(b):
            return True
        return lexicon.similarity(a, b) >= similarity

    for phrase, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        home = next((n for n in names if same(phrase, n)), None)
        if home is None:
            names.append(phrase)
            home = phrase
        mapping[phrase] = home
    return mapping


def one_sided_fisher(flips: int, n: int, control_flips: int, control_n: int) -> float:
    """P(real edits flip at least this much more often than controls by chance); 1.0 without data."""
    if n == 0 or control_n == 0:
        return 1.0
    table = [[flips, n - flips], [control_flips, control_n - control_flips]]
    return float(fisher_exact(table, alternative="greater").pvalue)


def aggregate_findings(probes: Sequence[Probe], class_names: Sequence[str],
                       settings: ProbeSettings | None = None) -> list[Finding]:
    """Findings per (class, phrase group, kind), strongest first."""
    settings = settings or ProbeSettings()
    mappings = {kind: merge_phrase_groups((p.phrase for p in probes if p.kind == kind), settings.merge_similarity,
                                          by_scene=kind == "background")
                for kind in ("foreground", "background")}
    groups: dict[tuple[int, str, str], list[Probe]] = defaultdict(list)
    for p in probes:
        groups[(p.y, mappings[p.kind][lexicon.normalize(p.phrase)], p.kind)].append(p)

    findings = []
    for (y, name, kind), items in groups.items():
        real = [p for p in items if not p.control]
        control = [p for p in items if p.control]
        if not real:
            continue
        flips = sum(p.flipped for p in real)
        control_flips = sum(p.flipped for p in control)
        flip_rate = flips / len(real)
        control_rate = control_flips / len(control) if control else 0.0
        p_value = one_sided_fisher(flips, len(real), control_flips, len(control))
        spurious = (len(real) >= settings.min_occurrences and p_value < settings.alpha
                    and flip_rate - control_rate >= settings.min_effect)
        findings.append(Finding(
            **{"class": class_names[y]}, class_index=y, phrase=name, kind=kind,
            phrases=sorted({lexicon.normalize(p.phrase) for p in real}),
            occurrences=len(real), flips=flips, flip_rate=flip_rate,
            control_occurrences=len(control), control_flips=control_flips, control_flip_rate=control_rate,
            mean_prob_drop=float(np.mean([p.prob_true_original - p.prob_true_edited for p in real])),
            p_value=p_value, spurious=spurious,
            flipped_edits=[p.edit_id for p in real if p.flipped]))
    findings.sort(key=lambda f: (-f.spurious, -(f.flip_rate - f.control_flip_rate), f.p_value, f.class_, f.phrase))
    return findings

"""Step 4's verdict: classify originals and edits, and turn paired evidence into findings with a calibrated test.

Every real edit has a control made by the same operation on something other than the phrase (same area
off the phrase's mask, the same mask on another image of the class, a background of the same group, ...:
`Edit.control_kind`); a real edit and its control share `Edit.pair`. Per (class, phrase group, kind):

    drop_i      = P(y | original) - P(y | edited)  for the real edit of pair i, and likewise for its control
    d_i         = drop_i(real) - drop_i(control)   the paired difference
    effect      = mean(d_i), with a bootstrap 95% interval (effect_ci)
    p_value     = one-sided Wilcoxon signed-rank test of d_i > 0 (zeros ranked, Pratt)
    q_value     = p_value adjusted by Benjamini-Yekutieli over every test of the run (all classes, groups and
                  kinds, whatever round or planner chose them): valid under any dependence between tests
    spurious    = occurrences >= min_occurrences and q_value < alpha and effect >= min_effect
    flip_rate   = flips / occurrences (the method's score, kept as a severity column), with
    flip_p_value = one-sided Fisher exact test: real edits flip more often than controls

margin_effect is the same mean paired drop on the logit margin (true class minus the best other).
A real edit without a control is not a pair: it counts in `occurrences` and flip rates but not in the test.
Near-duplicate phrases (same lemma, or similarity >= merge_similarity) are merged into one group named by its
most frequent phrase.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Optional, Sequence

import numpy as np
from scipy.stats import false_discovery_control, fisher_exact, wilcoxon

from aspire.config import ProbeSettings
from aspire.data.images import load_image
from aspire.errors import DataError
from aspire.schemas import Edit, Finding, Probe, Record, Sample
from aspire.tools import lexicon


class Prediction(Record):
    """The classifier's top-1 class, its probability of the true class and the logit margin, for one image."""

    pred: int
    prob_true: float
    margin: Optional[float] = None  # log P(y) - max_{k != y} log P(k) = the logit margin


def logit_margin(probs: np.ndarray, y: int) -> float:
    """True-class logit minus the best other class's, from probabilities (softmax cancels); clipped at 1e-30."""
    logp = np.log(np.clip(np.asarray(probs, np.float64), 1e-30, None))
    others = np.delete(logp, y)
    return float(logp[y] - others.max()) if len(others) else 0.0


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
                out += [Prediction(pred=int(p.argmax()), prob_true=float(p[y]), margin=logit_margin(p, y))
                        for p, y in zip(probs, ys)]
        return out

    def probe(self, edits: Sequence[Edit], samples: dict[str, Sample],
              originals: dict[str, Prediction] | None = None) -> list[Probe]:
        """One Probe per edit. `originals` caches predictions on source images (filled in place)."""
        originals = {} if originals is None else originals
        missing = sorted({e.image for e in edits if e.image not in originals or originals[e.image].margin is None})
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
                             flipped=after.pred != y, margin_original=before.margin, margin_edited=after.margin,
                             control_kind=e.control_kind, pair=e.pair_key))
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


def paired_test(d: np.ndarray) -> float:
    """One-sided Wilcoxon signed-rank p-value of d > 0 (Pratt: zeros are ranked); 1.0 when nothing differs."""
    d = np.asarray(d, np.float64)
    if len(d) == 0 or not np.any(d != 0):
        return 1.0
    return float(wilcoxon(d, zero_method="pratt", alternative="greater").pvalue)


def bootstrap_ci(d: np.ndarray, seed: int, resamples: int = 2000, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of mean(d); deterministic by seed."""
    d = np.asarray(d, np.float64)
    if len(d) == 0:
        return [0.0, 0.0]
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (resamples, len(d)))].mean(axis=1)  # (resamples,)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def q_values(p_values: Sequence[float]) -> list[float]:
    """Benjamini-Yekutieli adjusted p-values (false-discovery control under any dependence)."""
    if not p_values:
        return []
    return [float(q) for q in false_discovery_control(np.asarray(p_values, np.float64), method="by")]


def min_testable_pairs(settings: ProbeSettings) -> int:
    """The fewest pairs whose test can be significant: min_occurrences, and 2^-n < alpha."""
    return max(settings.min_occurrences, math.floor(-math.log2(settings.alpha)) + 1)


def rank_key(f: Finding) -> tuple:
    """Findings order: spurious first, then larger effect, smaller q, then name (one order everywhere)."""
    return (-f.spurious, -f.effect, f.q_value, f.p_value, f.class_, f.phrase)


def _stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:4], "little")


def aggregate_findings(probes: Sequence[Probe], class_names: Sequence[str],
                       settings: ProbeSettings | None = None) -> list[Finding]:
    """Findings per (class, phrase group, kind), strongest first; q-values over all of them."""
    settings = settings or ProbeSettings()
    # 1. group the probes; a real edit and its control share a pair key
    mappings = {kind: merge_phrase_groups((p.phrase for p in probes if p.kind == kind), settings.merge_similarity,
                                          by_scene=kind == "background")
                for kind in ("foreground", "background")}
    groups: dict[tuple[int, str, str], list[Probe]] = defaultdict(list)
    for p in probes:
        groups[(p.y, mappings[p.kind][lexicon.normalize(p.phrase)], p.kind)].append(p)

    # 2. per group: paired differences, the paired test, the flip test
    rows = []
    for (y, name, kind), items in groups.items():
        real = [p for p in items if not p.control]
        control = [p for p in items if p.control]
        if not real:
            continue
        controls = {p.pair_key: p for p in control}
        pairs = [(r, controls[r.pair_key]) for r in real if r.pair_key in controls]
        d = np.array([r.prob_drop - c.prob_drop for r, c in pairs])
        margins = [(r.margin_original - r.margin_edited) - (c.margin_original - c.margin_edited)
                   for r, c in pairs if None not in (r.margin_original, r.margin_edited, c.margin_original,
                                                      c.margin_edited)]
        by_drop = sorted(((r.prob_drop - c.prob_drop, r.edit_id) for r, c in pairs), key=lambda t: (-t[0], t[1]))
        flips = sum(p.flipped for p in real)
        control_flips = sum(p.flipped for p in control)
        rows.append(dict(
            **{"class": class_names[y]}, class_index=y, phrase=name, kind=kind,
            phrases=sorted({lexicon.normalize(p.phrase) for p in real}),
            occurrences=len(real), flips=flips, flip_rate=flips / len(real),
            control_occurrences=len(control), control_flips=control_flips,
            control_flip_rate=control_flips / len(control) if control else 0.0,
            mean_prob_drop=float(np.mean([p.prob_drop for p in real])),
            p_value=paired_test(d), flip_p_value=one_sided_fisher(flips, len(real), control_flips, len(control)),
            effect=float(d.mean()) if len(d) else 0.0,
            effect_ci=bootstrap_ci(d, _stable_seed(settings.seed, y, kind, name)),
            margin_effect=float(np.mean(margins)) if margins else None, pairs=len(pairs),
            control_kind="+".join(sorted({c.control_kind or "same-area" for _, c in pairs})),
            flipped_edits=[p.edit_id for p in real if p.flipped],
            top_edits=[e for drop, e in by_drop if drop > 0][:settings.max_edits_per_class]))

    # 3. false-discovery control over every test of the run that can reach significance: a group with fewer
    #    than min_occurrences pairs, or too few for the paired test's smallest p-value (2^-n) to pass alpha,
    #    can never be flagged and is left out of the family (Tarone's rule for discrete tests)
    tested = [r for r in rows if r["pairs"] >= min_testable_pairs(settings)]
    for r, q in zip(tested, q_values([r["p_value"] for r in tested])):
        r["q_value"] = q
    findings = []
    for r in rows:
        r.setdefault("q_value", 1.0)
        r["spurious"] = bool(r["occurrences"] >= settings.min_occurrences and r["q_value"] < settings.alpha
                             and r["effect"] >= settings.min_effect)
        findings.append(Finding(**r))
    findings.sort(key=rank_key)
    return findings

"""Step 4's verdict: classify originals and edits, and turn paired evidence into findings with a calibrated test.

Every real edit has a control made by the same operation on something other than the phrase (same area
off the phrase's mask, the same mask on another image of the class, a background of the same group, ...:
`Edit.control_kind`); a real edit and its control share `Edit.pair`. Per (class, phrase group, kind):

    drop_i      = P(y | original) - P(y | edited)  for the real edit of pair i, and likewise for its control
    d_i         = drop_i(real) - drop_i(control)   the paired difference
    effect      = mean(d_i), with a bootstrap 95% interval (effect_ci)
    p_value     = one-sided Wilcoxon signed-rank test of d_i > 0 (zeros ranked, Pratt)
    q_value     = p_value adjusted by Benjamini-Yekutieli over every test of the run (all classes, groups and
                  kinds, whatever round or planner chose them, the insertion and joint tests included): valid
                  under any dependence between tests. A test with fewer pairs than could ever reach alpha
                  (2^-n >= alpha, or n < min_occurrences) is left out of the family (Tarone's rule).
    insertion_* = the same paired statistics on the rise of the class's probability when the group's region is
                  pasted into other classes' images (Edit.test == "insertion"): sufficiency beside necessity
    joint_*     = the same on joint removal (Edit.test == "joint"): every candidate group of the class removed
                  vs all of them but this group's control
    spurious    = occurrences >= min_occurrences, and q_value < alpha with effect >= min_effect, or the same
                  for the joint test (then `joint`: it matters only once the class's other candidates are gone)
    flip_rate   = flips / occurrences (the method's score, kept as a severity column), with
    flip_p_value = one-sided Fisher exact test: real edits flip more often than controls

margin_effect is the same mean paired drop on the logit margin (true class minus the best other).
A real edit without a control is not a pair: it counts in `occurrences` and flip rates but not in the test.
Near-duplicate phrases (same lemma, or similarity >= merge_similarity) are merged into one group named by its
most frequent phrase (tools/groups.py); background phrases take the pipeline's groups (by how their regions look)
when given.
"""

from __future__ import annotations

import math
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
from scipy.stats import false_discovery_control, fisher_exact, wilcoxon

from aspire.config import ProbeSettings
from aspire.data.images import load_image, min_image_side
from aspire.errors import DataError
from aspire.schemas import AfterRepair, Edit, Finding, Probe, Record, Sample
from aspire.tools import lexicon
from aspire.tools.generate import derive_seed
from aspire.tools.groups import merge_phrase_groups


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
        min_side = min_image_side(self.classifier.input_size)
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(_load_all, batches[0], min_side) if batches else None
            for i in range(len(batches)):
                images = pending.result()
                pending = pool.submit(_load_all, batches[i + 1], min_side) if i + 1 < len(batches) else None
                probs = self.classifier.predict_proba(images, batch_size=size)  # (B, C)
                ys = labels[i * size:i * size + len(images)]
                out += [Prediction(pred=int(p.argmax()), prob_true=float(p[y]), margin=logit_margin(p, y))
                        for p, y in zip(probs, ys)]
        return out

    def probe(self, edits: Sequence[Edit], samples: dict[str, Sample],
              originals: dict[str, Prediction] | None = None) -> list[Probe]:
        """One Probe per edit. `originals` caches predictions on source images (filled in place).

        The probability read is the image's label's, or the edit's `score_class` (insertion tests read the
        class whose region was pasted in); an insertion "flips" when the prediction becomes that class."""
        originals = {} if originals is None else originals
        for e in edits:
            if e.image not in samples:
                raise DataError(f"edit {e.edit_id}: source image {e.image!r} is not in the dataset")
        label = {e.edit_id: samples[e.image].y if e.score_class is None else e.score_class for e in edits}
        missing = sorted({e.image for e in edits if e.image not in originals or originals[e.image].margin is None})
        if missing:
            preds = self.predict([samples[i].path for i in missing], [samples[i].y for i in missing])
            originals.update(zip(missing, preds))
        scored = sorted({(e.image, label[e.edit_id]) for e in edits if label[e.edit_id] != samples[e.image].y})
        other = dict(zip(scored, self.predict([samples[i].path for i, _ in scored], [y for _, y in scored])))
        edited = self.predict([e.edited_png for e in edits], [label[e.edit_id] for e in edits])
        out = []
        for e, after in zip(edits, edited):
            y = label[e.edit_id]
            before = originals[e.image] if y == samples[e.image].y else other[(e.image, y)]
            flipped = after.pred == y != before.pred if e.test == "insertion" else after.pred != y
            out.append(Probe(edit_id=e.edit_id, image=e.image, phrase=e.phrase, kind=e.kind, control=e.control, y=y,
                             pred_original=before.pred, pred_edited=after.pred,
                             prob_true_original=before.prob_true, prob_true_edited=after.prob_true,
                             flipped=flipped, margin_original=before.margin, margin_edited=after.margin,
                             control_kind=e.control_kind, pair=e.pair_key, test=e.test))
        return out


def _load_all(paths: Sequence[str], min_side: int) -> list:
    return [load_image(p, min_side=min_side) for p in paths]


def one_sided_fisher(flips: int, n: int, control_flips: int, control_n: int) -> float:
    """P(real edits flip at least this much more often than controls by chance); 1.0 without data."""
    if n == 0 or control_n == 0:
        return 1.0
    table = [[flips, n - flips], [control_flips, control_n - control_flips]]
    return float(fisher_exact(table, alternative="greater").pvalue)


def phrase_groups(probes: Sequence[Probe], settings: ProbeSettings,
                  known_groups: Optional[dict[str, str]] = None) -> dict[str, dict[str, str]]:
    """{kind: {phrase: group name}} over the removal probes' phrases: `known_groups` first (the pipeline's: aliases
    found by grounding, background groups by appearance), then near-duplicates by text."""
    mappings = {kind: merge_phrase_groups((p.phrase for p in probes if p.kind == kind and p.test == "removal"),
                                          settings.merge_similarity, by_scene=kind == "background")
                for kind in ("foreground", "background")}
    if known_groups:  # composed, so that a group's name maps to itself
        known = known_groups
        mappings = {kind: {**{p: known.get(p, known.get(g, g)) for p, g in m.items()}, **known}
                    for kind, m in mappings.items()}
    return mappings


def joint_summary(probes: Sequence[Probe], findings: Sequence[Finding], class_names: Sequence[str],
                  all_phrase: str, seed: int = 0) -> dict[str, dict]:
    """Per class with joint-removal pairs: the combined effect of removing every candidate group (vs all their
    controls), its interval and p-value, and each group's share (its joint effect over the combined effect)."""
    out = {}
    for y, name in enumerate(class_names):
        pairs = _pairs([p for p in probes if p.test == "joint" and p.y == y and p.phrase == all_phrase])
        if not pairs:
            continue
        d = np.array([r.prob_drop - c.prob_drop for r, c in pairs])
        combined = float(d.mean())
        shares = {f.phrase: (round(f.joint_effect / combined, 3) if combined > 0 else None)
                  for f in findings if f.class_index == y and f.joint_effect is not None}
        out[name] = {"effect": combined, "effect_ci": bootstrap_ci(d, derive_seed(seed, y, all_phrase)),
                     "p_value": paired_test(d), "pairs": len(pairs), "shares": shares}
    return out


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


def finding_edits(f: Finding, probes: Sequence[Probe]) -> list[Probe]:
    """A finding's real removal edits (its class, kind and any member phrase), flipped first, then by the drop of
    the class's probability: what its evidence shows (report galleries, chat)."""
    members = {f.phrase, *f.phrases}
    mine = [p for p in probes if p.test == "removal" and not p.control and p.y == f.class_index and p.kind == f.kind
            and lexicon.normalize(p.phrase) in members]
    return sorted(mine, key=evidence_order)


def evidence_order(p: Probe) -> tuple:
    """How edits are shown as evidence: flipped first, then by the drop of the class's probability."""
    return (not p.flipped, -p.prob_drop, p.edit_id)


def rank_key(f: Finding) -> tuple:
    """Findings order: spurious first, then larger effect, smaller q, then name (one order everywhere)."""
    return (-f.spurious, -f.effect, f.q_value, f.p_value, f.class_, f.phrase)


def _pairs(items: Sequence[Probe]) -> list[tuple[Probe, Probe]]:
    """(real, control) probes that share a pair key, in the real probes' order."""
    controls = {p.pair_key: p for p in items if p.control}
    return [(p, controls[p.pair_key]) for p in items if not p.control and p.pair_key in controls]


GroupKey = tuple[int, str, str]  # (class index, group name, kind)


def group_probes(probes: Sequence[Probe], settings: ProbeSettings,
                 known_groups: Optional[dict[str, str]] = None) -> dict[str, dict[GroupKey, list[Probe]]]:
    """{test: {(class, group, kind): probes}}; insertion and joint probes are named by the group they test."""
    mappings = phrase_groups(probes, settings, known_groups)
    out: dict[str, dict[GroupKey, list[Probe]]] = defaultdict(lambda: defaultdict(list))
    for p in probes:
        name = lexicon.normalize(p.phrase)
        out[p.test][(p.y, mappings[p.kind].get(name, name), p.kind)].append(p)
    return out


def aggregate_findings(probes: Sequence[Probe], class_names: Sequence[str], settings: ProbeSettings | None = None,
                       known_groups: Optional[dict[str, str]] = None) -> list[Finding]:
    """Findings per (class, phrase group, kind), strongest first; q-values over all of them.
    `known_groups` ({phrase: group}, the pipeline's: aliases by grounding, backgrounds by appearance) names the
    groups of the phrases it knows; other phrases are merged by text."""
    settings = settings or ProbeSettings()
    # 1. group the probes; a real edit and its control share a pair key
    by_test = group_probes(probes, settings, known_groups)
    groups = by_test["removal"]

    # 2. per group: paired differences, the paired test, the flip test
    rows = []
    for (y, name, kind), items in groups.items():
        real = [p for p in items if not p.control]
        control = [p for p in items if p.control]
        if not real:
            continue
        pairs = _pairs(items)
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
            effect_ci=bootstrap_ci(d, derive_seed(settings.seed, y, kind, name)),
            margin_effect=float(np.mean(margins)) if margins else None, pairs=len(pairs),
            control_kind="+".join(sorted({c.control_kind or "same-area" for _, c in pairs})),
            flipped_edits=[p.edit_id for p in real if p.flipped],
            top_edits=[e for drop, e in by_drop if drop > 0][:settings.max_edits_per_class]))
        # the insertion test of the same group: the rise of the class's probability, real paste - control paste
        rise = np.array([c.prob_drop - r.prob_drop for r, c in _pairs(by_test["insertion"].get((y, name, kind), []))])
        if len(rise):
            rows[-1].update(insertion_effect=float(rise.mean()), insertion_p_value=paired_test(rise),
                            insertion_pairs=len(rise))
        # joint removal: all candidates removed vs all but this group's control
        joint = np.array([r.prob_drop - c.prob_drop for r, c in _pairs(by_test["joint"].get((y, name, kind), []))])
        if len(joint):
            rows[-1].update(joint_effect=float(joint.mean()), joint_p_value=paired_test(joint), joint_pairs=len(joint))

    # 3. false-discovery control over every test of the run that can reach significance: a group with fewer
    #    than min_occurrences pairs, or too few for the paired test's smallest p-value (2^-n) to pass alpha,
    #    can never be flagged and is left out of the family (Tarone's rule for discrete tests)
    least = min_testable_pairs(settings)
    family = [(r, "p_value", "q_value") for r in rows if r["pairs"] >= least]
    family += [(r, "insertion_p_value", "insertion_q_value") for r in rows if r.get("insertion_pairs", 0) >= least]
    family += [(r, "joint_p_value", "joint_q_value") for r in rows if r.get("joint_pairs", 0) >= least]
    for (r, _, q_key), q in zip(family, q_values([r[p_key] for r, p_key, _ in family])):
        r[q_key] = q
    findings = []
    for r in rows:
        r.setdefault("q_value", 1.0)
        r.pop("insertion_pairs", None)
        r.pop("joint_pairs", None)
        alone = r["q_value"] < settings.alpha and r["effect"] >= settings.min_effect
        jointly = (r.get("joint_q_value") or 1.0) < settings.alpha and (r.get("joint_effect") or 0.0) >= settings.min_effect
        r["joint"] = bool(jointly and not alone)  # it matters only once the class's other candidates are gone
        r["spurious"] = bool(r["occurrences"] >= settings.min_occurrences and (alone or jointly))
        findings.append(Finding(**r))
    findings.sort(key=rank_key)
    return findings


def compare_findings(before_probes: Sequence[Probe], after_probes: Sequence[Probe], before: Sequence[Finding],
                     after: Sequence[Finding], settings: ProbeSettings | None = None,
                     known_groups: Optional[dict[str, str]] = None) -> list[Finding]:
    """The findings `before` with `after` filled in: each group's statistics on the same edits scored by another
    classifier (`after`, aggregated from `after_probes`), whether its paired drop fell, and a verdict.

    The reduction test pairs each real/control pair with itself: change_i = d_i(before) - d_i(after), one-sided
    Wilcoxon, Benjamini-Yekutieli over the groups confirmed before (those a verdict of reduced can apply to).
    A group confirmed only by joint removal is compared on its joint pairs."""
    settings = settings or ProbeSettings()
    by_before = group_probes(before_probes, settings, known_groups)
    by_after = group_probes(after_probes, settings, known_groups)
    now = {(f.class_index, f.phrase, f.kind): f for f in after}

    def paired(items: Sequence[Probe]) -> dict[str, float]:
        return {r.pair_key: r.prob_drop - c.prob_drop for r, c in _pairs(items)}

    # 1. per group confirmed before: the paired change of its drop
    changes: dict[GroupKey, np.ndarray] = {}
    for f in before:
        key = (f.class_index, f.phrase, f.kind)
        test = "joint" if f.joint else "removal"
        d_before, d_after = paired(by_before[test].get(key, [])), paired(by_after[test].get(key, []))
        common = sorted(set(d_before) & set(d_after))
        if f.spurious and key in now and common:
            changes[key] = np.array([d_before[k] - d_after[k] for k in common])
    # 2. the reduction tests' q-values, then a verdict per group
    least = min_testable_pairs(settings)
    family = [k for k, c in changes.items() if len(c) >= least]
    q = dict(zip(family, q_values([paired_test(changes[k]) for k in family])))
    out = []
    for f in before:
        key = (f.class_index, f.phrase, f.kind)
        a = now.get(key)
        if a is None:
            out.append(f)
            continue
        change = changes.get(key)
        reduction_q = q.get(key, 1.0 if change is not None else None)
        if f.spurious:
            strength = (a.joint_effect or 0.0) if f.joint else a.effect   # the test that confirmed it before
            gone = not a.spurious and strength < settings.min_effect
            reduced = reduction_q is not None and reduction_q < settings.alpha
            verdict = "removed" if gone else "reduced" if reduced else "unchanged"
        else:
            verdict = "new" if a.spurious else None
        out.append(f.model_copy(update={"after": AfterRepair(
            effect=a.effect, effect_ci=a.effect_ci, p_value=a.p_value, q_value=a.q_value, flip_rate=a.flip_rate,
            control_flip_rate=a.control_flip_rate, spurious=a.spurious, joint_effect=a.joint_effect,
            joint_q_value=a.joint_q_value, reduction=None if change is None else float(change.mean()),
            reduction_p_value=None if change is None else paired_test(change), reduction_q_value=reduction_q,
            verdict=verdict)}))
    return out


def remaining(findings: Sequence[Finding], min_effect: Optional[float] = None) -> list[Finding]:
    """The findings that still stand: confirmed on the repaired model when it was re-probed (or judged
    `unchanged`: its drop did not fall, though its q-value may have crossed alpha), else as probed; with
    `min_effect`, only those whose effect or joint effect reaches it."""
    out = []
    for f in findings:
        now = f.after or f
        stands = now.spurious or (f.after is not None and f.after.verdict == "unchanged")
        if stands and (min_effect is None or max(now.effect, now.joint_effect or 0.0) >= min_effect):
            out.append(f)
    return out

"""Which phrase groups to probe next: per-class phrase statistics and the deterministic offline planner.

The statistics are what the LLM planner sees too. Per probed class y and phrase group g (near-duplicate
phrases merged as the findings merge them), over the hold-out images' phrase sets:

    p_class = P(g | y)             share of class-y images whose phrases name g
    p_other = P(g | other classes) the same share over the other probed classes' images
    lift    = p_class / p_other    with add-one-half smoothing: (n + 0.5) / (N + 1) on both sides;
                                   None when no other class is probed

A phrase that comes with one class much more often than with the others is a candidate shortcut.

`OfflinePlanner.propose(request) -> Plan` follows the method without an LLM: per class, the untested
groups named in at least `min_occurrences` images, in order of lift (then frequency), `groups_per_round`
of them per round; it stops when no such group is left. The graph stops the loop on stability or budget.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

from pydantic import BaseModel
from typing_extensions import TypedDict

from aspire.schemas import Finding, PhraseSet
from aspire.tools import lexicon
from aspire.tools.groups import merge_phrase_groups

KINDS = ("foreground", "background")


class Hypothesis(TypedDict):
    """One phrase group to probe on one class, and why."""

    class_index: int
    class_name: str
    kind: str                   # foreground | background
    phrase: str                 # the group's name
    phrases: list[str]          # the group's member phrases (what the edits are restricted to)
    reason: str
    source: str                 # llm | planner


@dataclass(frozen=True)
class GroupStat:
    """How often one phrase group occurs in one class's hold-out images vs the other classes'."""

    class_index: int
    class_name: str
    kind: str
    phrase: str                 # the group's name (its most frequent phrase)
    phrases: tuple[str, ...]    # every phrase merged into the group
    n_class: int                # images of this class naming the group
    n_images_class: int
    n_other: int                # images of the other probed classes naming it
    n_images_other: int
    p_class: float
    p_other: Optional[float]
    lift: Optional[float]

    @property
    def key(self) -> str:
        return group_key(self.class_index, self.kind, self.phrase)

    @property
    def estimated_edits(self) -> int:
        """Real and control edits probing this group would make (at most)."""
        return 2 * self.n_class

    def to_prompt(self) -> dict:
        return {"kind": self.kind, "phrase": self.phrase, "members": list(self.phrases), "n": self.n_class,
                "p_class": round(self.p_class, 3), "p_other": None if self.p_other is None else round(self.p_other, 3),
                "lift": None if self.lift is None else round(self.lift, 2)}


def group_key(class_index: int, kind: str, phrase: str) -> str:
    return f"{class_index}|{kind}|{phrase}"


def phrase_stats(phrase_sets: Sequence[PhraseSet], labels: dict[str, int], class_names: Sequence[str],
                 class_ids: Sequence[int], similarity: float = 0.7) -> dict[int, list[GroupStat]]:
    """Per probed class, its phrase groups with their shares and lift, highest lift first."""
    # 1. the phrases of each image, per kind (failed extractions carry none)
    per_image: dict[str, dict[str, set[str]]] = {}
    for ps in phrase_sets:
        if ps.failed or ps.image not in labels:
            continue
        per_image[ps.image] = {"foreground": {lexicon.normalize(p) for p in ps.foreground},
                               "background": {lexicon.normalize(p) for p in ps.background[:1]}}
    # 2. merge near-duplicates exactly as the findings do
    mapping = {kind: merge_phrase_groups([p for d in per_image.values() for p in d[kind]], similarity,
                                         by_scene=kind == "background") for kind in KINDS}
    members: dict[tuple[str, str], set[str]] = defaultdict(set)
    counts: dict[tuple[int, str, str], int] = defaultdict(int)   # (y, kind, group) -> images
    n_images: dict[int, int] = defaultdict(int)
    for image, by_kind in per_image.items():
        y = labels[image]
        n_images[y] += 1
        for kind in KINDS:
            groups = {mapping[kind][p] for p in by_kind[kind] if p}
            for p in by_kind[kind]:
                if p:
                    members[(kind, mapping[kind][p])].add(p)
            for g in groups:
                counts[(y, kind, g)] += 1
    # 3. shares and lift per probed class
    out: dict[int, list[GroupStat]] = {}
    for y in class_ids:
        others = [c for c in class_ids if c != y]
        n_y, n_o = n_images.get(y, 0), sum(n_images.get(c, 0) for c in others)
        stats = []
        for (cy, kind, g), n in counts.items():
            if cy != y:
                continue
            n_other = sum(counts.get((c, kind, g), 0) for c in others)
            p_class = n / n_y if n_y else 0.0
            p_other = n_other / n_o if n_o else None
            lift = ((n + 0.5) / (n_y + 1)) / ((n_other + 0.5) / (n_o + 1)) if n_o else None
            stats.append(GroupStat(y, class_names[y], kind, g, tuple(sorted(members[(kind, g)])), n, n_y,
                                   n_other, n_o, p_class, p_other, lift))
        stats.sort(key=_priority)
        out[y] = stats
    return out


def _priority(s: GroupStat) -> tuple:
    """Highest lift first (share in the class when there is no other class), then more images, then name."""
    return (-(s.lift if s.lift is not None else s.p_class), -s.n_class, s.kind, s.phrase)


def match_group(stats: Sequence[GroupStat], kind: Optional[str], phrase: str, similarity: float = 0.7) -> Optional[GroupStat]:
    """The group a phrase names: by group name, then member phrase, then near-duplicate."""
    phrase = lexicon.normalize(phrase)
    pool = [s for s in stats if kind is None or s.kind == kind]
    for test in (lambda s: s.phrase == phrase, lambda s: phrase in s.phrases,
                 lambda s: lexicon.same_as_any(phrase, (s.phrase, *s.phrases), similarity)):
        hit = next((s for s in pool if test(s)), None)
        if hit is not None:
            return hit
    return None


def finding_for(findings: Sequence[Finding], class_index: int, kind: str, phrases: Sequence[str]) -> Optional[Finding]:
    """The finding that aggregates a hypothesis's phrases (most member phrases in common), of the hypothesis's
    kind first: the probe decides object vs background from the mask, so it may have tested the other kind."""
    wanted = set(phrases)
    best, score = None, (0, False)
    for f in findings:
        if f.class_index != class_index:
            continue
        common = len(wanted & (set(f.phrases) | {f.phrase}))
        if common and (common, f.kind == kind) > score:
            best, score = f, (common, f.kind == kind)
    return best


# ---------------------------------------------------------------- the planners' interface
@dataclass
class PlanRequest:
    """What a planner decides from: the round, the statistics, what was probed and how it came out."""

    round: int
    stats: dict[int, list[GroupStat]]
    tested: set[str]
    history: list[dict]             # outcome events so far: hypothesis + result
    groups_per_round: int = 3
    min_occurrences: int = 3
    similarity: float = 0.7
    llm_calls_left: Optional[int] = None   # the LLM planner's remaining call budget (None: its setting)

    def candidates(self, y: int) -> list[GroupStat]:
        """Untested groups of class y that could reach significance (named in enough images)."""
        return [s for s in self.stats.get(y, []) if s.key not in self.tested and s.n_class >= self.min_occurrences]


class Plan(BaseModel):
    """A round's plan: what a planner proposes, and what the store records (record `plan`, key `round-<n>`)."""

    hypotheses: list[Hypothesis]
    stop: bool = False
    reason: str = ""
    source: str = "planner"
    llm_calls: int = 0
    failures: list[str] = []   # why LLM attempts were not used
    round: int = 0             # set when recorded


class Planner(Protocol):
    name: str

    def propose(self, request: PlanRequest) -> Plan: ...


def hypothesis(stat: GroupStat, reason: str, source: str) -> Hypothesis:
    return Hypothesis(class_index=stat.class_index, class_name=stat.class_name, kind=stat.kind, phrase=stat.phrase,
                      phrases=list(stat.phrases), reason=reason, source=source)


def describe(stat: GroupStat) -> str:
    """A one-line statistical reason for probing a group."""
    if stat.lift is None:
        return f"named in {stat.n_class} of {stat.n_images_class} {stat.class_name} images ({stat.p_class:.0%})"
    return (f"lift {stat.lift:.1f}: named in {stat.p_class:.0%} of {stat.class_name} images "
            f"vs {stat.p_other:.0%} of the other classes' ({stat.n_class} images)")


class OfflinePlanner:
    """The deterministic planner: probe in order of lift, a few groups per class and round."""

    name = "planner"

    def propose(self, request: PlanRequest) -> Plan:
        chosen = [s for y in sorted(request.stats) for s in request.candidates(y)[: request.groups_per_round]]
        if not chosen:
            return Plan(hypotheses=[], stop=True, reason="no untested phrase group is named in enough images to test")
        return Plan(hypotheses=[hypothesis(s, describe(s), self.name) for s in chosen],
                    reason=f"round {request.round}: the {len(chosen)} untested groups of highest lift")


def trim_to_budget(hypotheses: list[Hypothesis], stats: dict[int, list[GroupStat]], edits_left: int) -> list[Hypothesis]:
    """The hypotheses, in order, whose estimated edits fit in what is left of the edit budget."""
    size = {s.key: s.estimated_edits for group in stats.values() for s in group}
    kept, used = [], 0
    for h in hypotheses:
        cost = size.get(group_key(h["class_index"], h["kind"], h["phrase"]), 0)
        if used + cost > edits_left:
            continue
        kept.append(h)
        used += cost
    return kept

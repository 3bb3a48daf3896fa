"""Phrase groups: the phrases that name one thing, merged into a group named by its most frequent phrase.

    merge_phrase_groups(phrases, similarity, by_scene=False) -> {phrase: group}   by text (tools/lexicon.py)
    merge_by_appearance({group: [histogram]}, ratio) -> {group: merged group}    by how the regions look
    colour_histogram(image, mask) -> (bins³,)                                     what "look" compares

Used by the probe (findings), the planner (its statistics), the probe pipeline (edits and propagation) and, through
the findings' groups, by the report, the repair and chat.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Optional

import numpy as np

from aspire.tools import lexicon


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


def colour_histogram(image: np.ndarray, mask: np.ndarray, bins: int = 4) -> np.ndarray:
    """The normalised RGB histogram (bins³,) of an (H, W, 3) uint8 image's pixels under a bool mask."""
    px = (np.asarray(image)[np.asarray(mask, bool)] // (256 // bins)).astype(np.int64)  # (n, 3)
    hist = np.bincount((px[:, 0] * bins + px[:, 1]) * bins + px[:, 2], minlength=bins ** 3).astype(np.float64)
    return hist / max(1.0, hist.sum())


def merge_by_appearance(hists: dict[str, list[np.ndarray]], ratio: float = 0.9) -> dict[str, str]:
    """Merge groups whose regions look alike: {group: [colour histogram per image]} → {group: merged name}.

    Groups are taken largest first; a group joins an earlier one when the mean histogram intersection between
    their images reaches `ratio` times the smaller of their own within-group means (so "pond" joins "lake"
    when pond images resemble lake images as much as lake images resemble each other). A group of one image
    uses the other's within-group mean. No word is consulted."""
    def mean_overlap(a: list[np.ndarray], b: list[np.ndarray], same: bool) -> Optional[float]:
        a, b = np.stack(a[:30]), np.stack(b[:30])  # (na, K), (nb, K)
        inter = np.minimum(a[:, None, :], b[None, :, :]).sum(-1)  # (na, nb)
        if same:
            if len(a) < 2:
                return None
            return float(inter[~np.eye(len(a), dtype=bool)].mean())
        return float(inter.mean())

    order = sorted((g for g in hists if hists[g]), key=lambda g: (-len(hists[g]), g))
    within = {g: mean_overlap(hists[g], hists[g], True) for g in order}
    kept: list[str] = []
    out: dict[str, str] = {}
    for g in order:
        home = g
        for k in kept:
            ref = [w for w in (within[g], within[k]) if w is not None]
            if ref and mean_overlap(hists[g], hists[k], False) >= ratio * min(ref):
                home = k
                break
        if home == g:
            kept.append(g)
        out[g] = home
    return out

"""Group-robust metrics on arrays (no torch): per-group accuracy, worst-group, plain and weighted averages.

Groups are (y, attribute) pairs when the dataset has an attribute, else the classes y. The weighted
average follows DFR/WILDS: sum over groups of (the group's share of the training split) x (its accuracy).
"""

from __future__ import annotations

from collections import Counter
from typing import Mapping, Optional, Sequence

import numpy as np

from aspire.errors import DataError
from aspire.schemas import EvalResult, GroupMetrics

GroupId = tuple[int, Optional[int]]  # (y, attr), attr None when there are no groups


def group_ids(y: Sequence[int], attr: Optional[Sequence[Optional[int]]] = None) -> list[GroupId]:
    """The group of each sample: (y, attr), or (y, None) when `attr` is None."""
    y = [int(v) for v in y]
    if attr is None:
        return [(v, None) for v in y]
    if len(attr) != len(y):
        raise ValueError(f"attr has {len(attr)} values for {len(y)} labels")
    if any(a is None for a in attr):
        raise DataError("some samples have no attribute value: groups need one for every sample")
    return [(v, int(a)) for v, a in zip(y, attr)]


def count_groups(y: Sequence[int], attr: Optional[Sequence[Optional[int]]] = None) -> dict[GroupId, int]:
    """Samples per group, e.g. of the training split for `train_group_counts`."""
    return dict(Counter(group_ids(y, attr)))


def group_key(group: GroupId, class_names: Sequence[str], attr_name: Optional[str] = None) -> str:
    """'y=<class name>,<attr_name>=<value>' or 'y=<class name>'."""
    y, a = group
    name = class_names[y] if 0 <= y < len(class_names) else str(y)
    return f"y={name}" if a is None else f"y={name},{attr_name or 'attr'}={a}"


def group_metrics(y: Sequence[int], pred: Sequence[int], attr: Optional[Sequence[Optional[int]]] = None, *,
                  class_names: Sequence[str], attr_name: Optional[str] = None,
                  train_group_counts: Optional[Mapping[GroupId, int]] = None, split: str = "test") -> EvalResult:
    """Accuracy per group, worst-group accuracy, plain average (over samples) and the average weighted by
    training-group shares. Without `train_group_counts` the weights are the evaluated split's own shares
    (so the weighted average equals the plain one). A training group absent from the split raises DataError."""
    # 1. check inputs
    y_arr, pred_arr = np.asarray(y, dtype=np.int64).ravel(), np.asarray(pred, dtype=np.int64).ravel()
    if y_arr.shape != pred_arr.shape:
        raise ValueError(f"{len(y_arr)} labels but {len(pred_arr)} predictions")
    if len(y_arr) == 0:
        raise DataError(f"split {split!r} has no samples to evaluate")
    ids = group_ids(y_arr.tolist(), attr)
    counts = Counter(ids)
    if train_group_counts is not None:
        train_group_counts = {(int(g[0]), None if g[1] is None else int(g[1])): int(n)
                              for g, n in train_group_counts.items() if n > 0}
        if any((g[1] is None) != (attr is None) for g in train_group_counts):
            raise ValueError("train_group_counts and attr disagree on whether there are groups")
        absent = sorted((g for g in train_group_counts if g not in counts), key=_order)
        if absent:
            raise DataError(f"group {group_key(absent[0], class_names, attr_name)} has training samples but none "
                            f"in split {split!r}: its accuracy is undefined")
    weights = dict(train_group_counts) if train_group_counts else dict(counts)
    total_weight = sum(weights.values())
    # 2. per-group accuracy
    correct_mask = y_arr == pred_arr
    correct: Counter = Counter(g for g, ok in zip(ids, correct_mask) if ok)
    groups = []
    for g in sorted(set(counts) | set(weights), key=_order):
        n = counts[g]
        groups.append(GroupMetrics(key=group_key(g, class_names, attr_name), y=g[0], attr=g[1], n=n,
                                   correct=correct[g], accuracy=correct[g] / n,
                                   train_fraction=(train_group_counts.get(g, 0) / total_weight
                                                   if train_group_counts else None)))
    # 3. summaries
    worst = min(groups, key=lambda m: m.accuracy)
    weighted = sum(weights.get((m.y, m.attr), 0) / total_weight * m.accuracy for m in groups)
    return EvalResult(split=split, n=int(len(y_arr)), average_accuracy=float(correct_mask.mean()),
                      worst_group_accuracy=worst.accuracy, weighted_average_accuracy=float(weighted),
                      worst_group=worst.key, groups=groups, attr_name=attr_name if attr is not None else None,
                      class_names=list(class_names))


def _order(g: GroupId) -> tuple[int, int]:
    return (g[0], -1 if g[1] is None else g[1])

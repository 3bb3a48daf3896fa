"""Evaluate a classifier on a dataset split: group metrics with training-group weights."""

from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np
from rich.console import Console
from aspire.progress import progress_bars

from aspire.data.formats import Dataset
from aspire.data.images import load_image, min_image_side
from aspire.errors import DataError
from aspire.models.classifier import Classifier
from aspire.models.metrics import count_groups, group_metrics
from aspire.schemas import EvalResult, Sample

_console = Console(stderr=True)


def _spelling(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "", name.lower())


def check_classes(clf, dataset: Dataset) -> None:
    """The checkpoint must be one of the dataset's classes: the same number of classes, and the same names when
    the dataset names them (names differing only in case or punctuation are a warning naming both). A dataset
    without class names (labels only) must not have a label beyond the checkpoint's classes."""
    mine, theirs = list(clf.class_names), list(dataset.class_names)
    model = getattr(clf, "source", None) or "the classifier"
    unnamed = theirs == [str(i) for i in range(len(theirs))]
    if unnamed:
        if len(theirs) > len(mine):
            raise DataError(f"{dataset.source}: labels go up to {len(theirs) - 1} but {model} has {len(mine)} "
                            f"classes ({', '.join(mine)})")
        return
    if len(mine) != len(theirs):
        raise DataError(f"{model} has {len(mine)} classes ({', '.join(mine)}) but {dataset.source} names "
                        f"{len(theirs)} ({', '.join(theirs)})")
    differ = [(a, b) for a, b in zip(mine, theirs) if a != b]
    if any(_spelling(a) != _spelling(b) for a, b in differ):
        a, b = next((a, b) for a, b in differ if _spelling(a) != _spelling(b))
        raise DataError(f"{model}: class {mine.index(a)} is {a!r} but {dataset.source}'s is {b!r}: the "
                        f"checkpoint was trained on other classes or in another order")
    if differ:
        _console.print("warning: class names differ in spelling only, matched by index: " +
                       ", ".join(f"{a!r} (checkpoint) = {b!r} (dataset)" for a, b in differ),
                       highlight=False, soft_wrap=True)


def check_labels(clf: Classifier, samples: Sequence[Sample]) -> None:
    """Every label must index one of the classifier's outputs."""
    for s in samples:
        if not 0 <= s.y < clf.num_classes:
            raise DataError(f"{s.path}: label {s.y} out of range: the classifier has {clf.num_classes} classes "
                            f"({', '.join(clf.class_names)})")


def predict_samples(clf: Classifier, samples: Sequence[Sample], batch_size: int = 128,
                    progress: bool = False) -> np.ndarray:
    """Class probabilities (N, C) for samples, loading images one batch at a time."""
    chunks = []
    with progress_bars(console=_console, enabled=progress, transient=True) as bar:
        task = bar.add_task("predicting", total=len(samples))
        for i in range(0, len(samples), batch_size):
            batch = samples[i:i + batch_size]
            images = [load_image(s.path, min_side=min_image_side(clf.input_size)) for s in batch]
            chunks.append(clf.predict_proba(images, batch_size=batch_size))
            bar.advance(task, len(batch))
    return np.concatenate(chunks) if chunks else np.zeros((0, clf.num_classes), np.float32)


def evaluate(clf: Classifier, dataset: Dataset, split: str = "test", batch_size: int = 128,
             progress: bool = False) -> EvalResult:
    """Per-group accuracy, worst-group, average and training-weighted average accuracy on one split.
    Groups are (y, attribute) when the dataset has an attribute, else the classes."""
    # 1. check inputs
    samples = dataset.split(split)
    check_classes(clf, dataset)
    check_labels(clf, samples)
    # 2. predict
    probs = predict_samples(clf, samples, batch_size, progress)  # (N, C)
    # 3. metrics, weighted by the training split's group shares when there is one
    use_groups = dataset.has_groups
    attr: Optional[list[Optional[int]]] = [s.attr for s in samples] if use_groups else None
    train = dataset.split("train", allow_empty=True)
    train_counts = count_groups([s.y for s in train], [s.attr for s in train] if use_groups else None) if train else None
    return group_metrics([s.y for s in samples], probs.argmax(1), attr, class_names=clf.class_names,
                         attr_name=dataset.attr_name if use_groups else None,
                         train_group_counts=train_counts, split=split)

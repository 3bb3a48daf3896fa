"""DFR's last layer (Kirichenko et al. 2023; the method is described in methods.py): features of a frozen model, an
L1 logistic regression tuned on half of a group-balanced validation split and refit on balanced subsamples of all of
it, written back into the classifier's head so the result is an ordinary checkpoint.

    fit = fit_last_layer(x_val, y_val, g_val, num_classes=K, ...)   then  write_head(clf, fit)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from aspire.errors import DataError
from aspire.models.classifier import Classifier
from aspire.models.train import ResizedImages, should_cache
from aspire.schemas import Sample

DFR_C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
DFR_CLASS_WEIGHTS = (1.0, 2.0, 3.0, 10.0, 100.0)


@dataclass
class LastLayerFit:
    """A DFR last layer on raw features (standardisation folded in): logits = features @ weight.T + bias."""

    weight: np.ndarray  # (K, D)
    bias: np.ndarray    # (K,)
    c: float
    class_weight: tuple[float, ...]
    tune_worst_group_accuracy: float
    grid: list[dict[str, Any]]
    n_train_per_refit: int
    n_extra: int
    refits: int

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (x @ self.weight.T + self.bias).argmax(1)

    def summary(self) -> dict[str, Any]:
        return {"c": self.c, "class_weight": list(self.class_weight),
                "tune_worst_group_accuracy": self.tune_worst_group_accuracy, "refits": self.refits,
                "n_train_per_refit": self.n_train_per_refit, "n_extra": self.n_extra,
                "nonzero_features": int((np.abs(self.weight) > 0).any(0).sum()), "grid": self.grid}


def class_weight_grid(num_classes: int, weights: Sequence[float] = DFR_CLASS_WEIGHTS) -> list[tuple[float, ...]]:
    """Uniform weights, then each class in turn weighted w (others 1) for every w != 1 (binary: DFR's grid)."""
    grid = [tuple([1.0] * num_classes)]
    for c in reversed(range(num_classes)):  # binary: {0:1,1:w} first, as in the DFR code
        for w in weights:
            if float(w) != 1.0:
                grid.append(tuple(float(w) if k == c else 1.0 for k in range(num_classes)))
    return grid


def _logreg(c: float):
    """L1 logistic regression with liblinear (sklearn >= 1.8 spells the L1 penalty l1_ratio=1)."""
    import sklearn
    from sklearn.linear_model import LogisticRegression

    major, minor = (int(v) for v in sklearn.__version__.split(".")[:2])
    if (major, minor) >= (1, 8):
        return LogisticRegression(C=c, l1_ratio=1.0, solver="liblinear")
    return LogisticRegression(C=c, penalty="l1", solver="liblinear")


def _fit_logreg(x: np.ndarray, y: np.ndarray, c: float, class_weight: Sequence[float],
                num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(coef (K, D), intercept (K,)) of an L1 logistic regression; K = 1 for two classes (logit of class 1),
    else one-vs-rest. Class weights enter as sample weights."""
    from sklearn.exceptions import ConvergenceWarning

    sw = np.asarray(class_weight, dtype=np.float64)[y]
    targets = [y] if num_classes == 2 else [(y == k).astype(np.int64) for k in range(num_classes)]
    coefs, intercepts = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for t in targets:
            m = _logreg(c).fit(x, t, sample_weight=sw)
            coefs.append(m.coef_[0])
            intercepts.append(m.intercept_[0])
    return np.stack(coefs), np.asarray(intercepts)


def _predict(coef: np.ndarray, intercept: np.ndarray, x: np.ndarray) -> np.ndarray:
    scores = x @ coef.T + intercept  # (N, K)
    return (scores[:, 0] > 0).astype(np.int64) if coef.shape[0] == 1 else scores.argmax(1)


def _balanced(by_group: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Indices of a group-balanced subset: each group cut at random to the smallest group's size."""
    smallest = min(len(g) for g in by_group)
    return np.concatenate([rng.choice(g, smallest, replace=False) for g in by_group])


def _standardise(fit_on: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = fit_on.mean(0), fit_on.std(0)
    return mean, np.where(std > 0, std, 1.0)  # zero-variance features stay as they are (sklearn's rule)


def fit_last_layer(x_val: np.ndarray, y_val: Sequence[int], g_val: Sequence[int], *, num_classes: int,
                   x_extra: Optional[np.ndarray] = None, y_extra: Optional[Sequence[int]] = None,
                   c_grid: Sequence[float] = DFR_C_GRID, class_weights: Sequence[float] = DFR_CLASS_WEIGHTS,
                   refits: int = 10, seed: int = 0) -> LastLayerFit:
    """DFR's last layer: tune (C, class weight) by worst-group accuracy, then refit and average.

    x_val (N, D) features of the held-out (validation) set with labels y_val and group ids g_val;
    x_extra (M, D), y_extra: features that join every training set (augmented images) but never the score."""
    # 1. check inputs
    x_val, y_val, g_val = np.asarray(x_val, np.float64), np.asarray(y_val, np.int64), np.asarray(g_val, np.int64)
    if x_val.ndim != 2 or len(x_val) != len(y_val) or len(y_val) != len(g_val):
        raise ValueError(f"x_val {x_val.shape}, y_val ({len(y_val)},) and g_val ({len(g_val)},) disagree")
    x_extra = np.zeros((0, x_val.shape[1])) if x_extra is None else np.asarray(x_extra, np.float64)
    y_extra = np.zeros(0, np.int64) if y_extra is None else np.asarray(y_extra, np.int64)
    if x_extra.shape[1:] != x_val.shape[1:] or len(x_extra) != len(y_extra):
        raise ValueError(f"x_extra {x_extra.shape} and y_extra ({len(y_extra)},) do not match x_val {x_val.shape}")
    absent = sorted(set(range(num_classes)) - set(y_val.tolist()))
    if absent:
        raise DataError(f"DFR: class {absent[0]} has no validation images to fit the last layer on")
    by_group = [np.flatnonzero(g_val == g) for g in np.unique(g_val)]
    if min(len(g) for g in by_group) < 2:
        raise DataError("DFR: every validation group needs at least 2 images (one to fit on, one to tune on)")
    rng = np.random.default_rng(seed)

    # 2. tune: fit on a balanced subset of one half of each group, score worst-group accuracy on the other
    halves = [rng.permutation(g) for g in by_group]
    fit_groups, score_groups = [h[len(h) // 2:] for h in halves], [h[:len(h) // 2] for h in halves]
    fit_idx, score_idx = _balanced(fit_groups, rng), np.concatenate(score_groups)
    x_fit = np.concatenate([x_val[fit_idx], x_extra])
    y_fit = np.concatenate([y_val[fit_idx], y_extra])
    mean, std = _standardise(x_fit)
    x_fit, x_score = (x_fit - mean) / std, (x_val[score_idx] - mean) / std
    grid, best = [], None
    for c in c_grid:
        for cw in class_weight_grid(num_classes, class_weights):
            coef, intercept = _fit_logreg(x_fit, y_fit, float(c), cw, num_classes)
            correct = _predict(coef, intercept, x_score) == y_val[score_idx]
            worst = min(float(correct[g_val[score_idx] == g].mean()) for g in np.unique(g_val[score_idx]))
            grid.append({"c": float(c), "class_weight": list(cw), "worst_group_accuracy": worst})
            if best is None or worst > best[0]:
                best = (worst, float(c), cw)
    assert best is not None
    tuned, c_best, cw_best = best

    # 3. refit on group-balanced subsamples of all of validation (+ extra), average the coefficients
    pool = np.concatenate([x_val, x_extra])
    mean, std = _standardise(pool)
    coefs, intercepts = [], []
    for _ in range(refits):
        idx = _balanced(by_group, rng)
        x_fit = (np.concatenate([x_val[idx], x_extra]) - mean) / std
        coef, intercept = _fit_logreg(x_fit, np.concatenate([y_val[idx], y_extra]), c_best, cw_best, num_classes)
        coefs.append(coef)
        intercepts.append(intercept)
    coef, intercept = np.mean(coefs, 0), np.mean(intercepts, 0)  # (K', D), (K',)

    # 4. fold the standardisation in: (x - mean) / std @ w + b = x @ (w / std) + (b - (mean / std) @ w)
    weight, bias = coef / std, intercept - coef @ (mean / std)
    if num_classes == 2:  # logit z of class 1 -> logits (-z/2, z/2): softmax gives sigmoid(z) for class 1
        weight, bias = np.concatenate([-weight / 2, weight / 2]), np.concatenate([-bias / 2, bias / 2])
    return LastLayerFit(weight=weight, bias=bias, c=c_best, class_weight=tuple(cw_best),
                        tune_worst_group_accuracy=tuned, grid=grid,
                        n_train_per_refit=len(by_group) * min(len(g) for g in by_group) + len(x_extra),
                        n_extra=len(x_extra), refits=refits)


@torch.no_grad()
def extract_features(clf: Classifier, samples: Sequence[Sample], *, batch_size: int = 128,
                     device: Optional[str] = None) -> np.ndarray:
    """Backbone features (N, D) float32 of samples (resized, normalised, no crop/flip), in order."""
    from aspire.devices import pick_device

    clf.to(pick_device(device)).eval()
    data = ResizedImages(samples, clf.input_size, cache=should_cache(len(samples), clf.input_size))
    chunks = [clf.features(clf.normalize(x)).float().cpu() for x, _, _, _ in DataLoader(data, batch_size=batch_size)]
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, clf.feature_dim), np.float32)


def write_head(clf: Classifier, fit: LastLayerFit) -> None:
    """Replace clf.head's weights with the fitted last layer."""
    if fit.weight.shape != tuple(clf.head.weight.shape):
        raise ValueError(f"last layer {fit.weight.shape} does not fit the head {tuple(clf.head.weight.shape)}")
    with torch.no_grad():
        clf.head.weight.copy_(torch.as_tensor(fit.weight, dtype=clf.head.weight.dtype))
        clf.head.bias.copy_(torch.as_tensor(fit.bias, dtype=clf.head.bias.dtype))

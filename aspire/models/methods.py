"""Retraining methods (DESIGN §2 step 6): ERM, GroupDRO, JTT, DFR and SUBG, each with an optional augmented set.

One entry point, `train_with_method`; every method ends in an ordinary `Classifier` whose `train_info` records
the method, its settings and the augmentation (dir, images available, images added, ratio).

Methods and settings (defaults here; the papers' Waterbirds values in brackets):
- erm       cross-entropy on the training split (+ augmented images); selection by validation average
            accuracy, no group labels.
- groupdro  Sagawa et al. 2020, online GroupDRO: per batch, the mean loss of each group g; weights
            q_g <- q_g * exp(eta * (loss_g + C / sqrt(n_g))), renormalised; the loss is sum_g q_g loss_g.
            eta 0.01 [0.01], C (`adjustment`) 0 [0; 1-4 in their generalisation study]; group-balanced
            sampling of the batches, as the authors' released commands do (`--reweight_groups`). Needs
            group labels on train and val; selection by validation worst-group accuracy.
            Synthetic images (no attribute) form one extra group per class, (y, synthetic): their loss is
            tracked and up-weighted like any group's, and the real groups' losses stay real-image losses
            (folding them into a "minority" group would assume which attribute value they lack).
- jtt       Liu et al. 2021: stage 1 trains ERM for T epochs at a constant learning rate (the released code
            has no schedule) and keeps the last epoch; the error set is the training images it gets
            wrong (predicted without crop/flip); stage 2 trains a new model from the same initialisation
            on the training set with every error-set image appearing lambda times (the paper's objective
            lambda * sum_error + sum_rest; the released code appends lambda extra copies, lambda + 1 in
            all). T 2, lambda 20 for CPU toy runs (smallcnn learns the majority rule within ~2 epochs);
            [Waterbirds T 60, lambda 100; CelebA T 1, lambda 50]. Group labels only for selection on
            validation (worst-group). Synthetic images join the training set in both stages (and the
            error set when stage 1 gets them wrong).
- dfr       Kirichenko et al. 2023, DFR on validation: the feature extractor of an ERM model is frozen
            (`--init MODEL.pt`, else ERM is trained first on the real training split, the model being
            repaired); features are standardised; an L1 logistic regression (liblinear) is fit on a
            group-balanced subset of the validation split. Grid: C in {1, 0.7, 0.3, 0.1, 0.07, 0.03,
            0.01} x class weights {1:1} and, per class in turn, that class weighted 2, 3, 10 or 100 (binary:
            {0:1,1:w} and {0:w,1:1}, the DFR code's form; K classes: 1 + 4K options, one-vs-rest fits).
            Tuning: validation is split in half within each group (the DFR code splits at random); fit on
            the balanced first half, score worst-group accuracy on the second; ties keep the earlier
            config. Refit: `refits` (10) [20] group-balanced subsamples of all of validation with the chosen
            config, coefficients averaged. The standardisation is folded into the weights, written into
            `clf.head` (binary: logits [-z/2, z/2], softmax = the logistic model), so the result is an
            ordinary checkpoint. Augmented images' features join every last-layer training set (ASPIRE's
            "group-balanced subset + augmented features"), never the tuning score, as one extra group per
            class, (y, synthetic), of the balanced groups' size (a seeded subsample): hundreds of generated
            images of one class would otherwise outweigh the real groups that DFR balances.
- subg      Idrissi et al. 2022: every (class, attribute) group of the training split subsampled at random
            to the smallest group's size, then ERM; selection by validation worst-group accuracy.
            Synthetic images are added after the subsampling.

The augmented set (`aspire train --augment AUGDIR --augment-ratio R`) is mixed in with
`aspire.data.augmented.mix_in(samples, augmented, ratio, seed)`: ratio None (default) adds every generated
image, as the paper does; R adds min(all, round(R x n)) of them drawn by the seed, n the size of the set
they join: the training split (erm, groupdro, jtt), the group-balanced subsample (subg), or the
group-balanced validation subset whose features train DFR's last layer.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from aspire.data.formats import Dataset
from aspire.errors import ConfigError, DataError
from aspire.models.classifier import Classifier
from aspire.models.dfr import DFR_C_GRID, DFR_CLASS_WEIGHTS, extract_features, fit_last_layer, write_head
from aspire.models.metrics import group_key
from aspire.models.train import ResizedImages, predict_loader, should_cache, train_classifier
from aspire.schemas import Sample

METHODS = ("erm", "groupdro", "jtt", "dfr", "subg")
GROUP_METHODS = ("groupdro", "jtt", "dfr", "subg")  # need (class, attribute) groups


# ---------------------------------------------------------------- settings
@dataclass(frozen=True)
class OptimSettings:
    """How the network is optimised (every method that trains one)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int = 0
    crop_flip: bool = True
    device: Optional[str] = None
    progress: bool = True
    schedule: str = "cosine"


@dataclass(frozen=True)
class MethodSettings:
    """The methods' own settings; see the module docstring for the papers' values."""

    groupdro_eta: float = 0.01
    groupdro_adjustment: float = 0.0
    groupdro_balanced: bool = True
    jtt_epochs: int = 2
    jtt_upweight: int = 20
    dfr_c_grid: tuple[float, ...] = DFR_C_GRID
    dfr_class_weights: tuple[float, ...] = DFR_CLASS_WEIGHTS
    dfr_refits: int = 10

    def __post_init__(self) -> None:
        if self.groupdro_eta <= 0 or self.groupdro_adjustment < 0:
            raise ConfigError(f"GroupDRO needs eta > 0 and adjustment >= 0 (got {self.groupdro_eta}, "
                              f"{self.groupdro_adjustment})")
        if self.jtt_epochs < 1 or self.jtt_upweight < 1:
            raise ConfigError(f"JTT needs T >= 1 epochs and lambda >= 1 (got {self.jtt_epochs}, {self.jtt_upweight})")
        if not self.dfr_c_grid or any(c <= 0 for c in self.dfr_c_grid) or self.dfr_refits < 1 or \
                not self.dfr_class_weights or any(w <= 0 for w in self.dfr_class_weights):
            raise ConfigError("DFR needs positive C values and class weights and at least 1 refit")


@dataclass(frozen=True)
class Augmentation:
    """Generated training images (synthetic=True, split train, attr None) and how many of them to add."""

    augdir: str
    samples: list[Sample] = field(default_factory=list)
    ratio: Optional[float] = None


# ---------------------------------------------------------------- groups
def group_table(samples: Sequence[Sample], class_names: Sequence[str],
                attr_name: Optional[str]) -> tuple[list[int], list[str]]:
    """The group index of each sample and the group names. Real groups are (y, attr), sorted; a synthetic
    sample without an attribute goes to its class's synthetic group (y, synthetic), numbered after them."""
    real = sorted({(s.y, s.attr) for s in samples if s.attr is not None})
    synthetic = sorted({s.y for s in samples if s.attr is None and s.synthetic})
    missing = [s for s in samples if s.attr is None and not s.synthetic]
    if missing:
        raise DataError(f"{missing[0].path}: no group attribute ({attr_name or 'none'}): groups need one per real image")
    index = {g: i for i, g in enumerate(real)}
    index.update({(y, None): len(real) + i for i, y in enumerate(synthetic)})
    names = [group_key(g, class_names, attr_name) for g in real] + \
            [f"{group_key((y, None), class_names)},synthetic" for y in synthetic]
    return [index[(s.y, s.attr)] for s in samples], names


def require_groups(method: str, dataset: Dataset) -> None:
    """A one-line error when a group method runs on a dataset without group labels."""
    if not dataset.has_groups:
        what = f"attribute column {dataset.attr_name!r}" if dataset.attr_name else "a group attribute"
        raise DataError(f"--method {method} needs group labels, and {dataset.source} has no {what} for every "
                        f"image; pass --attr COLUMN or use --method erm")


# ---------------------------------------------------------------- GroupDRO
class GroupDROLoss:
    """Online GroupDRO (Sagawa et al. 2020, Algorithm 1): a `loss_fn` for train_classifier.

    `group_of[i]` is the group of training sample i; `group_counts` the training samples per group (for the
    adjustment C / sqrt(n_g)). `q` holds the current group weights (sums to 1)."""

    def __init__(self, group_of: Sequence[int], group_counts: Sequence[int], *, eta: float = 0.01,
                 adjustment: float = 0.0):
        self.group_of = torch.as_tensor(list(group_of), dtype=torch.long)  # (N,)
        counts = torch.as_tensor(list(group_counts), dtype=torch.float)   # (G,)
        if len(counts) == 0 or (counts <= 0).any():
            raise ConfigError(f"GroupDRO needs a positive count for every group, got {counts.tolist()}")
        self.n_groups, self.eta = len(counts), float(eta)
        self.adjust = float(adjustment) / counts.sqrt()                    # (G,)
        self.q = torch.full((self.n_groups,), 1.0 / self.n_groups)         # (G,)

    def group_losses(self, per_sample: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """(B,) losses, (B,) group ids -> (G,) mean loss per group; 0 for a group absent from the batch."""
        one_hot = F.one_hot(groups, self.n_groups).to(per_sample.dtype)   # (B, G)
        counts = one_hot.sum(0)                                            # (G,)
        return (one_hot * per_sample[:, None]).sum(0) / counts.clamp(min=1)

    @torch.no_grad()
    def update(self, group_loss: torch.Tensor) -> torch.Tensor:
        """q <- q * exp(eta * (loss_g + C / sqrt(n_g))), renormalised; returns the new q."""
        q = self.q.to(group_loss.device) * torch.exp(self.eta * (group_loss.detach() + self.adjust.to(group_loss.device)))
        self.q = q / q.sum()
        return self.q

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, attr: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        per_sample = F.cross_entropy(logits, y, reduction="none")          # (B,)
        group_loss = self.group_losses(per_sample, self.group_of.to(index.device)[index])  # (G,)
        q = self.update(group_loss)
        return group_loss @ q


# ---------------------------------------------------------------- JTT and SUBG sample lists
def jtt_upsample(n: int, errors: Sequence[int], upweight: int) -> list[int]:
    """Indices of the stage-2 training set: every sample once, each error-set sample `upweight` times in all."""
    if upweight < 1:
        raise ConfigError(f"JTT upweight lambda must be >= 1, got {upweight}")
    bad = [i for i in errors if not 0 <= i < n]
    if bad:
        raise ValueError(f"error-set index {bad[0]} out of range for {n} samples")
    return list(range(n)) + sorted(errors) * (upweight - 1)


def subsample_groups(samples: Sequence[Sample], seed: int) -> list[Sample]:
    """SUBG: every (y, attr) group cut to the smallest group's size, at random without replacement; the
    kept samples stay in their original order."""
    by_group: dict[tuple[int, Optional[int]], list[int]] = {}
    for i, s in enumerate(samples):
        if s.attr is None:
            raise DataError(f"{s.path}: no group attribute: SUBG needs one for every training image")
        by_group.setdefault((s.y, s.attr), []).append(i)
    if not by_group:
        raise DataError("no training samples to subsample")
    smallest = min(len(v) for v in by_group.values())
    rng = np.random.default_rng(seed)
    keep = sorted(int(i) for g in sorted(by_group) for i in rng.choice(by_group[g], smallest, replace=False))
    return [samples[i] for i in keep]


# ---------------------------------------------------------------- the methods
def _mix(samples: list[Sample], augmentation: Optional[Augmentation], seed: int) -> tuple[list[Sample], dict[str, Any]]:
    """samples + the augmented images (as mix_in picks them), and the record of what was added."""
    if augmentation is None:
        return samples, {}
    from aspire.data.augmented import mix_in

    mixed = list(mix_in(samples, augmentation.samples, augmentation.ratio, seed))
    return mixed, {"augmentation": {"dir": augmentation.augdir, "n_available": len(augmentation.samples),
                                    "n_added": len(mixed) - len(samples), "ratio": augmentation.ratio}}


def _train(clf: Classifier, train: list[Sample], val: list[Sample], optim: OptimSettings, method: str, **kw) -> dict:
    return train_classifier(clf, train, val, epochs=kw.pop("epochs", optim.epochs), batch_size=optim.batch_size,
                            lr=optim.lr, weight_decay=optim.weight_decay, seed=optim.seed, augment=optim.crop_flip,
                            device=optim.device, progress=optim.progress,
                            schedule=kw.pop("schedule", optim.schedule), method=method, **kw)


def train_with_method(method: str, dataset: Dataset, build: Callable[[], Classifier], optim: OptimSettings,
                      settings: MethodSettings = MethodSettings(), *, augmentation: Optional[Augmentation] = None,
                      init: Optional[Classifier] = None) -> Classifier:
    """Train with `method` on dataset's train split (+ augmentation), selecting on its val split; returns the
    trained classifier (train_info records everything). `build` makes a fresh classifier (JTT's two stages,
    DFR without `init`); `init` is DFR's existing model."""
    # 1. check inputs
    method = method.lower()
    if method not in METHODS:
        raise ConfigError(f"unknown --method {method!r}: expected one of {', '.join(METHODS)}")
    if init is not None and method != "dfr":
        raise ConfigError(f"--init is for --method dfr (a last layer retrained on a frozen model), not {method}")
    if method in GROUP_METHODS:
        require_groups(method, dataset)
    train, val = dataset.split("train"), dataset.split("val", allow_empty=True)
    if method in GROUP_METHODS and not val:
        raise DataError(f"--method {method} needs a validation split with group labels ({dataset.source} has none)")
    started = time.time()
    # 2. run the method
    if method == "erm":
        clf = _erm(train, val, build, optim, augmentation)
    elif method == "groupdro":
        clf = _groupdro(dataset, train, val, build, optim, settings, augmentation)
    elif method == "jtt":
        clf = _jtt(dataset, train, val, build, optim, settings, augmentation)
    elif method == "subg":
        clf = _subg(train, val, build, optim, augmentation)
    else:
        clf = _dfr(dataset, val, build, optim, settings, augmentation, init)
    clf.train_info["method"] = method
    clf.train_info["total_seconds"] = round(time.time() - started, 3)
    return clf


def _erm(train, val, build, optim, augmentation) -> Classifier:
    samples, aug_info = _mix(train, augmentation, optim.seed)
    clf = build()
    _train(clf, samples, val, optim, "erm")
    clf.train_info.update(aug_info)
    return clf


def _groupdro(dataset, train, val, build, optim, settings, augmentation) -> Classifier:
    samples, aug_info = _mix(train, augmentation, optim.seed)
    group_of, names = group_table(samples, dataset.class_names, dataset.attr_name)
    counts = np.bincount(group_of, minlength=len(names))
    loss = GroupDROLoss(group_of, counts.tolist(), eta=settings.groupdro_eta, adjustment=settings.groupdro_adjustment)
    weights = (1.0 / counts[group_of]).tolist() if settings.groupdro_balanced else None
    clf = build()
    _train(clf, samples, val, optim, "groupdro", loss_fn=loss, select_by="worst_group", sample_weights=weights)
    clf.train_info.update(aug_info)
    clf.train_info["groupdro"] = {"eta": settings.groupdro_eta, "adjustment": settings.groupdro_adjustment,
                                  "group_balanced_sampling": settings.groupdro_balanced,
                                  "groups": {n: {"n": int(c), "final_weight": float(q)}
                                             for n, c, q in zip(names, counts, loss.q.cpu().tolist())}}
    return clf


def _jtt(dataset, train, val, build, optim, settings, augmentation) -> Classifier:
    # 1. stage 1: ERM for T epochs at a constant learning rate, the last epoch kept (no validation)
    samples, aug_info = _mix(train, augmentation, optim.seed)
    stage1 = build()
    first = _train(stage1, samples, [], optim, "jtt-stage1", epochs=settings.jtt_epochs, schedule="constant")
    # 2. the error set: training images stage 1 gets wrong, predicted without crop/flip
    data = ResizedImages(samples, stage1.input_size, cache=should_cache(len(samples), stage1.input_size))
    pred = predict_loader(stage1, DataLoader(data, batch_size=max(optim.batch_size, 128)))
    errors = [i for i, (s, p) in enumerate(zip(samples, pred.tolist())) if s.y != p]
    del stage1, data
    # 3. stage 2: a new model on the upsampled set, selected by validation worst-group accuracy
    upsampled = [samples[i] for i in jtt_upsample(len(samples), errors, settings.jtt_upweight)]
    clf = build()
    _train(clf, upsampled, val, optim, "jtt", select_by="worst_group")
    group_of, names = group_table(samples, dataset.class_names, dataset.attr_name)
    clf.train_info.update(aug_info)
    clf.train_info["jtt"] = {"stage1_epochs": settings.jtt_epochs, "upweight": settings.jtt_upweight,
                             "n_errors": len(errors), "stage1_seconds": first["seconds"],
                             "errors_per_group": {names[g]: n for g, n in sorted(Counter(group_of[i] for i in errors).items())},
                             "n_per_group": {names[g]: n for g, n in sorted(Counter(group_of).items())}}
    return clf


def _subg(train, val, build, optim, augmentation) -> Classifier:
    real = [s for s in train if s.attr is not None]
    subsample = subsample_groups(real, optim.seed)
    samples, aug_info = _mix(subsample, augmentation, optim.seed)
    clf = build()
    _train(clf, samples, val, optim, "subg", select_by="worst_group")
    clf.train_info.update(aug_info)
    clf.train_info["subg"] = {"n_before": len(real), "n_subsample": len(subsample),
                              "group_size": len(subsample) // max(1, len({(s.y, s.attr) for s in subsample}))}
    return clf


def cap_per_class(samples: list[Sample], cap: int, seed: int) -> list[Sample]:
    """At most `cap` samples of each class, drawn by `seed` (kept in their order)."""
    by_class: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_class.setdefault(s.y, []).append(i)
    rng = np.random.default_rng(seed)
    keep = [i for idx in by_class.values() for i in (idx if len(idx) <= cap else rng.choice(idx, cap, replace=False))]
    return [samples[i] for i in sorted(keep)]


def _dfr(dataset, val, build, optim, settings, augmentation, init) -> Classifier:
    # 1. the frozen model: --init, else ERM on the real training split
    if init is None:
        clf = build()
        _train(clf, dataset.split("train"), val, optim, "erm")
    else:
        clf = init
        if clf.num_classes != dataset.num_classes:
            raise ConfigError(f"--init model has {clf.num_classes} classes ({', '.join(clf.class_names)}), the "
                              f"dataset {dataset.num_classes} ({', '.join(dataset.class_names)})")
    base_info = dict(clf.train_info)
    started = time.time()
    # 2. features of validation (+ the augmented images, as mix_in picks them for the balanced set size)
    x_val = extract_features(clf, val, device=optim.device)  # (N, D)
    g_val, names = group_table(val, dataset.class_names, dataset.attr_name)
    x_extra, y_extra, aug_info = None, None, {}
    if augmentation is not None:
        counts = Counter(g_val)
        group_size = min(counts.values())
        balanced = [s for g in sorted(counts) for s in [v for v, gv in zip(val, g_val) if gv == g][:group_size]]
        mixed, aug_info = _mix(balanced, augmentation, optim.seed)
        generated = [s for s in mixed if s.attr is None]  # validation images all have one (require_groups)
        chosen = cap_per_class(generated, group_size, optim.seed)
        aug_info["augmentation"].update(n_added=len(chosen), per_class_cap=group_size)
        x_extra, y_extra = extract_features(clf, chosen, device=optim.device), [s.y for s in chosen]
    # 3. fit the last layer and write it into the head
    fit = fit_last_layer(x_val, [s.y for s in val], g_val, num_classes=clf.num_classes, x_extra=x_extra,
                         y_extra=y_extra, c_grid=settings.dfr_c_grid, class_weights=settings.dfr_class_weights,
                         refits=settings.dfr_refits, seed=optim.seed)
    write_head(clf, fit)
    clf.eval()
    clf.train_info = {"method": "dfr", "seed": optim.seed, "base": base_info, **aug_info,
                      "dfr": {**fit.summary(), "n_val": len(val), "val_groups": names,
                              "seconds": round(time.time() - started, 3)}}
    return clf


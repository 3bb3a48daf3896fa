"""Training a classifier: SGD with momentum, a cosine or step schedule, model selection on validation.

`train_classifier` is method-agnostic: ERM is the default cross-entropy loss with selection by validation
average accuracy (no group labels). Group-robust methods plug in through `loss_fn` (GroupDRO's group
losses, JTT's upweighting), `select_by="worst_group"` (selection with validation group labels) and the
samples passed in (SUBG's subsampling, JTT's upsampled error set, augmented images).

Images are decoded and resized once (uint8, in memory when the split is small), then augmented and
normalised per batch on the training device. Deterministic given `seed` (on a GPU with cuDNN's deterministic
kernels).
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from aspire.data.images import load_image, min_image_side
from aspire.devices import deterministic_cudnn, pick_device
from aspire.errors import ConfigError, DataError
from aspire.models.classifier import Classifier, resize_to_uint8
from aspire.progress import progress_bars
from aspire.schemas import Sample

CACHE_MAX_IMAGES = 20_000
CACHE_MAX_BYTES = 4 * 1024**3
SCHEDULES = ("cosine", "step", "constant")
SELECT_BY = ("average", "worst_group")

# loss_fn(logits (B, C), y (B,), attr (B,) with -1 where unknown, index (B,) into train_samples) -> scalar
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_console = Console(stderr=True)


# ---------------------------------------------------------------- data
class ResizedImages(torch.utils.data.Dataset):
    """Samples as (uint8 image (3, S, S), y, attr or -1, index); decoded once into memory when `cache`."""

    def __init__(self, samples: Sequence[Sample], size: int, *, cache: bool, progress: Optional[Progress] = None,
                 label: str = "images"):
        self.samples, self.size = list(samples), size
        self.y = torch.tensor([s.y for s in self.samples], dtype=torch.long)
        self.attr = torch.tensor([-1 if s.attr is None else s.attr for s in self.samples], dtype=torch.long)
        self.images: Optional[torch.Tensor] = None  # (N, 3, S, S) uint8 when cached
        if cache and self.samples:
            task = progress.add_task(f"loading {label}", total=len(self.samples), info="") if progress else None
            out = torch.empty(len(self.samples), 3, size, size, dtype=torch.uint8)
            try:
                with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
                    for i, img in enumerate(pool.map(self._load, range(len(self.samples)))):
                        out[i] = img
                        if task is not None:
                            progress.advance(task)
            finally:
                if task is not None:
                    progress.remove_task(task)
            self.images = out

    def _load(self, i: int) -> torch.Tensor:
        return resize_to_uint8(load_image(self.samples[i].path, min_side=min_image_side(self.size)), self.size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        img = self.images[i] if self.images is not None else self._load(i)
        return img, self.y[i], self.attr[i], i


def should_cache(n_images: int, size: int) -> bool:
    return n_images <= CACHE_MAX_IMAGES and n_images * 3 * size * size <= CACHE_MAX_BYTES


def augment_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random resized crop (70-100% of the area, aspect 3/4-4/3) and horizontal flip.
    uint8 (N, 3, S, S) -> float (N, 3, S, S) in 0..1, on x's device."""
    n, _, s, _ = x.shape
    r = torch.rand(n, 5, generator=gen).tolist()  # area, log-aspect, x0, y0, flip
    out = torch.empty(n, 3, s, s, device=x.device)
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    for i, (ra, rr, rx, ry, rf) in enumerate(r):
        area, aspect = s * s * (0.7 + 0.3 * ra), math.exp(lo + (hi - lo) * rr)
        w = max(1, min(s, round(math.sqrt(area * aspect))))
        h = max(1, min(s, round(math.sqrt(area / aspect))))
        x0, y0 = min(int(rx * (s - w + 1)), s - w), min(int(ry * (s - h + 1)), s - h)
        crop = x[i:i + 1, :, y0:y0 + h, x0:x0 + w].float() / 255.0  # (1, 3, h, w)
        crop = F.interpolate(crop, size=(s, s), mode="bilinear", align_corners=False)
        out[i] = crop[0].flip(-1) if rf < 0.5 else crop[0]
    return out


def _iterate(loader: DataLoader):
    """Iterate a DataLoader; a DataError raised in a worker comes back as its own one line."""
    try:
        yield from loader
    except DataError as e:
        line = str(e).strip().splitlines()[-1]
        raise DataError(line.split("DataError: ", 1)[-1]) from None


# ---------------------------------------------------------------- evaluation on cached images
@torch.no_grad()
def predict_loader(clf: Classifier, loader: DataLoader) -> np.ndarray:
    """Predicted classes for a non-shuffled loader of ResizedImages, in order."""
    clf.eval()
    preds = [clf(clf.normalize(x)).argmax(1).cpu() for x, _, _, _ in _iterate(loader)]
    return torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)


def _accuracies(y: np.ndarray, attr: np.ndarray, pred: np.ndarray) -> tuple[float, Optional[float]]:
    """(average accuracy, worst accuracy over the (y, attr) groups present; None without attributes)."""
    correct = y == pred
    if len(y) == 0:
        return float("nan"), None
    if (attr < 0).any():
        return float(correct.mean()), None
    groups = {(a, b) for a, b in zip(y.tolist(), attr.tolist())}
    worst = min(float(correct[(y == g[0]) & (attr == g[1])].mean()) for g in groups)
    return float(correct.mean()), worst


def _schedule(name: str, total_steps: int) -> Callable[[int], float]:
    if name == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    if name == "step":  # x0.1 at half and at three quarters of training
        return lambda step: 0.1 ** ((step >= 0.5 * total_steps) + (step >= 0.75 * total_steps))
    return lambda step: 1.0


# ---------------------------------------------------------------- training
def train_classifier(
    clf: Classifier,
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    seed: int,
    augment: bool,
    device: Optional[str] = None,
    progress: bool = True,
    schedule: Literal["cosine", "step", "constant"] = "cosine",
    method: str = "erm",
    loss_fn: Optional[LossFn] = None,
    select_by: Literal["average", "worst_group"] = "average",
    sample_weights: Optional[Sequence[float]] = None,
) -> dict[str, Any]:
    """Train `clf` in place and keep the weights of the best validation epoch (by validation average
    accuracy, or worst-group accuracy with `select_by="worst_group"`; the last epoch when there is no
    validation split). `sample_weights` (one per training sample) draws each epoch's len(train_samples)
    samples with replacement in proportion to them (GroupDRO's group-balanced sampling) instead of
    shuffling. Returns the training record, also stored in `clf.train_info`."""
    # 1. check inputs
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"epochs and batch size must be >= 1 (got epochs={epochs}, batch_size={batch_size})")
    if lr <= 0 or weight_decay < 0 or not 0 <= momentum < 1:
        raise ConfigError(f"need lr > 0, weight decay >= 0, 0 <= momentum < 1 (got {lr}, {weight_decay}, {momentum})")
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if select_by not in SELECT_BY:
        raise ConfigError(f"unknown model selection {select_by!r}: expected one of {', '.join(SELECT_BY)}")
    if not train_samples:
        raise DataError("no training samples")
    for s in list(train_samples) + list(val_samples):
        if not 0 <= s.y < clf.num_classes:
            raise DataError(f"{s.path}: label {s.y} out of range: the classifier has {clf.num_classes} classes "
                            f"({', '.join(clf.class_names)})")
    if sample_weights is not None and (len(sample_weights) != len(train_samples) or min(sample_weights) < 0
                                       or sum(sample_weights) <= 0):
        raise ConfigError(f"need one non-negative sample weight per training sample, not all zero "
                          f"(got {len(sample_weights)} weights for {len(train_samples)} samples)")
    if select_by == "worst_group" and (not val_samples or any(s.attr is None for s in val_samples)):
        raise DataError("selection by worst-group accuracy needs a validation split with an attribute for every sample")

    # 2. seeds, device, data
    torch.manual_seed(seed)
    loader_gen, aug_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    dev = pick_device(device)
    clf.to(dev)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    started = time.time()
    with progress_bars(*columns, console=_console, enabled=progress) as bar, deterministic_cudnn():
        size = clf.input_size
        cache = should_cache(len(train_samples) + len(val_samples), size)
        train_set = ResizedImages(train_samples, size, cache=cache, progress=bar, label="training images")
        val_set = ResizedImages(val_samples, size, cache=cache, progress=bar, label="validation images")
        workers = 0 if cache or dev.type == "cpu" else min(8, os.cpu_count() or 1)
        sampler = None if sample_weights is None else torch.utils.data.WeightedRandomSampler(
            torch.as_tensor(sample_weights, dtype=torch.double), len(train_set), replacement=True, generator=loader_gen)
        train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                                  generator=loader_gen if sampler is None else None, num_workers=workers,
                                  drop_last=len(train_set) % batch_size == 1 and len(train_set) > 1)
        val_loader = DataLoader(val_set, batch_size=max(batch_size, 128), shuffle=False, num_workers=workers)
        val_y, val_attr = val_set.y.numpy(), val_set.attr.numpy()

        # 3. optimiser and schedule (stepped per batch)
        total_steps = epochs * len(train_loader)
        opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(schedule, total_steps))

        # 4. epochs: train, validate, keep the best
        history: list[dict[str, Any]] = []
        best: Optional[tuple[float, int, dict[str, torch.Tensor]]] = None
        epoch_task = bar.add_task("epochs", total=epochs, info="")
        batch_task = bar.add_task("batches", total=len(train_loader), info="")
        for epoch in range(1, epochs + 1):
            t0 = time.time()
            clf.train()
            bar.reset(batch_task, total=len(train_loader))
            loss_sum, n_seen, n_correct = 0.0, 0, 0
            for x, yb, ab, ib in _iterate(train_loader):  # x: (B, 3, S, S) uint8
                x, yb, ab, ib = x.to(dev), yb.to(dev), ab.to(dev), ib.to(dev)
                x = augment_batch(x, aug_gen) if augment else x
                logits = clf(clf.normalize(x))  # (B, C)
                loss = loss_fn(logits, yb, ab, ib) if loss_fn is not None else F.cross_entropy(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += float(loss.detach()) * len(yb)
                n_seen += len(yb)
                n_correct += int((logits.detach().argmax(1) == yb).sum())
                bar.update(batch_task, advance=1, info=f"loss {loss_sum / n_seen:.4f}")
            val_avg, val_worst = _accuracies(val_y, val_attr, predict_loader(clf, val_loader))
            record = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_loss": loss_sum / max(n_seen, 1),
                      "train_accuracy": n_correct / max(n_seen, 1),
                      "val_average_accuracy": None if math.isnan(val_avg) else val_avg,
                      "val_worst_group_accuracy": val_worst, "seconds": round(time.time() - t0, 3)}
            history.append(record)
            score = (val_worst if select_by == "worst_group" else val_avg) if val_samples else float(epoch)
            if best is None or score > best[0]:
                best = (score, epoch, {k: v.detach().clone() for k, v in clf.state_dict().items()})
            worst_text = "" if val_worst is None else f", val worst-group {val_worst:.3f}"
            val_text = f"val average {val_avg:.3f}{worst_text}" if val_samples else "no validation split"
            bar.update(epoch_task, advance=1, info=f"best epoch {best[1]}")
            if progress:
                bar.console.print(f"epoch {epoch}/{epochs}: train loss {record['train_loss']:.4f}, "
                                f"train accuracy {record['train_accuracy']:.3f}, {val_text} ({record['seconds']:.1f} s)")

    # 5. restore the selected epoch and record how the model was trained
    assert best is not None
    clf.load_state_dict(best[2])
    clf.eval()
    chosen = history[best[1] - 1]
    info = {"method": method, "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr,
            "weight_decay": weight_decay, "momentum": momentum, "schedule": schedule, "augment": augment,
            "select_by": select_by if val_samples else "last_epoch", "weighted_sampling": sample_weights is not None,
            "n_train": len(train_samples),
            "n_val": len(val_samples), "device": str(dev), "cached": cache, "best_epoch": best[1],
            "best_val_average_accuracy": chosen["val_average_accuracy"],
            "best_val_worst_group_accuracy": chosen["val_worst_group_accuracy"],
            "seconds": round(time.time() - started, 3), "history": history}
    clf.train_info = {**clf.train_info, **info}
    return info

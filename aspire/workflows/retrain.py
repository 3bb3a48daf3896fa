"""Retraining the audited classifier with generated images: one recipe for the audit and the batch.

    retrain_plan(config, classifier, dataset) -> dict     method, arch, epochs, batch size, lr, ... (shown for approval)
    retrain(before, dataset, plan, augmentation, seed=..., device=..., progress=...) -> classifier

The recipe is the audited model's (its checkpoint's `train_info`) unless agent.retrain_* say otherwise, else
the architecture's defaults (config.TrainSettings).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from aspire.config import AspireConfig, TrainSettings


def retrain_plan(config: AspireConfig, classifier, dataset) -> dict[str, Any]:
    """How retraining will run: method, epochs, batch size, lr (settings, else as the audited model was trained)."""
    s = config.agent
    info = dict(getattr(classifier, "train_info", {}) or {})
    arch = getattr(classifier, "arch", None)
    defaults = TrainSettings.for_arch(arch)
    return {"method": s.retrain_method, "arch": arch,
            "epochs": s.retrain_epochs or info.get("epochs") or defaults.epochs,
            "batch_size": s.retrain_batch_size or info.get("batch_size") or defaults.batch_size,
            "lr": s.retrain_lr or info.get("lr") or defaults.lr,
            "weight_decay": info.get("weight_decay", defaults.weight_decay),
            "crop_flip": bool(info.get("augment", True)), "pretrained": _pretrained_source(info.get("pretrained")),
            "train_images": len(dataset.split("train", allow_empty=True))}


def _pretrained_source(recorded: Optional[str]) -> Optional[str]:
    if not recorded:
        return None
    return "imagenet" if str(recorded).startswith("torchvision:") else str(recorded)


def retrain(before, dataset, plan: dict[str, Any], augmentation, *, seed: int, device: Optional[str] = None,
            progress: bool = False):
    """A new classifier of `before`'s architecture, classes and input size, trained by `plan` on the training
    split plus `augmentation` (models.methods.Augmentation); DFR starts from `before` itself."""
    from aspire.models.classifier import build_classifier
    from aspire.models.methods import OptimSettings, train_with_method

    optim = OptimSettings(epochs=plan["epochs"], batch_size=plan["batch_size"], lr=plan["lr"],
                          weight_decay=plan["weight_decay"], seed=seed, crop_flip=plan["crop_flip"], device=device,
                          progress=progress)

    def build():
        return build_classifier(before.arch, before.class_names, input_size=before.input_size,
                                pretrained=plan["pretrained"], seed=seed)

    init = copy.deepcopy(before) if plan["method"] == "dfr" else None
    return train_with_method(plan["method"], dataset, build, optim, augmentation=augmentation, init=init)

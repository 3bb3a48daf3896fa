"""Image classifiers: build, preprocess, predict, and the one-file checkpoint (DESIGN §4).

A `Classifier` is a backbone (image -> feature vector) plus a linear head (feature vector -> logits), so
last-layer retraining (DFR) can swap the head and Grad-CAM can hook `target_layer`. Images are resized
to a square `input_size` (no crop: every pixel of an edited image reaches the classifier) and
normalised with ImageNet's mean and std.

Checkpoint: one `torch.save` file holding
`{"format": "aspire-classifier", "version": 1, "arch", "class_names", "input_size", "mean", "std",
"state_dict", "train"}`; it loads with `torch.load(weights_only=True)` and needs nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from aspire.atomic import write_with
from aspire.devices import map_batches, pick_device
from aspire.errors import CheckpointError, ConfigError, ModelLoadError, one_line

ARCHS = ("smallcnn", "resnet18", "resnet34", "resnet50")
RESNETS = ("resnet18", "resnet34", "resnet50")
DEFAULT_INPUT_SIZE = {"smallcnn": 64, "resnet18": 224, "resnet34": 224, "resnet50": 224}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FORMAT = "aspire-classifier"
CHECKPOINT_VERSION = 1
MIN_INPUT_SIZE = 16


# ---------------------------------------------------------------- networks
class SmallCNN(nn.Module):
    """A small fast CNN for CPU: conv-BN-ReLU blocks, each halving the size, then global average pooling.

    (N, 3, S, S) -> (N, widths[-1]); 64 px input -> 4x4 maps in the last block.
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        blocks, c_in = [], 3
        for w in widths:
            blocks.append(nn.Sequential(nn.Conv2d(c_in, w, 3, stride=2, padding=1, bias=False),
                                        nn.BatchNorm2d(w), nn.ReLU(inplace=True)))
            c_in = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.blocks(x)), 1)  # (N, D)


def _build_backbone(arch: str) -> tuple[nn.Module, int]:
    """The network without its classification layer: (N, 3, S, S) -> (N, D), and D."""
    if arch == "smallcnn":
        net = SmallCNN()
        return net, net.out_dim
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)  # ImageNet layout: fc has 1000 outputs
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


# ---------------------------------------------------------------- preprocessing
def resize_to_uint8(image: Image.Image, size: int) -> torch.Tensor:
    """An image resized to size x size, as a uint8 tensor (3, S, S); the cacheable part of preprocessing."""
    im = image.convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class Classifier(nn.Module):
    """backbone + linear head, with the preprocessing and class names that belong to it."""

    def __init__(self, arch: str, class_names: Sequence[str], *, input_size: Optional[int] = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        # 1. check inputs
        if arch not in ARCHS:
            raise ConfigError(f"unknown architecture {arch!r}: expected one of {', '.join(ARCHS)}")
        class_names = [str(c) for c in class_names]
        if len(class_names) < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, got {len(class_names)}: {class_names}")
        input_size = DEFAULT_INPUT_SIZE[arch] if input_size is None else int(input_size)
        if input_size < MIN_INPUT_SIZE:
            raise ConfigError(f"input size {input_size} is too small: at least {MIN_INPUT_SIZE} px")
        if len(mean) != 3 or len(std) != 3 or any(float(s) <= 0 for s in std):
            raise ConfigError(f"normalisation needs 3 means and 3 positive stds, got mean={mean} std={std}")
        # 2. the network
        self.arch = arch
        self.class_names = class_names
        self.input_size = input_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.backbone, self.feature_dim = _build_backbone(arch)
        self.head = nn.Linear(self.feature_dim, len(class_names))
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self.train_info: dict[str, Any] = {}

    # -- network
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def target_layer(self) -> nn.Module:
        """The last convolutional block: Grad-CAM's target layer."""
        return self.backbone.blocks[-1] if self.arch == "smallcnn" else self.backbone.layer4[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # (N, 3, S, S) normalised -> (N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, C) logits

    # -- preprocessing
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, S, S) in 0..255, or float in 0..1 -> normalised float on the classifier's device."""
        x = x.to(self.device)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return (x - self._mean) / self._std

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> normalised (N, 3, S, S) on the classifier's device."""
        if len(images) == 0:
            return torch.zeros(0, 3, self.input_size, self.input_size, device=self.device)
        return self.normalize(torch.stack([resize_to_uint8(im, self.input_size) for im in images]))

    # -- prediction
    @torch.no_grad()
    def predict_proba(self, images: Sequence[Image.Image], batch_size: int = 64) -> np.ndarray:
        """Class probabilities (N, C) float32; eval mode, no grad, batch halved on out-of-memory."""

        def run(batch: Sequence[Image.Image]) -> list[np.ndarray]:
            logits = self(self.preprocess(list(batch)))  # (B, C)
            return list(torch.softmax(logits.float(), dim=1).cpu().numpy())

        was_training = self.training
        self.eval()
        try:
            rows = map_batches(run, list(images), batch_size)
        finally:
            self.train(was_training)
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, self.num_classes), np.float32)


# ---------------------------------------------------------------- build (with optional ImageNet weights)
def build_classifier(arch: str, class_names: Sequence[str], *, input_size: Optional[int] = None,
                     pretrained: Optional[str] = None, seed: Optional[int] = None) -> Classifier:
    """A new classifier. `pretrained`: None (random init), "imagenet" (torchvision's weights, downloaded
    or from the torch hub cache) or the path of a local ImageNet state dict; the fc layer is dropped and
    a new head with len(class_names) outputs is initialised. `seed` makes the random init reproducible."""
    if seed is not None:
        torch.manual_seed(seed)
    clf = Classifier(arch, class_names, input_size=input_size)
    if pretrained:
        if arch not in RESNETS:
            raise ConfigError(f"--pretrained: {arch} has no ImageNet weights; use one of {', '.join(RESNETS)}")
        source, state = _imagenet_state_dict(arch, pretrained)
        _load_backbone(clf, state, source)
        clf.train_info["pretrained"] = source
    return clf


def _imagenet_state_dict(arch: str, pretrained: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(where the weights came from, the state dict) for "imagenet" or a local file."""
    if pretrained == "imagenet":
        from torchvision.models import get_model_weights

        weights = get_model_weights(arch).IMAGENET1K_V1
        try:
            return f"torchvision:{arch}.IMAGENET1K_V1", weights.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # noqa: BLE001 - URLError, HTTPError, hash mismatch, unreadable cache
            raise ModelLoadError(
                f"cannot get ImageNet weights for {arch} ({type(e).__name__}: {one_line(e)}); download "
                f"{weights.url} where you can and pass the local file: --pretrained /path/to/{Path(weights.url).name}"
            ) from None
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"{path}: pretrained weights file is missing (pass 'imagenet' or a local state dict file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt, truncated or not a torch file
        raise ModelLoadError(f"{path}: not a readable state dict file ({type(e).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: not a state dict (expected a mapping of parameter names to tensors)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return str(path.resolve()), state


def _load_backbone(clf: Classifier, state: dict[str, torch.Tensor], source: str) -> None:
    """Load an ImageNet state dict into the backbone, dropping its fc layer."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    problem = _mismatch(clf.backbone.state_dict(), state)
    if problem:
        raise ModelLoadError(f"{source}: not an ImageNet {clf.arch} state dict ({problem})")
    clf.backbone.load_state_dict(state)


def _mismatch(expected: dict[str, torch.Tensor], found: dict[str, Any]) -> str:
    """'' when `found` has exactly `expected`'s keys and shapes, else a short description of the difference."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and tuple(getattr(found[k], "shape", ())) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys, e.g. {missing[0]!r}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]!r}")
    if shapes:
        k = shapes[0]
        parts.append(f"shape of {k!r} is {tuple(getattr(found[k], 'shape', ()))}, expected {tuple(expected[k].shape)}")
    return "; ".join(parts)


# ---------------------------------------------------------------- checkpoint
def _plain(obj: Any) -> Any:
    """JSON-like copy (dict, list, str, int, float, bool, None): what weights_only loading accepts."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def save_checkpoint(clf: Classifier, path: str | Path, *, train: Optional[dict[str, Any]] = None) -> Path:
    """Write the classifier to one file, atomically. `train` (default clf.train_info) records how it was trained."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": clf.arch,
        "class_names": list(clf.class_names),
        "input_size": int(clf.input_size),
        "mean": list(clf.mean),
        "std": list(clf.std),
        "state_dict": {k: v.detach().cpu().clone() for k, v in clf.state_dict().items()},
        "train": _plain(clf.train_info if train is None else train),
    }
    return write_with(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path, device: Optional[str] = None) -> Classifier:
    """Load a checkpoint written by save_checkpoint, in eval mode on `device` (default: the best available).
    Every problem raises CheckpointError naming the file."""
    # 1. read the file
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file is missing")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt, truncated, not a torch file, or unsafe pickle
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}): corrupt, truncated "
                              f"or not a file written by torch.save") from None
    # 2. check it is ours and well-formed
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        bare = isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values())
        hint = " (it is a bare state dict; aspire checkpoints also hold arch, class names and input size)" if bare else ""
        raise CheckpointError(f"{path}: not an aspire classifier checkpoint{hint}")
    version = payload.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {version!r} is not supported (this aspire reads "
                              f"version <= {CHECKPOINT_VERSION})")
    arch = payload.get("arch")
    if arch not in ARCHS:
        raise CheckpointError(f"{path}: unknown architecture {arch!r} (expected one of {', '.join(ARCHS)})")
    for key, ok in (("class_names", lambda v: isinstance(v, list) and len(v) >= 2 and all(isinstance(c, str) for c in v)),
                    ("input_size", lambda v: isinstance(v, int) and v >= MIN_INPUT_SIZE),
                    ("mean", lambda v: isinstance(v, list) and len(v) == 3),
                    ("std", lambda v: isinstance(v, list) and len(v) == 3 and all(s > 0 for s in v)),
                    ("state_dict", lambda v: isinstance(v, dict))):
        if not ok(payload.get(key)):
            raise CheckpointError(f"{path}: field {key!r} is missing or invalid ({one_line(payload.get(key))[:80]!r})")
    # 3. rebuild the network and load the weights
    clf = Classifier(arch, payload["class_names"], input_size=payload["input_size"],
                     mean=payload["mean"], std=payload["std"])
    problem = _mismatch(clf.state_dict(), payload["state_dict"])
    if problem:
        raise CheckpointError(f"{path}: state dict does not match architecture {arch} with "
                              f"{len(payload['class_names'])} classes ({problem})")
    clf.load_state_dict(payload["state_dict"])
    clf.train_info = payload.get("train") if isinstance(payload.get("train"), dict) else {}
    clf.source = str(path)   # what error messages name
    return clf.to(pick_device(device)).eval()

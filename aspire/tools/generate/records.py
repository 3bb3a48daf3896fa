"""What generation takes and gives: the class's job (its flipped edits and clean backgrounds), the images
made with their provenance, a learned token; and the seeds and names they are made with."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from aspire.tools import lexicon


@dataclass(frozen=True)
class SourceEdit:
    """A flipped edit to generate from: the edited image and, when it was found, the label object's mask."""

    edit_id: str
    image_key: str  # the source image the edit was made from
    edited: np.ndarray  # (H, W, 3) uint8
    object_mask: Optional[np.ndarray] = None  # (H, W) bool


@dataclass(frozen=True)
class Background:
    """A background without the class's spurious features: an image with its own objects inpainted away."""

    key: str  # the image it comes from
    image: np.ndarray  # (H, W, 3) uint8


@dataclass(frozen=True)
class ClassJob:
    """What one class's images are generated from."""

    class_index: int
    class_name: str
    sources: Sequence[SourceEdit]
    backgrounds: Sequence[Background] = ()
    seed: int = 0


@dataclass
class GeneratedImage:
    image: Image.Image
    class_index: int
    seed: int
    sources: list[str]  # source image keys (the edits' images, then the donor background's)
    edits: list[str]  # edit ids
    info: dict[str, Any] = field(default_factory=dict)  # donor and transform | token, prompt, embedding


@dataclass(frozen=True)
class LearnedToken:
    token: str
    embedding_file: Path  # safetensors {token: tensor(1, dim)}
    initializer_token: str
    seed: int
    steps: int
    losses: tuple[float, ...]
    sha256: str


# ---------------------------------------------------------------- helpers
def derive_seed(*parts: object) -> int:
    """A 32-bit seed that depends only on `parts` (stable across runs and machines)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def class_slug(name: str) -> str:
    return lexicon.slug(name, empty="class")


def token_for(class_name: str, seed: int) -> str:
    """The placeholder token learned for a class with one seed: `<waterbird-s0>`."""
    return f"<{class_slug(class_name)}-s{seed}>"


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()




def color_jitter(image: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """(H, W, 3) uint8 → uint8: scale brightness, contrast about the mean grey, saturation about each pixel's grey."""
    x = image.astype(np.float32) * brightness
    weights = np.array([0.299, 0.587, 0.114], np.float32)
    x = (x - float((x @ weights).mean())) * contrast + float((x @ weights).mean())
    grey = (x @ weights)[:, :, None]  # (H, W, 1)
    x = grey + (x - grey) * saturation
    return np.clip(np.round(x), 0, 255).astype(np.uint8)

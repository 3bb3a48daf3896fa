"""Step 5.3, the optional filter of generated images (augment.filter): near-duplicates and feature outliers."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from aspire.config import AspireConfig
from aspire.data.images import load_image
from aspire.schemas import Sample

THUMB_PX = 16


def _thumbnails(paths: Sequence[Path]) -> np.ndarray:
    """(N, 256) grey 16x16 thumbnails in [0, 1]."""
    return np.stack([np.asarray(Image.open(p).convert("L").resize((THUMB_PX, THUMB_PX), Image.BILINEAR),
                                np.float32).ravel() / 255.0 for p in paths])


def _features(clf, paths: Sequence[str | Path]) -> np.ndarray:
    """Classifier features (N, D) of images on disk."""
    import torch

    from aspire.devices import map_batches

    def run(batch: Sequence[str | Path]) -> list[np.ndarray]:
        with torch.no_grad():
            return list(clf.features(clf.preprocess([load_image(p) for p in batch])).float().cpu().numpy())

    clf.eval()
    return np.stack(map_batches(run, list(paths), 64))


def filter_generated(rows: Sequence[dict], folder: Path, real: Sequence[Sample], clf, config: AspireConfig,
                     seed: int) -> tuple[list[dict], dict[str, int], dict[str, Any]]:
    """(kept rows, {reason: dropped count}, what the filter measured) for one class's generated images."""
    settings = config.augment
    paths = [folder / r["img_filename"] for r in rows]
    drop: dict[int, str] = {}
    # 1. near-duplicates of an earlier kept image
    thumbs = _thumbnails(paths)  # (N, 256)
    kept: list[int] = []
    for i in range(len(rows)):
        if kept and float(np.sqrt(((thumbs[kept] - thumbs[i]) ** 2).mean(1)).min()) < settings.duplicate_rms:
            drop[i] = "near_duplicate"
        else:
            kept.append(i)
    # 2. far from the class's real images in the classifier's feature space
    info: dict[str, Any] = {"duplicate_rms": settings.duplicate_rms, "outlier_std": settings.outlier_std}
    pool = sorted(real, key=lambda s: s.image)
    random.Random(seed).shuffle(pool)
    pool = pool[:settings.reference_images]
    if len(pool) >= 2 and kept:
        ref = _features(clf, [s.path for s in pool])  # (R, D)
        centroid = ref.mean(0)
        d_ref = np.linalg.norm(ref - centroid, axis=1)
        limit = float(d_ref.mean() + settings.outlier_std * d_ref.std())
        d_gen = np.linalg.norm(_features(clf, [paths[i] for i in kept]) - centroid, axis=1)
        for i, d in zip(kept, d_gen):
            if d > limit:
                drop[i] = "far_from_class"
        info.update(reference_images=len(pool), distance_limit=limit)
    else:
        info.update(reference_images=len(pool), distance_limit=None)
    counts = {"near_duplicate": 0, "far_from_class": 0}
    for reason in drop.values():
        counts[reason] += 1
    return [r for i, r in enumerate(rows) if i not in drop], counts, info

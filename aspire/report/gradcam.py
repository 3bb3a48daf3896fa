"""Grad-CAM heat maps of a classifier checkpoint, overlaid on images (pytorch-grad-cam on `target_layer`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from aspire.errors import AspireError


class GradCam:
    """Where one classifier looks: Grad-CAM of a class's logit at the classifier's `target_layer`.

    The checkpoint loads lazily on the first call; `overlays(images, classes)` is the entry point."""

    def __init__(self, checkpoint: str | Path, *, device: Optional[str] = None, batch_size: int = 16):
        self.checkpoint = Path(checkpoint).expanduser()
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self._classifier = None

    @property
    def classifier(self):
        if self._classifier is None:
            from aspire.models.classifier import load_checkpoint

            self._classifier = load_checkpoint(self.checkpoint, device=self.device)
        return self._classifier

    def overlays(self, images: Sequence[Image.Image], classes: Sequence[int]) -> list[Image.Image]:
        """One RGB overlay per image (classifier input size): the heat map of `classes[i]` on `images[i]`."""
        # 1. check inputs
        if len(images) != len(classes):
            raise ValueError(f"{len(images)} images but {len(classes)} classes")
        clf = self.classifier
        for c in classes:
            if not 0 <= int(c) < clf.num_classes:
                raise AspireError(f"{self.checkpoint}: class index {c} is out of range for a classifier with "
                                  f"{clf.num_classes} classes")
        if not images:
            return []
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.image import show_cam_on_image
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        # 2. heat maps batch by batch, overlaid on the image as the classifier sees it (resized, square)
        size = clf.input_size
        out: list[Image.Image] = []
        with GradCAM(model=clf, target_layers=[clf.target_layer]) as cam:
            for start in range(0, len(images), self.batch_size):
                batch = list(images[start:start + self.batch_size])
                targets = [ClassifierOutputTarget(int(c)) for c in classes[start:start + self.batch_size]]
                x = clf.preprocess(batch)                                  # (B, 3, S, S) normalised
                maps = cam(input_tensor=x, targets=targets)                # (B, S, S) in [0, 1]
                for im, heat in zip(batch, maps):
                    rgb = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), np.float32) / 255.0
                    heat = np.nan_to_num(np.asarray(heat, np.float32), nan=0.0).clip(0.0, 1.0)
                    out.append(Image.fromarray(show_cam_on_image(rgb, heat, use_rgb=True, image_weight=0.55)))
        return out

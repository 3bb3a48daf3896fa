"""A classifier with a known rule, for tests that must flag exactly what it looks at: red pixels mean
"widget" (class 1). It has the attributes the agent reads of a real checkpoint (arch, input size, recipe)."""

from __future__ import annotations

import numpy as np


class RedMeansWidget:
    class_names = ["gizmo", "widget"]
    num_classes = 2
    arch = "smallcnn"
    input_size = 32
    train_info = {"epochs": 1, "batch_size": 16, "lr": 0.05, "weight_decay": 5e-4, "augment": False}

    def __init__(self, min_red: float = 0.01):
        self.min_red = min_red   # the share of red pixels from which an image is a widget

    def predict_proba(self, images, batch_size=64):
        out = []
        for im in images:
            a = np.asarray(im.convert("RGB")).astype(int)
            red = ((a[..., 0] > 150) & (a[..., 1] < 80) & (a[..., 2] < 80)).mean()
            p_widget = 0.95 if red > self.min_red else 0.05
            out.append([1 - p_widget, p_widget])
        return np.array(out, dtype=np.float32)

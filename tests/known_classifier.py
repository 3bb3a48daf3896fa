"""Classifiers with known rules, for tests that must flag exactly what they look at: red pixels mean "widget"
(class 1), or a graded sum of what an image shows. They have the attributes the agent reads of a real
checkpoint (arch, input size, recipe)."""

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


class GradedWidget:
    """P(widget) from what an image shows: 0.2 with a green object (a gizmo), else 0.55; +`red` (0.3) with a red
    block and +`blue` (0.1) with a blue mark (`rule="sum"`), or +0.35 with either (`rule="either"`: a redundant
    shortcut)."""

    class_names = ["gizmo", "widget"]
    num_classes = 2
    arch = "smallcnn"
    input_size = 64
    train_info = {"epochs": 1, "batch_size": 16, "lr": 0.05, "weight_decay": 5e-4, "augment": False}

    def __init__(self, rule: str = "sum", red: float = 0.3, blue: float = 0.1):
        self.rule, self.red, self.blue = rule, red, blue

    def predict_proba(self, images, batch_size=64):
        out = []
        for im in images:
            a = np.asarray(im.convert("RGB")).astype(int)
            share = lambda m: float(m.mean())  # noqa: E731
            green = share((a[..., 1] > 150) & (a[..., 0] < 80) & (a[..., 2] < 80)) > 0.01
            red = share((a[..., 0] > 150) & (a[..., 1] < 80) & (a[..., 2] < 80)) > 0.01
            blue = share((a[..., 2] > 150) & (a[..., 0] < 80) & (a[..., 1] < 120)) > 0.002
            p = 0.2 if green else 0.55
            p += self.red * red + self.blue * blue if self.rule == "sum" else 0.35 * (red or blue)
            p = min(p, 0.95)
            out.append([1 - p, p])
        return np.array(out, dtype=np.float32)

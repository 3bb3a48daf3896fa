"""The device the model-backend tests load their tiny models on: cpu here. On a GPU machine,
ASPIRE_TEST_DEVICE=cuda runs the same tests through the CUDA path (half precision included)."""

from __future__ import annotations

import os

DEVICE = os.environ.get("ASPIRE_TEST_DEVICE", "cpu")

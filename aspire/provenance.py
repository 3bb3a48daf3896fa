"""The reproducibility record of a run: package versions, model ids, prompt hashes, seeds and config."""

from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aspire.config import AspireConfig

PACKAGES = ("aspire", "torch", "torchvision", "transformers", "diffusers", "langgraph", "langchain-openai",
            "numpy", "opencv-python-headless", "scikit-learn")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_record(config: AspireConfig, **extra: Any) -> dict[str, Any]:
    from aspire.prompts import prompt_hash, prompt_names

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "prompts": {name: prompt_hash(name) for name in prompt_names()},
        "config": config.model_dump(mode="json", exclude={"caption": {"api_key"}, "phrases": {"api_key"}}),
        **extra,
    }

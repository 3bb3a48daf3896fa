"""What every part of the probe pipeline shares: its counts and result, seeds, the label's own phrases."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Optional, Sequence

import numpy as np

from aspire.errors import DataError
from aspire.schemas import Finding
from aspire.tools import lexicon
from aspire.tools.generate import derive_seed



Progress = Callable[[str, int], ContextManager[Callable[[int], None]]]
# A tool's failure on one item (a bad mask, an edit that cannot be made, a model error or out-of-memory at the
# smallest batch): recorded and skipped. Settings and model-loading errors (ConfigError, ModelLoadError) and
# programming errors still stop the run.
ITEM_ERRORS = (DataError, RuntimeError, ValueError, OSError)


@dataclass
class ProbeCounts:
    holdout: int = 0
    donors: int = 0   # other classes' training images that lend backgrounds (holdout.donor_images)
    captions: int = 0
    phrase_failures: int = 0
    regions: int = 0
    not_grounded: int = 0
    edits: int = 0
    control_edits: int = 0
    skipped: int = 0   # edits not made: no control possible, or a tool failed (the failures also in `failures`)
    propagated: int = 0  # phrases found by grounding in images whose captions left them out (step 3b)
    failures: int = 0  # images or phrases a tool failed on (records `failure`; `--retry-skipped` tries them again)
    probes: int = 0
    insertion_edits: int = 0  # real and control pastes
    joint_edits: int = 0      # real and control joint removals


@dataclass
class ProbeResult:
    run_dir: Path
    findings: list[Finding]
    counts: ProbeCounts = field(default_factory=ProbeCounts)

    joint: dict = field(default_factory=dict)  # per class: the combined effect of removing every candidate group

    def to_json(self) -> dict:
        return {"run_dir": str(self.run_dir), "findings": [f.to_json() for f in self.findings],
                "counts": vars(self.counts), "joint": self.joint}


def edit_seed(seed: int, *parts: str) -> int:
    """A per-edit seed that depends only on the run seed and what is edited (stable across resumes)."""
    return derive_seed(seed, *parts)


ALL_CANDIDATES = "all candidates"  # the phrase of a class's joint-removal pair of every candidate group


def object_phrases(class_name: str, also: Sequence[str] = ()) -> list[str]:
    """Phrases that name the label's own object: the class name and its head noun ("waterbird" → "bird"), then
    `also` (probe.label_objects: other names of it); the same terms the phrase extractor leaves out
    (lexicon.label_terms). A negated class ("not Blond_Hair") names no object itself."""
    return lexicon.label_terms(class_name, also)


def masks_overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two masks are mostly one region (intersection over union above one half)."""
    return bool(np.logical_and(a, b).sum() > 0.5 * np.logical_or(a, b).sum())


def phrase_filter_key(only: Optional[dict[int, set[str]]], y: int) -> str:
    return "all" if only is None else ",".join(sorted(only.get(y, ())))

"""The audit graph's state: small (ids, counts, summaries); the run store holds the data.

Every key declares how a node's update merges into it: plain keys are replaced, `Annotated[..., reducer]`
keys accumulate (`operator.add` on lists and numbers, `merge_dicts` on dicts).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Optional

from typing_extensions import TypedDict

from aspire.agent.planner import Hypothesis, Planner

if TYPE_CHECKING:
    from aspire.config import AspireConfig
    from aspire.data.formats import Dataset
    from aspire.workflows.probe import ProbePipeline


def merge_dicts(old: Optional[dict], new: Optional[dict]) -> dict:
    """Reducer: keys of `new` replace those of `old`."""
    return {**(old or {}), **(new or {})}


class AuditState(TypedDict, total=False):
    # the hypothesize → probe loop
    round: int                                              # rounds planned so far
    hypotheses: list[Hypothesis]                            # the current round's plan
    tested: Annotated[list[str], operator.add]              # "class index|kind|group" keys probed so far
    spurious: list[str]                                     # keys of the spurious findings after the last round
    unchanged_rounds: int                                   # consecutive rounds without a change in `spurious`
    stop_reason: Optional[str]                              # why the loop ended (stability or a budget)
    seconds: Annotated[float, operator.add]                 # spent hypothesizing and probing
    llm_calls: Annotated[int, operator.add]
    llm_failures: Annotated[int, operator.add]
    counts: dict[str, int]                                  # ProbeCounts of the last round
    # approvals and repair
    features: list[str]                                     # approved finding keys used for generation
    approvals: Annotated[dict[str, str], merge_dicts]      # stage -> approve | edit | reject | skip
    augmented: Optional[dict[str, Any]]                     # {dir, n_images, per_class}
    models: Optional[dict[str, str]]                        # {before, after} checkpoint paths
    accuracy: Optional[dict[str, Any]]                      # {split, before, after}: worst-group and average
    reprobe: Optional[dict[str, Any]]                       # {model, verdicts, still_spurious} after retraining
    report: Optional[dict[str, str]]                        # {html, md, json} paths


@dataclass
class AuditContext:
    """What the nodes work with, given at invoke time (not checkpointed): built again on resume."""

    pipeline: "ProbePipeline"
    dataset: "Dataset"
    config: "AspireConfig"
    planner: "Planner"
    model_path: str
    seed: int = 0
    progress: bool = False

"""Steps 1-4 of the method (see pipeline.py)."""

from aspire.workflows.probe.base import ALL_CANDIDATES, ProbeCounts, ProbeResult, object_phrases
from aspire.workflows.probe.pipeline import ProbePipeline

__all__ = ["ALL_CANDIDATES", "ProbeCounts", "ProbeResult", "ProbePipeline", "object_phrases"]

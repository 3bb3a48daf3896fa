"""The options several commands share, declared once (typer `Annotated` aliases), and their parsing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

ArchName = Literal["smallcnn", "resnet18", "resnet34", "resnet50"]  # = aspire.models.classifier.ARCHS
FormatName = Literal["waterbirds", "celeba", "imagefolder"]       # = aspire.data.formats.FORMATS

FAIL_EXIT = 3    # --fail-on: a confirmed spurious finding remains
PAUSED_EXIT = 4  # aspire audit without --yes or a terminal: paused for approval (resume with --resume RUN --yes)
FAIL_ON_HELP = ("exit 3 when a confirmed spurious finding remains (on the repaired model when the run retrained): "
                "'spurious', or a minimum effect such as 0.1")


def check_fail_on(value: Optional[str]) -> Optional[str]:
    """--fail-on's value: 'spurious' or an effect in [0, 1] (else a usage error)."""
    if value is None or value == "spurious":
        return value
    try:
        threshold = float(value)
    except ValueError:
        threshold = -1.0
    if not 0.0 <= threshold <= 1.0:
        raise typer.BadParameter(f"expected 'spurious' or an effect between 0 and 1, got {value!r}")
    return value


def split_classes(classes: Optional[list[str]]) -> Optional[list[str]]:
    """--classes given once or more, each comma-separated."""
    if not classes:
        return None
    return [c.strip() for item in classes for c in item.split(",") if c.strip()]


Data = Annotated[Path, typer.Option("--data", help="dataset folder")]
Format = Annotated[FormatName, typer.Option("--format", help="dataset format")]
Attr = Annotated[Optional[str], typer.Option("--attr", help="group attribute column (waterbirds: place; celeba: Male); "
                                             "auditing never needs it")]
Target = Annotated[Optional[str], typer.Option("--target", help="label attribute (celeba: Blond_Hair)")]
Model = Annotated[Path, typer.Option("--model", help="checkpoint written by aspire train")]
Annotations = Annotated[Optional[Path], typer.Option(
    "--annotations", help="annotations.jsonl for the offline backends (default: DATA/annotations.jsonl)")]
Classes = Annotated[Optional[list[str]], typer.Option(
    "--classes", help="class names or indices, comma-separated (default: all)")]
RunDir = Annotated[Optional[Path], typer.Option("--run-dir", help="run folder; an existing one is resumed")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="settings file (TOML or JSON)")]
Seed = Annotated[int, typer.Option("--seed")]
Device = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1, mps; default: the best available")]
Json = Annotated[bool, typer.Option("--json", help="print the result as JSON on stdout")]
FailOn = Annotated[Optional[str], typer.Option("--fail-on", help=FAIL_ON_HELP, callback=check_fail_on)]
Offline = Annotated[bool, typer.Option("--offline", help="plan with the deterministic planner, even with an LLM "
                                       "configured")]
LlmModel = Annotated[Optional[str], typer.Option("--llm-model", help="the chat model (agent.model)")]
RetrySkipped = Annotated[bool, typer.Option("--retry-skipped", help="try again the images and phrases a tool failed "
                                            "on in an earlier run of this folder (recorded failures are not retried "
                                            "otherwise)")]

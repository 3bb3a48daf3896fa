"""Typed records passed between stages: paths and ids, never tensors.

Field names carry units and formats (`box_xyxy_px`, `mask_png`). Every record is a pydantic model, so
it validates on creation and serialises to the JSON the CLI prints and the run store keeps.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

Split = Literal["train", "val", "test"]
SPLIT_CODES: dict[int, Split] = {0: "train", 1: "val", 2: "test"}
PhraseKind = Literal["foreground", "background"]


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True)


# ---------------------------------------------------------------- data
class Sample(Record):
    """One labelled image of a dataset."""

    image: str = Field(description="path relative to the dataset root (the key used by annotations)")
    path: str = Field(description="absolute path of the image file")
    y: int
    split: Split
    attr: Optional[int] = Field(default=None, description="group attribute value, when the dataset has one")
    synthetic: bool = False


class AnnotatedRegion(Record):
    phrase: str
    mask_png: str = Field(description="absolute path of a 0/255 PNG mask of the image's size")


class Annotation(Record):
    """One line of annotations.jsonl, with paths resolved."""

    image: str
    caption: str
    regions: list[AnnotatedRegion] = []


# ---------------------------------------------------------------- evaluation
class GroupMetrics(Record):
    key: str = Field(description="'y=<class>,<attr>=<value>' or 'y=<class>' when there are no groups")
    y: int
    attr: Optional[int] = None
    n: int
    correct: int
    accuracy: float
    train_fraction: Optional[float] = Field(default=None, description="share of this group in the training split")


class EvalResult(Record):
    split: str
    n: int
    average_accuracy: float
    worst_group_accuracy: float
    weighted_average_accuracy: float
    worst_group: str
    groups: list[GroupMetrics]
    attr_name: Optional[str] = None
    class_names: list[str] = []


# ---------------------------------------------------------------- probing (method steps 1-4)
class Caption(Record):
    image: str
    caption: str
    backend: str
    model_id: Optional[str] = None


class PhraseSet(Record):
    """The method's per-caption extraction: foreground objects, the predominant background, an alternative."""

    image: str
    foreground: list[str] = []
    background: list[str] = []
    alt: list[str] = []
    failed: Optional[str] = Field(default=None, description="why extraction failed; phrases are empty then")
    backend: str = ""


class Region(Record):
    image: str
    phrase: str
    grounded: bool
    mask_png: Optional[str] = None
    box_xyxy_px: list[list[float]] = []
    scores: list[float] = []
    area_px: int = 0
    backend: str = ""
    reason: Optional[str] = Field(default=None, description="why the phrase was not grounded")


class Edit(Record):
    """An edited image with its provenance."""

    edit_id: str
    image: str
    phrase: str
    kind: PhraseKind
    control: bool = Field(description="a control edit: same area at a random place off the phrase's mask")
    mask_png: Optional[str]
    edited_png: str
    backend: str
    model_id: Optional[str] = None
    seed: int
    instruction: Optional[str] = None


class Probe(Record):
    edit_id: str
    image: str
    phrase: str
    kind: PhraseKind
    control: bool
    y: int
    pred_original: int
    pred_edited: int
    prob_true_original: float
    prob_true_edited: float
    flipped: bool


class Finding(Record):
    """A phrase group probed on one class; `spurious` when its edits flip the classifier beyond the control."""

    class_: str = Field(alias="class")
    class_index: int
    phrase: str
    phrases: list[str] = Field(default=[], description="the near-duplicate phrases merged into this group")
    kind: PhraseKind
    occurrences: int
    flips: int
    flip_rate: float
    control_occurrences: int
    control_flips: int
    control_flip_rate: float
    mean_prob_drop: float
    p_value: float
    spurious: bool
    flipped_edits: list[str] = Field(default=[], description="edit ids of the edits that flipped")

    def to_json(self) -> dict:
        return self.model_dump(by_alias=True)

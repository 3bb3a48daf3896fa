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
ProbeTest = Literal["removal", "insertion", "joint"]
Verdict = Literal["removed", "reduced", "unchanged", "new"]
ControlKind = Literal["same-area", "matched-image", "same-group-donor", "self-donor", "own-mean-colour",
                      "same-instruction", "other-group-donor"]


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

    def named(self) -> list[str]:
        """What the image's phrases name: its foreground phrases and its background, each once, in order."""
        return list(dict.fromkeys([*self.foreground, *self.background[:1]]))


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
    control: bool = Field(description="a control edit: the same operation on something other than the phrase")
    mask_png: Optional[str]
    edited_png: str
    backend: str
    model_id: Optional[str] = None
    seed: int
    instruction: Optional[str] = None
    control_kind: Optional[ControlKind] = Field(
        default=None, description="how a control was made: same-area (the same area off the phrase's mask), "
        "matched-image (the phrase's mask on another image of the class), same-group-donor / self-donor "
        "(a background from an image of the same background group / the image itself), own-mean-colour, "
        "same-instruction (instruction editing with alt = bg)")
    pair: str = Field(default="", description="`image|kind|phrase` of the real edit this edit belongs to "
                                              "(a real edit and its control share it)")
    test: ProbeTest = Field(default="removal", description="removal (necessity: the phrase removed or its background "
                            "changed), insertion (sufficiency: its region pasted into another class's image) or "
                            "joint (removed with the class's other candidate groups)")
    score_class: Optional[int] = Field(default=None, description="the class whose probability the test reads "
                                       "(insertion: the source's class); None: the image's label")
    donor: Optional[str] = Field(default=None, description="a background change from another image: the image "
                                 "(its key) whose background was laid over")
    donor_background: Optional[str] = Field(default=None, description="that image's background phrase")

    @property
    def pair_key(self) -> str:
        return self.pair or f"{self.image}|{self.kind}|{self.phrase}"


class Propagated(Record):
    """The hold-out's frequent phrases that this image's caption left out, grounded in it (probe step 3b)."""

    image: str
    tried: list[str] = []   # the phrases grounded in the image
    found: list[str] = Field(default=[], description="those found, in a region the image does not already name "
                             "under another phrase: they join the image's phrases")
    same: dict[str, str] = Field(default={}, description="those found on a region the image names under another "
                                 "phrase: {phrase: that phrase} (evidence that they name the same thing)")


class Failure(Record):
    """A tool's failure on one image (or one phrase of it): the item was skipped and the run went on."""

    stage: Literal["holdout", "caption", "edit"]
    image: str
    phrase: str = ""
    reason: str


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
    margin_original: Optional[float] = Field(default=None, description="true-class logit minus the best other's")
    margin_edited: Optional[float] = None
    control_kind: Optional[ControlKind] = None
    pair: str = ""
    test: ProbeTest = "removal"

    @property
    def pair_key(self) -> str:
        return self.pair or f"{self.image}|{self.kind}|{self.phrase}"

    @property
    def prob_drop(self) -> float:
        return self.prob_true_original - self.prob_true_edited


class AfterRepair(Record):
    """A finding's group re-scored on another classifier of the same classes (the repaired one): the same stored
    edits and controls, the same statistics (tools/probe.py `compare_findings`)."""

    effect: float = Field(description="mean paired drop of the true-class probability on the new model")
    effect_ci: list[float] = [0.0, 0.0]
    p_value: float = 1.0
    q_value: float = Field(default=1.0, description="adjusted over every test of the re-probe (Benjamini-Yekutieli)")
    flip_rate: float = 0.0
    control_flip_rate: float = 0.0
    spurious: bool = False
    joint_effect: Optional[float] = None
    joint_q_value: Optional[float] = None
    reduction: Optional[float] = Field(default=None, description="mean over the pairs of the paired drop before minus "
                                       "after (the joint test's pairs for a finding confirmed only jointly)")
    reduction_p_value: Optional[float] = Field(default=None, description="one-sided Wilcoxon test that the paired drop "
                                               "fell (only for findings confirmed before)")
    reduction_q_value: Optional[float] = None
    verdict: Optional[Verdict] = Field(default=None, description="removed: confirmed before, not after, and the effect "
                                       "of the test that confirmed it (removal; joint removal for a joint finding) now "
                                       "under probe.min_effect; reduced: its effect fell significantly, not removed; "
                                       "unchanged: confirmed before and neither; new: confirmed only after (a shortcut "
                                       "the repair amplified); null: confirmed neither before nor after")


class Finding(Record):
    """A phrase group probed on one class; `spurious` when removing or changing it lowers the true class's
    probability beyond its matched controls (q_value < alpha and effect >= min_effect; tools/probe.py)."""

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
    p_value: float = Field(description="one-sided paired test (Wilcoxon signed-rank) of real vs control drop")
    spurious: bool
    flipped_edits: list[str] = Field(default=[], description="edit ids of the edits that flipped")
    q_value: float = Field(default=1.0, description="p_value adjusted over every test of the run (Benjamini-Yekutieli)")
    effect: float = Field(default=0.0, description="mean paired drop of the true-class probability, real - control")
    effect_ci: list[float] = Field(default=[0.0, 0.0], description="bootstrap 95% interval of `effect`")
    margin_effect: Optional[float] = Field(default=None, description="mean paired drop of the logit margin")
    pairs: int = Field(default=0, description="real edits with a matched control")
    control_kind: str = Field(default="", description="the control kinds used, '+'-joined")
    flip_p_value: float = Field(default=1.0, description="one-sided Fisher exact test on flips (the paper's evidence)")
    insertion_effect: Optional[float] = Field(default=None, description="mean paired rise of the class's probability "
                                              "when the region is pasted into other classes' images")
    insertion_p_value: Optional[float] = None
    insertion_q_value: Optional[float] = Field(default=None, description="insertion_p_value adjusted with the run's "
                                               "other tests (null when not run or with too few pairs)")
    joint: bool = Field(default=False, description="spurious only by joint removal: it matters once the class's other "
                        "candidate groups are removed too (a redundant shortcut)")
    joint_effect: Optional[float] = Field(default=None, description="mean paired drop with the class's other candidates "
                                          "removed: all removed - all but this group's control (null when not run)")
    joint_p_value: Optional[float] = None
    joint_q_value: Optional[float] = None
    top_edits: list[str] = Field(default=[], description="real edits with the largest paired drop, strongest first")
    after: Optional[AfterRepair] = Field(default=None, description="the same group re-probed on the repaired model "
                                         "(aspire reprobe; null until a model after repair is scored)")

    @property
    def key(self) -> str:
        """The finding's id, its store key and how approvals name it: `class index|kind|phrase`."""
        return f"{self.class_index}|{self.kind}|{self.phrase}"

    @property
    def evidence_edits(self) -> list[str]:
        """The real edits generation starts from: the flipped ones, then those with the largest paired drop of
        the class's probability (a confirmed finding may flip few images)."""
        return list(dict.fromkeys([*self.flipped_edits, *self.top_edits]))

    def to_json(self) -> dict:
        return self.model_dump(by_alias=True)

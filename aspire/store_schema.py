"""What a run store holds: its record kinds, and one type per meta key and per event kind.

The store checks every write against its entry's type (a misspelt field or a wrong value fails at the writer, not
in a report later) and `store.meta(key)` reads a value back typed, defaults filled in. docs/RUN_STORE.md's tables,
fields included, are generated from these entries (`python -m aspire.store_docs`; a test fails when they drift).

Meta values are closed models (`Meta`: an unknown field is an error). Event payloads name the fields every event
of the kind has and may carry more (`Payload`): the trail records what each stage knows.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, Optional

from pydantic import BaseModel, ConfigDict, Field

from aspire.schemas import EvalResult


class Entry(NamedTuple):
    """A documented meta key, record kind or event kind: its name (`<x>` marks a variable part), who writes it,
    what it holds, and its type (a model, or a type such as `list[str]`)."""

    name: str
    writer: str
    value: str
    type: Any = Any

    def matches(self, key: str) -> bool:
        return key == self.name or ("<" in self.name and key.startswith(self.name.split("<")[0]))


class Meta(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Payload(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


# ---------------------------------------------------------------- records
# The record kinds of a run store (typed by the pydantic models their values name).
RUN_RECORDS = (
    Entry("prediction", "probe step 1", "tools.probe.Prediction: the classifier on a source image"),
    Entry("caption", "probe step 2", "Caption"),
    Entry("phrases", "probe step 3", "PhraseSet"),
    Entry("propagated", "probe step 3b", "Propagated: the frequent phrases the image's caption left out, grounded in it"),
    Entry("region", "probe step 4a", "Region (`image|phrase`; mask PNG under `masks/`)"),
    Entry("edit", "probe steps 4a-4e", "Edit (PNGs and JSON under `edits/`; `test`: removal, insertion or joint; "
                                       "`pair`: the real edit a control belongs to; intermediate steps of joint "
                                       "edits under `joint-steps/`)"),
    Entry("edited", "probe step 4a", "marker `image|phrase filter`: all edits of an image are done"),
    Entry("inserted", "probe step 4d", "marker `class index|kind|phrase`: the group's insertion pastes are done"),
    Entry("joint", "probe step 4e", "marker `class index|kind:phrase,...`: the class's joint removals are done"),
    Entry("failure", "probe steps 1, 2, 4", "Failure (key `stage|image|phrase`): a tool failed on one image or phrase "
                                            "(`holdout`: the image could not be read; never retried); it was "
                                            "skipped, and is not retried on resume unless `--retry-skipped`"),
    Entry("probe", "probe step 4c", "Probe (key: edit id)"),
    Entry("reprobe", "probe reprobe", "Probe: the same edit scored on the model of meta `reprobe`"),
    Entry("reprobe_prediction", "probe reprobe", "tools.probe.Prediction: that model on a source image"),
    Entry("plan", "agent hypothesize", "agent.planner.Plan (key `round-N`): the planner's hypotheses of a round"),
    Entry("finding", "probe findings", "Finding (key `class index|kind|phrase`; replaced whole on each "
                                       "aggregation; also `findings.json`)"),
)


# ---------------------------------------------------------------- meta
RunKind = Literal["probe", "audit"]


class RunArgs(Meta):
    """A run's inputs: a run folder holds the run of exactly these."""

    data: str
    format: str = "waterbirds"
    model: str
    classes: Optional[list[str]] = None
    seed: int = 0
    attr: Optional[str] = None
    target: Optional[str] = None


class RunRecord(Payload):
    """The reproducibility record (aspire/provenance.py); writers add what they know (classifier, planner, batch)."""

    python: str = ""
    platform: str = ""
    packages: dict[str, str] = {}
    prompts: dict[str, str] = {}
    config: dict[str, Any] = {}
    seed: Optional[int] = None
    classifier: Optional[dict[str, Any]] = None
    planner: Optional[str | dict[str, Any]] = None      # "offline", or the LLM planner's settings


class JointTest(Meta):
    effect: float
    effect_ci: list[float]
    p_value: float
    pairs: int
    shares: dict[str, Optional[float]] = {}


class Reprobe(Meta):
    model: str
    digest: str
    verdicts: dict[str, int] = {}
    edits: Optional[int] = None


class AugmentedSet(Meta):
    dir: str
    n_images: int
    per_class: dict[str, int] = {}
    manifest: str
    generator: dict[str, Any] = {}


class Models(Meta):
    before: Optional[str] = None
    after: Optional[str] = None


class Evaluation(Meta):
    before: Optional[EvalResult] = None
    after: Optional[EvalResult] = None


class Approval(Meta):
    stage: str
    decision: str
    dropped: list[str] = []
    added: list[str] = []
    auto: bool = False
    time: float
    reason: str = ""


class ApprovedFeature(Meta):
    key: str
    class_: str = Field(alias="class")
    class_index: int
    phrase: str
    kind: str
    phrases: list[str] = []
    flipped_edits: list[str] = []
    edits: list[str] = []


class AuditMeta(Meta):
    thread_id: Optional[str] = None
    status: Optional[Literal["done"]] = None


class BatchLink(Meta):
    dir: str
    unit: str
    repair: bool
    retraining: str


RUN_META = (
    Entry("kind", "CLI", "`probe`, `audit` (a probe run becomes an audit with `aspire audit --from-probe`)", RunKind),
    Entry("args", "CLI", "a run folder refuses other inputs and another kind", RunArgs),
    Entry("record", "CLI", "reproducibility record (aspire/provenance.py): python, platform, packages, prompt hashes, "
                           "config, seed, classifier", RunRecord),
    Entry("holdout", "probe step 1", "image keys (D_hold)", list[str]),
    Entry("donors", "probe step 1", "image keys of other classes' training images that lend backgrounds and take "
          "insertion pastes (`holdout.donor_images`; only when some classes are probed)", list[str]),
    Entry("holdout_extension", "probe step 1b", "`{class: [image keys]}`: training images that joined the hold-out "
                                                 "because they show a group too rare in it", dict[str, list[str]]),
    Entry("background_groups", "probe step 4b", "`{background phrase: group}`: near-duplicates merged, then groups "
                                                "whose regions look alike (colour histograms); donors and findings use it",
          dict[str, str]),
    Entry("joint_sets", "probe joint removal", "`{class index: tag}`: the candidate set whose joint pairs the findings "
                                               "read", dict[str, str]),
    Entry("joint", "probe findings", "per class: removing every candidate group together", dict[str, JointTest]),
    Entry("reprobe", "probe reprobe", "the checkpoint the edits were re-scored on (by sha256: another one starts "
                                      "over), the count of each verdict", Reprobe),
    Entry("augmented", "repair", "the generated set", AugmentedSet),
    Entry("augmented-generic", "repair", "the same for a generic (baseline) set", AugmentedSet),
    Entry("models", "retrain", "checkpoint paths", Models),
    Entry("evaluation", "evaluate", "schemas.EvalResult before and after", Evaluation),
    Entry("approvals", "agent review", "one per stage", list[Approval]),
    Entry("approved_features", "agent review", "the features approved for repair (key `class_index|kind|phrase`)",
          list[ApprovedFeature]),
    Entry("audit", "agent", "the LangGraph thread in `checkpoints.sqlite` beside the store", AuditMeta),
    Entry("batch", "batch", "the class run belongs to a batch", BatchLink),
)


# ---------------------------------------------------------------- events
class HoldoutChosen(Meta):
    n: int
    classes: list[str]


class ImageReason(Meta):
    image: str
    reason: str


class PhraseReason(Meta):
    image: str
    phrase: str
    reason: str


class KindFromMask(Meta):
    image: str
    phrase: str
    extractor: str
    mask: str


class ReprobeStarted(Meta):
    model: str
    digest: str


class AgentStep(Payload):
    """A hypothesis or its outcome (`result`: spurious, not spurious, not probed), with its evidence."""

    round: Optional[int] = None
    class_: str = Field(alias="class")
    class_index: int
    phrase: str
    kind: str
    source: str


class LLMFailure(Payload):
    stage: str
    reason: str


class ApprovalEvent(Payload):
    stage: str
    decision: str


class StageRan(Payload):
    stage: str


class ChatTurn(Payload):
    role: Literal["user", "assistant", "tool"]
    content: str = ""


RUN_EVENTS = (
    Entry("holdout", "probe step 1", "the hold-out was chosen", HoldoutChosen),
    Entry("holdout_extended", "probe step 1b", "`{class: images added}`", dict[str, int]),
    Entry("phrase_failure", "probe step 3", "the phrases of an image could not be extracted", ImageReason),
    Entry("not_grounded", "probe step 4a", "a phrase not found in an image", PhraseReason),
    Entry("kind_from_mask", "probe step 4a", "the mask decided another kind than the extractor's word", KindFromMask),
    Entry("skipped", "probe step 4", "an edit not made", PhraseReason),
    Entry("reprobe", "probe reprobe", "scoring on a new model began", ReprobeStarted),
    Entry("hypothesis", "agent", "a hypothesis to test, with its `reason` (`source`: llm, planner or chat)", AgentStep),
    Entry("outcome", "agent", "a hypothesis's result with its evidence (effect, q, flips)", AgentStep),
    Entry("llm_failure", "agent", "an LLM call that failed, and at which stage", LLMFailure),
    Entry("approval", "agent", "a stage's decision (as meta `approvals`)", ApprovalEvent),
    Entry("stage", "agent", "a stage ran, with what it did (`reprobe`: the verdicts)", StageRan),
    Entry("chat", "aspire chat", "the conversation, turn by turn (`offline`, `cancelled`, a tool's `name` and `args`)",
          ChatTurn),
)

"""Typed settings, one pydantic model per concern, validated on creation.

Defaults follow the method as the paper and its released code run it (DESIGN §2). Values come from, in
order of precedence: command-line flags, environment variables (ASPIRE_<CONCERN>__<FIELD>, e.g.
ASPIRE_GROUND__BOX_THRESHOLD=0.35), a TOML/JSON config file (`--config`), these defaults.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aspire.errors import ConfigError


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Precision = Literal["auto", "float16", "bfloat16", "float32"]  # "auto": float16 on a GPU, float32 on the CPU


class HoldoutSettings(Settings):
    fraction: float = Field(0.2, gt=0, le=1, description="p: share of correctly classified training images probed")
    min_per_class: int = Field(100, ge=1, description="at least this many per class (when the class has them): "
                               "a phrase group needs enough paired edits for its test to reach significance")
    max_per_class: int = Field(200, ge=1)
    min_group_images: int = Field(20, ge=0, description="a phrase group shown in fewer of a class's hold-out images "
                                  "gets more: the class's other correctly classified training images are searched "
                                  "for it (grounding its phrase), up to max_per_class images in all (0: off)")
    donor_images: int = Field(40, ge=0, description="when only some classes are probed (--classes, a batch unit): "
                              "this many training images of the other classes are captioned and grounded too, to lend "
                              "their backgrounds to background changes (a class's correctly classified images may all "
                              "show one kind of background) and take the insertion tests' pastes; their own "
                              "features are not tested (0: off)")
    seed: int = 0


class CaptionSettings(Settings):
    backend: Literal["annotations", "transformers", "openai"] = "annotations"
    model_id: str = "microsoft/git-large-coco"
    max_new_tokens: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    prompt: Optional[str] = Field(None, description="transformers: text the caption starts from (stripped from the output)")
    device: Optional[str] = None
    dtype: Precision = Field("auto", description="transformers: the model's precision (auto: float16 on a GPU)")
    annotations: Optional[str] = Field(None, description="annotations backend: path of annotations.jsonl")
    chat_model: str = Field("gpt-4o", description="openai backend: vision chat model name")
    base_url: Optional[str] = Field(None, description="openai backend: endpoint (else OPENAI_BASE_URL, else OpenAI)")
    api_key: Optional[str] = Field(None, repr=False, exclude=True, description="openai backend: key (else OPENAI_API_KEY)")
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(2, ge=0)
    backoff_s: float = Field(1.0, ge=0, description="wait before retry k: backoff_s * 2**(k-1)")

    def llm(self) -> "LLMSettings":
        """The openai backend's endpoint as the LLM client takes it (greedy answers)."""
        return LLMSettings(model=self.chat_model, base_url=self.base_url, api_key=self.api_key,
                           timeout_s=self.timeout_s, max_retries=self.max_retries, backoff_s=self.backoff_s,
                           temperature=0.0)


class LLMSettings(Settings):
    """An OpenAI-compatible endpoint and how it is asked (aspire/llm.py). The phrase extractor and the agent are
    LLMSettings; the captioner's openai backend builds one (`CaptionSettings.llm()`)."""

    model: str = "gpt-4o"
    base_url: Optional[str] = Field(None, description="OpenAI-compatible endpoint; falls back to OPENAI_BASE_URL")
    api_key: Optional[str] = Field(None, repr=False, exclude=True, description="falls back to OPENAI_API_KEY")
    timeout_s: float = Field(60.0, gt=0, description="per LLM request")
    max_retries: int = Field(2, ge=0, description="retries of a failed request or a malformed answer")
    backoff_s: float = Field(1.0, ge=0, description="wait before retry k: backoff_s * 2**(k-1)")
    temperature: Optional[float] = Field(0.0, ge=0, description="None: the server's default (models without it)")
    structured_output: Literal["function_calling", "json_schema"] = "function_calling"


class PhraseSettings(LLMSettings):
    backend: Literal["offline", "llm"] = "offline"
    captions_per_call: int = Field(8, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        """`retry_wait_s` is the old name of `backoff_s`."""
        if isinstance(data, dict) and "retry_wait_s" in data:
            data = {k: v for k, v in data.items() if k != "retry_wait_s"} | {"backoff_s": data["retry_wait_s"]}
        return data


class GroundSettings(Settings):
    backend: Literal["annotations", "transformers"] = "annotations"
    detector_id: str = "IDEA-Research/grounding-dino-tiny"
    segmenter_id: str = "facebook/sam-vit-base"
    box_threshold: float = Field(0.3, ge=0, le=1)
    text_threshold: float = Field(0.25, ge=0, le=1)
    clip_to_box: bool = Field(True, description="transformers: keep each SAM mask inside the box that prompted it "
                              "(SAM can spill past a box onto similar texture; the detector placed the thing in the "
                              "box); the dilation applies after")
    dilation_px: int = Field(10, ge=0, description="mask dilation radius; 0 keeps exact masks as they are")
    dtype: Precision = Field("auto", description="transformers: SAM's precision (auto: float16 on a GPU); "
                             "GroundingDINO stays in float32")
    dilation_reference_px: Optional[int] = Field(
        512, ge=1, description="dilation_px applies at this longer image side and scales with it "
        "(the method's 10 px at 512 px); None: dilation_px is absolute")
    batch_size: int = Field(8, ge=1, description="phrases per GroundingDINO forward")
    annotations: Optional[str] = Field(None, description="annotations backend: path of annotations.jsonl")
    device: Optional[str] = None




class DiffusionMemory(Settings):
    """Memory switches of a Stable Diffusion pipeline, for small GPUs (all off by default but the half precision
    that `dtype = "auto"` picks on a GPU)."""

    dtype: Precision = Field("auto", description="weights' precision: auto = float16 on a GPU, float32 on the CPU")
    attention_slicing: bool = Field(False, description="attention in slices: less memory, a little slower")
    vae_tiling: bool = Field(False, description="the VAE decodes and encodes in tiles (large images)")
    cpu_offload: bool = Field(False, description="enable_model_cpu_offload (accelerate): each model moves to the GPU "
                                                 "only while it runs; needs a CUDA device")


class EditSettings(DiffusionMemory):
    remove_backend: Literal["opencv", "sd-inpaint", "lama"] = "opencv"
    background_backend: Literal["replace", "instruct-pix2pix"] = "replace"
    inpaint_model_id: str = "stable-diffusion-v1-5/stable-diffusion-inpainting"
    lama_torchscript: Optional[str] = None
    pix2pix_model_id: str = "timbrooks/instruct-pix2pix"
    instruction: str = "turn the background of {bg} into {alt}"
    num_inference_steps: int = Field(50, ge=1)
    guidance_scale: float = 7.5
    background_fill: Literal["neutral", "other-image"] = "other-image"
    batch_size: int = Field(4, ge=1)
    device: Optional[str] = None
    inpaint_prompt: str = Field("background", description="the neutral prompt of diffusion inpainting")
    image_guidance_scale: float = 1.5
    working_size_px: Optional[int] = Field(
        512, ge=8, description="longer side diffusion works at (None: native), rounded to a multiple of 8")
    opencv_radius_px: int = Field(3, ge=1, le=15)
    control_gap_px: int = Field(4, ge=0, description="a control mask keeps this many pixels away from the phrase's mask")


class ProbeSettings(Settings):
    batch_size: int = Field(64, ge=1)
    merge_similarity: float = Field(0.7, ge=0, le=1)
    max_edits_per_class: int = Field(35, ge=1, description="flipping edits kept per class for generation")
    min_occurrences: int = Field(3, ge=1)
    alpha: float = Field(0.05, gt=0, lt=1, description="false-discovery level: a finding needs q_value < alpha")
    min_effect: float = Field(0.05, ge=0, le=1, description="minimum effect: mean paired drop of the true class's "
                              "probability, real edit minus its control")
    insertion_images: int = Field(20, ge=0, description="insertion (sufficiency) test: pastes per testable group into "
                                  "other classes' hold-out images (0: off)")
    joint_images: int = Field(40, ge=0, description="joint removal: hold-out images per class showing at least two "
                              "testable groups, all removed together (0: off)")
    propagate: bool = Field(True, description="ground every phrase group of at least min_occurrences hold-out images "
                            "in the hold-out images whose captions left it out, and test it there too")
    background_min_share: float = Field(0.25, gt=0, le=1, description="a region touching three image sides and "
                                        "covering this share of the pixels outside the label's object is a background")
    label_objects: dict[str, list[str]] = Field(
        {}, description="{class: [names]}: what a class's own object is called when its name does not say (the "
        "CelebA format's \"not X\" classes, attribute classes): never tested as a feature, kept in background changes")
    seed: int = 0


class TrainSettings(Settings):
    """An SGD training recipe. `for_arch` gives the defaults: smallcnn 10 epochs, batch 64, lr 0.05, weight decay
    5e-4; the resnets the paper's Waterbirds setting (100 epochs, batch 32, lr 1e-3, weight decay 1e-3)."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.05, gt=0)
    weight_decay: float = Field(5e-4, ge=0)

    @classmethod
    def for_arch(cls, arch: Optional[str]) -> "TrainSettings":
        if arch in (None, "smallcnn"):
            return cls()
        return cls(epochs=100, batch_size=32, lr=1e-3, weight_decay=1e-3)


class AgentSettings(LLMSettings):
    """The investigation agent (aspire audit / chat): its LLM, its budgets, and the retraining it runs."""

    offline: bool = Field(False, description="use the deterministic planner even when an LLM is configured")
    stream: bool = Field(True, description="chat: stream answers token by token")
    groups_per_round: int = Field(3, ge=1, description="phrase groups probed per class and round")
    groups_in_prompt: int = Field(15, ge=1, description="candidate phrase groups per class shown to the LLM")
    stable_rounds: int = Field(1, ge=1, description="stop after this many rounds without a change in the spurious set")
    max_rounds: int = Field(6, ge=1)
    max_edits: int = Field(5000, ge=1, description="budget: edits (real and control) made in the run")
    max_seconds: float = Field(3600.0, gt=0, description="budget: seconds spent hypothesizing and probing")
    max_llm_calls: int = Field(30, ge=0, description="budget: LLM requests of the planner")
    retrain_epochs: Optional[int] = Field(None, ge=1, description="None: as many as the audited model was trained for")
    retrain_batch_size: Optional[int] = Field(None, ge=1, description="None: as the audited model was trained")
    retrain_lr: Optional[float] = Field(None, gt=0, description="None: as the audited model was trained")
    retrain_method: Literal["erm", "groupdro", "jtt", "dfr", "subg"] = Field(
        "erm", description="aspire.models.methods; dfr retrains the audited model's last layer")
    augment_ratio: Optional[float] = Field(None, gt=0, description="mix_in ratio of generated images; None: all")
    device: Optional[str] = Field(None, description="retraining and evaluation device; default: the best available")


class GenerateSettings(DiffusionMemory):
    """Step 5: images of a class without its spurious features (tools/generate/)."""

    gradient_checkpointing: bool = Field(False, description="textual inversion: recompute the UNet's and text "
                                         "encoder's activations in the backward pass (less memory, slower)")

    backend: Literal["offline", "textual-inversion"] = Field(
        "offline", description="offline: recombination of flipped edits; textual-inversion: Stable Diffusion")
    # textual inversion + Stable Diffusion (the released code's choices)
    model_id: str = "CompVis/stable-diffusion-v1-4"
    revision: Optional[str] = Field(None, description="model revision (branch, tag or commit); None: the default")
    initializer_token: str = Field("the", description="word whose embedding the new token starts from")
    train_steps: int = Field(1000, ge=1)
    learning_rate: float = Field(5e-4, gt=0, description="scaled by batch size x accumulation when scale_lr")
    scale_lr: bool = True
    train_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    resolution_px: int = Field(512, ge=8, description="training and generation size (a multiple of 8)")
    seeds: list[int] = Field([0, 1, 2, 3, 4, 5, 6, 7], min_length=1, description="one textual inversion per seed")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 (else fp16) on GPU, none on CPU")
    prompt_template: str = Field("a photo of a {token}", description="generation prompt; {token} is the class's token")
    guidance_scale: float = 7.5
    num_inference_steps: int = Field(50, ge=1)
    images_per_seed: int = Field(100, ge=1, description="images per (seed, class)")
    batch_size: int = Field(8, ge=1, description="images per pipeline call (halved on out-of-memory)")
    device: Optional[str] = None
    # offline recombination: a flipped edit's object on backgrounds without the class's spurious features
    images_per_class: int = Field(800, ge=1, description="offline backend: images per class (the method's 100 x 8 seeds)")
    max_backgrounds: int = Field(64, ge=1, description="offline backend: donor backgrounds per class")
    flip: bool = True
    scale_range: tuple[float, float] = Field((0.85, 1.15), description="object scale, uniform in [lo, hi]")
    translate_frac: float = Field(0.1, ge=0, le=0.5, description="object shift, up to this share of the image side")
    color_jitter: float = Field(0.15, ge=0, le=1, description="brightness, contrast, saturation factors 1 +- this")


class AugmentSettings(Settings):
    """Step 5's selection, filter and commit (aspire/workflows/repair/)."""

    select: Literal["spurious", "significant", "flipping", "generic"] = Field(
        "spurious", description="groups whose flipped edits are used: spurious findings; p_value < probe.alpha; "
        "any group with a flip (the paper's ranking by flip rate); generic: no group, the baseline of generic "
        "augmentation (the class's hold-out images on backgrounds of its own training images)")
    filter: bool = Field(False, description="drop near-duplicates and images far from the class's real images")
    duplicate_rms: float = Field(0.02, ge=0, le=1, description="near-duplicate: RMS distance of 16x16 grey thumbnails")
    outlier_std: float = Field(3.0, gt=0, description="far: feature distance to the class centroid > mean + k*std")
    reference_images: int = Field(256, ge=2, description="real training images per class for the centroid")


class BatchSettings(Settings):
    """aspire batch: how the per-class audits are executed (aspire/batch). Not an input of the audits: a
    batch may be resumed with other values."""

    executor: Literal["local", "ray"] = Field("local", description="local: in-process or a process pool; ray: Ray tasks")
    workers: Optional[int] = Field(None, ge=1, description="audits at a time (pool size); local default 1 (in-process), "
                                   "ray default the cluster's CPUs / num_cpus")
    retries: int = Field(1, ge=0, description="retries of a failed class before it is reported as failed")
    address: Optional[str] = Field(None, description="ray: cluster address ('auto', 'ray://host:10001'); None: a local Ray")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per audit task (Ray resource; torch threads in pool and Ray workers)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per audit task (Ray resource)")
    ray_temp_dir: Optional[str] = Field(None, description="local Ray's session folder; None: BATCH_DIR/ray when the "
                                        "path is short enough for Ray's sockets, else a new folder under /tmp")


class AspireConfig(Settings):
    holdout: HoldoutSettings = HoldoutSettings()
    caption: CaptionSettings = CaptionSettings()
    phrases: PhraseSettings = PhraseSettings()
    ground: GroundSettings = GroundSettings()
    edit: EditSettings = EditSettings()
    probe: ProbeSettings = ProbeSettings()
    agent: AgentSettings = AgentSettings()
    generate: GenerateSettings = GenerateSettings()
    augment: AugmentSettings = AugmentSettings()
    batch: BatchSettings = BatchSettings()

    def used_models(self, generated: bool = False) -> list[tuple[str, str]]:
        """(setting, value) of the backends a run uses and the models those backends load; step 5's only when
        the run `generated` images. The planner's LLM is recorded on its own (`planner`)."""
        c = self
        out: list[tuple[str, str]] = [("caption.backend", c.caption.backend)]
        out += {"transformers": [("caption.model_id", c.caption.model_id)],
                "openai": [("caption.chat_model", c.caption.chat_model)]}.get(c.caption.backend, [])
        out.append(("phrases.backend", c.phrases.backend))
        out += [("phrases.model", c.phrases.model)] if c.phrases.backend == "llm" else []
        out.append(("ground.backend", c.ground.backend))
        if c.ground.backend == "transformers":
            out += [("ground.detector_id", c.ground.detector_id), ("ground.segmenter_id", c.ground.segmenter_id)]
        out.append(("edit.remove_backend", c.edit.remove_backend))
        out += {"sd-inpaint": [("edit.inpaint_model_id", c.edit.inpaint_model_id)],
                "lama": [("edit.lama_torchscript", str(c.edit.lama_torchscript))]}.get(c.edit.remove_backend, [])
        out.append(("edit.background_backend", c.edit.background_backend))
        if c.edit.background_backend == "instruct-pix2pix":
            out.append(("edit.pix2pix_model_id", c.edit.pix2pix_model_id))
        if generated:
            out.append(("generate.backend", c.generate.backend))
            if c.generate.backend == "textual-inversion":
                out.append(("generate.model_id", c.generate.model_id + (f"@{c.generate.revision}"
                                                                          if c.generate.revision else "")))
        return out


def _env_overrides(prefix: str = "ASPIRE_") -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for key, value in os.environ.items():
        if key.startswith(prefix) and "__" in key:
            concern, field = key[len(prefix):].lower().split("__", 1)
            out.setdefault(concern, {})[field] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def load_config(path: Optional[str | Path] = None, overrides: Optional[dict[str, Any]] = None) -> AspireConfig:
    """Defaults < config file < environment < `overrides` (from flags). Invalid values raise ConfigError."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file is missing") from None
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: invalid config file ({e})") from None
    data = _merge(data, _env_overrides())
    data = _merge(data, overrides or {})
    try:
        return AspireConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"setting {where}: {err['msg']} (got {err.get('input')!r})") from None

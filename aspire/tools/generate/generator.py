"""Step 5's generation: many training images of a class without its spurious features (DESIGN §2, 5).

One `Generator` with two backends (recombine.py, textual_inversion.py) behind `Generator.generate(job)`, chosen by `GenerateSettings.backend`:

- "textual-inversion" (the method; released code: SD v1.4): per class and seed, a new token (`<class-sN>`)
  is learned on the class's flipped edits by textual inversion, as diffusers' example does it: the token's
  embedding starts from `initializer_token` ("the") and is the only weight that trains (every other row
  of the embedding matrix is restored after each step); 1000 steps, AdamW lr 5e-4 x batch x accumulation,
  batch 4, 512 px, random flips and the example's prompt templates, mixed precision on GPU. The embedding is
  saved as safetensors `{token: tensor(1, dim)}` and loaded into a StableDiffusionPipeline
  (`load_textual_inversion`), which draws `images_per_seed` images of `prompt_template` ("a photo of a
  {token}"), guidance 7.5, 50 steps, in batches halved on out-of-memory. A training that runs out of memory
  restarts with half the batch and twice the accumulation (the same effective batch).
- "offline" (CPU, nothing to download): recombination. The label object of a flipped edit (its edited
  image under the object's mask) is pasted onto backgrounds the caller chose to be free of the class's
  spurious features (other images with their own object inpainted away), with a random horizontal flip,
  a small scale and shift of the object, and a colour jitter of the composite. Without backgrounds, or
  without an object mask, the whole edited image is flipped, scaled, shifted and jittered.

Both are deterministic given the job's seed (offline: byte-identical; diffusion: same noise, CPU generators,
up to the GPU's own non-determinism). Every image comes back with what it was made from (source images,
edit ids) and how (donor and transform, or token, prompt, seed and model), for the augmented set's manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from PIL import Image

from aspire.config import GenerateSettings
from aspire.errors import ConfigError, DataError
from aspire.tools.generate.recombine import recombine
from aspire.tools.generate.records import ClassJob, GeneratedImage, SourceEdit, class_slug, derive_seed, token_for
from aspire.tools.generate.textual_inversion import TextualInversion, resolved_revision

OFFLINE = "offline-recombination"
TEXTUAL_INVERSION = "textual-inversion"


class Generator:
    """Images of a class without its spurious features; `generate(job)` yields them one by one."""

    def __init__(self, settings: Optional[GenerateSettings] = None):
        self.settings = settings or GenerateSettings()
        self.textual_inversion = TextualInversion(self.settings)

    @property
    def resident(self) -> bool:
        """Whether Stable Diffusion (training weights or the sampling pipeline) is loaded."""
        return self.textual_inversion.resident

    def release(self) -> None:
        """Drop every Stable Diffusion model (loaded again on the next class): the next stage gets the memory."""
        if self.resident:
            self.textual_inversion.free_memory()

    # ---------------------------------------------------------------- entry point
    def generate(self, job: ClassJob, work_dir: Optional[str | Path] = None) -> Iterator[GeneratedImage]:
        """The class's images: offline, `images_per_class`; textual inversion, `images_per_seed` per seed
        (learned embeddings are cached in `work_dir`, so a re-run after a crash does not train again)."""
        # 1. check inputs
        if not job.sources:
            raise DataError(f"class {job.class_name!r}: no edits to generate from")
        for src in job.sources:
            _check_source(src)
        # 2. the chosen backend
        if self.settings.backend == "offline":
            yield from recombine(job, self.settings)
            return
        if work_dir is None:
            raise ConfigError("textual inversion needs a work folder for the learned embeddings")
        # 3. textual inversion: every seed's token first (training weights freed after), then the images
        ti = self.textual_inversion
        images = [Image.fromarray(s.edited) for s in job.sources]
        learned = []
        for seed in self.settings.seeds:
            file = Path(work_dir) / f"{class_slug(job.class_name)}-s{seed}-{ti.training_key(job, seed)}.safetensors"
            learned.append(ti.learn_token(images, token_for(job.class_name, seed), seed, file))
        for tok in learned:
            prompt = ti.prompt(tok.token)
            seeds = [derive_seed(job.seed, job.class_index, tok.seed, i) for i in range(self.settings.images_per_seed)]
            for image_seed, image in zip(seeds, ti.sample(tok, seeds)):
                yield GeneratedImage(
                    image=image, class_index=job.class_index, seed=image_seed,
                    sources=sorted({s.image_key for s in job.sources}), edits=[s.edit_id for s in job.sources],
                    info={"model_id": self.settings.model_id, "revision": self.settings.revision, "token": tok.token,
                          "prompt": prompt, "ti_seed": tok.seed, "embedding_file": tok.embedding_file.name,
                          "embedding_sha256": tok.sha256})

    def describe(self) -> dict[str, Any]:
        """The generator's record for the manifest: backend, model id and revisions, and its parameters."""
        s = self.settings
        if s.backend == "offline":
            return {"name": OFFLINE, "images_per_class": s.images_per_class, "flip": s.flip,
                    "scale_range": list(s.scale_range), "translate_frac": s.translate_frac,
                    "color_jitter": s.color_jitter}
        return {"name": TEXTUAL_INVERSION, "model_id": s.model_id, "revision": s.revision,
                "resolved_revision": resolved_revision(s.model_id, s.revision),
                "initializer_token": s.initializer_token, "train_steps": s.train_steps,
                "learning_rate": s.learning_rate, "scale_lr": s.scale_lr, "train_batch_size": s.train_batch_size,
                "gradient_accumulation_steps": s.gradient_accumulation_steps, "resolution_px": s.resolution_px,
                "seeds": list(s.seeds), "mixed_precision": s.mixed_precision, "prompt_template": s.prompt_template,
                "guidance_scale": s.guidance_scale, "num_inference_steps": s.num_inference_steps,
                "images_per_seed": s.images_per_seed}


def _check_source(src: SourceEdit) -> None:
    arr = src.edited
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise DataError(f"edit {src.edit_id}: expected an RGB uint8 image, got shape {arr.shape} {arr.dtype}")
    if src.object_mask is not None and src.object_mask.shape != arr.shape[:2]:
        m = src.object_mask.shape
        raise DataError(f"edit {src.edit_id}: object mask {m[1]}x{m[0]} differs from the edited image "
                        f"{arr.shape[1]}x{arr.shape[0]}")

"""Step 5's generation: many training images of a class without its spurious features (DESIGN §2, 5).

One `Generator` with two backends behind `Generator.generate(job)`, chosen by `GenerateSettings.backend`:

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

import hashlib
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from aspire.config import GenerateSettings
from aspire.errors import ConfigError, DataError, ModelLoadError, describe
from aspire.tools import lexicon

log = logging.getLogger(__name__)

# diffusers/examples/textual_inversion: imagenet_templates_small (object mode)
TRAIN_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
ADAM_WEIGHT_DECAY = 1e-2  # the example's defaults
OFFLINE = "offline-recombination"
TEXTUAL_INVERSION = "textual-inversion"


# ---------------------------------------------------------------- records
@dataclass(frozen=True)
class SourceEdit:
    """A flipped edit to generate from: the edited image and, when it was found, the label object's mask."""

    edit_id: str
    image_key: str  # the source image the edit was made from
    edited: np.ndarray  # (H, W, 3) uint8
    object_mask: Optional[np.ndarray] = None  # (H, W) bool


@dataclass(frozen=True)
class Background:
    """A background without the class's spurious features: an image with its own objects inpainted away."""

    key: str  # the image it comes from
    image: np.ndarray  # (H, W, 3) uint8


@dataclass(frozen=True)
class ClassJob:
    """What one class's images are generated from."""

    class_index: int
    class_name: str
    sources: Sequence[SourceEdit]
    backgrounds: Sequence[Background] = ()
    seed: int = 0


@dataclass
class GeneratedImage:
    image: Image.Image
    class_index: int
    seed: int
    sources: list[str]  # source image keys (the edits' images, then the donor background's)
    edits: list[str]  # edit ids
    info: dict[str, Any] = field(default_factory=dict)  # donor and transform | token, prompt, embedding


@dataclass(frozen=True)
class LearnedToken:
    token: str
    embedding_file: Path  # safetensors {token: tensor(1, dim)}
    initializer_token: str
    seed: int
    steps: int
    losses: tuple[float, ...]
    sha256: str


# ---------------------------------------------------------------- helpers
def derive_seed(*parts: object) -> int:
    """A 32-bit seed that depends only on `parts` (stable across runs and machines)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def class_slug(name: str) -> str:
    return lexicon.slug(name, empty="class")


def token_for(class_name: str, seed: int) -> str:
    """The placeholder token learned for a class with one seed: `<waterbird-s0>`."""
    return f"<{class_slug(class_name)}-s{seed}>"


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()




def color_jitter(image: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """(H, W, 3) uint8 → uint8: scale brightness, contrast about the mean grey, saturation about each pixel's grey."""
    x = image.astype(np.float32) * brightness
    weights = np.array([0.299, 0.587, 0.114], np.float32)
    x = (x - float((x @ weights).mean())) * contrast + float((x @ weights).mean())
    grey = (x @ weights)[:, :, None]  # (H, W, 1)
    x = grey + (x - grey) * saturation
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- the tool
class Generator:
    """Images of a class without its spurious features; `generate(job)` yields them one by one."""

    def __init__(self, settings: Optional[GenerateSettings] = None):
        self.settings = settings or GenerateSettings()
        self.last_text_encoder = None  # textual inversion: the text encoder of the last training (to inspect)
        self._frozen = None  # (vae, unet, noise scheduler, dtype), loaded lazily
        self._pipe = None  # StableDiffusionPipeline, loaded lazily
        self._device = None

    @property
    def resident(self) -> bool:
        """Whether Stable Diffusion (training weights or the sampling pipeline) is loaded."""
        return self._frozen is not None or self._pipe is not None

    def release(self) -> None:
        """Drop every Stable Diffusion model (loaded again on the next class): the next stage gets the memory."""
        if self.resident:
            self._free_memory()

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
            yield from self.recombine(job)
            return
        if work_dir is None:
            raise ConfigError("textual inversion needs a work folder for the learned embeddings")
        # 3. textual inversion: every seed's token first (training weights freed after), then the images
        images = [Image.fromarray(s.edited) for s in job.sources]
        learned = []
        for seed in self.settings.seeds:
            file = Path(work_dir) / f"{class_slug(job.class_name)}-s{seed}-{self._training_key(job, seed)}.safetensors"
            learned.append(self.learn_token(images, token_for(job.class_name, seed), seed, file))
        for tok in learned:
            prompt = self._prompt(tok.token)
            seeds = [derive_seed(job.seed, job.class_index, tok.seed, i) for i in range(self.settings.images_per_seed)]
            for image_seed, image in zip(seeds, self.sample(tok, seeds)):
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
                "resolved_revision": _resolved_revision(s.model_id, s.revision),
                "initializer_token": s.initializer_token, "train_steps": s.train_steps,
                "learning_rate": s.learning_rate, "scale_lr": s.scale_lr, "train_batch_size": s.train_batch_size,
                "gradient_accumulation_steps": s.gradient_accumulation_steps, "resolution_px": s.resolution_px,
                "seeds": list(s.seeds), "mixed_precision": s.mixed_precision, "prompt_template": s.prompt_template,
                "guidance_scale": s.guidance_scale, "num_inference_steps": s.num_inference_steps,
                "images_per_seed": s.images_per_seed}

    # ---------------------------------------------------------------- offline: recombination
    def recombine(self, job: ClassJob, n: Optional[int] = None) -> Iterator[GeneratedImage]:
        """`n` (default `images_per_class`) composites: edits in turn, a random background each."""
        n = self.settings.images_per_class if n is None else n
        lo, hi = self.settings.scale_range
        if not 0 < lo <= hi:
            raise ConfigError(f"generate.scale_range must be 0 < lo <= hi, got {self.settings.scale_range}")
        for i in range(n):
            src = job.sources[i % len(job.sources)]
            seed = derive_seed(job.seed, job.class_index, i)
            rng = np.random.default_rng(seed)
            bg = job.backgrounds[int(rng.integers(len(job.backgrounds)))] if job.backgrounds else None
            image, transform = self._composite(src, bg, rng)
            yield GeneratedImage(
                image=Image.fromarray(image, mode="RGB"), class_index=job.class_index, seed=seed,
                sources=[src.image_key] + ([bg.key] if bg is not None else []), edits=[src.edit_id],
                info={"donor": None if bg is None else bg.key, "transform": transform})

    def _composite(self, src: SourceEdit, bg: Optional[Background],
                   rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        import cv2

        s = self.settings
        H, W = src.edited.shape[:2]
        # 1. draw every random number first, in a fixed order
        flip = bool(s.flip and rng.random() < 0.5)
        scale = float(rng.uniform(*s.scale_range))
        ux, uy = float(rng.random()), float(rng.random())
        j = s.color_jitter
        brightness, contrast, saturation = (float(v) for v in rng.uniform(1 - j, 1 + j, 3))
        recombined = bg is not None and src.object_mask is not None and src.object_mask.any()
        # 2. the object's (or the whole image's) box, and the shift that keeps it inside the image
        if recombined:
            ys, xs = np.nonzero(src.object_mask)
            x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
        else:
            x0, x1, y0, y1 = 0, W - 1, 0, H - 1
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        dx = _shift(ux, cx, (x1 - x0) / 2 * scale, W, s.translate_frac) if recombined else \
            int(round((2 * ux - 1) * s.translate_frac * W))
        dy = _shift(uy, cy, (y1 - y0) / 2 * scale, H, s.translate_frac) if recombined else \
            int(round((2 * uy - 1) * s.translate_frac * H))
        # 3. x' = a (x - cx) + cx + dx with a = -scale when flipped; y' = scale (y - cy) + cy + dy
        a = -scale if flip else scale
        M = np.float32([[a, 0, cx - a * cx + dx], [0, scale, cy - scale * cy + dy]])  # (2, 3)
        interp = cv2.INTER_NEAREST if scale == 1.0 else cv2.INTER_LINEAR  # scale 1: pixels copied exactly
        if recombined:
            base = np.asarray(Image.fromarray(bg.image).resize((W, H), Image.BICUBIC)) \
                if bg.image.shape[:2] != (H, W) else bg.image
            obj = cv2.warpAffine(src.edited, M, (W, H), flags=interp, borderMode=cv2.BORDER_CONSTANT)
            mask = cv2.warpAffine(src.object_mask.astype(np.uint8) * 255, M, (W, H), flags=cv2.INTER_NEAREST) > 127
            out = np.where(mask[:, :, None], obj, base).astype(np.uint8)  # (H, W, 3)
        else:
            out = cv2.warpAffine(src.edited, M, (W, H), flags=interp, borderMode=cv2.BORDER_REFLECT_101)
        if j > 0:
            out = color_jitter(out, brightness, contrast, saturation)
        transform = {"mode": "recombined" if recombined else "whole-image", "flip": flip, "scale": scale,
                     "dx_px": dx, "dy_px": dy, "brightness": brightness, "contrast": contrast,
                     "saturation": saturation}
        return np.ascontiguousarray(out), transform

    # ---------------------------------------------------------------- textual inversion: training
    def learn_token(self, images: Sequence[Image.Image], token: str, seed: int, out_file: str | Path) -> LearnedToken:
        """Learn `token`'s embedding on `images`; saved to `out_file` (reused when it is already there)."""
        import json

        from safetensors.torch import load_file, save_file

        from aspire.atomic import write_json, write_with
        from aspire.devices import is_oom

        # 1. check inputs; a finished training (embedding + its record beside it) is reused
        if not images:
            raise DataError(f"textual inversion of {token!r}: no training images")
        self._check_size()
        out_file = Path(out_file)
        record_file = out_file.with_suffix(".json")
        if out_file.is_file() and record_file.is_file():
            try:
                record = json.loads(record_file.read_text(encoding="utf-8"))
                same = record["token"] == token and record["sha256"] == sha256_file(out_file)
                if same and token in load_file(out_file):
                    return LearnedToken(token, out_file, record["initializer_token"], seed, record["steps"],
                                        tuple(record["losses"]), record["sha256"])
            except Exception as e:  # noqa: BLE001 - an unreadable cache is trained again
                log.info("retraining %s: cached embedding unreadable (%s)", token, describe(e))
        # 2. train; out of memory: half the batch, twice the accumulation, from the start
        batch, accum = self.settings.train_batch_size, self.settings.gradient_accumulation_steps
        while True:
            try:
                embedding, losses = self._train(images, token, seed, batch, accum)
                break
            except (RuntimeError, MemoryError) as e:
                if not is_oom(e) or batch == 1:
                    raise
                self._free_memory()
                batch, accum = batch // 2, accum * 2
                log.warning("textual inversion out of memory: batch %d x accumulation %d", batch, accum)
        # 3. save {token: (1, dim)} (no metadata: the same training gives the same bytes), then its record
        write_with(out_file, lambda tmp: save_file({token: embedding}, str(tmp)))
        learned = LearnedToken(token, out_file, self.settings.initializer_token, seed, len(losses), tuple(losses),
                               sha256_file(out_file))
        write_json(record_file, {"token": token, "initializer_token": learned.initializer_token, "seed": seed,
                                 "steps": learned.steps, "train_batch_size": batch,
                                 "gradient_accumulation_steps": accum, "model_id": self.settings.model_id,
                                 "losses": list(losses), "sha256": learned.sha256})
        return learned

    def _train(self, images: Sequence[Image.Image], token: str, seed: int, batch: int,
               accum: int) -> tuple["torch.Tensor", list[float]]:  # noqa: F821
        import torch
        import torch.nn.functional as F

        s = self.settings
        device = self._torch_device()
        vae, unet, noise_scheduler, dtype = self._frozen_parts()
        tokenizer, text_encoder = self._load_text()
        # 1. the new token, its embedding initialised from the initializer word
        if tokenizer.add_tokens(token) != 1:
            raise ConfigError(f"token {token!r} is already in the tokenizer of {s.model_id!r}; choose another")
        init_ids = tokenizer.encode(s.initializer_token, add_special_tokens=False)
        if len(init_ids) != 1:
            raise ConfigError(f"generate.initializer_token {s.initializer_token!r} must be a single token of "
                              f"{s.model_id!r}'s tokenizer, it is {len(init_ids)}")
        token_id = tokenizer.convert_tokens_to_ids(token)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embeddings = text_encoder.get_input_embeddings()
        with torch.no_grad():
            embeddings.weight[token_id] = embeddings.weight[init_ids[0]].clone()
        # 2. only the token embeddings train (transformers 5: no .text_model wrapper); other rows are restored
        text_model = getattr(text_encoder, "text_model", text_encoder)
        text_encoder.requires_grad_(False)
        embeddings.weight.requires_grad_(True)
        text_model.encoder.requires_grad_(False)
        text_model.final_layer_norm.requires_grad_(False)
        text_model.embeddings.position_embedding.requires_grad_(False)
        text_encoder.to(device).train()
        if s.gradient_checkpointing:
            text_encoder.gradient_checkpointing_enable()
        original = embeddings.weight.detach().clone()
        keep = torch.ones(len(tokenizer), dtype=torch.bool, device=original.device)
        keep[token_id] = False
        lr = s.learning_rate * (batch * accum if s.scale_lr else 1)
        optimizer = torch.optim.AdamW([embeddings.weight], lr=lr, betas=(0.9, 0.999),
                                      weight_decay=ADAM_WEIGHT_DECAY, eps=1e-8)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        # 3. data: images at the training size in [-1, 1] (N, 3, R, R); random flips and prompt templates
        R = s.resolution_px
        pixels = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((R, R), Image.BICUBIC)).copy())
                              for im in images]).permute(0, 3, 1, 2).float().div(127.5).sub(1)  # (N, 3, R, R)
        rng = random.Random(seed)
        gen = torch.Generator("cpu").manual_seed(seed)  # noise and timesteps drawn on CPU: the same on any device
        losses: list[float] = []
        for _ in range(s.train_steps):
            step_loss = 0.0
            for _ in range(accum):
                # 3a. a batch
                idx = [rng.randrange(len(pixels)) for _ in range(batch)]
                x = torch.stack([pixels[i].flip(-1) if rng.random() < 0.5 else pixels[i] for i in idx])  # (B, 3, R, R)
                prompts = [rng.choice(TRAIN_TEMPLATES).format(token) for _ in idx]
                ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                                return_tensors="pt").input_ids.to(device)  # (B, L)
                # 3b. the denoising loss on noised latents, conditioned on the prompt
                with torch.no_grad():
                    latents = vae.encode(x.to(device, dtype)).latent_dist.sample(gen) * vae.config.scaling_factor
                noise = torch.randn(latents.shape, generator=gen).to(device, dtype)  # (B, 4, R/8, R/8)
                t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=gen).to(device)
                noisy = noise_scheduler.add_noise(latents, noise, t)
                hidden = text_encoder(ids)[0].to(dtype)  # (B, L, D)
                pred = unet(noisy, t, hidden).sample
                target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
                    noise_scheduler.get_velocity(latents, noise, t)
                loss = F.mse_loss(pred.float(), target.float()) / accum
                scaler.scale(loss).backward()
                step_loss += float(loss.detach())
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                embeddings.weight[keep] = original[keep]
            losses.append(step_loss)
        self.last_text_encoder = text_encoder
        return embeddings.weight[token_id].detach().float().cpu().clone().unsqueeze(0), losses  # (1, D)

    def _training_key(self, job: ClassJob, seed: int) -> str:
        """A short hash of what a training depends on: the images, the settings and the seed."""
        h = hashlib.sha256()
        for src in job.sources:
            h.update(src.edit_id.encode())
            h.update(hashlib.sha256(np.ascontiguousarray(src.edited).tobytes()).digest())
        s = self.settings
        h.update(repr((s.model_id, s.revision, s.initializer_token, s.train_steps, s.learning_rate, s.scale_lr,
                       s.train_batch_size, s.gradient_accumulation_steps, s.resolution_px, s.mixed_precision,
                       seed, job.class_name)).encode())
        return h.hexdigest()[:12]

    # ---------------------------------------------------------------- textual inversion: generation
    def sample(self, learned: LearnedToken, seeds: Sequence[int]) -> list[Image.Image]:
        """One image per seed of the prompt with the learned token, in batches halved on out-of-memory."""
        import torch

        from aspire.devices import map_batches

        s = self.settings
        self._check_size()
        pipe = self._pipeline()
        if learned.token not in pipe.tokenizer.get_vocab():
            pipe.load_textual_inversion(str(learned.embedding_file), token=learned.token)
        prompt = self._prompt(learned.token)

        def run(batch: Sequence[int]) -> list[Image.Image]:
            out = pipe([prompt] * len(batch), height=s.resolution_px, width=s.resolution_px,
                       num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                       generator=[torch.Generator("cpu").manual_seed(x) for x in batch])
            return [im.convert("RGB") for im in out.images]

        return map_batches(run, list(seeds), s.batch_size)

    def _check_size(self) -> None:
        if self.settings.resolution_px % 8:
            raise ConfigError(f"generate.resolution_px must be a multiple of 8 (Stable Diffusion's VAE), "
                              f"got {self.settings.resolution_px}")

    def _prompt(self, token: str) -> str:
        try:
            return self.settings.prompt_template.format(token=token)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"generate.prompt_template {self.settings.prompt_template!r}: use the field {{token}} "
                              f"({e!r})") from None

    # ---------------------------------------------------------------- model loading
    def _torch_device(self):
        if self._device is None:
            from aspire.devices import pick_device

            self._device = pick_device(self.settings.device)
        return self._device

    def _train_dtype(self):
        import torch

        device, mp = self._torch_device(), self.settings.mixed_precision
        if mp == "no" or (mp == "auto" and device.type != "cuda"):
            return torch.float32
        if mp == "fp16":
            return torch.float16
        if mp == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16

    def _from_pretrained(self, cls, subfolder: Optional[str], **kwargs):
        s = self.settings
        try:
            if subfolder is None:
                return cls.from_pretrained(s.model_id, revision=s.revision, **kwargs)
            return cls.from_pretrained(s.model_id, subfolder=subfolder, revision=s.revision, **kwargs)
        except Exception as e:  # noqa: BLE001 - hub, file and config errors all mean "cannot load"
            raise ModelLoadError(f"cannot load {cls.__name__} of {s.model_id!r} ({describe(e)})") from None

    def _frozen_parts(self):
        """VAE, UNet (frozen, in the training dtype, on the device) and the DDPM noise scheduler."""
        if self._frozen is None:
            from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

            device, dtype = self._torch_device(), self._train_dtype()
            vae = self._from_pretrained(AutoencoderKL, "vae", dtype=dtype).to(device).requires_grad_(False).eval()
            unet = self._from_pretrained(UNet2DConditionModel, "unet", dtype=dtype).to(device).requires_grad_(False)
            unet.eval()
            if self.settings.gradient_checkpointing:   # frozen, but the token's gradient flows through it
                unet.enable_gradient_checkpointing()
            scheduler = self._from_pretrained(DDPMScheduler, "scheduler")
            self._frozen = (vae, unet, scheduler, dtype)
        return self._frozen

    def _load_text(self):
        """A fresh tokenizer and text encoder (float32: the trained embedding stays in full precision)."""
        from transformers import CLIPTextModel, CLIPTokenizer

        return (self._from_pretrained(CLIPTokenizer, "tokenizer"),
                self._from_pretrained(CLIPTextModel, "text_encoder"))

    def _pipeline(self):
        if self._pipe is None:
            from diffusers import StableDiffusionPipeline

            from aspire.devices import pick_dtype, place_pipeline

            device = self._torch_device()
            self._free_memory(keep_pipeline=True)  # training weights are not needed any more
            pipe = self._from_pretrained(StableDiffusionPipeline, None, dtype=pick_dtype(device, self.settings.dtype),
                                         safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            pipe = place_pipeline(pipe, device, self.settings, "generate")
            pipe.set_progress_bar_config(disable=True)
            self._pipe = pipe
        return self._pipe

    def _free_memory(self, keep_pipeline: bool = False) -> None:
        from aspire.devices import free_memory

        self._frozen = None
        self.last_text_encoder = None
        if not keep_pipeline:
            self._pipe = None
        free_memory()


# -------------------------------------------------------------------- helpers
def _check_source(src: SourceEdit) -> None:
    arr = src.edited
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise DataError(f"edit {src.edit_id}: expected an RGB uint8 image, got shape {arr.shape} {arr.dtype}")
    if src.object_mask is not None and src.object_mask.shape != arr.shape[:2]:
        m = src.object_mask.shape
        raise DataError(f"edit {src.edit_id}: object mask {m[1]}x{m[0]} differs from the edited image "
                        f"{arr.shape[1]}x{arr.shape[0]}")


def _shift(u: float, centre: float, half: float, size: int, frac: float) -> int:
    """A shift in [-frac*size, frac*size] (from u in [0, 1)) that keeps a box of half-width `half` inside."""
    lo = max(-frac * size, half - centre)
    hi = min(frac * size, size - 1 - half - centre)
    if lo > hi:  # the box does not fit whatever the shift: keep it where it is
        return 0
    return int(round(lo + u * (hi - lo)))


def _resolved_revision(model_id: str, revision: Optional[str]) -> Optional[str]:
    """The commit a hub model id resolves to in the local cache (None for a local folder or an uncached id)."""
    if Path(model_id).expanduser().is_dir():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(model_id, "model_index.json", revision=revision)
    except Exception:  # noqa: BLE001 - no hub library or a malformed id: nothing to record
        return None
    if isinstance(path, str):
        match = re.search(r"snapshots/([0-9a-f]{40})", path)
        if match:
            return match.group(1)
    return None

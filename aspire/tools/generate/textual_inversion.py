"""The textual-inversion backend (the method; released code: SD v1.4): per class and seed, a new token (`<class-sN>`)
is learned on the class's flipped edits as diffusers' example does it: the token's embedding starts from
`initializer_token` ("the") and is the only weight that trains (every other row of the embedding matrix is
restored after each step); 1000 steps, AdamW lr 5e-4 x batch x accumulation, batch 4, 512 px, random flips and
the example's prompt templates, mixed precision on GPU. The embedding is saved as safetensors
`{token: tensor(1, dim)}` and loaded into a StableDiffusionPipeline (`load_textual_inversion`), which draws
images of `prompt_template` ("a photo of a {token}"), guidance 7.5, 50 steps, in batches halved on
out-of-memory. A training that runs out of memory restarts with half the batch and twice the accumulation (the
same effective batch). Deterministic given the seeds (CPU generators), up to the GPU's own non-determinism.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from aspire.config import GenerateSettings
from aspire.errors import ConfigError, DataError, ModelLoadError, describe
from aspire.tools.generate.records import ClassJob, LearnedToken, sha256_file

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


class TextualInversion:
    """Stable Diffusion, loaded lazily: `learn_token` (training weights), then `sample` (the pipeline)."""

    def __init__(self, settings: GenerateSettings):
        self.settings = settings
        self.last_text_encoder = None  # the text encoder of the last training (to inspect)
        self._frozen = None  # (vae, unet, noise scheduler, dtype), loaded lazily
        self._pipe = None  # StableDiffusionPipeline, loaded lazily
        self._device = None

    @property
    def resident(self) -> bool:
        """Whether Stable Diffusion (training weights or the sampling pipeline) is loaded."""
        return self._frozen is not None or self._pipe is not None

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
                self.free_memory()
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

    def training_key(self, job: ClassJob, seed: int) -> str:
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
        prompt = self.prompt(learned.token)

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

    def prompt(self, token: str) -> str:
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
            self.free_memory(keep_pipeline=True)  # training weights are not needed any more
            pipe = self._from_pretrained(StableDiffusionPipeline, None, dtype=pick_dtype(device, self.settings.dtype),
                                         safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            pipe = place_pipeline(pipe, device, self.settings, "generate")
            pipe.set_progress_bar_config(disable=True)
            self._pipe = pipe
        return self._pipe

    def free_memory(self, keep_pipeline: bool = False) -> None:
        from aspire.devices import free_memory

        self._frozen = None
        self.last_text_encoder = None
        if not keep_pipeline:
            self._pipe = None
        free_memory()


def resolved_revision(model_id: str, revision: Optional[str]) -> Optional[str]:
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

"""The editing models, loaded on first use and released together: LaMa (a big-lama TorchScript file) for removal,
Stable Diffusion inpainting for removal and InstructPix2Pix for background changes (diffusers, by model id, at the
job's working size, seeded on the CPU so the noise is the same on any device)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from aspire.config import EditSettings
from aspire.errors import ConfigError, ModelLoadError, describe
from aspire.tools.edit.masks import mask_pil, paste
from aspire.tools.edit.records import EditJob


class ModelEdits:
    """LaMa, SD inpainting and InstructPix2Pix for an Editor: `lama(job)`, `sd_inpaint(jobs)`, `pix2pix(jobs)`."""

    def __init__(self, settings: EditSettings):
        self.settings = settings
        self._inpaint_pipe = None  # loaded lazily
        self._pix2pix_pipe = None
        self._lama = None
        self._device = None

    @property
    def resident(self) -> bool:
        """Whether a diffusion or LaMa model is loaded."""
        return any(m is not None for m in (self._inpaint_pipe, self._pix2pix_pipe, self._lama))

    def release(self) -> None:
        """Drop the models (loaded again on the next call): the next stage gets their memory."""
        if self.resident:
            from aspire.devices import free_memory

            self._inpaint_pipe = self._pix2pix_pipe = self._lama = None
            free_memory()

    def lama_path(self) -> str:
        path = self.settings.lama_torchscript
        if not path:
            raise ConfigError("edit.lama_torchscript is not set: the lama backend needs a big-lama TorchScript file")
        return str(path)

    def _lama_model(self):
        if self._lama is None:
            import torch

            path = Path(self.lama_path()).expanduser()
            if not path.is_file():
                raise ModelLoadError(f"{path}: LaMa TorchScript file is missing")
            try:
                with warnings.catch_warnings():  # big-lama ships as TorchScript, deprecated in torch 2.x
                    warnings.simplefilter("ignore", FutureWarning)
                    self._lama = torch.jit.load(str(path), map_location=self._torch_device()).eval()
            except Exception as e:  # noqa: BLE001 - any failure to deserialize is a load error
                raise ModelLoadError(f"{path}: cannot load LaMa TorchScript ({describe(e)})") from None
        return self._lama

    def lama(self, job: EditJob) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        assert job.edit_mask is not None
        model, device = self._lama_model(), self._torch_device()
        H, W = job.image.shape[:2]
        # 1. to tensors, padded to a multiple of 8
        x = torch.from_numpy(job.image).permute(2, 0, 1)[None].float().div(255)  # (1, 3, H, W)
        m = torch.from_numpy(job.edit_mask)[None, None].float()  # (1, 1, H, W)
        pad = (0, (-W) % 8, 0, (-H) % 8)
        x, m = F.pad(x, pad, mode="replicate"), F.pad(m, pad)  # (1, 3, H8, W8), (1, 1, H8, W8)
        # 2. inpaint
        with torch.inference_mode():
            y = model(x.to(device), m.to(device))
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(x.shape):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ModelLoadError(f"{self.lama_path()}: LaMa returned {got}, expected {tuple(x.shape)}")
        # 3. back to uint8 (H, W, 3), pasted inside the mask
        out = (y[0, :, :H, :W].float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        return paste(job.image, out, job.edit_mask)

    # ---------------------------------------------------------------- diffusion
    def _torch_device(self):
        if self._device is None:
            from aspire.devices import pick_device

            self._device = pick_device(self.settings.device)
        return self._device

    def _load_pipeline(self, cls_name: str, model_id: str):
        import diffusers

        from aspire.devices import pick_dtype, place_pipeline

        device = self._torch_device()
        try:
            pipe = getattr(diffusers, cls_name).from_pretrained(
                model_id, dtype=pick_dtype(device, self.settings.dtype), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)
        except Exception as e:  # noqa: BLE001 - hub, file and config errors all mean "cannot load"
            raise ModelLoadError(f"cannot load {cls_name} model {model_id!r} ({describe(e)})") from None
        pipe = place_pipeline(pipe, device, self.settings, "edit")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _generators(self, jobs: Sequence[EditJob]) -> list:
        import torch

        return [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]  # CPU: same noise on any device

    def sd_inpaint(self, jobs: Sequence[EditJob]) -> list[np.ndarray]:
        if self._inpaint_pipe is None:
            self._inpaint_pipe = self._load_pipeline("StableDiffusionInpaintPipeline", self.settings.inpaint_model_id)
        s = self.settings
        size = tuple(jobs[0].params["work_size"])  # (W8, H8), the same for the whole batch
        images = [Image.fromarray(j.image).resize(size, Image.BICUBIC) for j in jobs]
        # a pixel partly covered by the mask after resizing counts as masked
        masks = [mask_pil(j.edit_mask).resize(size, Image.BILINEAR).point(lambda v: 255 if v > 0 else 0)
                 for j in jobs]
        out = self._inpaint_pipe(prompt=[j.instruction for j in jobs], image=images, mask_image=masks,
                                 height=size[1], width=size[0], strength=1.0,
                                 num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                                 generator=self._generators(jobs)).images
        return [paste(j.image, np.asarray(o.convert("RGB").resize(j.size, Image.BICUBIC)), j.edit_mask)
                for j, o in zip(jobs, out)]

    def pix2pix(self, jobs: Sequence[EditJob]) -> list[np.ndarray]:
        if self._pix2pix_pipe is None:
            self._pix2pix_pipe = self._load_pipeline("StableDiffusionInstructPix2PixPipeline",
                                                     self.settings.pix2pix_model_id)
        s = self.settings
        size = tuple(jobs[0].params["work_size"])
        images = [Image.fromarray(j.image).resize(size, Image.BICUBIC) for j in jobs]
        out = self._pix2pix_pipe(prompt=[j.instruction for j in jobs], image=images,
                                 num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                                 image_guidance_scale=s.image_guidance_scale,
                                 generator=self._generators(jobs)).images
        edited = [np.asarray(o.convert("RGB").resize(j.size, Image.BICUBIC)) for j, o in zip(jobs, out)]
        return [e if j.edit_mask is None else paste(j.image, e, j.edit_mask) for j, e in zip(jobs, edited)]

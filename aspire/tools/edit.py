"""Step 4's editing: remove a foreground object, or change the background, and write the edit with provenance.

Backends behind one `Editor`, chosen by `EditSettings`:

- removal (`remove_backend`): "sd-inpaint" (diffusers StableDiffusionInpaintPipeline by model id, a neutral
  prompt, seeded), "lama" (a big-lama TorchScript file: `model(image (1,3,H,W) in [0,1], mask (1,1,H,W) in
  {0,1}) -> (1,3,H,W) in [0,1]`), "opencv" (cv2.inpaint Telea; offline).
- background (`background_backend`): "instruct-pix2pix" (diffusers StableDiffusionInstructPix2PixPipeline,
  instruction `turn the background of {bg} into {alt}`), "replace" (offline: the background region, or every
  pixel outside the foreground object's mask, replaced by a neutral grey, or by a donor image's background:
  its region's pixels at the same places, the rest inpainted from them; without a region, the donor's whole
  background with its own object inpainted away).
- insertion (`paste_many`, no model): a region of another image pasted at the same place, the image's own
  object kept (the sufficiency test).

Whatever the backend, only the pixels an edit is meant to change change: generated pixels are pasted back
inside the removal mask (outside it the image is exact), and the foreground object is pasted back over a
changed background. Diffusion works at `working_size_px` (a multiple of 8) and is resized back.

Controls. A change of the classifier after an edit means "this phrase matters" only if editing something
else the same way does not change it as much. Every real edit therefore has a control edit (`control=True`,
its `control_kind` recorded) that keeps the size and the artefacts of the operation and drops the phrase:

- removal: the same backend inpaints a mask of the same area at a random place that does not touch the
  phrase's mask (not even after dilating it by `control_gap_px`): the phrase's mask translated when it fits,
  otherwise a random rectangle of exactly the same area ("same-area"). No free place (the mask covers too
  much): None, with the reason in `Editor.skipped`; the caller may then ask for the phrase's mask on another
  image of the class (`relocate=False`: "matched-image").
- background: the same operation keeping the kind of background. InstructPix2Pix: the instruction with
  alt = bg ("turn the background of water into water", "same-instruction"). Replacement with donors: a donor
  from the caller whose background is of the same group ("same-group-donor"; the image itself as donor gives
  the compositing artefacts alone: "self-donor"). Without a donor the real edit is a flat neutral grey and its
  control a flat fill with the background's own mean colour ("own-mean-colour").

tools/probe.py pairs each real edit with its control (`Edit.pair`) and tests the paired differences.

Files. Each edit is keyed by `edit_id`, a stable hash of source image key, phrase, kind, control, backend,
model id, seed, instruction, the masks and the backend's parameters; under `out_dir` it writes
`<edit_id>.png` (the edited image), `<edit_id>.mask.png` (the pixels the edit was allowed to change) and
`<edit_id>.json` (the record plus the files' sha256), all atomically, the record last. Re-running an edit whose
files are present with matching hashes returns the record without computing or writing anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
from PIL import Image

from aspire.atomic import write_json, write_with
from aspire.config import EditSettings
from aspire.data.images import dilate, save_mask
from aspire.errors import AspireError, ConfigError, DataError, ModelLoadError, describe
from aspire.schemas import ControlKind, Edit, PhraseKind

if TYPE_CHECKING:
    from langchain_core.tools import BaseTool

log = logging.getLogger(__name__)

# (donor image, its foreground mask (H, W) bool or None[, its background region (H, W) bool]): with a region, the
# donor's region is laid over the edited region's bounding box; without, the donor's whole background is used
Donor = tuple  # tuple[Image.Image, Optional[np.ndarray]] | tuple[Image.Image, Optional[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class RemoveRequest:
    """One object removal: inpaint `mask` (the phrase's pixels), or a control of the same area elsewhere."""

    image_key: str
    image: Image.Image
    mask: np.ndarray  # (H, W) bool
    phrase: str
    seed: int = 0
    control: bool = False
    relocate: bool = True  # a control moves the mask off itself; False: the mask as given (matched-image control)
    pair: str = ""  # the real edit's `image|kind|phrase` (a control on another image names its real edit)
    test: str = "removal"  # "joint": one step of a joint removal (schemas.ProbeTest)
    control_kind: Optional[ControlKind] = None  # overrides same-area / matched-image


@dataclass(frozen=True)
class BackgroundRequest:
    """One background change around the foreground object `fg_mask` (None: unknown, IP2P only): every pixel
    outside the object, or only those of `region_mask` (the background phrase's region) when given."""

    image_key: str
    image: Image.Image
    fg_mask: Optional[np.ndarray]  # (H, W) bool
    bg_phrase: str
    alt_phrase: str
    seed: int = 0
    donor: Optional[Donor] = None
    control: bool = False
    region_mask: Optional[np.ndarray] = None  # (H, W) bool
    control_kind: Optional[ControlKind] = None  # default: same-group-donor, own-mean-colour or same-instruction
    test: str = "removal"
    pair: str = ""
    label: str = ""  # the phrase the edit is recorded under (default bg_phrase; a joint edit names the group it tests)
    label_kind: PhraseKind = "background"  # and its kind


@dataclass(frozen=True)
class PasteRequest:
    """One insertion: the pixels of `source` under `mask` pasted onto `image` at the same place (both resized to
    the image), keeping the image's own object `keep_mask` exact. `score_class` is the class the test reads."""

    image_key: str
    image: Image.Image
    source: Image.Image
    mask: np.ndarray  # (H, W) bool, in the source's pixels
    phrase: str
    kind: PhraseKind
    score_class: int
    pair: str
    seed: int = 0
    control: bool = False
    control_kind: Optional[ControlKind] = None
    keep_mask: Optional[np.ndarray] = None  # (H, W) bool, in the image's pixels


@dataclass(frozen=True)
class Skip:
    """A requested edit that was not made (a control with no free place), and why."""

    image: str
    phrase: str
    kind: PhraseKind
    reason: str


@dataclass
class _Job:
    """An edit ready to run: checked arrays, backend choices and its id."""

    image_key: str
    phrase: str
    kind: PhraseKind
    control: bool
    seed: int
    image: np.ndarray  # (H, W, 3) uint8
    edit_mask: Optional[np.ndarray]  # (H, W) bool: the pixels the edit may change; None = all of them
    backend: str
    model_id: Optional[str]
    instruction: Optional[str]
    params: dict[str, Any]
    keep_mask: Optional[np.ndarray] = None  # (H, W) bool: pixels pasted back from the source (foreground)
    fill: str = ""  # replace backend: neutral-grey | own-mean-colour | donor
    donor: Optional[tuple] = None  # (H, W, 3) uint8, (H, W) bool or None, (H, W) bool or None
    control_kind: Optional[ControlKind] = None
    pair: str = ""
    test: str = "removal"
    score_class: Optional[int] = None
    edit_id: str = field(default="", init=False)

    @property
    def size(self) -> tuple[int, int]:  # (W, H)
        return self.image.shape[1], self.image.shape[0]


class Editor:
    """Object removal and background change with control edits; one entry point per edit kind."""

    def __init__(self, settings: Optional[EditSettings] = None):
        self.settings = settings or EditSettings()
        self.skipped: list[Skip] = []  # requested edits not made, with the reason
        self._inpaint_pipe = None  # loaded lazily
        self._pix2pix_pipe = None
        self._lama = None
        self._device = None

    @property
    def resident(self) -> bool:
        """Whether a diffusion or LaMa model is loaded."""
        return any(m is not None for m in (self._inpaint_pipe, self._pix2pix_pipe, self._lama))

    def release(self) -> None:
        """Drop the editing models (loaded again on the next call): the next stage gets their memory."""
        if self.resident:
            from aspire.devices import free_memory

            self._inpaint_pipe = self._pix2pix_pipe = self._lama = None
            free_memory()

    # ---------------------------------------------------------------- entry points
    def remove(self, image_key: str, image: Image.Image, mask: np.ndarray, phrase: str, seed: int,
               out_dir: str | Path, control: bool = False, relocate: bool = True, pair: str = "",
               test: str = "removal", control_kind: Optional[ControlKind] = None) -> Optional[Edit]:
        """Remove the object under `mask` (or, with `control`, inpaint the same area elsewhere; with
        `relocate=False` too, inpaint `mask` as given: the phrase's mask on another image, whose real edit
        `pair` names).

        Returns None only for a control that has no free place (the reason goes to `self.skipped`).
        """
        req = RemoveRequest(image_key, image, mask, phrase, seed, control, relocate, pair, test, control_kind)
        return self.remove_many([req], out_dir)[0]

    def change_background(self, image_key: str, image: Image.Image, fg_mask: Optional[np.ndarray], bg_phrase: str,
                          alt_phrase: str, seed: int, out_dir: str | Path, donor: Optional[Donor] = None,
                          control: bool = False, region_mask: Optional[np.ndarray] = None,
                          control_kind: Optional[ControlKind] = None, test: str = "removal", pair: str = "",
                          label: str = "", label_kind: PhraseKind = "background") -> Edit:
        """Change the background `bg_phrase` around the foreground object `fg_mask`, which is kept exactly.

        `donor` (image, its foreground mask) is used by the "replace" backend when `background_fill` is
        "other-image"; for a control, pass a donor whose background is of the same group. `region_mask`
        limits the change to the background phrase's region.
        """
        req = BackgroundRequest(image_key, image, fg_mask, bg_phrase, alt_phrase, seed, donor, control,
                                region_mask, control_kind, test, pair, label, label_kind)
        out = self.change_background_many([req], out_dir)[0]
        assert out is not None
        return out

    def remove_many(self, requests: Sequence[RemoveRequest], out_dir: str | Path) -> list[Optional[Edit]]:
        """Removals in order; diffusion runs in batches of `batch_size`, halved on out-of-memory."""
        jobs = [self._removal_job(r) for r in requests]
        return self._run(jobs, Path(out_dir))

    def change_background_many(self, requests: Sequence[BackgroundRequest],
                               out_dir: str | Path) -> list[Optional[Edit]]:
        """Background changes in order (never None); diffusion batched like `remove_many`."""
        jobs: list[Optional[_Job]] = [self._background_job(r) for r in requests]
        return self._run(jobs, Path(out_dir))

    def paste_many(self, requests: Sequence[PasteRequest], out_dir: str | Path) -> list[Optional[Edit]]:
        """Insertions (sufficiency tests) in order: compositing only, no model. None when nothing would change
        (the pasted region lies inside the image's own object)."""
        jobs = []
        for r in requests:
            image = _as_rgb(r.image, r.image_key)
            size = (image.shape[1], image.shape[0])
            source = _as_rgb(r.source.resize(size, Image.BICUBIC) if r.source.size != size else r.source,
                             f"source of {r.image_key}")
            mask = np.asarray(_mask_pil(_as_mask(r.mask)).resize(size, Image.NEAREST)) > 0
            if r.keep_mask is not None:
                mask &= ~_check_mask(r.keep_mask, image, r.phrase, r.image_key, "kept object mask", allow_empty=True)
            if not mask.any():
                jobs.append(None)
                continue
            instruction = f"{r.phrase} pasted from another image"
            jobs.append(self._keyed(_Job(r.image_key, r.phrase, r.kind, r.control, r.seed, image, mask, "paste", None,
                                         instruction, {"source": _digest(source)}, donor=(source, None, None),
                                         control_kind=r.control_kind if r.control else None, pair=r.pair,
                                         test="insertion", score_class=r.score_class)))
        return self._run(jobs, Path(out_dir))

    def control_mask(self, mask: np.ndarray, seed: int) -> Optional[np.ndarray]:
        """A mask of the same area off the phrase's mask (None when there is no room; see `find_control`)."""
        return find_control(_as_mask(mask), seed, self.settings.control_gap_px)[0]

    # ---------------------------------------------------------------- building jobs
    def _removal_job(self, r: RemoveRequest) -> Optional[_Job]:
        # 1. check inputs
        image = _as_rgb(r.image, r.image_key)
        mask = _check_mask(r.mask, image, r.phrase, r.image_key, "mask")
        if mask.all():
            raise DataError(f"mask for phrase {r.phrase!r} covers the whole image {r.image_key!r}: "
                            "nothing to inpaint from")
        # 2. a control inpaints the same area elsewhere (or, not relocated, the same mask on another image)
        control_kind: Optional[ControlKind] = None
        if r.control and r.relocate:
            mask, why = find_control(mask, r.seed, self.settings.control_gap_px)
            if mask is None:
                self.skipped.append(Skip(r.image_key, r.phrase, "foreground", why))
                log.info("no control for %r in %s: %s", r.phrase, r.image_key, why)
                return None
            control_kind = "same-area"
        elif r.control:
            control_kind = "matched-image"
        control_kind = r.control_kind or control_kind if r.control else None
        # 3. backend and its parameters (they key the edit)
        s = self.settings
        backend = s.remove_backend
        if backend == "sd-inpaint":
            model_id, instruction = s.inpaint_model_id, s.inpaint_prompt
            params = {"steps": s.num_inference_steps, "guidance": s.guidance_scale,
                      "work_size": self._work_size(image.shape[1], image.shape[0])}
        elif backend == "lama":
            model_id, instruction, params = self._lama_path(), None, {}
        else:
            model_id, instruction, params = None, None, {"method": "telea", "radius": s.opencv_radius_px}
        return self._keyed(_Job(r.image_key, r.phrase, "foreground", r.control, r.seed, image, mask, backend,
                                model_id, instruction, params, control_kind=control_kind, pair=r.pair, test=r.test))

    def _background_job(self, r: BackgroundRequest) -> _Job:
        s = self.settings
        # 1. check inputs
        image = _as_rgb(r.image, r.image_key)
        if not r.bg_phrase.strip():
            raise DataError(f"empty background phrase for image {r.image_key!r}")
        fg = None
        if r.fg_mask is not None or s.background_backend == "replace":
            if r.fg_mask is None:
                raise DataError(f"background replacement needs a foreground mask (phrase {r.bg_phrase!r}, "
                                f"image {r.image_key!r})")
            fg = _check_mask(r.fg_mask, image, r.bg_phrase, r.image_key, "foreground mask")
            if fg.all():
                raise DataError(f"foreground mask covers the whole image {r.image_key!r}: no background "
                                f"{r.bg_phrase!r} to change")
        bg = None if fg is None else ~fg  # the pixels the edit may change
        if r.region_mask is not None:
            region = _check_mask(r.region_mask, image, r.bg_phrase, r.image_key, "background region")
            bg = region if bg is None else region & bg
            if not bg.any():
                raise DataError(f"background region of {r.bg_phrase!r} lies inside the foreground object "
                                f"in image {r.image_key!r}: nothing to change")
        # 2. instruction-based editing: the control keeps the background's kind (alt = bg)
        if s.background_backend == "instruct-pix2pix":
            alt = r.bg_phrase if r.control else r.alt_phrase
            if not alt.strip():
                raise DataError(f"empty alternative background for {r.bg_phrase!r} in image {r.image_key!r}")
            try:
                instruction = s.instruction.format(bg=r.bg_phrase, alt=alt)
            except (KeyError, IndexError, ValueError) as e:
                raise ConfigError(f"edit.instruction {s.instruction!r}: use the fields {{bg}} and {{alt}} "
                                  f"({e!r})") from None
            params = {"steps": s.num_inference_steps, "guidance": s.guidance_scale,
                      "image_guidance": s.image_guidance_scale,
                      "work_size": self._work_size(image.shape[1], image.shape[0])}
            return self._keyed(_Job(r.image_key, r.label or r.bg_phrase, r.label_kind, r.control, r.seed, image, bg,
                                    "instruct-pix2pix", s.pix2pix_model_id, instruction, params, keep_mask=fg,
                                    control_kind=(r.control_kind or "same-instruction") if r.control else None,
                                    pair=r.pair, test=r.test))
        # 3. replacement: a donor's background, or a flat fill (a control's flat fill keeps the colour)
        donor = None
        if r.donor is not None and s.background_fill == "other-image":
            donor = self._prepare_donor_inputs(r.donor, image, r.image_key)
            fill = "donor"
        else:
            fill = "own-mean-colour" if r.control else "neutral-grey"
        instruction = {
            "donor": "background replaced by another image's background",
            "own-mean-colour": "background filled with its own mean colour",
            "neutral-grey": "background filled with neutral grey" + (
                " (no donor given)" if s.background_fill == "other-image" else ""),
        }[fill]
        params = {"fill": fill, "radius": s.opencv_radius_px,
                  "donor": None if donor is None else _digest(*donor)}
        kind = r.control_kind or ("same-group-donor" if fill == "donor" else "own-mean-colour")
        return self._keyed(_Job(r.image_key, r.label or r.bg_phrase, r.label_kind, r.control, r.seed, image, bg, "replace",
                                None, instruction, params, keep_mask=fg, fill=fill, donor=donor,
                                control_kind=kind if r.control else None, pair=r.pair, test=r.test))

    def _prepare_donor_inputs(self, donor: Donor, image: np.ndarray, image_key: str):
        d_img, d_mask = donor[0], donor[1]
        d_region = donor[2] if len(donor) > 2 else None
        d = _as_rgb(d_img, f"donor for {image_key}")
        if d_region is not None:
            d_region = _check_mask(d_region, d, "donor background", f"donor for {image_key}", "donor region")
        if d_mask is not None:
            d_mask = _check_mask(d_mask, d, "donor foreground", f"donor for {image_key}", "donor mask",
                                 allow_empty=True)
            if d_mask.all():
                raise DataError(f"donor foreground mask covers the whole donor image (for {image_key!r}): "
                                "no background")
        if d_region is not None and d_mask is not None:
            d_region = d_region & ~d_mask
            if not d_region.any():
                raise DataError(f"donor background region lies inside the donor's object (for {image_key!r})")
        return d, d_mask, d_region

    def _keyed(self, job: _Job) -> _Job:
        payload = {"image": job.image_key, "phrase": job.phrase, "kind": job.kind, "control": job.control,
                   "backend": job.backend, "model_id": job.model_id, "seed": job.seed,
                   "instruction": job.instruction, "params": job.params,
                   "mask": _digest(job.edit_mask), "keep": _digest(job.keep_mask)}
        if job.pair and job.pair != f"{job.image_key}|{job.kind}|{job.phrase}":
            payload["pair"] = job.pair  # a control on another image: its real edit is part of its identity
        if job.test != "removal":
            payload.update(test=job.test, score_class=job.score_class, pair=job.pair)
        text = json.dumps(payload, sort_keys=True, default=list)
        job.edit_id = hashlib.sha256(text.encode()).hexdigest()[:20]
        return job

    # ---------------------------------------------------------------- running jobs
    def _run(self, jobs: Sequence[Optional[_Job]], out_dir: Path) -> list[Optional[Edit]]:
        # 1. edits already on disk are returned as they are
        out_dir = out_dir.expanduser().resolve()
        results: list[Optional[Edit]] = [None] * len(jobs)
        pending: list[tuple[int, _Job]] = []
        for i, job in enumerate(jobs):
            if job is None:
                continue
            cached = _cached(job, out_dir)
            if cached is not None:
                results[i] = cached
            else:
                pending.append((i, job))
        # 2. offline and LaMa one by one; diffusion in batches of images of one working size
        by_size: dict[tuple[str, tuple[int, int]], list[tuple[int, _Job]]] = {}
        for i, job in pending:
            if job.backend == "opencv":
                results[i] = _write(job, self._opencv(job), out_dir)
            elif job.backend == "lama":
                results[i] = _write(job, self._lama_inpaint(job), out_dir)
            elif job.backend == "replace":
                results[i] = _write(job, self._replace(job), out_dir)
            elif job.backend == "paste":
                results[i] = _write(job, _paste(job.image, job.donor[0], job.edit_mask), out_dir)
            else:
                by_size.setdefault((job.backend, tuple(job.params["work_size"])), []).append((i, job))
        if by_size:
            from aspire.devices import map_batches  # imports torch: only when diffusion runs
        for (backend, _), group in by_size.items():
            run = self._sd_inpaint_batch if backend == "sd-inpaint" else self._pix2pix_batch

            def write_batch(batch: Sequence[tuple[int, _Job]], run=run) -> list[None]:
                arrays = run([job for _, job in batch])
                for (i, job), arr in zip(batch, arrays):  # written per batch: a crash keeps finished work
                    results[i] = _write(job, arr, out_dir)
                return [None] * len(batch)

            map_batches(write_batch, group, self.settings.batch_size)
        return results

    # ---------------------------------------------------------------- offline backends
    def _opencv(self, job: _Job) -> np.ndarray:
        assert job.edit_mask is not None
        return _paste(job.image, _telea(job.image, job.edit_mask, self.settings.opencv_radius_px), job.edit_mask)

    def _replace(self, job: _Job) -> np.ndarray:
        assert job.edit_mask is not None and job.keep_mask is not None
        img, bg, radius = job.image, job.edit_mask, self.settings.opencv_radius_px
        if job.fill == "neutral-grey":
            fill = np.full_like(img, int(round(float(img[bg].mean()))))
        elif job.fill == "own-mean-colour":
            fill = np.broadcast_to(np.round(img[bg].reshape(-1, 3).mean(0)).astype(np.uint8), img.shape)
        elif job.donor[2] is not None:  # a donor region laid over the edited region's bounding box
            fill = _region_fill(job.donor[0], job.donor[2], bg, radius)
        else:  # donor: resized to the image, its own object inpainted away first
            assert job.donor is not None
            d_img, d_mask = job.donor[0], job.donor[1]
            W, H = job.size
            fill = np.asarray(Image.fromarray(d_img).resize((W, H), Image.BICUBIC))
            if d_mask is not None and d_mask.any():
                hole = np.asarray(_mask_pil(d_mask).resize((W, H), Image.BILINEAR)) > 0
                hole = dilate(hole, radius)
                if hole.all():
                    raise DataError(f"donor foreground covers the whole donor once resized (for {job.image_key!r})")
                fill = _telea(fill, hole, radius)
        return _paste(img, np.ascontiguousarray(fill), bg)

    # ---------------------------------------------------------------- LaMa
    def _lama_path(self) -> str:
        path = self.settings.lama_torchscript
        if not path:
            raise ConfigError("edit.lama_torchscript is not set: the lama backend needs a big-lama TorchScript file")
        return str(path)

    def _lama_model(self):
        if self._lama is None:
            import torch

            path = Path(self._lama_path()).expanduser()
            if not path.is_file():
                raise ModelLoadError(f"{path}: LaMa TorchScript file is missing")
            try:
                with warnings.catch_warnings():  # big-lama ships as TorchScript, deprecated in torch 2.x
                    warnings.simplefilter("ignore", FutureWarning)
                    self._lama = torch.jit.load(str(path), map_location=self._torch_device()).eval()
            except Exception as e:  # noqa: BLE001 - any failure to deserialize is a load error
                raise ModelLoadError(f"{path}: cannot load LaMa TorchScript ({describe(e)})") from None
        return self._lama

    def _lama_inpaint(self, job: _Job) -> np.ndarray:
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
            raise ModelLoadError(f"{self._lama_path()}: LaMa returned {got}, expected {tuple(x.shape)}")
        # 3. back to uint8 (H, W, 3), pasted inside the mask
        out = (y[0, :, :H, :W].float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        return _paste(job.image, out, job.edit_mask)

    # ---------------------------------------------------------------- diffusion
    def _torch_device(self):
        if self._device is None:
            from aspire.devices import pick_device

            self._device = pick_device(self.settings.device)
        return self._device

    def _work_size(self, w: int, h: int) -> tuple[int, int]:
        """(W, H) for diffusion: longer side `working_size_px` (or native), both multiples of 8."""
        target = self.settings.working_size_px
        scale = 1.0 if target is None else target / max(w, h)
        return max(8, int(round(w * scale / 8)) * 8), max(8, int(round(h * scale / 8)) * 8)

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

    def _generators(self, jobs: Sequence[_Job]) -> list:
        import torch

        return [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]  # CPU: same noise on any device

    def _sd_inpaint_batch(self, jobs: Sequence[_Job]) -> list[np.ndarray]:
        if self._inpaint_pipe is None:
            self._inpaint_pipe = self._load_pipeline("StableDiffusionInpaintPipeline", self.settings.inpaint_model_id)
        s = self.settings
        size = tuple(jobs[0].params["work_size"])  # (W8, H8), the same for the whole batch
        images = [Image.fromarray(j.image).resize(size, Image.BICUBIC) for j in jobs]
        # a pixel partly covered by the mask after resizing counts as masked
        masks = [_mask_pil(j.edit_mask).resize(size, Image.BILINEAR).point(lambda v: 255 if v > 0 else 0)
                 for j in jobs]
        out = self._inpaint_pipe(prompt=[j.instruction for j in jobs], image=images, mask_image=masks,
                                 height=size[1], width=size[0], strength=1.0,
                                 num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                                 generator=self._generators(jobs)).images
        return [_paste(j.image, np.asarray(o.convert("RGB").resize(j.size, Image.BICUBIC)), j.edit_mask)
                for j, o in zip(jobs, out)]

    def _pix2pix_batch(self, jobs: Sequence[_Job]) -> list[np.ndarray]:
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
        return [e if j.edit_mask is None else _paste(j.image, e, j.edit_mask) for j, e in zip(jobs, edited)]


# -------------------------------------------------------------------- control masks
def find_control(mask: np.ndarray, seed: int, gap_px: int = 4) -> tuple[Optional[np.ndarray], str]:
    """A control mask of the same area as `mask`, off `mask` dilated by `gap_px`, and how it was placed.

    First the mask itself translated to a random place where it fits; else a random rectangle of exactly
    the same area (several aspect ratios tried). Returns (None, why) when nothing fits. Deterministic by seed.
    """
    import cv2

    mask = _as_mask(mask)
    H, W = mask.shape
    area = int(mask.sum())
    if area == 0:
        return None, "the phrase's mask is empty"
    rng = np.random.default_rng(seed)
    forbidden = dilate(mask, gap_px).astype(np.float32)  # (H, W)
    # 1. translation: overlap of the mask's bounding-box crop with `forbidden` at every offset
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)  # (h, w)
    overlap = cv2.matchTemplate(forbidden, crop, cv2.TM_CCORR)  # (H-h+1, W-w+1)
    free = np.argwhere(overlap < 0.5)
    if len(free):
        y0, x0 = free[rng.integers(len(free))]
        out = np.zeros_like(mask)
        out[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop > 0
        return out, f"translated by ({y0 - ys.min()}, {x0 - xs.min()}) px"
    # 2. a rectangle of the same area: rows of width w, the last one partly filled
    integral = cv2.integral(forbidden.astype(np.uint8))  # (H+1, W+1)
    options = []
    for ratio in (1.0, 0.5, 2.0, 0.25, 4.0, 0.125, 8.0):  # width / height
        w = max(1, int(round(np.sqrt(area * ratio))))
        h = -(-area // w)  # ceil
        if h > H or w > W:
            continue
        sums = (integral[h:, w:] - integral[:-h, w:] - integral[h:, :-w] + integral[:-h, :-w])  # (H-h+1, W-w+1)
        spots = np.argwhere(sums == 0)
        if len(spots):
            options.append((h, w, spots))
    if not options:
        share = area / (H * W)
        return None, f"no free place for a control of {area} px outside the phrase's mask ({share:.0%} of the image)"
    h, w, spots = options[rng.integers(len(options))]
    y0, x0 = spots[rng.integers(len(spots))]
    block = np.zeros(h * w, bool)
    block[:area] = True
    out = np.zeros_like(mask)
    out[y0:y0 + h, x0:x0 + w] = block.reshape(h, w)
    return out, f"rectangle {w}x{h} px at ({x0}, {y0})"


# -------------------------------------------------------------------- helpers
def _as_rgb(image: Image.Image | np.ndarray, key: str) -> np.ndarray:
    """(H, W, 3) uint8 from a PIL image or an RGB uint8 array."""
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise DataError(f"image {key!r}: expected an RGB image, got an array of shape {arr.shape} {arr.dtype}")
    return arr.copy()


def _as_mask(mask: np.ndarray) -> np.ndarray:
    arr = np.asarray(mask)
    return arr if arr.dtype == bool else arr > (127 if arr.dtype == np.uint8 and arr.max(initial=0) > 1 else 0)


def _check_mask(mask: Optional[np.ndarray], image: np.ndarray, phrase: str, key: str, what: str,
                allow_empty: bool = False) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise DataError(f"{what} for phrase {phrase!r} in image {key!r} must be 2-D (H, W), got shape {arr.shape}")
    if arr.shape != image.shape[:2]:
        raise DataError(f"{what} size {arr.shape[1]}x{arr.shape[0]} differs from image size "
                        f"{image.shape[1]}x{image.shape[0]} (phrase {phrase!r}, image {key!r})")
    arr = _as_mask(arr)
    if not allow_empty and not arr.any():
        raise DataError(f"empty {what} for phrase {phrase!r} in image {key!r}")
    return arr


def _region_fill(donor: np.ndarray, region: np.ndarray, target: np.ndarray, radius: int) -> np.ndarray:
    """An image of the donor's size whose pixels come from the donor's `region` at the same places: where the
    region does not reach (over the target's pixels outside it), inpainted from the region's own pixels, so the
    donor's texture keeps its scale and nothing of the donor outside its region is used. (H, W, 3) uint8."""
    H, W = target.shape
    if donor.shape[:2] != (H, W):  # another size: the donor and its region resized to the target's
        donor = np.asarray(Image.fromarray(donor).resize((W, H), Image.BICUBIC))
        region = np.asarray(_mask_pil(region).resize((W, H), Image.NEAREST)) > 0
    if not (target & ~region).any() or not region.any():
        return donor
    return _telea(donor, ~region, radius)  # the donor outside its region, inpainted from the region


def _mask_pil(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")


def _telea(image: np.ndarray, mask: np.ndarray, radius: int) -> np.ndarray:
    """OpenCV Telea inpainting of an (H, W, 3) uint8 RGB image inside a bool mask."""
    import cv2

    bgr = np.ascontiguousarray(image[:, :, ::-1])
    out = cv2.inpaint(bgr, mask.astype(np.uint8) * 255, radius, cv2.INPAINT_TELEA)
    return np.ascontiguousarray(out[:, :, ::-1])


def _paste(source: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`edited` inside the bool mask, `source` exactly everywhere else."""
    return np.where(mask[:, :, None], edited, source).astype(np.uint8)


def _digest(*arrays: Optional[np.ndarray]) -> Optional[str]:
    if all(a is None for a in arrays):
        return None
    h = hashlib.sha256()
    for a in arrays:
        if a is not None:
            a = np.ascontiguousarray(a)
            h.update(f"{a.shape}{a.dtype}".encode())
            h.update(np.packbits(a).tobytes() if a.dtype == bool else a.tobytes())
    return h.hexdigest()[:16]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()




def _record(job: _Job, out_dir: Path) -> Edit:
    return Edit(edit_id=job.edit_id, image=job.image_key, phrase=job.phrase, kind=job.kind, control=job.control,
                mask_png=None if job.edit_mask is None else str(out_dir / f"{job.edit_id}.mask.png"),
                edited_png=str(out_dir / f"{job.edit_id}.png"), backend=job.backend, model_id=job.model_id,
                seed=job.seed, instruction=job.instruction, control_kind=job.control_kind,
                pair=job.pair or f"{job.image_key}|{job.kind}|{job.phrase}", test=job.test,
                score_class=job.score_class)


def _cached(job: _Job, out_dir: Path) -> Optional[Edit]:
    """The edit's record when its files are on disk with the hashes its sidecar names, else None."""
    edit = _record(job, out_dir)
    try:
        meta = json.loads((out_dir / f"{job.edit_id}.json").read_text(encoding="utf-8"))
        if _sha256(Path(edit.edited_png)) != meta["edited_sha256"]:
            return None
        if edit.mask_png is not None and _sha256(Path(edit.mask_png)) != meta["mask_sha256"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return edit


def _write(job: _Job, edited: np.ndarray, out_dir: Path) -> Edit:
    """Write the mask, the edited image, then the sidecar record (the commit marker), all atomically."""
    edit = _record(job, out_dir)
    assert edited.shape == job.image.shape, (edited.shape, job.image.shape)
    if edit.mask_png is not None:
        save_mask(job.edit_mask, edit.mask_png)
    img = Image.fromarray(edited, mode="RGB")
    write_with(edit.edited_png, lambda tmp: img.save(tmp, format="PNG"))
    write_json(out_dir / f"{job.edit_id}.json", {
        "edit": edit.model_dump(), "edited_sha256": _sha256(Path(edit.edited_png)),
        "mask_sha256": None if edit.mask_png is None else _sha256(Path(edit.mask_png))})
    return edit


# -------------------------------------------------------------------- LangChain adapter
def as_tool(editor: Editor, out_dir: str | Path, root: Optional[str | Path] = None) -> "BaseTool":
    """A LangChain tool `edit_image(...)` → the Edit record as a dict, or {"skipped": why} for an impossible control.

    Paths are relative to `root` when given (and then the image key is that relative path). A user error
    (AspireError) comes back to the agent as the tool's one-line error message.
    """
    from langchain_core.tools import StructuredTool, ToolException

    from aspire.data.images import load_image, load_mask

    root_path = Path(root).expanduser().resolve() if root is not None else None

    def edit_image(image_path: str, mask_png: str, phrase: str, kind: PhraseKind, alt_phrase: str = "",
                   seed: int = 0, control: bool = False) -> dict:
        """Edit an image to test whether a phrase matters to the classifier.

        kind "foreground": remove the object under mask_png (the phrase's mask) by inpainting.
        kind "background": change the background `phrase` into `alt_phrase`, keeping the foreground object
        whose mask is mask_png. control=True makes the matching control edit (same size, phrase untouched).
        """
        try:
            path = root_path / image_path if root_path is not None else Path(image_path)
            mpath = root_path / mask_png if root_path is not None else Path(mask_png)
            image = load_image(path)
            mask = load_mask(mpath, image.size)
            if kind == "foreground":
                edit = editor.remove(image_path, image, mask, phrase, seed, out_dir, control=control)
            else:
                edit = editor.change_background(image_path, image, mask, phrase, alt_phrase, seed, out_dir,
                                                control=control)
        except AspireError as e:
            raise ToolException(f"{type(e).__name__}: {e}") from e
        if edit is None:
            return {"skipped": editor.skipped[-1].reason}
        return edit.model_dump()

    return StructuredTool.from_function(edit_image, name="edit_image", handle_tool_error=True)

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
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
from PIL import Image

from aspire.config import EditSettings
from aspire.data.images import dilate
from aspire.errors import AspireError, ConfigError, DataError
from aspire.schemas import ControlKind, Edit, PhraseKind

from aspire.tools.edit.masks import (as_mask, as_rgb, check_mask, find_control, mask_pil, paste, region_fill,
                                     telea)
from aspire.tools.edit.models import ModelEdits
from aspire.tools.edit.records import (BackgroundRequest, Donor, EditJob, PasteRequest, RemoveRequest, Skip, cached_edit,
                                       digest, write_edit)

if TYPE_CHECKING:
    from langchain_core.tools import BaseTool

log = logging.getLogger(__name__)


class Editor:
    """Object removal and background change with control edits; one entry point per edit kind."""

    def __init__(self, settings: Optional[EditSettings] = None):
        self.settings = settings or EditSettings()
        self.skipped: list[Skip] = []  # requested edits not made, with the reason
        self.models = ModelEdits(self.settings)

    @property
    def resident(self) -> bool:
        """Whether a diffusion or LaMa model is loaded."""
        return self.models.resident

    def release(self) -> None:
        """Drop the editing models (loaded again on the next call): the next stage gets their memory."""
        self.models.release()

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
        jobs: list[Optional[EditJob]] = [self._background_job(r) for r in requests]
        return self._run(jobs, Path(out_dir))

    def paste_many(self, requests: Sequence[PasteRequest], out_dir: str | Path) -> list[Optional[Edit]]:
        """Insertions (sufficiency tests) in order: compositing only, no model. None when nothing would change
        (the pasted region lies inside the image's own object)."""
        jobs = []
        for r in requests:
            image = as_rgb(r.image, r.image_key)
            size = (image.shape[1], image.shape[0])
            source = as_rgb(r.source.resize(size, Image.BICUBIC) if r.source.size != size else r.source,
                             f"source of {r.image_key}")
            mask = np.asarray(mask_pil(as_mask(r.mask)).resize(size, Image.NEAREST)) > 0
            if r.keep_mask is not None:
                mask &= ~check_mask(r.keep_mask, image, r.phrase, r.image_key, "kept object mask", allow_empty=True)
            if not mask.any():
                jobs.append(None)
                continue
            instruction = f"{r.phrase} pasted from another image"
            jobs.append(self._keyed(EditJob(r.image_key, r.phrase, r.kind, r.control, r.seed, image, mask, "paste", None,
                                         instruction, {"source": digest(source)}, donor=(source, None, None),
                                         control_kind=r.control_kind if r.control else None, pair=r.pair,
                                         test="insertion", score_class=r.score_class)))
        return self._run(jobs, Path(out_dir))

    def control_mask(self, mask: np.ndarray, seed: int) -> Optional[np.ndarray]:
        """A mask of the same area off the phrase's mask (None when there is no room; see `find_control`)."""
        return find_control(as_mask(mask), seed, self.settings.control_gap_px)[0]

    # ---------------------------------------------------------------- building jobs
    def _removal_job(self, r: RemoveRequest) -> Optional[EditJob]:
        # 1. check inputs
        image = as_rgb(r.image, r.image_key)
        mask = check_mask(r.mask, image, r.phrase, r.image_key, "mask")
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
            model_id, instruction, params = self.models.lama_path(), None, {}
        else:
            model_id, instruction, params = None, None, {"method": "telea", "radius": s.opencv_radius_px}
        return self._keyed(EditJob(r.image_key, r.phrase, "foreground", r.control, r.seed, image, mask, backend,
                                model_id, instruction, params, control_kind=control_kind, pair=r.pair, test=r.test))

    def _background_job(self, r: BackgroundRequest) -> EditJob:
        s = self.settings
        # 1. check inputs
        image = as_rgb(r.image, r.image_key)
        if not r.bg_phrase.strip():
            raise DataError(f"empty background phrase for image {r.image_key!r}")
        fg = None
        if r.fg_mask is not None or s.background_backend == "replace":
            if r.fg_mask is None:
                raise DataError(f"background replacement needs a foreground mask (phrase {r.bg_phrase!r}, "
                                f"image {r.image_key!r})")
            fg = check_mask(r.fg_mask, image, r.bg_phrase, r.image_key, "foreground mask")
            if fg.all():
                raise DataError(f"foreground mask covers the whole image {r.image_key!r}: no background "
                                f"{r.bg_phrase!r} to change")
        bg = None if fg is None else ~fg  # the pixels the edit may change
        if r.region_mask is not None:
            region = check_mask(r.region_mask, image, r.bg_phrase, r.image_key, "background region")
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
            return self._keyed(EditJob(r.image_key, r.label or r.bg_phrase, r.label_kind, r.control, r.seed, image, bg,
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
                  "donor": None if donor is None else digest(*donor)}
        kind = r.control_kind or ("same-group-donor" if fill == "donor" else "own-mean-colour")
        return self._keyed(EditJob(r.image_key, r.label or r.bg_phrase, r.label_kind, r.control, r.seed, image, bg, "replace",
                                None, instruction, params, keep_mask=fg, fill=fill, donor=donor,
                                control_kind=kind if r.control else None, pair=r.pair, test=r.test))

    def _prepare_donor_inputs(self, donor: Donor, image: np.ndarray, image_key: str):
        d_img, d_mask = donor[0], donor[1]
        d_region = donor[2] if len(donor) > 2 else None
        d = as_rgb(d_img, f"donor for {image_key}")
        if d_region is not None:
            d_region = check_mask(d_region, d, "donor background", f"donor for {image_key}", "donor region")
        if d_mask is not None:
            d_mask = check_mask(d_mask, d, "donor foreground", f"donor for {image_key}", "donor mask",
                                 allow_empty=True)
            if d_mask.all():
                raise DataError(f"donor foreground mask covers the whole donor image (for {image_key!r}): "
                                "no background")
        if d_region is not None and d_mask is not None:
            d_region = d_region & ~d_mask
            if not d_region.any():
                raise DataError(f"donor background region lies inside the donor's object (for {image_key!r})")
        return d, d_mask, d_region

    def _keyed(self, job: EditJob) -> EditJob:
        payload = {"image": job.image_key, "phrase": job.phrase, "kind": job.kind, "control": job.control,
                   "backend": job.backend, "model_id": job.model_id, "seed": job.seed,
                   "instruction": job.instruction, "params": job.params,
                   "mask": digest(job.edit_mask), "keep": digest(job.keep_mask)}
        if job.pair and job.pair != f"{job.image_key}|{job.kind}|{job.phrase}":
            payload["pair"] = job.pair  # a control on another image: its real edit is part of its identity
        if job.test != "removal":
            payload.update(test=job.test, score_class=job.score_class, pair=job.pair)
        text = json.dumps(payload, sort_keys=True, default=list)
        job.edit_id = hashlib.sha256(text.encode()).hexdigest()[:20]
        return job

    # ---------------------------------------------------------------- running jobs
    def _run(self, jobs: Sequence[Optional[EditJob]], out_dir: Path) -> list[Optional[Edit]]:
        # 1. edits already on disk are returned as they are
        out_dir = out_dir.expanduser().resolve()
        results: list[Optional[Edit]] = [None] * len(jobs)
        pending: list[tuple[int, EditJob]] = []
        for i, job in enumerate(jobs):
            if job is None:
                continue
            cached = cached_edit(job, out_dir)
            if cached is not None:
                results[i] = cached
            else:
                pending.append((i, job))
        # 2. offline and LaMa one by one; diffusion in batches of images of one working size
        by_size: dict[tuple[str, tuple[int, int]], list[tuple[int, EditJob]]] = {}
        for i, job in pending:
            if job.backend == "opencv":
                results[i] = write_edit(job, self._opencv(job), out_dir)
            elif job.backend == "lama":
                results[i] = write_edit(job, self.models.lama(job), out_dir)
            elif job.backend == "replace":
                results[i] = write_edit(job, self._replace(job), out_dir)
            elif job.backend == "paste":
                results[i] = write_edit(job, paste(job.image, job.donor[0], job.edit_mask), out_dir)
            else:
                by_size.setdefault((job.backend, tuple(job.params["work_size"])), []).append((i, job))
        if by_size:
            from aspire.devices import map_batches  # imports torch: only when diffusion runs
        for (backend, _), group in by_size.items():
            run = self.models.sd_inpaint if backend == "sd-inpaint" else self.models.pix2pix

            def write_batch(batch: Sequence[tuple[int, EditJob]], run=run) -> list[None]:
                arrays = run([job for _, job in batch])
                for (i, job), arr in zip(batch, arrays):  # written per batch: a crash keeps finished work
                    results[i] = write_edit(job, arr, out_dir)
                return [None] * len(batch)

            map_batches(write_batch, group, self.settings.batch_size)
        return results

    # ---------------------------------------------------------------- offline backends
    def _opencv(self, job: EditJob) -> np.ndarray:
        assert job.edit_mask is not None
        return paste(job.image, telea(job.image, job.edit_mask, self.settings.opencv_radius_px), job.edit_mask)

    def _replace(self, job: EditJob) -> np.ndarray:
        assert job.edit_mask is not None and job.keep_mask is not None
        img, bg, radius = job.image, job.edit_mask, self.settings.opencv_radius_px
        if job.fill == "neutral-grey":
            fill = np.full_like(img, int(round(float(img[bg].mean()))))
        elif job.fill == "own-mean-colour":
            fill = np.broadcast_to(np.round(img[bg].reshape(-1, 3).mean(0)).astype(np.uint8), img.shape)
        elif job.donor[2] is not None:  # a donor region laid over the edited region's bounding box
            fill = region_fill(job.donor[0], job.donor[2], bg, radius)
        else:  # donor: resized to the image, its own object inpainted away first
            assert job.donor is not None
            d_img, d_mask = job.donor[0], job.donor[1]
            W, H = job.size
            fill = np.asarray(Image.fromarray(d_img).resize((W, H), Image.BICUBIC))
            if d_mask is not None and d_mask.any():
                hole = np.asarray(mask_pil(d_mask).resize((W, H), Image.BILINEAR)) > 0
                hole = dilate(hole, radius)
                if hole.all():
                    raise DataError(f"donor foreground covers the whole donor once resized (for {job.image_key!r})")
                fill = telea(fill, hole, radius)
        return paste(img, np.ascontiguousarray(fill), bg)

    def _work_size(self, w: int, h: int) -> tuple[int, int]:
        """(W, H) for diffusion: longer side `working_size_px` (or native), both multiples of 8."""
        target = self.settings.working_size_px
        scale = 1.0 if target is None else target / max(w, h)
        return max(8, int(round(w * scale / 8)) * 8), max(8, int(round(h * scale / 8)) * 8)


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

"""What editing takes and writes: the requests, the job a request becomes, and the edit's files on disk (`<edit_id>.png`,
`.mask.png`, `.json` with the files' sha256, written atomically, the record last; a job whose files are there with
matching hashes is returned as it is)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from aspire.atomic import write_json, write_with
from aspire.data.images import save_mask
from aspire.schemas import ControlKind, Edit, PhraseKind


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
class EditJob:
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


def digest(*arrays: Optional[np.ndarray]) -> Optional[str]:
    if all(a is None for a in arrays):
        return None
    h = hashlib.sha256()
    for a in arrays:
        if a is not None:
            a = np.ascontiguousarray(a)
            h.update(f"{a.shape}{a.dtype}".encode())
            h.update(np.packbits(a).tobytes() if a.dtype == bool else a.tobytes())
    return h.hexdigest()[:16]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def job_record(job: EditJob, out_dir: Path) -> Edit:
    return Edit(edit_id=job.edit_id, image=job.image_key, phrase=job.phrase, kind=job.kind, control=job.control,
                mask_png=None if job.edit_mask is None else str(out_dir / f"{job.edit_id}.mask.png"),
                edited_png=str(out_dir / f"{job.edit_id}.png"), backend=job.backend, model_id=job.model_id,
                seed=job.seed, instruction=job.instruction, control_kind=job.control_kind,
                pair=job.pair or f"{job.image_key}|{job.kind}|{job.phrase}", test=job.test,
                score_class=job.score_class)


def cached_edit(job: EditJob, out_dir: Path) -> Optional[Edit]:
    """The edit's record when its files are on disk with the hashes its sidecar names, else None."""
    edit = job_record(job, out_dir)
    try:
        meta = json.loads((out_dir / f"{job.edit_id}.json").read_text(encoding="utf-8"))
        if sha256_of(Path(edit.edited_png)) != meta["edited_sha256"]:
            return None
        if edit.mask_png is not None and sha256_of(Path(edit.mask_png)) != meta["mask_sha256"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return edit


def write_edit(job: EditJob, edited: np.ndarray, out_dir: Path) -> Edit:
    """Write the mask, the edited image, then the sidecar record (the commit marker), all atomically."""
    edit = job_record(job, out_dir)
    assert edited.shape == job.image.shape, (edited.shape, job.image.shape)
    if edit.mask_png is not None:
        save_mask(job.edit_mask, edit.mask_png)
    img = Image.fromarray(edited, mode="RGB")
    write_with(edit.edited_png, lambda tmp: img.save(tmp, format="PNG"))
    write_json(out_dir / f"{job.edit_id}.json", {
        "edit": edit.model_dump(), "edited_sha256": sha256_of(Path(edit.edited_png)),
        "mask_sha256": None if edit.mask_png is None else sha256_of(Path(edit.mask_png))})
    return edit

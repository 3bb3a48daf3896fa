"""Step 5.2, what the generator starts from: each edit with its label-object mask, and donor backgrounds."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from aspire.config import AspireConfig
from aspire.data.images import erode, load_image, load_mask
from aspire.errors import DataError
from aspire.schemas import Edit, Finding
from aspire.store import RunStore
from aspire.tools import lexicon
from aspire.tools.generate import Background, ClassJob, SourceEdit, derive_seed
from aspire.workflows.repair.select import ClassSelection

CACHE = "augment-cache"


def mentions(phrase: str, groups: Sequence[Finding], threshold: float) -> bool:
    """Whether `phrase` names one of the phrase groups (background groups: also any phrase of their scene)."""
    scene = lexicon.scene_category(phrase)
    return any(lexicon.same_as_any(phrase, (g.phrase, *g.phrases), threshold)
               or (g.kind == "background" and scene is not None
                   and any(lexicon.scene_category(name) == scene for name in (g.phrase, *g.phrases)))
               for g in groups)


class Sources:
    """Builds a class's ClassJob from the run: edits with object masks, and donor backgrounds."""

    def __init__(self, pipeline, config: AspireConfig, seed: int):
        self.pipeline = pipeline
        self.store: RunStore = pipeline.store
        self.config = config
        self.seed = seed
        self._phrases: Optional[dict[str, list[str]]] = None

    def job(self, sel: ClassSelection, notes: list[str]) -> ClassJob:
        if sel.originals:
            return self._generic_job(sel)
        offline = self.config.generate.backend == "offline"  # textual inversion needs the edited images only
        sources, dilated = [], []
        for e in sel.edits:
            edited = np.array(load_image(e.edited_png))  # (H, W, 3) uint8
            mask = self._object_mask(e, edited.shape[:2]) if offline else None
            dilated.append(mask)
            sources.append(SourceEdit(e.edit_id, e.image, edited, None if mask is None else self._erode(mask)))
        backgrounds: list[Background] = []
        if offline:
            backgrounds = self._donors(sel)
            if not backgrounds:
                backgrounds = self._own_backgrounds(sel, sources, dilated)
                avoid = ", ".join(f.phrase for f in sel.avoid)
                notes.append(f"class {sel.class_name!r}: every training image of the run with a known background "
                             f"shows {avoid}, so none could lend a background free of it; the generated images keep "
                             f"the backgrounds of the edited images (where the edits changed or removed {avoid})")
        return ClassJob(sel.class_index, sel.class_name, sources, backgrounds, seed=self.seed)

    def _generic_job(self, sel: ClassSelection) -> ClassJob:
        """Generic mode: the hold-out images themselves (their object masks: offline), on backgrounds of the
        class's own training images (any of them: not filtered)."""
        offline = self.config.generate.backend == "offline"
        sources = []
        for key in sel.originals:
            sample = self.pipeline.samples[key]
            image = np.array(load_image(sample.path))  # (H, W, 3) uint8
            mask = self.pipeline.object_mask(sample) if offline else None
            if mask is not None and (mask.shape != image.shape[:2] or mask.all() or not mask.any()):
                mask = None
            sources.append(SourceEdit(key, key, image, None if mask is None else self._erode(mask)))
        backgrounds: list[Background] = []
        if offline:
            keys = sorted(k for k, s in self.pipeline.samples.items()
                          if s.split == "train" and not s.synthetic and s.y == sel.class_index)
            random.Random(derive_seed(self.seed, "generic-backgrounds", sel.class_index)).shuffle(keys)
            backgrounds = self._inpainted(keys)
        return ClassJob(sel.class_index, sel.class_name, sources, backgrounds, seed=self.seed)

    # -- object masks
    def _object_mask(self, edit: Edit, shape_hw: tuple[int, int]) -> Optional[np.ndarray]:
        """The label object in the edited image: what a background edit kept, else the grounded object."""
        if edit.kind == "background" and edit.mask_png:
            mask = ~load_mask(edit.mask_png, (shape_hw[1], shape_hw[0]))
        else:
            sample = self.pipeline.samples.get(edit.image)
            if sample is None:
                raise DataError(f"edit {edit.edit_id}: source image {edit.image!r} is not in the dataset")
            mask = self.pipeline.object_mask(sample)
            if mask is not None and mask.shape != tuple(shape_hw):
                raise DataError(f"edit {edit.edit_id}: object mask {mask.shape[::-1]} differs from the edited image "
                                f"{shape_hw[::-1]}")
        return mask if mask is not None and mask.any() and not mask.all() else None

    def _erode(self, mask: np.ndarray) -> np.ndarray:
        """Undo the grounder's dilation, so no ring of the old background comes along with the object."""
        eroded = erode(mask, self.pipeline.tool("grounder").dilation_radius(mask.shape))
        return eroded if eroded.any() else mask

    # -- backgrounds
    def _phrase_table(self) -> dict[str, list[str]]:
        """{image key: phrases} for training images with a known background: the run's described images (hold-out
        and donors: the background from their masks, their phrases with the propagated ones), then, as a fallback,
        annotated images naming a scene word (never validation or test images: their pixels must not reach
        training)."""
        if self._phrases is None:
            samples = {k: s for k, s in self.pipeline.samples.items() if s.split == "train" and not s.synthetic}
            table = {k: phrases for k, phrases in self.pipeline.described_backgrounds().items() if k in samples}
            path = self.config.ground.annotations or self.config.caption.annotations
            if path and Path(path).is_file():
                from aspire.data.annotations import read_annotations

                for key, ann in read_annotations(path, check_files=False).items():
                    phrases = [r.phrase for r in ann.regions]
                    if key in table:   # what the annotations show and the captions did not say is in it too
                        table[key] = list(dict.fromkeys([*table[key], *phrases]))
                    elif key in samples and any(lexicon.scene_category(p) for p in phrases):
                        table[key] = phrases
            self._phrases = table
        return self._phrases

    def _donors(self, sel: ClassSelection) -> list[Background]:
        threshold = self.config.probe.merge_similarity
        keys = sorted(k for k, phrases in self._phrase_table().items()
                      if not any(mentions(p, sel.avoid, threshold) for p in phrases))
        random.Random(derive_seed(self.seed, "backgrounds", sel.class_index)).shuffle(keys)
        return self._inpainted(keys)

    def _inpainted(self, keys: Sequence[str]) -> list[Background]:
        """Backgrounds from the images `keys` in turn (their own label object inpainted away), up to
        max_backgrounds; images whose object is not found are passed over."""
        editor, out = self.pipeline.tool("editor"), self.store.folder(f"{CACHE}/backgrounds")
        found: list[Background] = []
        for key in keys:
            if len(found) >= self.config.generate.max_backgrounds:
                break
            sample = self.pipeline.samples[key]
            mask = self.pipeline.object_mask(sample)  # its own object: inpainted away
            if mask is None or mask.all():
                continue
            image = load_image(sample.path)
            if mask.shape != (image.height, image.width):
                continue
            edit = editor.remove(key, image, mask, self._object_name(sample.y),
                                 derive_seed(self.seed, "background", key), out)
            found.append(Background(key, np.array(load_image(edit.edited_png))))
        return found

    def _object_name(self, y: int) -> str:
        """What a removal of class y's own object is recorded as: its first name, else the class name."""
        return (self.pipeline.object_phrases(y) or [lexicon.normalize(self.pipeline.class_names[y])])[0]

    def _own_backgrounds(self, sel: ClassSelection, sources: Sequence[SourceEdit],
                         dilated: Sequence[Optional[np.ndarray]]) -> list[Background]:
        editor, out = self.pipeline.tool("editor"), self.store.folder(f"{CACHE}/backgrounds")
        found = []
        for src, mask in zip(sources, dilated):
            if mask is None:
                continue
            edit = editor.remove(f"edit {src.edit_id}", Image.fromarray(src.edited), mask,
                                 self._object_name(sel.class_index), derive_seed(self.seed, "own", src.edit_id), out)
            found.append(Background(src.image_key, np.array(load_image(edit.edited_png))))
        return found

"""Step 4a's grounding: a phrase → a mask of the image region it names (DESIGN §2, 4a).

Backends behind one `Grounder.ground(image_key, image, phrases, out_dir)` call, chosen by
`GroundSettings.backend`:

- "transformers": GroundingDINO (`IDEA-Research/grounding-dino-tiny`) finds boxes for the prompt
  `phrase + "."` (box threshold 0.3, text threshold 0.25); SAM (`facebook/sam-vit-base`) turns each box
  into one mask (the image embedding is computed once per image, for all phrases), kept inside its box
  (`clip_to_box`); the union of the masks,
  dilated by `dilation_px` (10 px at 512 px, scaled with the image; elliptical kernel), is the phrase's region.
- "annotations": the masks of the image's annotations.jsonl regions whose phrase matches (normalised,
  lemmas, synonyms: `lexicon.same_phrase`), unioned and dilated the same way (set `dilation_px=0` to keep
  exact annotated masks as they are).

One Region per phrase: grounded with a 0/255 PNG mask of the image's size written atomically to
`out_dir`, or grounded=False with a `reason` when the phrase cannot be found (never an exception).
Bad input (an empty phrase, a mask of the wrong size, an image missing from the annotations) raises
DataError naming it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from aspire.config import GroundSettings
from aspire.data.annotations import norm_key
from aspire.data.images import dilate
from aspire.errors import AspireError, ConfigError, DataError, ModelLoadError, describe
from aspire.schemas import Annotation, Region
from aspire.tools import lexicon

if TYPE_CHECKING:
    import torch
    from langchain_core.tools import BaseTool

SAM_BOXES_PER_CALL = 64  # boxes decoded per SAM mask-decoder call (halved on OOM)


# ---------------------------------------------------------------- helpers
def mask_box_xyxy_px(mask: np.ndarray) -> list[float]:
    """The bounding box of a non-empty bool mask (H, W), as pixel edges [x0, y0, x1, y1]."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def box_masks(boxes_xyxy_px: Sequence[Sequence[float]], shape_hw: Sequence[int], device=None) -> "torch.Tensor":
    """Bool masks (n, H, W) of the pixels each box [x0, y0, x1, y1] (pixel edges) touches."""
    import torch

    h, w = int(shape_hw[0]), int(shape_hw[1])
    out = torch.zeros((len(boxes_xyxy_px), h, w), dtype=torch.bool, device=device)
    for i, (x0, y0, x1, y1) in enumerate(boxes_xyxy_px):
        c0, r0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
        c1, r1 = min(w, max(c0 + 1, int(np.ceil(x1)))), min(h, max(r0 + 1, int(np.ceil(y1))))
        out[i, r0:r1, c0:c1] = True
    return out


def region_kind(mask: np.ndarray, object_mask: Optional[np.ndarray], min_share: float = 0.25) -> str:
    """"background" for a region that touches at least three sides of the image and covers at least
    `min_share` of the pixels outside the label's object (`object_mask`, None: unknown); else "foreground".

    This decides object vs background from the mask, whatever word names the region."""
    mask = np.asarray(mask, bool)
    free = ~np.asarray(object_mask, bool) if object_mask is not None else np.ones_like(mask)
    share = float((mask & free).sum()) / max(1, int(free.sum()))
    sides = int(mask[0].any()) + int(mask[-1].any()) + int(mask[:, 0].any()) + int(mask[:, -1].any())
    return "background" if sides >= 3 and share >= min_share else "foreground"


def mask_filename(image_key: str, phrase: str, fingerprint: str = "") -> str:
    """A file name safe for any key and phrase (spaces, slashes, unicode): readable slugs + a hash of all three."""
    digest = hashlib.sha256("\0".join((fingerprint, image_key, phrase)).encode("utf-8")).hexdigest()[:16]
    return f"{lexicon.slug(Path(image_key).stem, 40)}__{lexicon.slug(phrase, 40)}__{digest}.png"


def detector_prompt(phrase: str) -> str:
    """GroundingDINO's prompt for one phrase, as the method uses it: lowercased, ending in '.'."""
    return " ".join(phrase.lower().split()).rstrip(".").strip() + "."






@dataclass
class _Hits:
    """What a backend found for one phrase: the undilated union mask (H, W) or None, and why not."""

    mask: Optional[np.ndarray] = None
    boxes: list[list[float]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    reason: Optional[str] = None


# ---------------------------------------------------------------- the tool
class Grounder:
    """Grounds phrases in images with the backend chosen by `settings.backend`; one entry point, `ground`."""

    def __init__(self, settings: Optional[GroundSettings] = None):
        self.settings = settings or GroundSettings()
        # transformers backend, after load()
        self.detector = None
        self.detector_processor = None
        self.segmenter = None
        self.segmenter_processor = None
        self.device = None
        # annotations backend: {normalised image key: Annotation}
        self._annotations: Optional[dict[str, Annotation]] = None

    # ---------------------------------------------------------------- entry points
    def ground(self, image_key: str, image: Image.Image, phrases: Sequence[str],
               out_dir: Union[str, Path], exact: bool = False) -> list[Region]:
        """One Region per phrase, in order; masks are written under `out_dir`. `exact` (annotations backend):
        only regions named by the same words, not near-duplicates (a phrase looked for where no caption said it)."""
        # 1. check inputs (non-RGB images are converted)
        image, phrases = self._check_inputs(image_key, image, phrases)
        if not phrases:
            return []
        distinct = list(dict.fromkeys(phrases))
        # 2. each distinct phrase's undilated union mask, from the chosen backend
        backend = self.settings.backend
        if backend == "annotations":
            hits = self._annotation_hits(image_key, image.size, distinct, exact)
        elif backend == "transformers":
            hits = self._model_hits(image, distinct)
        else:  # unreachable through GroundSettings validation
            raise ConfigError(f"ground.backend: unknown backend {backend!r}")
        # 3. dilate, write the masks, build the records
        regions = {p: self._region(image_key, p, hits[p], Path(out_dir)) for p in distinct}
        return [regions[p] for p in phrases]

    def ground_many(self, items: Iterable[tuple[str, Image.Image, Sequence[str]]],
                    out_dir: Union[str, Path]) -> list[Region]:
        """`ground` over (image_key, image, phrases) triples; the Regions of all images, in order."""
        out: list[Region] = []
        for image_key, image, phrases in items:
            out.extend(self.ground(image_key, image, phrases, out_dir))
        return out

    @staticmethod
    def _check_inputs(image_key: str, image: Image.Image,
                      phrases: Sequence[str]) -> tuple[Image.Image, list[str]]:
        if not isinstance(image_key, str) or not image_key.strip():
            raise DataError(f"ground: image_key must be a non-empty string, got {image_key!r}")
        if not isinstance(image, Image.Image):
            raise DataError(f"{image_key}: expected a PIL image, got {type(image).__name__}")
        if image.width == 0 or image.height == 0:
            raise DataError(f"{image_key}: image is empty ({image.width}x{image.height})")
        if image.mode != "RGB":
            image = image.convert("RGB")
        if isinstance(phrases, str):
            phrases = [phrases]
        if not isinstance(phrases, Sequence):
            raise DataError(f"{image_key}: phrases must be a list of strings, got {type(phrases).__name__}")
        for i, p in enumerate(phrases):
            if not isinstance(p, str):
                raise DataError(f"{image_key}: phrase #{i} is not a string ({p!r})")
            if not p.strip(" .\t\n"):
                raise DataError(f"{image_key}: phrase #{i} is empty ({p!r})")
        return image, list(phrases)

    def _fingerprint(self) -> str:
        """The settings a mask depends on: a different setting writes a different file."""
        s = self.settings
        if s.backend == "transformers":
            parts = (s.backend, s.detector_id, s.segmenter_id, s.box_threshold, s.text_threshold, s.dilation_px,
                     s.dilation_reference_px) + (("clip",) if s.clip_to_box else ())
            return "|".join(map(str, parts))
        return f"{s.backend}|{s.dilation_px}|{s.dilation_reference_px}"

    def dilation_radius(self, shape_hw: tuple[int, int]) -> int:
        """`dilation_px`, scaled by the image's longer side over `dilation_reference_px` (at least 1 px)."""
        px, ref = self.settings.dilation_px, self.settings.dilation_reference_px
        if px == 0 or ref is None:
            return px
        return max(1, round(px * max(shape_hw) / ref))

    def _region(self, image_key: str, phrase: str, hits: _Hits, out_dir: Path) -> Region:
        from aspire.data.images import save_mask

        common = dict(image=image_key, phrase=phrase, box_xyxy_px=hits.boxes, scores=hits.scores,
                      backend=self.settings.backend)
        if hits.mask is None:
            return Region(grounded=False, reason=hits.reason, **common)
        mask = dilate(hits.mask, self.dilation_radius(hits.mask.shape))  # (H, W) bool
        path = save_mask(mask, out_dir / mask_filename(image_key, phrase, self._fingerprint()))
        return Region(grounded=True, mask_png=str(path.resolve()), area_px=int(mask.sum()), **common)

    # ---------------------------------------------------------------- annotations backend
    def _annotation_for(self, image_key: str) -> Annotation:
        path = self.settings.annotations
        if not path:
            raise ConfigError("ground.annotations: the annotations backend needs an annotations.jsonl path")
        if self._annotations is None:
            from aspire.data.annotations import read_annotations

            anns = read_annotations(path)  # checks that every mask file exists
            self._annotations = {norm_key(k): a for k, a in anns.items()}
        ann = self._annotations.get(norm_key(image_key))
        if ann is None:
            raise DataError(f"{image_key}: no annotation for this image in {Path(path).expanduser().resolve()}")
        return ann

    def _annotation_hits(self, image_key: str, size: tuple[int, int], phrases: list[str],
                         exact: bool = False) -> dict[str, _Hits]:
        from aspire.data.images import load_mask
        from aspire.tools.lexicon import same_phrase, similarity

        ann = self._annotation_for(image_key)
        out: dict[str, _Hits] = {}
        for phrase in phrases:
            # 1. the annotated regions whose phrase names the same thing
            matched = [r for r in ann.regions if (similarity(phrase, r.phrase) == 1.0 if exact
                                                  else same_phrase(phrase, r.phrase))]
            if not matched:
                named = ", ".join(repr(r.phrase) for r in ann.regions) or "none"
                out[phrase] = _Hits(reason=f"no annotated region matches {phrase!r} (regions: {named})")
                continue
            # 2. their masks (H, W) bool; a wrong size raises DataError naming the mask file
            masks = [load_mask(r.mask_png, size=size) for r in matched]
            kept = [m for m in masks if m.any()]
            if not kept:
                files = ", ".join(Path(r.mask_png).name for r in matched)
                out[phrase] = _Hits(reason=f"annotated mask is empty ({files})")
                continue
            # 3. union
            out[phrase] = _Hits(mask=np.logical_or.reduce(kept), boxes=[mask_box_xyxy_px(m) for m in kept],
                                scores=[1.0] * len(kept))
        return out

    @property
    def resident(self) -> bool:
        """Whether GroundingDINO and SAM are loaded."""
        return self.detector is not None

    def release(self) -> None:
        """Drop GroundingDINO and SAM (loaded again on the next call): the next stage gets their memory."""
        if self.detector is not None:
            from aspire.devices import free_memory

            self.detector = self.detector_processor = self.segmenter = self.segmenter_processor = None
            free_memory()

    # ---------------------------------------------------------------- transformers backend
    def load(self) -> None:
        """Load GroundingDINO and SAM once; an unloadable id raises ModelLoadError naming it."""
        if self.detector is not None:
            return
        from transformers import (AutoConfig, AutoModelForZeroShotObjectDetection, AutoProcessor, SamModel,
                                  SamProcessor)

        from aspire.devices import pick_device, pick_dtype

        def model_type(model_id: str, what: str) -> str:
            try:
                return AutoConfig.from_pretrained(model_id).model_type
            except Exception as e:  # missing folder, unknown repo, offline hub, bad files: one user error
                raise ModelLoadError(f"{model_id}: cannot load the {what} ({describe(e)})") from e

        s = self.settings
        device = pick_device(s.device)
        # 1. GroundingDINO (or MM-GroundingDINO), in full precision: its deformable attention has had fp16/bf16
        #    dtype bugs across transformers releases, and the detector is small next to SAM
        kind = model_type(s.detector_id, "GroundingDINO detector")
        if "grounding-dino" not in kind:
            raise ModelLoadError(f"{s.detector_id}: not a GroundingDINO model (model_type {kind!r})")
        try:
            detector_processor = AutoProcessor.from_pretrained(s.detector_id)
            detector = AutoModelForZeroShotObjectDetection.from_pretrained(s.detector_id)
        except Exception as e:
            raise ModelLoadError(f"{s.detector_id}: cannot load the GroundingDINO detector ({describe(e)})") from e
        # 2. SAM, half precision on GPU (SamModel would load any checkpoint with random weights: check the type)
        kind = model_type(s.segmenter_id, "SAM segmenter")
        if kind != "sam":
            raise ModelLoadError(f"{s.segmenter_id}: not a SAM model (model_type {kind!r})")
        try:
            segmenter_processor = SamProcessor.from_pretrained(s.segmenter_id)
            segmenter = SamModel.from_pretrained(s.segmenter_id, dtype=pick_dtype(device, s.dtype))
        except Exception as e:
            raise ModelLoadError(f"{s.segmenter_id}: cannot load the SAM segmenter ({describe(e)})") from e
        self.detector = detector.to(device).eval()
        self.segmenter = segmenter.to(device).eval()
        self.detector_processor, self.segmenter_processor = detector_processor, segmenter_processor
        self.device = device

    def _model_hits(self, image: Image.Image, phrases: list[str]) -> dict[str, _Hits]:
        import torch

        from aspire.devices import map_batches, pixel_dtype

        self.load()
        s = self.settings
        # 1. detect: per phrase, boxes (n, 4) xyxy px inside the image and scores (n,)
        detections = map_batches(lambda batch: self.detect(image, batch), phrases, s.batch_size)
        all_boxes = [b for boxes, _ in detections for b in boxes.tolist()]
        if not all_boxes:
            return {p: _Hits(reason=f"no box scored above box_threshold {s.box_threshold}") for p in phrases}
        # 2. SAM image embedding, once for all phrases: (1, C, e, e)
        sam_inputs = self.segmenter_processor(images=image, input_boxes=[all_boxes], return_tensors="pt")
        pixel_values = sam_inputs["pixel_values"].to(self.device, dtype=pixel_dtype(self.segmenter))  # (1, 3, S, S)
        with torch.inference_mode():
            embeddings = self.segmenter.get_image_embeddings(pixel_values)
        # 3. per phrase: one mask per box, their union
        out: dict[str, _Hits] = {}
        start = 0
        for phrase, (boxes, scores) in zip(phrases, detections):
            n = len(boxes)
            hits = _Hits(boxes=[[round(float(v), 2) for v in b] for b in boxes],
                         scores=[round(float(v), 4) for v in scores])
            if n == 0:
                hits.reason = f"no box scored above box_threshold {s.box_threshold}"
            else:
                box_index = list(range(start, start + n))
                unions = map_batches(lambda idx: [self._masks(embeddings, sam_inputs, idx, all_boxes).any(dim=0)],
                                     box_index, SAM_BOXES_PER_CALL)
                union = torch.stack(unions).any(dim=0).cpu().numpy()  # (H, W) bool
                if union.any():
                    hits.mask = union
                else:
                    hits.reason = f"SAM found no pixels inside the {n} detected box(es)"
            out[phrase] = hits
            start += n
        return out

    def detect(self, image: Image.Image, phrases: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """GroundingDINO on one image, one prompt per phrase: per phrase (boxes (n, 4) xyxy px, scores (n,))."""
        import torch

        self.load()
        s = self.settings
        prompts = [detector_prompt(p) for p in phrases]
        inputs = self.detector_processor(images=[image] * len(prompts), text=prompts, return_tensors="pt",
                                         padding=True).to(self.device)
        with torch.inference_mode():
            outputs = self.detector(**inputs)  # logits (B, queries, max_text_len), pred_boxes (B, queries, 4)
        # every box above box_threshold belongs to the phrase (one phrase per prompt); text_threshold only
        # decides which of its words label the box
        results = self.detector_processor.post_process_grounded_object_detection(
            outputs, input_ids=inputs["input_ids"], threshold=s.box_threshold, text_threshold=s.text_threshold,
            target_sizes=[(image.height, image.width)] * len(prompts), text_labels=[[p] for p in prompts])
        out = []
        for r in results:
            boxes = r["boxes"].float().cpu().numpy().reshape(-1, 4)
            scores = r["scores"].float().cpu().numpy().reshape(-1)
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, image.width)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, image.height)
            keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)  # drop degenerate boxes
            out.append((boxes[keep], scores[keep]))
        return out

    def _masks(self, embeddings: "torch.Tensor", sam_inputs, box_index: Sequence[int],
               boxes_px: Sequence[Sequence[float]]) -> "torch.Tensor":
        """SAM's masks for the picked boxes (n, H, W), each kept inside its box when `clip_to_box`."""
        masks = self.segment(embeddings, sam_inputs, box_index)
        if self.settings.clip_to_box:
            masks = masks & box_masks([boxes_px[i] for i in box_index], masks.shape[-2:], masks.device)
        return masks

    def segment(self, embeddings: "torch.Tensor", sam_inputs, box_index: Sequence[int]) -> "torch.Tensor":
        """SAM's mask for each box of `sam_inputs` picked by `box_index`: bool (n, H, W) at the image's size."""
        import torch

        boxes = sam_inputs["input_boxes"][:, list(box_index)].to(self.device)  # (1, n, 4), SAM's input frame
        with torch.inference_mode():
            outputs = self.segmenter(image_embeddings=embeddings, input_boxes=boxes, multimask_output=False)
        # pred_masks (1, n, 1, h, w) low-res logits → (n, 1, H, W) bool
        masks = self.segmenter_processor.post_process_masks(
            outputs.pred_masks.float(), sam_inputs["original_sizes"], sam_inputs["reshaped_input_sizes"])[0]
        return masks[:, 0]


# ---------------------------------------------------------------- LangChain adapter
def as_tool(grounder: Grounder, out_dir: Union[str, Path], root: Optional[Union[str, Path]] = None) -> "BaseTool":
    """A LangChain tool `ground_phrases(image_path, phrases)` → list of Region dicts, masks under `out_dir`.

    The image key is the path relative to `root` when given and under it (the key annotations use), else as
    given. A user error (AspireError) comes back to the agent as the tool's one-line error message.
    """
    from langchain_core.tools import StructuredTool, ToolException

    from aspire.data.images import load_image

    root_path = Path(root).expanduser().resolve() if root is not None else None

    def ground_phrases(image_path: str, phrases: list[str]) -> list[dict]:
        """Find the region each phrase names in an image; returns per phrase whether it was found and its mask."""
        path, key = Path(image_path).expanduser(), image_path
        if root_path is not None:
            path = (root_path / path).resolve()
            if path.is_relative_to(root_path):
                key = path.relative_to(root_path).as_posix()
        try:
            return [r.model_dump() for r in grounder.ground(key, load_image(path), phrases, out_dir)]
        except AspireError as e:
            raise ToolException(f"{type(e).__name__}: {e}") from e

    return StructuredTool.from_function(ground_phrases, name="ground_phrases", handle_tool_error=True)

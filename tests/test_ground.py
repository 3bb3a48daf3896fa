"""Grounding (step 4a): the transformers backend end to end with tiny random-weight GroundingDINO + SAM,
the annotations backend, dilation, input checks and the LangChain adapter."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from aspire.config import GroundSettings
from aspire.data.images import load_mask, save_mask
from aspire.errors import ConfigError, DataError, ModelLoadError
from aspire.devices import pixel_dtype
from aspire.data.images import dilate
from aspire.tools.ground import Grounder, as_tool, box_masks, detector_prompt, mask_box_xyxy_px, mask_filename
from tiny_ground import build_tiny_gdino, build_tiny_sam
from target_device import DEVICE

W, H = 80, 60  # not square, not SAM's 64 px: exercises resizing back to the image size


def _image(seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).convert(mode)


def _png_mask(path: str) -> np.ndarray:
    arr = np.asarray(Image.open(path))
    assert arr.shape == (H, W) and set(np.unique(arr)) <= {0, 255}
    return arr == 255


# ---------------------------------------------------------------- transformers backend
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_ground")
    return str(build_tiny_gdino(root / "gdino")), str(build_tiny_sam(root / "sam"))


def _model_grounder(tiny_models, **kw) -> Grounder:
    gdino, sam = tiny_models
    settings = dict(backend="transformers", detector_id=gdino, segmenter_id=sam, device=DEVICE, dilation_reference_px=None)
    return Grounder(GroundSettings(**(settings | kw)))


def test_transformers_end_to_end(tiny_models, tmp_path):
    g = _model_grounder(tiny_models, box_threshold=0.0, text_threshold=0.0, dilation_px=0)
    phrases = ["dog", "green grass / hill", "dog"]
    regions = g.ground("images/a b.jpg", _image(mode="L"), phrases, tmp_path / "masks")
    assert [r.phrase for r in regions] == phrases and regions[0] == regions[2]
    assert all(r.image == "images/a b.jpg" and r.backend == "transformers" for r in regions)
    # threshold 0 keeps every query: boxes inside the image, one score each
    for r in regions:
        assert len(r.box_xyxy_px) >= 1 and len(r.scores) == len(r.box_xyxy_px)
        for x0, y0, x1, y1 in r.box_xyxy_px:
            assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
    grounded = [r for r in regions if r.grounded]
    assert grounded, "random SAM logits should switch some pixels on"
    for r in grounded:
        mask = _png_mask(r.mask_png)
        assert r.area_px == int(mask.sum()) > 0 and Path(r.mask_png).parent == tmp_path / "masks"
    written = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert written == sorted({Path(r.mask_png).name for r in grounded})

    # the written mask is exactly the union of SAM's masks, one per box (image-sized bool), each kept in its box
    image = _image(mode="L").convert("RGB")
    r = grounded[0]
    (boxes, _), = g.detect(image, [r.phrase])
    assert np.allclose(np.round(boxes, 2), r.box_xyxy_px)
    sam_inputs = g.segmenter_processor(images=image, input_boxes=[boxes.tolist()], return_tensors="pt")
    pixels = sam_inputs["pixel_values"].to(g.device, dtype=pixel_dtype(g.segmenter))
    embeddings = g.segmenter.get_image_embeddings(pixels)
    masks = g.segment(embeddings, sam_inputs, range(len(boxes))).cpu().numpy()
    assert masks.shape == (len(boxes), H, W) and masks.dtype == bool
    inside = box_masks(boxes.tolist(), (H, W)).numpy()
    union = (masks & inside).any(axis=0)
    assert union.sum() > (masks & inside).sum(axis=(1, 2)).max()  # the boxes' masks differ: not one of them
    assert np.array_equal(_png_mask(r.mask_png), union)
    assert not (union & ~inside.any(axis=0)).any()


def test_sam_masks_kept_inside_their_boxes_unless_asked(tiny_models, tmp_path):
    """clip_to_box (default): no pixel outside the detector's boxes, before dilation; off: SAM's masks as they are
    (random SAM weights spill far past the boxes, as SAM can on similar texture)."""
    kw = dict(box_threshold=0.0, text_threshold=0.0, dilation_px=0)
    clipped, = _model_grounder(tiny_models, **kw).ground("x.png", _image(), ["dog"], tmp_path)
    raw, = _model_grounder(tiny_models, clip_to_box=False, **kw).ground("x.png", _image(), ["dog"], tmp_path)
    assert clipped.grounded and raw.grounded and clipped.mask_png != raw.mask_png  # other settings, other file
    g = _model_grounder(tiny_models, **kw)
    (boxes, _), = g.detect(_image(), ["dog"])   # the exact boxes (the records round them)
    assert clipped.box_xyxy_px == raw.box_xyxy_px and np.allclose(boxes, clipped.box_xyxy_px, atol=0.01)
    inside = box_masks(boxes.tolist(), (H, W)).numpy().any(axis=0)
    mc, mr = _png_mask(clipped.mask_png), _png_mask(raw.mask_png)
    assert mc.any() and not (mc & ~(mr & inside)).any()   # each box's mask in its box: inside their union too
    assert (mr & ~inside).any()   # the clip removed something


def test_box_masks_cover_the_pixels_a_box_touches():
    m = box_masks([[1.2, 0.0, 3.0, 2.5], [9.5, 9.5, 12.0, 12.0]], (10, 10)).numpy()
    assert m.shape == (2, 10, 10)
    assert np.argwhere(m[0]).min(0).tolist() == [0, 1] and np.argwhere(m[0]).max(0).tolist() == [2, 2]
    assert m[1].sum() == 1 and m[1, 9, 9]   # clipped to the image, at least one pixel


def test_half_precision_segmenter_gets_half_pixels(tiny_models, tmp_path):
    """ground.dtype = float16 (what "auto" picks on a GPU), on the CPU: SAM's pixels take its convolutions' dtype.
    (On CUDA the float16 SamModel's `.dtype` said float32 and the old cast crashed; ASPIRE_TEST_DEVICE=cuda checks
    that.) GroundingDINO stays in float32."""
    g = _model_grounder(tiny_models, box_threshold=0.0, text_threshold=0.0, dilation_px=0, dtype="float16")
    regions = g.ground("a.png", _image(), ["dog"], tmp_path / "masks")
    assert torch.float16 in {p.dtype for p in g.segmenter.parameters()} and pixel_dtype(g.segmenter) == torch.float16
    assert len(regions) == 1 and regions[0].scores
    assert {p.dtype for p in g.detector.parameters()} == {torch.float32}


def test_transformers_dilation_grows_the_same_union(tiny_models, tmp_path):
    exact = _model_grounder(tiny_models, box_threshold=0.0, text_threshold=0.0, dilation_px=0)
    grown = _model_grounder(tiny_models, box_threshold=0.0, text_threshold=0.0, dilation_px=4)
    a, = exact.ground("x.png", _image(1), ["a cat"], tmp_path)
    b, = grown.ground("x.png", _image(1), ["a cat"], tmp_path)
    assert a.grounded and b.grounded and a.mask_png != b.mask_png  # other settings, other file
    ma, mb = _png_mask(a.mask_png), _png_mask(b.mask_png)
    assert b.area_px > a.area_px and not (ma & ~mb).any()
    assert np.array_equal(mb, dilate(ma, 4))


def test_transformers_threshold_one_grounds_nothing(tiny_models, tmp_path):
    g = _model_grounder(tiny_models, box_threshold=1.0, text_threshold=1.0)
    regions = g.ground("x.png", _image(), ["dog", "tree"], tmp_path / "m")
    assert [r.grounded for r in regions] == [False, False]
    assert all(r.mask_png is None and r.area_px == 0 and "box_threshold" in r.reason for r in regions)
    assert not (tmp_path / "m").exists()


def test_unloadable_model_raises_model_load_error(tiny_models, tmp_path):
    gdino, sam = tiny_models
    missing = str(tmp_path / "no-such-model")
    g = Grounder(GroundSettings(backend="transformers", detector_id=missing, segmenter_id=sam, device=DEVICE))
    with pytest.raises(ModelLoadError, match="no-such-model"):
        g.ground("x.png", _image(), ["dog"], tmp_path)
    g = Grounder(GroundSettings(backend="transformers", detector_id=gdino, segmenter_id=gdino, device=DEVICE))
    with pytest.raises(ModelLoadError, match="not a SAM model"):
        g.load()
    g = Grounder(GroundSettings(backend="transformers", detector_id=sam, segmenter_id=sam, device=DEVICE))
    with pytest.raises(ModelLoadError, match="not a GroundingDINO model"):
        g.load()


def test_detector_prompt():
    assert detector_prompt("  A Red  Boat ") == "a red boat."
    assert detector_prompt("dog.") == "dog."


# ---------------------------------------------------------------- annotations backend
def _square(x0: int, y0: int, side: int, size=(W, H)) -> np.ndarray:
    m = np.zeros((size[1], size[0]), dtype=bool)
    m[y0:y0 + side, x0:x0 + side] = True
    return m


@pytest.fixture()
def annotated(tmp_path):
    """A dataset root with annotations.jsonl: one image, regions boat, two trees, an empty cloud, a bad dog."""
    root = tmp_path / "data"
    (root / "masks").mkdir(parents=True)
    masks = {"boat": _square(5, 5, 10), "tree1": _square(40, 10, 8), "tree2": _square(60, 40, 6),
             "cloud": np.zeros((H, W), bool), "lawn": _square(0, 50, 10)}
    for name, m in masks.items():
        save_mask(m, root / "masks" / f"{name}.png")
    save_mask(np.ones((H + 1, W), bool), root / "masks" / "dog.png")  # wrong size
    regions = [{"phrase": "a small boat", "mask": "masks/boat.png"}, {"phrase": "tree", "mask": "masks/tree1.png"},
               {"phrase": "trees", "mask": "masks/tree2.png"}, {"phrase": "cloud", "mask": "masks/cloud.png"},
               {"phrase": "lawn", "mask": "masks/lawn.png"}, {"phrase": "dog", "mask": "masks/dog.png"}]
    lines = [{"image": "imgs/one.png", "caption": "a small boat near trees", "regions": regions},
             {"image": "imgs/two.png", "caption": "nothing annotated", "regions": []}]
    (root / "annotations.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return root, masks


def _ann_grounder(root: Path, dilation_px: int = 0) -> Grounder:
    return Grounder(GroundSettings(annotations=str(root / "annotations.jsonl"), dilation_px=dilation_px,
                                   dilation_reference_px=None))


def test_annotations_exact_plural_synonym_match(annotated, tmp_path):
    root, masks = annotated
    g = _ann_grounder(root)
    boat, boats, grass = g.ground("imgs/one.png", _image(), ["a small boat", "Boats", "grass"], tmp_path)
    for r in (boat, boats):
        assert r.grounded and r.backend == "annotations"
        assert np.array_equal(_png_mask(r.mask_png), masks["boat"])
        assert r.box_xyxy_px == [[5.0, 5.0, 15.0, 15.0]] and r.area_px == 100
    assert boat.mask_png != boats.mask_png  # keyed by phrase
    assert grass.grounded and np.array_equal(_png_mask(grass.mask_png), masks["lawn"])  # grass ~ lawn


def test_annotations_union_of_matching_regions(annotated, tmp_path):
    root, masks = annotated
    r, = _ann_grounder(root).ground("./imgs/one.png", _image(), ["trees"], tmp_path)
    assert r.grounded and r.area_px == 64 + 36
    assert np.array_equal(_png_mask(r.mask_png), masks["tree1"] | masks["tree2"])
    assert sorted(r.box_xyxy_px) == [[40.0, 10.0, 48.0, 18.0], [60.0, 40.0, 66.0, 46.0]]


def test_annotations_dilation_applies(annotated, tmp_path):
    root, masks = annotated
    r, = _ann_grounder(root, dilation_px=2).ground("imgs/one.png", _image(), ["boat"], tmp_path)
    assert np.array_equal(_png_mask(r.mask_png), dilate(masks["boat"], 2)) and r.area_px > 100


def test_annotations_not_found_and_empty_mask(annotated, tmp_path):
    root, _ = annotated
    g = _ann_grounder(root)
    giraffe, cloud = g.ground("imgs/one.png", _image(), ["giraffe", "clouds"], tmp_path / "m")
    assert not giraffe.grounded and "no annotated region matches" in giraffe.reason
    assert not cloud.grounded and "empty" in cloud.reason and "cloud.png" in cloud.reason
    none, = g.ground("imgs/two.png", _image(), ["boat"], tmp_path / "m")
    assert not none.grounded and none.mask_png is None
    assert not (tmp_path / "m").exists()


def test_annotations_bad_input(annotated, tmp_path):
    root, _ = annotated
    g = _ann_grounder(root)
    with pytest.raises(DataError, match=r"dog\.png.*size"):
        g.ground("imgs/one.png", _image(), ["dog"], tmp_path)
    with pytest.raises(DataError, match="imgs/three.png"):
        g.ground("imgs/three.png", _image(), ["boat"], tmp_path)
    with pytest.raises(DataError, match="phrase #1 is empty"):
        g.ground("imgs/one.png", _image(), ["boat", "  "], tmp_path)
    with pytest.raises(DataError, match="PIL image"):
        g.ground("imgs/one.png", np.zeros((H, W, 3)), ["boat"], tmp_path)
    with pytest.raises(ConfigError, match="ground.annotations"):
        Grounder().ground("imgs/one.png", _image(), ["boat"], tmp_path)


def test_non_rgb_image_and_single_phrase_string(annotated, tmp_path):
    root, masks = annotated
    rgba = _image().convert("RGBA")
    r, = _ann_grounder(root).ground("imgs/one.png", rgba, "boat", tmp_path)
    assert r.grounded and r.phrase == "boat"


# ---------------------------------------------------------------- helpers
def test_dilation_grows_a_square_by_the_radius():
    side, r = 10, 3
    square = _square(20, 20, side, size=(64, 64))
    grown = dilate(square, r)
    assert mask_box_xyxy_px(grown) == [20.0 - r, 20.0 - r, 30.0 + r, 30.0 + r]
    # Minkowski sum of a square with a convex symmetric disc kernel K: s² + 4sr + (|K| - 4r - 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    assert grown.sum() == side * side + 4 * side * r + int(kernel.sum()) - 4 * r - 1
    assert (side + 2 * r) ** 2 > grown.sum() > side * side + 4 * side * r  # rounded corners
    assert np.array_equal(dilate(square, 0), square)


def test_mask_filenames_are_safe_and_distinct():
    names = {mask_filename("dir/img 1.jpg", p, "fp") for p in ["a/b", "a b", "a-b", "../x", "ünï"]}
    assert len(names) == 5
    assert all("/" not in n and n.endswith(".png") and not n.startswith(".") for n in names)
    assert mask_filename("a.jpg", "dog", "fp") == mask_filename("a.jpg", "dog", "fp")
    assert mask_filename("a.jpg", "dog", "fp") != mask_filename("b/a.jpg", "dog", "fp")


def test_langchain_tool(annotated, tmp_path):
    root, masks = annotated
    (root / "imgs").mkdir()
    _image().save(root / "imgs" / "one.png")
    tool = as_tool(_ann_grounder(root), out_dir=tmp_path / "m", root=root)
    out = tool.invoke({"image_path": "imgs/one.png", "phrases": ["boat", "giraffe"]})
    assert [(d["image"], d["phrase"], d["grounded"]) for d in out] == [("imgs/one.png", "boat", True),
                                                                      ("imgs/one.png", "giraffe", False)]
    assert np.array_equal(load_mask(out[0]["mask_png"], size=(W, H)), masks["boat"])
    err = tool.invoke({"image_path": "imgs/one.png", "phrases": ["dog"]})
    assert isinstance(err, str) and "DataError" in err and "dog.png" in err


def test_dilation_scales_with_the_image_side():
    g = Grounder(GroundSettings(dilation_px=10))
    assert g.dilation_radius((512, 384)) == 10 and g.dilation_radius((1024, 1024)) == 20
    assert g.dilation_radius((64, 64)) == 1
    assert Grounder(GroundSettings(dilation_px=10, dilation_reference_px=None)).dilation_radius((64, 64)) == 10
    assert Grounder(GroundSettings(dilation_px=0)).dilation_radius((512, 512)) == 0

"""Editor: removal and background change, offline and with tiny real pipelines, controls, provenance."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aspire.config import EditSettings
from aspire.data.images import load_mask
from aspire.errors import ConfigError, DataError, ModelLoadError
from aspire.tools.edit import BackgroundRequest, Editor, RemoveRequest, as_tool, find_control
from tiny_diffusers import build_tiny_pix2pix, build_tiny_sd_inpaint

GREEN = np.array([40, 160, 60])
RED = np.array([220, 20, 30])


def scene(w: int = 64, h: int = 64, bg=GREEN, obj=RED, box=(20, 20, 36, 36)):
    """A smooth background with a square object; returns (PIL image, object mask (H, W) bool)."""
    rng = np.random.default_rng(0)
    img = np.broadcast_to(bg, (h, w, 3)).astype(np.int16) + rng.integers(-6, 7, (h, w, 3))
    x0, y0, x1, y1 = box
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = True
    img[mask] = obj
    return Image.fromarray(img.clip(0, 255).astype(np.uint8)), mask


def arr(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------ offline removal
def test_opencv_removal_changes_only_the_mask_towards_its_surroundings(tmp_path):
    image, obj = scene()
    mask = obj.copy()
    mask[18:38, 18:38] = True  # the object dilated by 2 px, as grounding hands it over
    edit = Editor().remove("a/img.png", image, mask, "red box", seed=0, out_dir=tmp_path)

    src, out = np.asarray(image).astype(np.int16), arr(edit.edited_png)
    assert out.shape == src.shape
    assert np.array_equal(out[~mask], src[~mask])  # exact outside the mask
    before = np.abs(src[mask] - GREEN).mean()
    after = np.abs(out[mask] - GREEN).mean()
    assert before > 60 and after < 15  # the red object is gone, filled with the green around it
    assert np.array_equal(load_mask(edit.mask_png), mask)
    assert (edit.image, edit.phrase, edit.kind, edit.control, edit.backend, edit.seed) == \
        ("a/img.png", "red box", "foreground", False, "opencv", 0)
    assert Path(edit.edited_png).parent == tmp_path.resolve()


def test_rerun_is_idempotent_and_keys_change_with_inputs(tmp_path):
    image, mask = scene()
    editor = Editor()
    first = editor.remove("img.png", image, mask, "red box", seed=1, out_dir=tmp_path)
    stamp, digest = Path(first.edited_png).stat().st_mtime_ns, sha(first.edited_png)
    again = Editor().remove("img.png", image, mask, "red box", seed=1, out_dir=tmp_path)
    assert again == first
    assert Path(again.edited_png).stat().st_mtime_ns == stamp and sha(again.edited_png) == digest
    assert len(list(tmp_path.glob("*.png"))) == 2  # edited + mask, nothing duplicated

    other_seed = editor.remove("img.png", image, mask, "red box", seed=2, out_dir=tmp_path)
    other_phrase = editor.remove("img.png", image, mask, "box", seed=1, out_dir=tmp_path)
    assert len({first.edit_id, other_seed.edit_id, other_phrase.edit_id}) == 3

    # a damaged file is recomputed, not trusted
    Path(first.edited_png).write_bytes(b"garbage")
    fixed = editor.remove("img.png", image, mask, "red box", seed=1, out_dir=tmp_path)
    assert fixed.edit_id == first.edit_id and sha(fixed.edited_png) == digest


def test_bad_inputs_raise_data_errors_naming_the_problem(tmp_path):
    image, mask = scene()
    editor = Editor()
    with pytest.raises(DataError, match=r"32x32 differs from image size 64x64.*'img\.png'"):
        editor.remove("img.png", image, np.ones((32, 32), bool), "boat", 0, tmp_path)
    with pytest.raises(DataError, match=r"empty mask for phrase 'boat' in image 'img\.png'"):
        editor.remove("img.png", image, np.zeros((64, 64), bool), "boat", 0, tmp_path)
    with pytest.raises(DataError, match="covers the whole image"):
        editor.remove("img.png", image, np.ones((64, 64), bool), "boat", 0, tmp_path)
    with pytest.raises(DataError, match="empty foreground mask"):
        editor.change_background("img.png", image, np.zeros((64, 64), bool), "grass", "water", 0, tmp_path)
    with pytest.raises(DataError, match="needs a foreground mask"):
        editor.change_background("img.png", image, None, "grass", "water", 0, tmp_path)
    with pytest.raises(DataError, match="no background"):
        editor.change_background("img.png", image, np.ones((64, 64), bool), "grass", "water", 0, tmp_path)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ offline background change
def test_neutral_fill_keeps_foreground_exactly(tmp_path):
    image, fg = scene()
    editor = Editor(EditSettings(background_fill="neutral"))
    edit = editor.change_background("img.png", image, fg, "grass", "water", 0, tmp_path)
    src, out = np.asarray(image).astype(np.int16), arr(edit.edited_png)
    assert np.array_equal(out[fg], src[fg])
    bg = out[~fg]
    assert len(np.unique(bg)) == 1  # one grey level, R = G = B
    assert np.abs(bg - src[~fg]).mean() > 40
    assert edit.kind == "background" and edit.backend == "replace" and "neutral grey" in edit.instruction
    assert np.array_equal(load_mask(edit.mask_png), ~fg)  # the pixels the edit changed

    control = editor.change_background("img.png", image, fg, "grass", "water", 0, tmp_path, control=True)
    out_c = arr(control.edited_png)
    assert control.control and control.edit_id != edit.edit_id
    assert np.array_equal(out_c[fg], src[fg])
    assert np.abs(out_c[~fg] - GREEN).max() <= 3  # the same flat fill, in the background's own colour


def test_donor_background_without_the_donors_object(tmp_path):
    image, fg = scene()
    blue = np.array([30, 60, 200])
    donor, donor_fg = scene(bg=blue, obj=np.array([250, 240, 0]), box=(40, 8, 56, 24))
    editor = Editor(EditSettings(background_fill="other-image"))
    edit = editor.change_background("img.png", image, fg, "grass", "water", 3, tmp_path, donor=(donor, donor_fg))
    src, out = np.asarray(image).astype(np.int16), arr(edit.edited_png)
    assert np.array_equal(out[fg], src[fg])
    assert np.abs(out[~fg] - blue).mean() < 10  # the donor's background...
    assert np.abs(out[~fg] - blue).max() < 60  # ...and no trace of the donor's yellow object
    assert edit.instruction.startswith("background replaced by another image")

    # a control: a donor with the same kind of background (here a noisier green one)
    green_donor, green_fg = scene(bg=GREEN + 10, obj=np.array([250, 240, 0]), box=(2, 40, 18, 56))
    control = editor.change_background("img.png", image, fg, "grass", "water", 3, tmp_path,
                                       donor=(green_donor, green_fg), control=True)
    out_c = arr(control.edited_png)
    assert control.control and np.array_equal(out_c[fg], src[fg]) and np.abs(out_c[~fg] - GREEN - 10).max() < 60

    # no donor: neutral grey, named in the provenance
    plain = editor.change_background("img.png", image, fg, "grass", "water", 3, tmp_path)
    assert "no donor" in plain.instruction and len(np.unique(arr(plain.edited_png)[~fg])) == 1


# ------------------------------------------------------------------ controls
def test_control_mask_translates_the_same_shape_off_the_mask():
    _, mask = scene()
    editor = Editor(EditSettings(control_gap_px=4))
    c1 = editor.control_mask(mask, seed=7)
    assert c1 is not None and c1.sum() == mask.sum()
    ys, xs = np.nonzero(c1)
    assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == (16, 16)  # the same shape
    from aspire.data.images import dilate as _dilate

    assert not (c1 & _dilate(mask, 4)).any()  # off the mask, also after dilation
    assert np.array_equal(c1, editor.control_mask(mask, seed=7))  # deterministic
    others = [editor.control_mask(mask, seed=s) for s in range(8, 12)]
    assert any(not np.array_equal(c1, o) for o in others)


def test_control_mask_falls_back_to_a_same_area_rectangle_or_none():
    mask = np.zeros((64, 64), bool)
    mask[:, :4] = True
    mask[:4, :] = True  # an L spanning the whole image: it cannot be translated
    control, how = find_control(mask, seed=0, gap_px=4)
    assert control is not None and how.startswith("rectangle")
    assert control.sum() == mask.sum()
    assert not (control & mask).any() and not control[:8, :].any() and not control[:, :8].any()

    big = np.ones((64, 64), bool)
    big[:8, :8] = False  # 98 % of the image
    control, why = find_control(big, seed=0, gap_px=4)
    assert control is None and "no free place" in why


def test_removal_control_edits_elsewhere_or_is_skipped(tmp_path):
    image, mask = scene()
    editor = Editor()
    real = editor.remove("img.png", image, mask, "red box", 5, tmp_path)
    control = editor.remove("img.png", image, mask, "red box", 5, tmp_path, control=True)
    assert control.control and control.edit_id != real.edit_id
    cmask = load_mask(control.mask_png)
    assert cmask.sum() == mask.sum() and not (cmask & mask).any()
    src, out = np.asarray(image).astype(np.int16), arr(control.edited_png)
    assert np.array_equal(out[~cmask], src[~cmask])  # the object itself is untouched

    big = np.ones((64, 64), bool)
    big[:6, :6] = False
    assert editor.remove("img.png", image, big, "field", 5, tmp_path, control=True) is None
    assert editor.skipped[-1].phrase == "field" and "no free place" in editor.skipped[-1].reason


# ------------------------------------------------------------------ LaMa (a tiny scripted module, real loading)
class MeanFill(torch.nn.Module):
    """Big-lama's TorchScript convention; fills the mask with the mean colour of the unmasked pixels."""

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # image (1, 3, H, W) in [0, 1]; mask (1, 1, H, W) in {0, 1}
        keep = 1 - mask
        mean = (image * keep).sum(dim=(2, 3), keepdim=True) / keep.sum(dim=(2, 3), keepdim=True)
        return image * keep + mean * mask


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_lama_torchscript_file(tmp_path):
    path = tmp_path / "big-lama.pt"
    torch.jit.save(torch.jit.script(MeanFill()), str(path))
    image, mask = scene(w=60, h=50, box=(10, 10, 26, 26))  # not a multiple of 8: padded and cropped back
    edit = Editor(EditSettings(remove_backend="lama", lama_torchscript=str(path))).remove(
        "img.png", image, mask, "red box", 0, tmp_path / "out")
    src, out = np.asarray(image).astype(np.int16), arr(edit.edited_png)
    assert out.shape == (50, 60, 3) and np.array_equal(out[~mask], src[~mask])
    assert np.abs(out[mask] - GREEN).max() <= 6 and edit.backend == "lama" and edit.model_id == str(path)

    with pytest.raises(ModelLoadError, match="missing"):
        Editor(EditSettings(remove_backend="lama", lama_torchscript=str(tmp_path / "nope.pt"))).remove(
            "img.png", image, mask, "red box", 0, tmp_path)
    with pytest.raises(ConfigError, match="lama_torchscript"):
        Editor(EditSettings(remove_backend="lama")).remove("img.png", image, mask, "red box", 0, tmp_path)


# ------------------------------------------------------------------ tiny real diffusion pipelines
@pytest.fixture(scope="module")
def tiny_pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return build_tiny_sd_inpaint(root / "sd-inpaint"), build_tiny_pix2pix(root / "pix2pix")


def test_sd_inpaint_end_to_end(tiny_pipes, tmp_path):
    settings = EditSettings(remove_backend="sd-inpaint", inpaint_model_id=str(tiny_pipes[0]), num_inference_steps=2,
                            working_size_px=64, batch_size=2)
    editor = Editor(settings)
    image, mask = scene(w=60, h=52, box=(20, 16, 40, 36))
    edit = editor.remove("img.png", image, mask, "red box", 0, tmp_path)
    src, out = np.asarray(image).astype(np.int16), arr(edit.edited_png)
    assert out.shape == src.shape
    assert np.array_equal(out[~mask], src[~mask])
    assert np.abs(out[mask] - src[mask]).mean() > 5  # something was generated there
    assert (edit.backend, edit.model_id, edit.instruction) == ("sd-inpaint", str(tiny_pipes[0]), "background")

    # batched: three requests in batches of two, one a control; same seed → same pixels as one by one
    reqs = [RemoveRequest("img.png", image, mask, "red box", 0),
            RemoveRequest("b.png", image, mask, "red box", 1),
            RemoveRequest("img.png", image, mask, "red box", 0, control=True)]
    many = Editor(settings).remove_many(reqs, tmp_path / "many")
    assert [e.control for e in many] == [False, False, True] and many[0].edit_id == edit.edit_id
    assert np.abs(arr(many[0].edited_png) - out).max() <= 2


def test_diffusion_batches_halve_on_out_of_memory(tiny_pipes, tmp_path, monkeypatch):
    editor = Editor(EditSettings(remove_backend="sd-inpaint", inpaint_model_id=str(tiny_pipes[0]),
                                 num_inference_steps=1, working_size_px=32, batch_size=4))
    real_batch, sizes = editor.models.sd_inpaint, []

    def tight_memory(jobs):  # the boundary we cannot reach here: a GPU that fits one image at a time
        sizes.append(len(jobs))
        if len(jobs) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_batch(jobs)

    monkeypatch.setattr(editor.models, "sd_inpaint", tight_memory)
    image, mask = scene()
    edits = editor.remove_many([RemoveRequest(f"{i}.png", image, mask, "red box", i) for i in range(3)], tmp_path)
    assert sizes == [3, 2, 1, 1, 1] and all(Path(e.edited_png).is_file() for e in edits)


def test_sd_inpaint_unloadable_model_id(tmp_path):
    image, mask = scene()
    editor = Editor(EditSettings(remove_backend="sd-inpaint", inpaint_model_id=str(tmp_path / "no-such-model")))
    with pytest.raises(ModelLoadError, match="no-such-model"):
        editor.remove("img.png", image, mask, "red box", 0, tmp_path)


def test_instruct_pix2pix_end_to_end(tiny_pipes, tmp_path):
    editor = Editor(EditSettings(background_backend="instruct-pix2pix", pix2pix_model_id=str(tiny_pipes[1]),
                                 num_inference_steps=2, working_size_px=None))
    image, fg = scene()
    edit = editor.change_background("img.png", image, fg, "grass", "water", 0, tmp_path)
    src, out = np.asarray(image).astype(np.int16), arr(edit.edited_png)
    assert out.shape == src.shape and np.array_equal(out[fg], src[fg])
    assert np.abs(out[~fg] - src[~fg]).mean() > 5
    assert edit.instruction == "turn the background of grass into water" and edit.backend == "instruct-pix2pix"

    control = editor.change_background("img.png", image, fg, "grass", "water", 0, tmp_path, control=True)
    assert control.instruction == "turn the background of grass into grass" and control.control
    no_fg = editor.change_background_many([BackgroundRequest("img.png", image, None, "grass", "water")], tmp_path)[0]
    assert no_fg.mask_png is None and arr(no_fg.edited_png).shape == src.shape


# ------------------------------------------------------------------ LangChain adapter
def test_as_tool(tmp_path):
    image, mask = scene()
    image.save(tmp_path / "img.png")
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(tmp_path / "mask.png")
    tool = as_tool(Editor(), tmp_path / "edits", root=tmp_path)
    out = tool.invoke({"image_path": "img.png", "mask_png": "mask.png", "phrase": "red box", "kind": "foreground"})
    assert out["image"] == "img.png" and Path(out["edited_png"]).is_file()
    err = tool.invoke({"image_path": "img.png", "mask_png": "missing.png", "phrase": "red box", "kind": "foreground"})
    assert "DataError" in err and "missing.png" in err


def test_diffusion_memory_switches(tiny_pipes, tmp_path):
    """Attention slicing and VAE tiling are applied and still edit; a chosen precision loads the weights in it;
    model CPU offload needs a CUDA device and says so in one line on the CPU."""
    from diffusers.models.attention_processor import SlicedAttnProcessor

    from aspire.errors import ConfigError

    image, mask = scene()
    common = dict(remove_backend="sd-inpaint", inpaint_model_id=str(tiny_pipes[0]), num_inference_steps=1,
                  working_size_px=32, device="cpu")
    editor = Editor(EditSettings(attention_slicing=True, vae_tiling=True, dtype="bfloat16", **common))
    edit = editor.remove("img.png", image, mask, "red box", 0, tmp_path)
    assert arr(edit.edited_png).shape == np.asarray(image).shape
    pipe = editor.models._inpaint_pipe
    assert pipe.vae.use_tiling and pipe.unet.dtype == torch.bfloat16
    assert any(isinstance(p, SlicedAttnProcessor) for p in pipe.unet.attn_processors.values())
    default = Editor(EditSettings(**common))
    default.remove("img.png", image, mask, "red box", 0, tmp_path / "default")
    assert default.models._inpaint_pipe.unet.dtype == torch.float32 and not default.models._inpaint_pipe.vae.use_tiling
    with pytest.raises(ConfigError, match=r"edit.cpu_offload needs a CUDA device \(this run's is cpu\)"):
        Editor(EditSettings(cpu_offload=True, **common)).remove("img.png", image, mask, "red box", 0, tmp_path / "o")

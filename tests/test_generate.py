"""tools/generate/: textual inversion + Stable Diffusion on tiny random components, and the offline
recombination generator (deterministic, object pixels kept)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from aspire.config import GenerateSettings
from aspire.errors import ConfigError, DataError
from aspire.tools.generate import (Background, ClassJob, Generator, SourceEdit, color_jitter, sha256_file,
                                   token_for)
from aspire.tools.generate.textual_inversion import TextualInversion
from tiny_diffusers import build_tiny_sd
from target_device import DEVICE

PX = 32  # training and generation size on the tiny pipeline (its VAE halves it)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "sd")


def ti_settings(model_dir, **kw) -> GenerateSettings:
    base = dict(backend="textual-inversion", model_id=str(model_dir), train_steps=3, train_batch_size=2,
                resolution_px=PX, seeds=[0], images_per_seed=2, num_inference_steps=2, batch_size=2, device=DEVICE)
    return GenerateSettings(**{**base, **kw})


def random_images(n: int, size: int = 48, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


# ---------------------------------------------------------------- textual inversion
def test_textual_inversion_trains_only_the_new_token_saves_reloads_and_generates(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer

    gen = Generator(ti_settings(tiny_sd))
    token = token_for("water bird", 0)
    assert token == "<water-bird-s0>"
    learned = gen.textual_inversion.learn_token(random_images(3), token, seed=0, out_file=tmp_path / "emb.safetensors")

    # N steps, finite loss
    assert learned.steps == 3 and len(learned.losses) == 3
    assert all(math.isfinite(v) and v > 0 for v in learned.losses)
    # saved as {token: (1, dim)}
    saved = load_file(str(learned.embedding_file))
    assert list(saved) == [token] and tuple(saved[token].shape) == (1, 32)
    assert learned.sha256 == sha256_file(learned.embedding_file)
    # only the new token's row changed; it moved away from its initializer ("the")
    tok = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    fresh = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder").get_input_embeddings().weight
    trained = gen.textual_inversion.last_text_encoder.get_input_embeddings().weight.detach().cpu()
    assert trained.shape[0] == fresh.shape[0] + 1
    assert torch.equal(trained[:fresh.shape[0]], fresh.detach())
    init_row = fresh[tok.encode("the", add_special_tokens=False)[0]].detach()
    assert torch.equal(trained[-1], saved[token][0])
    assert not torch.allclose(trained[-1], init_row)
    # reloads into a pipeline, restores the exact embedding, and generates images of the requested size
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(learned.embedding_file), token=token)
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(token)]
    assert torch.equal(row.detach(), saved[token][0])
    images = gen.textual_inversion.sample(learned, seeds=[1, 2, 3])
    assert [im.size for im in images] == [(PX, PX)] * 3
    again = gen.textual_inversion.sample(learned, seeds=[1, 2, 3])
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(again, images))  # seeded
    # a seed alone gives its image too (on a GPU, up to half precision's batch-size-dependent rounding)
    alone = np.asarray(gen.textual_inversion.sample(learned, seeds=[1])[0], dtype=float)
    assert np.abs(alone - np.asarray(images[0], dtype=float)).mean() <= (0.0 if DEVICE == "cpu" else 1.0)


def test_gradient_checkpointing_learns_the_same_token(tiny_sd, tmp_path):
    """Recomputing activations in the backward pass saves memory and changes nothing: the same embedding."""
    token = token_for("water bird", 0)
    plain = TextualInversion(ti_settings(tiny_sd)).learn_token(random_images(3), token, 0, tmp_path / "plain.safetensors")
    saving = TextualInversion(ti_settings(tiny_sd, gradient_checkpointing=True))
    checked = saving.learn_token(random_images(3), token, 0, tmp_path / "checked.safetensors")
    assert saving._frozen[1].is_gradient_checkpointing and saving.last_text_encoder.is_gradient_checkpointing
    from safetensors.torch import load_file

    a, b = load_file(str(plain.embedding_file))[token], load_file(str(checked.embedding_file))[token]
    assert torch.allclose(a, b, atol=1e-6) and checked.losses == pytest.approx(plain.losses, abs=1e-6)


def test_learned_token_is_reused_and_generate_yields_records(tiny_sd, tmp_path, monkeypatch):
    gen = Generator(ti_settings(tiny_sd))
    job = ClassJob(1, "waterbird", [SourceEdit(f"e{i}", f"img{i}.png", np.asarray(im))
                                     for i, im in enumerate(random_images(2))], seed=5)
    out = list(gen.generate(job, work_dir=tmp_path))
    assert len(out) == 2 and all(g.image.size == (PX, PX) for g in out)
    info = out[0].info
    assert info["token"] == "<waterbird-s0>" and info["prompt"] == "a photo of a <waterbird-s0>"
    assert info["model_id"] == str(tiny_sd)
    assert out[0].edits == ["e0", "e1"] and out[0].sources == ["img0.png", "img1.png"]
    files = sorted(tmp_path.glob("*.safetensors"))
    assert [f.name for f in files] == [info["embedding_file"]] and sha256_file(files[0]) == info["embedding_sha256"]
    assert out[0].seed != out[1].seed

    # a second run finds the finished training and does not train again
    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(TextualInversion, "_train", no_training)
    again = list(Generator(ti_settings(tiny_sd)).generate(job, work_dir=tmp_path))
    assert [np.asarray(g.image).tobytes() for g in again] == [np.asarray(g.image).tobytes() for g in out]


def test_training_out_of_memory_halves_the_batch_and_keeps_the_effective_batch(tmp_path, monkeypatch):
    calls = []

    def fake_train(self, images, token, seed, batch, accum):
        calls.append((batch, accum))
        if batch > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.zeros(1, 8), [0.5]

    monkeypatch.setattr(TextualInversion, "_train", fake_train)
    gen = Generator(GenerateSettings(backend="textual-inversion", train_batch_size=4))
    learned = gen.textual_inversion.learn_token(random_images(1), "<x-s0>", 0, tmp_path / "x.safetensors")
    assert calls == [(4, 1), (2, 2), (1, 4)] and learned.steps == 1


def test_generation_out_of_memory_halves_the_batch(tmp_path):
    from safetensors.torch import save_file

    class FakePipe:  # the boundary: a pipeline that cannot fit more than one image
        tokenizer = type("T", (), {"get_vocab": staticmethod(lambda: {"<x-s0>": 1})})()

        def __init__(self):
            self.sizes = []

        def __call__(self, prompts, generator, height, width, **kw):
            self.sizes.append(len(prompts))
            if len(prompts) > 1:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return type("Out", (), {"images": [Image.new("RGB", (width, height))]})()

    gen = Generator(GenerateSettings(backend="textual-inversion", batch_size=4, resolution_px=16))
    gen.textual_inversion._pipe = FakePipe()
    save_file({"<x-s0>": torch.zeros(1, 8)}, str(tmp_path / "x.safetensors"))
    from aspire.tools.generate import LearnedToken

    learned = LearnedToken("<x-s0>", tmp_path / "x.safetensors", "the", 0, 1, (0.1,), "")
    images = gen.textual_inversion.sample(learned, [1, 2, 3])
    assert len(images) == 3 and gen.textual_inversion._pipe.sizes == [3, 2, 1, 1, 1]


def test_textual_inversion_bad_settings(tiny_sd, tmp_path):
    gen = Generator(ti_settings(tiny_sd, initializer_token="photograph of"))
    with pytest.raises(ConfigError, match="initializer_token"):
        gen.textual_inversion.learn_token(random_images(1), "<a-s0>", 0, tmp_path / "a.safetensors")
    with pytest.raises(ConfigError, match="prompt_template"):
        Generator(ti_settings(tiny_sd, prompt_template="a photo of {cls}")).textual_inversion.prompt("<a-s0>")
    with pytest.raises(DataError, match="no training images"):
        gen.textual_inversion.learn_token([], "<a-s0>", 0, tmp_path / "a.safetensors")
    with pytest.raises(ConfigError, match="multiple of 8"):
        Generator(ti_settings(tiny_sd, resolution_px=30)).textual_inversion.learn_token(random_images(1), "<a-s0>", 0,
                                                                      tmp_path / "a.safetensors")


# ---------------------------------------------------------------- offline recombination
def scene(seed: int = 0, size: int = 40):
    """An edited image with a square object, its mask, and a differently coloured background."""
    rng = np.random.default_rng(seed)
    edited = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), bool)
    mask[12:24, 14:26] = True
    background = np.zeros((size, size, 3), np.uint8)
    background[..., 1] = 200
    return edited, mask, background


def job_of(n_sources: int = 2, with_background: bool = True, seed: int = 0) -> ClassJob:
    sources = []
    for i in range(n_sources):
        edited, mask, _ = scene(i)
        sources.append(SourceEdit(f"edit{i}", f"images/{i}.png", edited, mask))
    bgs = [Background(f"images/bg{i}.png", scene(10 + i)[2] + np.uint8(i)) for i in range(3)] if with_background else []
    return ClassJob(0, "bird", sources, bgs, seed=seed)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_offline_generator_is_deterministic_by_seed():
    settings = GenerateSettings(images_per_class=6)
    first = [png(g.image) for g in Generator(settings).generate(job_of(seed=3))]
    second = [png(g.image) for g in Generator(settings).generate(job_of(seed=3))]
    other = [png(g.image) for g in Generator(settings).generate(job_of(seed=4))]
    assert len(first) == 6 and first == second
    assert first != other
    assert len(set(first)) == 6  # diverse: no two images alike


def test_offline_images_keep_the_object_pixels_of_the_edit():
    # no transform: the object pixels are the edit's, everything else the background's
    plain = GenerateSettings(images_per_class=3, flip=False, scale_range=(1.0, 1.0), translate_frac=0.0,
                             color_jitter=0.0)
    job = job_of()
    for g in Generator(plain).generate(job):
        out = np.asarray(g.image)
        src = next(s for s in job.sources if s.edit_id == g.edits[0])
        bg = next(b for b in job.backgrounds if b.key == g.info["donor"])
        assert g.sources == [src.image_key, bg.key] and g.info["transform"]["mode"] == "recombined"
        assert np.array_equal(out[src.object_mask], src.edited[src.object_mask])
        assert np.array_equal(out[~src.object_mask], bg.image[~src.object_mask])
    # flipped and shifted (scale 1, no jitter): every object pixel lands where the recorded transform says
    moved = GenerateSettings(images_per_class=8, flip=True, scale_range=(1.0, 1.0), translate_frac=0.2,
                             color_jitter=0.0)
    flips = set()
    for g in Generator(moved).generate(job):
        out = np.asarray(g.image)
        src = next(s for s in job.sources if s.edit_id == g.edits[0])
        t = g.info["transform"]
        flips.add(t["flip"])
        ys, xs = np.nonzero(src.object_mask)
        cx = (xs.min() + xs.max()) / 2
        x2 = (2 * cx - xs if t["flip"] else xs) + t["dx_px"]
        y2 = ys + t["dy_px"]
        assert x2.min() >= 0 and x2.max() < out.shape[1] and y2.min() >= 0 and y2.max() < out.shape[0]
        assert np.array_equal(out[y2, x2.astype(int)], src.edited[ys, xs])
    assert flips == {True, False}


def test_offline_without_backgrounds_transforms_the_whole_edit():
    out = list(Generator(GenerateSettings(images_per_class=2)).generate(job_of(with_background=False)))
    assert all(g.info["transform"]["mode"] == "whole-image" and g.info["donor"] is None for g in out)
    assert out[0].image.size == (40, 40) and out[0].sources == ["images/0.png"]


def test_offline_bad_input():
    edited, mask, _ = scene()
    with pytest.raises(DataError, match="object mask"):
        list(Generator().generate(ClassJob(0, "bird", [SourceEdit("e", "i", edited, mask[:10])])))
    with pytest.raises(DataError, match="no edits"):
        list(Generator().generate(ClassJob(0, "bird", [])))
    with pytest.raises(ConfigError, match="scale_range"):
        list(Generator(GenerateSettings(scale_range=(1.2, 0.8))).generate(job_of()))


def test_color_jitter_identity_and_range():
    edited, _, _ = scene()
    assert np.array_equal(color_jitter(edited, 1.0, 1.0, 1.0), edited)
    dark = color_jitter(edited, 0.5, 1.0, 1.0)
    assert dark.dtype == np.uint8 and dark.mean() < edited.mean()

"""Captioner: tiny GIT / BLIP / BLIP-2 loaded through from_pretrained, annotations, a loopback OpenAI server."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aspire.config import CaptionSettings
from aspire.devices import pick_dtype
from aspire.errors import AspireError, ConfigError, DataError, ModelLoadError
from aspire.schemas import Caption, Sample
from aspire.prompts import render_prompt
from aspire.tools.caption import Captioner, as_tool, strip_prompt
from llm_server import LoopbackLLM, content
from tiny_caption import build_tiny_blip, build_tiny_blip2, build_tiny_git
from target_device import DEVICE

BUILDERS = {"git": build_tiny_git, "blip": build_tiny_blip, "blip2": build_tiny_blip2}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("caption-models")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (24 + 4 * i, 40, 3), dtype=np.uint8)) for i in range(n)]


def _settings(model_dir: Path, **kw) -> CaptionSettings:
    return CaptionSettings(backend="transformers", model_id=str(model_dir), max_new_tokens=4, device=DEVICE, **kw)


# ---------------------------------------------------------------- transformers backend
@pytest.mark.parametrize("family", ["git", "blip", "blip2"])
def test_transformers_captions_each_family(tiny_models, family):
    cap = Captioner(_settings(tiny_models[family], batch_size=2))
    assert cap.model is None  # lazy
    out = cap.caption([(f"img{i}.png", im) for i, im in enumerate(_images(5))])
    assert [c.image for c in out] == [f"img{i}.png" for i in range(5)]
    assert all(isinstance(c, Caption) and isinstance(c.caption, str) for c in out)
    assert {c.backend for c in out} == {"transformers"} and {c.model_id for c in out} == {str(tiny_models[family])}
    assert cap.model is not None and cap.model.device.type == DEVICE
    # loaded in float32 on CPU, half on a GPU (BLIP-2 keeps its Q-Former in float32), pixels cast to match
    assert pick_dtype(torch.device(DEVICE)) in {p.dtype for p in cap.model.parameters()}


@pytest.mark.parametrize("family", ["git", "blip", "blip2"])
def test_batching_is_independent_of_batch_size(tiny_models, family):
    images = [(f"k{i}", im) for i, im in enumerate(_images(5, seed=1))]
    by_size = {b: [c.caption for c in Captioner(_settings(tiny_models[family], batch_size=b)).caption(images)]
               for b in (1, 2, 5)}  # 5 images: batches 1x5, 2+2+1, 5
    assert len(by_size[1]) == 5 and len(set(by_size[1])) > 1  # captions depend on the image
    assert by_size[1] == by_size[2] == by_size[5]


@pytest.mark.parametrize("family", ["git", "blip", "blip2"])
def test_prompt_is_not_echoed(tiny_models, family):
    prompt = "a photo of"
    out = Captioner(_settings(tiny_models[family], prompt=prompt)).caption([("a", _images(1)[0])])
    assert len(out) == 1 and not out[0].caption.lower().startswith(prompt)


@pytest.mark.parametrize("family", ["git", "blip", "blip2"])
def test_half_precision_casts_pixels_not_token_ids(tiny_models, family):
    # half precision, as on a GPU, on the CPU: bfloat16 (CPU fp16 kernels are incomplete), by the setting
    cap = Captioner(_settings(tiny_models[family], prompt="a photo of", dtype="bfloat16"))
    out = cap.caption([(f"k{i}", im) for i, im in enumerate(_images(3))])
    assert cap.model.dtype == torch.bfloat16 and len(out) == 3 and all(isinstance(c.caption, str) for c in out)


def test_samples_and_paths_are_read_from_disk(tiny_models, tmp_path):
    ims = _images(2)
    for i, im in enumerate(ims):
        im.convert("L").save(tmp_path / f"{i}.png")  # grayscale on disk: loaded as RGB
    samples = [Sample(image="0.png", path=str(tmp_path / "0.png"), y=0, split="train")]
    cap = Captioner(_settings(tiny_models["blip"]))
    out = cap.caption(samples + [("1.png", tmp_path / "1.png")])
    assert [c.image for c in out] == ["0.png", "1.png"]


def test_oom_halves_the_batch(tiny_models):
    cap = Captioner(_settings(tiny_models["git"], batch_size=8))
    images = [(f"k{i}", im) for i, im in enumerate(_images(5, seed=2))]
    expected = [c.caption for c in Captioner(_settings(tiny_models["git"], batch_size=1)).caption(images)]

    cap.load()
    real_generate, seen = cap.model.generate, []

    def generate_or_oom(**kw):  # fault injection at the model boundary: a GPU that fits 2 images
        n = kw["pixel_values"].shape[0]
        seen.append(n)
        if n > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_generate(**kw)

    cap.model.generate = generate_or_oom
    progress = []
    out = cap.caption(images, on_batch=progress.append)
    assert seen == [5, 4, 2, 2, 1]  # batch 8 (5 images) and 4 run out of memory; 2 fits
    assert progress == [2, 2, 1]
    assert [c.caption for c in out] == expected


def test_unloadable_model_raises_model_load_error(tmp_path):
    missing = tmp_path / "no-such-model"
    cap = Captioner(_settings(missing))
    with pytest.raises(ModelLoadError) as e:
        cap.caption([("a", _images(1)[0])])
    msg = str(e.value)
    assert msg == f"{missing}: captioning model folder does not exist"


def test_folder_without_a_captioning_model_raises_model_load_error(tmp_path, tiny_models):
    # a processor is there, the weights are not
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_models["blip"].iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ModelLoadError, match="broken"):
        Captioner(_settings(broken)).caption([("a", _images(1)[0])])


# ---------------------------------------------------------------- inputs
@pytest.mark.parametrize("bad, match", [
    ([], "no images"),
    ("img.png", "expected a list"),
    ([("a", 3)], "a: expected a PIL image or an image path, got int"),
    (["just-a-string"], "input #0"),
    ([("a", "/nonexistent/img.png")], "/nonexistent/img.png"),
])
def test_bad_inputs_name_the_value(bad, match):
    with pytest.raises(DataError, match=match):
        Captioner(CaptionSettings(backend="annotations", annotations="unused.jsonl")).caption(bad)


def test_corrupt_image_file_is_named(tiny_models, tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="corrupt.png"):
        Captioner(_settings(tiny_models["blip"])).caption([("corrupt.png", bad)])


# ---------------------------------------------------------------- annotations backend
def _write_annotations(path: Path, rows: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"image": k, "caption": v, "regions": []}) + "\n" for k, v in rows.items()))
    return path


def test_annotations_backend_returns_annotated_captions(tmp_path):
    ann = _write_annotations(tmp_path / "annotations.jsonl",
                             {"train/bird/1.jpg": "a bird on water", "train/bird/2.jpg": "a bird in a forest"})
    cap = Captioner(CaptionSettings(backend="annotations", annotations=str(ann)))
    Image.new("RGB", (8, 8)).save(tmp_path / "2.jpg")
    samples = [Sample(image="train/bird/2.jpg", path=str(tmp_path / "2.jpg"), y=0, split="train"),
               ("./train/bird/1.jpg", Image.new("RGB", (8, 8)))]  # keys are normalised
    out = cap.caption(samples)
    assert [(c.image, c.caption, c.backend) for c in out] == [
        ("train/bird/2.jpg", "a bird in a forest", "annotations"),
        ("./train/bird/1.jpg", "a bird on water", "annotations")]


def test_annotations_backend_missing_image_names_image_and_file(tmp_path):
    ann = _write_annotations(tmp_path / "annotations.jsonl", {"a.jpg": "a dog"})
    cap = Captioner(CaptionSettings(backend="annotations", annotations=str(ann)))
    with pytest.raises(DataError) as e:
        cap.caption([("b.jpg", Image.new("RGB", (8, 8)))])
    assert "b.jpg" in str(e.value) and str(ann) in str(e.value)


def test_annotations_backend_needs_a_file():
    with pytest.raises(ConfigError, match="caption.annotations"):
        Captioner(CaptionSettings(backend="annotations")).caption([("a", Image.new("RGB", (8, 8)))])


# ---------------------------------------------------------------- openai backend (loopback server)
def test_openai_backend_sends_image_and_model(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with LoopbackLLM([content(" a bird standing on a beach\n"), content('"a bird in the snow"')]) as llm:
        settings = CaptionSettings(backend="openai", base_url=llm.base_url, api_key="sk-test", chat_model="vision-x",
                                   max_retries=0, timeout_s=10)
        out = Captioner(settings).caption([("one.png", _images(1)[0]), ("two.png", _images(2)[1])])
    assert [(c.image, c.caption, c.backend, c.model_id) for c in out] == [
        ("one.png", "a bird standing on a beach", "openai", "vision-x"),
        ("two.png", "a bird in the snow", "openai", "vision-x")]
    assert llm.paths == ["/v1/chat/completions"] * 2 and llm.unscripted == 0
    body = llm.requests[0]
    assert body["model"] == "vision-x"
    parts = body["messages"][0]["content"]
    texts = [p["text"] for p in parts if p["type"] == "text"]
    urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert texts == [render_prompt("caption", max_words=30).strip()]
    assert len(urls) == 1 and urls[0].startswith("data:image/jpeg;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1])))
    assert sent.size == (40, 24)  # the first image, decoded back


def test_openai_backend_reads_base_url_and_key_from_env(monkeypatch):
    with LoopbackLLM([content("a dog on the grass")]) as llm:
        monkeypatch.setenv("OPENAI_BASE_URL", llm.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
        out = Captioner(CaptionSettings(backend="openai", max_retries=0)).caption([("a", _images(1)[0])])
    assert out[0].caption == "a dog on the grass" and len(llm.requests) == 1


def test_openai_http_500_is_a_clear_error_after_retries():
    with LoopbackLLM([500, 500]) as llm:
        settings = CaptionSettings(backend="openai", base_url=llm.base_url, api_key="k", chat_model="vision-x",
                                   max_retries=1, timeout_s=10)
        with pytest.raises(AspireError) as e:
            Captioner(settings).caption([("one.png", _images(1)[0])])
    msg = str(e.value)
    assert len(llm.requests) == 2 and llm.unscripted == 0  # the first try and one retry
    assert "HTTP 500" in msg and "vision-x" in msg and "one.png" in msg and "\n" not in msg


def test_openai_empty_answer_is_an_error():
    with LoopbackLLM([content("")]) as llm:
        settings = CaptionSettings(backend="openai", base_url=llm.base_url, api_key="k", max_retries=0)
        with pytest.raises(AspireError, match="empty caption for one.png"):
            Captioner(settings).caption([("one.png", _images(1)[0])])


def test_openai_backend_without_key_or_url_is_a_config_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        Captioner(CaptionSettings(backend="openai")).caption([("a", _images(1)[0])])


# ---------------------------------------------------------------- helpers and the LangChain adapter
def test_strip_prompt():
    assert strip_prompt("A photo of  a dog\n", "a photo of") == "a dog"
    assert strip_prompt("a dog on grass", "a photo of") == "a dog on grass"
    assert strip_prompt(" a  dog ", None) == "a dog"


def test_caption_prompt_renders_strictly():
    text = render_prompt("caption", max_words=12)
    assert "12 words" in text and "{{" not in text and "vars:" not in text
    with pytest.raises(ConfigError, match="max_words"):
        render_prompt("caption")


def test_langchain_tool_captions_paths(tmp_path):
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    _images(1)[0].save(root / "train" / "a.png")
    ann = _write_annotations(root / "annotations.jsonl", {"train/a.png": "a cat on a sofa"})
    tool = as_tool(Captioner(CaptionSettings(backend="annotations", annotations=str(ann))), root=root)
    assert tool.name == "caption_images"
    out = tool.invoke({"image_paths": ["train/a.png"]})
    assert out == [{"image": "train/a.png", "caption": "a cat on a sofa", "backend": "annotations", "model_id": None}]
    json.dumps(out)
    # a user error comes back as the tool's message, not an exception
    msg = tool.invoke({"image_paths": ["train/missing.png"]})
    assert isinstance(msg, str) and "DataError" in msg and "missing.png" in msg

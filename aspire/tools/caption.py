"""Step 2 of the method: caption each image (DESIGN §2).

Backends behind one `Captioner.caption(images)` call, chosen by `CaptionSettings.backend`:

- "transformers": an image-to-text model by id: GIT (`microsoft/git-large-coco`, the released code's
  choice: greedy, 100 new tokens), BLIP, BLIP-2. Loaded lazily, batched, halves the batch on CUDA OOM.
- "openai": any OpenAI-compatible vision chat model (aspire/llm.py); one request per image, the image as a
  data URL, retried with backoff.
- "annotations": the captions of an annotations.jsonl (offline). An image with no annotation raises
  DataError naming the image and the file: a silent empty caption would skew the phrase statistics.

Inputs are `Sample`s or `(image_key, PIL.Image or path)` pairs; the key is what `Caption.image` carries
(for a Sample, its path relative to the dataset root, the key annotations use).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

from PIL import Image

from aspire import llm
from aspire.config import CaptionSettings
from aspire.data.annotations import norm_key
from aspire.errors import AspireError, ConfigError, DataError, ModelLoadError, describe
from aspire.prompts import render_prompt
from aspire.schemas import Caption, Sample

if TYPE_CHECKING:
    from langchain_core.tools import BaseTool

ImageInput = Union[Sample, tuple[str, Union[Image.Image, str, Path]]]

CHAT_MAX_WORDS = 30  # the chat instruction's cap on caption length
CHAT_MAX_IMAGE_PX = 1024  # longest side sent to a chat model; vision models downscale anyway


def strip_prompt(text: str, prompt: Optional[str]) -> str:
    """Collapse whitespace and drop a text prompt the model echoed at the start (BLIP, BLIP-2 do)."""
    text = " ".join(text.split())
    if prompt:
        p = " ".join(prompt.split())
        if text[:len(p)].lower() == p.lower():
            text = text[len(p):]
    return text.strip()






class Captioner:
    """Captions images with the backend chosen by `settings.backend`; one entry point, `caption`."""

    def __init__(self, settings: Optional[CaptionSettings] = None):
        self.settings = settings or CaptionSettings()
        self.model = None  # transformers backend, after load()
        self.processor = None
        self.device = None
        self._client = None  # openai backend
        self._annotations: Optional[dict[str, str]] = None  # annotations backend: {normalised key: caption}

    # ---------------------------------------------------------------- entry point
    def caption(self, images: Sequence[ImageInput],
                on_batch: Optional[Callable[[int], None]] = None) -> list[Caption]:
        """One Caption per input, in input order. `on_batch(n)` is called after each n images (progress)."""
        # 1. check inputs: (key, PIL image or path) pairs
        items = self._check_inputs(images)
        # 2. caption with the chosen backend
        backend = self.settings.backend
        if backend == "annotations":
            out = self._caption_annotations(items)
            if on_batch is not None:
                on_batch(len(items))
        elif backend == "transformers":
            from aspire.devices import map_batches

            self.load()
            out = map_batches(self._caption_batch, items, self.settings.batch_size, on_batch=on_batch)
        elif backend == "openai":
            out = []
            for item in items:
                out.append(self._caption_chat(item))
                if on_batch is not None:
                    on_batch(1)
        else:  # unreachable through CaptionSettings validation
            raise ConfigError(f"caption.backend: unknown backend {backend!r}")
        return out

    @staticmethod
    def _check_inputs(images: Sequence[ImageInput]) -> list[tuple[str, Union[Image.Image, Path]]]:
        if isinstance(images, (str, bytes, Path, Image.Image)) or not isinstance(images, Sequence):
            raise DataError(f"caption: expected a list of images, got {type(images).__name__}")
        if len(images) == 0:
            raise DataError("caption: no images given")
        items: list[tuple[str, Union[Image.Image, Path]]] = []
        for i, item in enumerate(images):
            if isinstance(item, Sample):
                key, image = item.image, item.path
            elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
                key, image = item
            else:
                raise DataError(f"caption input #{i}: expected a Sample or an (image_key, image) pair, "
                                f"got {repr(item)[:80]}")
            if isinstance(image, Image.Image):
                if image.width == 0 or image.height == 0:
                    raise DataError(f"{key}: image is empty ({image.width}x{image.height})")
                items.append((key, image if image.mode == "RGB" else image.convert("RGB")))
            elif isinstance(image, (str, Path)):
                path = Path(image).expanduser()
                if not path.is_file():
                    raise DataError(f"{path}: image file is missing (caption input {key!r})")
                items.append((key, path))
            else:
                raise DataError(f"{key}: expected a PIL image or an image path, got {type(image).__name__}")
        return items

    @staticmethod
    def _load_rgb(image: Union[Image.Image, Path]) -> Image.Image:
        from aspire.data.images import load_image

        return image if isinstance(image, Image.Image) else load_image(image)

    # ---------------------------------------------------------------- annotations backend
    def _caption_annotations(self, items: list[tuple[str, Any]]) -> list[Caption]:
        path = self.settings.annotations
        if not path:
            raise ConfigError("caption.annotations: the annotations backend needs an annotations.jsonl path")
        if self._annotations is None:
            from aspire.data.annotations import read_annotations

            # masks are not needed to caption; the grounding step checks them
            anns = read_annotations(path, check_files=False)
            self._annotations = {norm_key(k): a.caption for k, a in anns.items()}
        out = []
        for key, _ in items:
            text = self._annotations.get(norm_key(key))
            if text is None:
                raise DataError(f"{key}: no annotation for this image in {Path(path).expanduser().resolve()}")
            out.append(Caption(image=key, caption=text, backend="annotations"))
        return out

    @property
    def resident(self) -> bool:
        """Whether a model is loaded."""
        return self.model is not None

    def release(self) -> None:
        """Drop the model (loaded again on the next call): the next stage gets its memory."""
        if self.model is not None:
            from aspire.devices import free_memory

            self.model = self.processor = None
            free_memory()

    # ---------------------------------------------------------------- transformers backend
    def load(self) -> None:
        """Load processor and model once (transformers backend); an unloadable id raises ModelLoadError."""
        if self.model is not None:
            return
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

        from aspire.devices import pick_device, pick_dtype

        # 1. a local path that is not there: say so (transformers would call it a malformed repo id)
        model_id = self.settings.model_id
        local = Path(model_id).expanduser()
        if (local.is_absolute() or model_id.startswith((".", "~"))) and not local.is_dir():
            raise ModelLoadError(f"{model_id}: captioning model folder does not exist")
        # 2. processor, then the model class that knows this config
        device = pick_device(self.settings.device)
        dtype = pick_dtype(device, self.settings.dtype)
        try:
            processor = AutoProcessor.from_pretrained(model_id)
        except Exception as e:  # missing folder, unknown repo, offline hub, bad files: all one user error
            raise ModelLoadError(f"{model_id}: cannot load the captioning processor ({describe(e)})") from e
        model, errors = None, []
        # GIT, BLIP and BLIP-2 are all image-text-to-text models in transformers 5; GIT is a causal LM too
        for auto_cls in (AutoModelForImageTextToText, AutoModelForCausalLM):
            try:
                model = auto_cls.from_pretrained(model_id, dtype=dtype)
                break
            except Exception as e:  # noqa: BLE001 - each class is tried, the first error is reported
                errors.append(e)
        if model is None:
            raise ModelLoadError(f"{model_id}: cannot load the captioning model ({describe(errors[0])})") \
                from errors[0]
        # 3. onto the device, half precision on GPU
        self.model = model.to(device).eval()
        self.processor, self.device = processor, device

    def _model_inputs(self, images: list[Image.Image]):
        """Processor outputs for a batch; the prompt (if any) repeated per image, same length for all."""
        import torch

        prompt = self.settings.prompt
        n = len(images)
        if not prompt:
            return self.processor(images=images, return_tensors="pt")
        if self.model.config.model_type == "git":
            # GIT's decoder starts from [CLS] + prompt, without the [SEP] the tokenizer would append
            inputs = self.processor(images=images, return_tensors="pt")
            tok = self.processor.tokenizer
            ids = [tok.cls_token_id] + tok(prompt, add_special_tokens=False).input_ids
            inputs["input_ids"] = torch.tensor([ids] * n)  # (n, prompt_len)
            return inputs
        inputs = self.processor(images=images, text=[prompt] * n, return_tensors="pt", padding=True)
        inputs.pop("token_type_ids", None)  # BERT tokenizers add it; generate() rejects it
        return inputs

    def _caption_batch(self, batch: list[tuple[str, Any]]) -> list[Caption]:
        import torch

        from aspire.devices import pixel_dtype

        # 1. load and preprocess: pixel_values (B, 3, H, W) in the model's dtype
        images = [self._load_rgb(image) for _, image in batch]
        inputs = self._model_inputs(images).to(self.device, dtype=pixel_dtype(self.model))
        # 2. greedy decoding, as the released code: ids (B, T)
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=self.settings.max_new_tokens,
                                      do_sample=False, num_beams=1)
        # 3. decode; drop the echoed prompt
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [Caption(image=key, caption=strip_prompt(text, self.settings.prompt), backend="transformers",
                        model_id=self.settings.model_id) for (key, _), text in zip(batch, texts)]

    # ---------------------------------------------------------------- openai backend
    def _chat_model(self):
        if self._client is None:
            self._client = llm.chat_model(self.settings.llm(), "caption")
        return self._client

    @staticmethod
    def _data_url(image: Image.Image) -> str:
        image = image.copy()
        image.thumbnail((CHAT_MAX_IMAGE_PX, CHAT_MAX_IMAGE_PX))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    def _caption_chat(self, item: tuple[str, Any]) -> Caption:
        from langchain_core.messages import HumanMessage

        key, image = item
        settings = self.settings.llm()
        model = self._chat_model()
        instruction = render_prompt("caption", max_words=CHAT_MAX_WORDS).strip()
        message = HumanMessage(content=[
            {"type": "text", "text": instruction},
            {"type": "image_url", "image_url": {"url": self._data_url(self._load_rgb(image))}},
        ])
        where = f"caption model {settings.model!r} at {llm.endpoint(settings)[0] or 'api.openai.com'}"
        failure = "no attempt"
        for _ in llm.attempts(settings):
            try:
                answer = llm.invoke(model, [message])
                break
            except Exception as e:  # noqa: BLE001 - HTTP errors, network errors, timeouts: retried, then an error
                failure = llm.describe_failure(e)
        else:
            raise AspireError(f"{where}: {failure}, for {key} after {settings.max_retries} retries")
        text = " ".join(llm.text_of(answer.content).split()).strip("\"'")
        if not text:
            raise AspireError(f"{where}: empty caption for {key}")
        return Caption(image=key, caption=text, backend="openai", model_id=settings.model)


# ---------------------------------------------------------------- LangChain adapter
def as_tool(captioner: Captioner, root: Optional[str | Path] = None) -> "BaseTool":
    """A LangChain tool `caption_images(image_paths)` → list of Caption dicts.

    Keys are the paths relative to `root` when given and under it (the keys annotations use), else as given.
    A user error (AspireError) comes back to the agent as the tool's one-line error message.
    """
    from langchain_core.tools import StructuredTool, ToolException

    root_path = Path(root).expanduser().resolve() if root is not None else None

    def key_of(p: str) -> str:
        if root_path is not None:
            full = (root_path / p).resolve() if not Path(p).is_absolute() else Path(p).resolve()
            if full.is_relative_to(root_path):
                return full.relative_to(root_path).as_posix()
        return p

    def caption_images(image_paths: list[str]) -> list[dict]:
        """Caption images: one short sentence per image naming its objects and background."""
        items = [(key_of(p), (root_path / p) if root_path is not None else Path(p)) for p in image_paths]
        try:
            return [c.model_dump() for c in captioner.caption(items)]
        except AspireError as e:
            raise ToolException(f"{type(e).__name__}: {e}") from e

    return StructuredTool.from_function(caption_images, name="caption_images", handle_tool_error=True)

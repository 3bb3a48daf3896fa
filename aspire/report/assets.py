"""The report's images: thumbnails encoded once, embedded in the HTML as data URIs and written under img/ for the
Markdown; `plain(context)` is the context as JSON, images by their file path."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from PIL import Image

THUMB_PX = 128
PNG_BUDGET_BYTES = 24_000  # a thumbnail larger than this as PNG is stored as JPEG when that is smaller


@dataclass(frozen=True)
class Img:
    """An image of the report: `file` relative to the report folder (Markdown, JSON), `uri` for the HTML."""

    file: str
    uri: str
    alt: str


class Assets:
    """The report's images, encoded once: embedded in the HTML, written under img/ for the Markdown."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def _add(self, data: bytes, ext: str, alt: str, name: Optional[str] = None) -> Img:
        import base64

        name = name or f"{hashlib.sha256(data).hexdigest()[:16]}.{ext}"
        self.files[name] = data
        mime = "image/jpeg" if ext == "jpg" else "image/png"
        return Img(file=f"img/{name}", uri=f"data:{mime};base64,{base64.b64encode(data).decode()}", alt=alt)

    def image(self, im: Image.Image, alt: str, max_px: int = THUMB_PX) -> Img:
        """A thumbnail (longest side at most max_px): PNG, or JPEG when PNG is large and JPEG smaller."""
        im = im.convert("RGB")
        if max(im.size) > max_px:
            im.thumbnail((max_px, max_px), Image.LANCZOS)
        png = io.BytesIO()
        im.save(png, format="PNG", optimize=True)
        data, ext = png.getvalue(), "png"
        if len(data) > PNG_BUDGET_BYTES:
            jpg = io.BytesIO()
            im.save(jpg, format="JPEG", quality=85)
            if len(jpg.getvalue()) < len(data):
                data, ext = jpg.getvalue(), "jpg"
        return self._add(data, ext, alt)

    def png(self, data: bytes, alt: str, name: str) -> Img:
        return self._add(data, "png", alt, name)


def open_image(path: Optional[Path]) -> Optional[Image.Image]:
    if path is None or not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError):
        return None


def plain(obj: Any) -> Any:
    """The context as JSON: images by their file path."""
    if isinstance(obj, Img):
        return obj.file
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj

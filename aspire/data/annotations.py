"""The annotations.jsonl reader (DESIGN §4): captions and phrase masks per image, for the offline backends.

One line per image: {"image": "<path relative to the dataset root>", "caption": "...",
"regions": [{"phrase": "boat", "mask": "<png path, 0/255, image size>"}]}. Mask paths are relative to the
annotations file's folder (the dataset root when the file sits there).
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

from pydantic import ValidationError

from aspire.errors import DataError
from aspire.schemas import AnnotatedRegion, Annotation


def norm_key(key: str) -> str:
    """An image key as annotations store it: forward slashes, no "./" ("./a\\b.png" -> "a/b.png")."""
    return posixpath.normpath(key.replace("\\", "/"))


def read_annotations(path: str | Path, *, check_files: bool = True) -> dict[str, Annotation]:
    """Read annotations.jsonl into {image: Annotation}; a bad line raises DataError naming file:line."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise DataError(f"{path}: annotations file is missing")
    base = path.parent
    out: dict[str, Annotation] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(raw, dict):
                raise DataError(f"{where}: expected a JSON object")
            for key in ("image", "caption"):
                if not isinstance(raw.get(key), str):
                    raise DataError(f"{where}: field {key!r} is missing or not a string")
            regions = []
            for r in raw.get("regions") or []:
                if not isinstance(r, dict) or not isinstance(r.get("phrase"), str) or not isinstance(r.get("mask"), str):
                    raise DataError(f"{where}: each region needs string fields 'phrase' and 'mask'")
                mask = (base / r["mask"]).resolve()
                if check_files and not mask.is_file():
                    raise DataError(f"{where}: mask file {mask} is missing")
                regions.append(AnnotatedRegion(phrase=r["phrase"], mask_png=str(mask)))
            try:
                out[raw["image"]] = Annotation(image=raw["image"], caption=raw["caption"], regions=regions)
            except ValidationError as e:
                raise DataError(f"{where}: {e.errors()[0]['msg']}") from None
    return out

"""Small constructed datasets in the waterbirds format with annotations (captions and region masks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

Item = tuple[np.ndarray, int, int, str, Sequence[tuple[str, np.ndarray]]]  # image, y, split, caption, regions


def write_world(root: Path, items: Iterable[Item], classes: Sequence[str] = ("gizmo", "widget"),
                extra_rows: Sequence[str] = ()) -> Path:
    """images/NNN.png, masks/NNN_<phrase>.png, metadata.csv (+ `extra_rows`), classes.txt, annotations.jsonl."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows, ann = ["img_filename,y,split"], []
    for i, (img, y, split, caption, regions) in enumerate(items):
        name = f"images/{i:03d}.png"
        Image.fromarray(img).save(root / name)
        entry = {"image": name, "caption": caption, "regions": []}
        for phrase, mask in regions:
            mpath = f"masks/{i:03d}_{phrase.replace(' ', '_')}.png"
            Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(root / mpath)
            entry["regions"].append({"phrase": phrase, "mask": mpath})
        ann.append(entry)
        rows.append(f"{name},{y},{split}")
    (root / "metadata.csv").write_text("\n".join([*rows, *extra_rows]) + "\n")
    (root / "classes.txt").write_text("".join(c + "\n" for c in classes))
    (root / "annotations.jsonl").write_text("\n".join(json.dumps(a) for a in ann) + "\n")
    return root

"""Augmented sets (step 5's output): read, verify, and mix into a training split.

An augmented set is a dataset in the waterbirds format (DESIGN §4), written once by `aspire augment`:

    AUGDIR/metadata.csv     img_filename, y, split (always 0: train), synthetic (always 1)
    AUGDIR/classes.txt      the classifier's class names, one per line (index = y)
    AUGDIR/synthetic/<y>-<class>/<n>.png
    AUGDIR/tokens/*.safetensors   learned textual-inversion embeddings (that backend only)
    AUGDIR/manifest.json    per image: its sources (images, edit ids), generator, model ids and revisions,
                            token, prompt, seed and sha256; the sha256 of every other file; the inputs' hash

Use in training (what `aspire train --augment AUGDIR` does):

    augmented = load_augmented(augdir, class_names=dataset.class_names)   # verified, or DataError
    train = mix_in(dataset.split("train"), augmented, ratio=None, seed=0)  # all generated images added

The set has no group attribute: its samples have `attr=None` and `synthetic=True`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from pathlib import Path
from typing import Any, Optional, Sequence

from aspire.errors import DataError
from aspire.schemas import Sample

MANIFEST = "manifest.json"
FORMAT = "aspire-augmented"
VERSION = 1
IMAGE_DIR = "synthetic"
COLUMNS = ("img_filename", "y", "split", "synthetic")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- writing (inside a folder being committed)
def write_set_files(folder: Path, class_names: Sequence[str], manifest: dict[str, Any]) -> dict[str, Any]:
    """Write metadata.csv, classes.txt and manifest.json into `folder`, whose images (listed in
    manifest["images"]) are already there; fills in manifest["files"] with the other files' sha256."""
    images = manifest["images"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in images:
        writer.writerow([row["img_filename"], row["y"], 0, 1])
    files = {"metadata.csv": buf.getvalue().encode("utf-8"),
             "classes.txt": "".join(f"{c}\n" for c in class_names).encode("utf-8")}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    hashes = {name: sha256_bytes(data) for name, data in files.items()}
    for extra in sorted(p for p in folder.rglob("*") if p.is_file() and p.parent.name == "tokens"):
        hashes[extra.relative_to(folder).as_posix()] = sha256_bytes(extra.read_bytes())
    manifest = {**manifest, "files": dict(sorted(hashes.items()))}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def read_manifest(augdir: str | Path) -> dict[str, Any]:
    """manifest.json of an augmented set (not verified); DataError when missing or malformed."""
    path = Path(augdir).expanduser().resolve() / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: manifest is missing (not an augmented set written by aspire augment)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not an aspire augmented-set manifest (format {FORMAT!r} expected)")
    if manifest.get("version") != VERSION:
        raise DataError(f"{path}: manifest version {manifest.get('version')!r} is not supported (expected {VERSION})")
    if not isinstance(manifest.get("images"), list) or not isinstance(manifest.get("files"), dict):
        raise DataError(f"{path}: manifest lacks its 'images' list or 'files' table")
    return manifest


# ---------------------------------------------------------------- reading
def verify_manifest(augdir: str | Path) -> dict[str, Any]:
    """Check every file of the set against manifest.json (sha256), and that the set holds nothing else;
    returns the manifest. A changed, missing or extra file raises DataError naming it."""
    root = Path(augdir).expanduser().resolve()
    manifest = read_manifest(root)
    # 1. the listed images and files, by hash
    expected: dict[str, str] = dict(manifest["files"])
    for i, row in enumerate(manifest["images"]):
        if not isinstance(row, dict) or not isinstance(row.get("img_filename"), str) or "sha256" not in row:
            raise DataError(f"{root / MANIFEST}: image entry #{i} lacks img_filename or sha256")
        expected[row["img_filename"]] = row["sha256"]
    for rel, digest in expected.items():
        path = root / rel
        if not path.is_file():
            raise DataError(f"{path}: listed in {MANIFEST} but missing")
        if sha256_bytes(path.read_bytes()) != digest:
            raise DataError(f"{path}: sha256 differs from {MANIFEST} (the file was changed or is corrupt)")
    # 2. nothing unlisted
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != MANIFEST and rel not in expected:
            raise DataError(f"{path}: not listed in {MANIFEST} (a file was added to the augmented set)")
    return manifest


def load_augmented(augdir: str | Path, class_names: Optional[Sequence[str]] = None,
                   verify: bool = True) -> list[Sample]:
    """The augmented set's samples (split train, synthetic, attr None), after `verify_manifest`.

    With `class_names` (the training dataset's), the set's classes.txt must name the same classes."""
    from aspire.data.formats import load_dataset

    root = Path(augdir).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{root}: augmented set folder does not exist")
    manifest = verify_manifest(root) if verify else read_manifest(root)
    ds = load_dataset(root, "waterbirds")
    if class_names is not None and list(ds.class_names) != list(class_names):
        raise DataError(f"{root / 'classes.txt'}: classes {ds.class_names} differ from the training data's "
                        f"{list(class_names)}")
    if len(ds.samples) != len(manifest["images"]):
        raise DataError(f"{root / 'metadata.csv'}: {len(ds.samples)} rows but {MANIFEST} lists "
                        f"{len(manifest['images'])} images")
    return [s.model_copy(update={"synthetic": True, "split": "train", "attr": None}) for s in ds.samples]


def mix_in(train_samples: Sequence[Sample], augmented: Sequence[Sample], ratio: Optional[float] = None,
           seed: int = 0) -> list[Sample]:
    """The training samples followed by augmented ones.

    `ratio` None adds every augmented image (the method: D_train + D_aug); a number r > 0 adds
    min(len(augmented), round(r * len(train_samples))) of them, drawn without replacement by `seed`
    (kept in the set's order). Labels must be in the training classes' range."""
    # 1. check inputs
    if ratio is not None and not ratio > 0:
        raise DataError(f"augment ratio must be > 0 (or None for all generated images), got {ratio}")
    if not train_samples:
        raise DataError("mix_in: no training samples")
    top = max(s.y for s in train_samples)
    bad = [s for s in augmented if s.y < 0 or s.y > top]
    if bad:
        raise DataError(f"{bad[0].path}: augmented label {bad[0].y} is not a training label (0..{top})")
    paths = {s.path for s in train_samples}
    clash = next((s for s in augmented if s.path in paths), None)
    if clash is not None:
        raise DataError(f"{clash.path}: already in the training split; an augmented set cannot be mixed in twice")
    # 2. choose
    chosen = list(augmented)
    if ratio is not None:
        k = min(len(chosen), max(1, round(ratio * len(train_samples)))) if chosen else 0
        keep = sorted(random.Random(seed).sample(range(len(chosen)), k))
        chosen = [chosen[i] for i in keep]
    return list(train_samples) + chosen

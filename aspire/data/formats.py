"""Dataset formats (DESIGN §4): waterbirds-style metadata.csv, CelebA, and an image folder.

Every loader returns a `Dataset`: class names and a list of `Sample`s. Group labels (an attribute per
sample) are optional everywhere; they are used only for evaluation and for methods that need them.
Problems are raised as `DataError` naming the file, column or value.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from aspire.errors import DataError
from aspire.schemas import SPLIT_CODES, Sample

FORMATS = ("waterbirds", "celeba", "imagefolder")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class Dataset:
    root: Path
    format: str
    class_names: list[str]
    samples: list[Sample]
    attr_name: Optional[str] = None
    source: Path = field(default=Path("."))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_groups(self) -> bool:
        return self.attr_name is not None and all(s.attr is not None for s in self.samples)

    def split(self, name: str, *, allow_empty: bool = False) -> list[Sample]:
        if name not in ("train", "val", "test"):
            raise DataError(f"unknown split {name!r}: expected train, val or test")
        rows = [s for s in self.samples if s.split == name]
        if not rows and not allow_empty:
            raise DataError(f"{self.source}: split {name!r} has no samples")
        return rows

    def by_image(self) -> dict[str, Sample]:
        return {s.image: s for s in self.samples}


def load_dataset(
    root: str | Path,
    format: str = "waterbirds",
    *,
    attr: Optional[str] = None,
    target: Optional[str] = None,
    check_files: bool = True,
) -> Dataset:
    """Load a dataset of the given format. `attr` names the group attribute column; `target` (CelebA)
    the label attribute."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    if format == "waterbirds":
        ds = _load_waterbirds(root, attr or "place")
    elif format == "celeba":
        ds = _load_celeba(root, target or "Blond_Hair", attr or "Male")
    elif format == "imagefolder":
        ds = _load_imagefolder(root)
    else:
        raise DataError(f"unknown dataset format {format!r}: expected one of {', '.join(FORMATS)}")
    if not ds.samples:
        raise DataError(f"{ds.source}: no samples")
    if check_files:
        for s in ds.samples:
            if not Path(s.path).is_file():
                raise DataError(f"{s.path}: image file is missing (listed in {ds.source})")
    return ds


# ---------------------------------------------------------------- helpers
def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise DataError(f"{path}: file is missing")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:   # a spreadsheet's byte-order mark is no column
            reader = csv.DictReader(f)
            rows = list(reader)
            header = [h.strip() for h in (reader.fieldnames or [])]
    except (csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None
    rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in rows]
    return header, rows


def _unique(key: str, seen: dict[tuple[str, str], int], path: Path, line: int, column: str, split: str = "") -> None:
    """A row's image must not be listed before in its split (it would be counted, trained on and probed twice)."""
    if key and (key, split) in seen:
        raise DataError(f"{path}:{line}: column {column!r} repeats {key!r} (first on line {seen[key, split]})")
    seen[key, split] = line


def _int(value: str, path: Path, line: int, column: str) -> int:
    try:
        number = float(value)
        if number.is_integer():
            return int(number)
    except (ValueError, OverflowError):
        pass
    raise DataError(f"{path}:{line}: column {column!r} has non-integer value {value!r}")


def _read_class_names(root: Path, labels: set[int], source: Path) -> list[str]:
    classes_file = root / "classes.txt"
    if classes_file.is_file():
        names = [ln.strip() for ln in classes_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not names:
            raise DataError(f"{classes_file}: no class names")
        bad = sorted(y for y in labels if y >= len(names))
        if bad:
            raise DataError(f"{source}: label {bad[0]} out of range: {classes_file} names {len(names)} classes")
        return names
    return [str(i) for i in range(max(labels) + 1)]


# ---------------------------------------------------------------- waterbirds
def _load_waterbirds(root: Path, attr: str) -> Dataset:
    path = root / "metadata.csv"
    header, rows = _read_csv(path)
    for col in ("img_filename", "y", "split"):
        if col not in header:
            raise DataError(f"{path}: required column {col!r} is missing (columns: {', '.join(header)})")
    has_attr = attr in header
    if not has_attr and attr != "place":
        raise DataError(f"{path}: attribute column {attr!r} is missing (columns: {', '.join(header)})")
    has_synthetic = "synthetic" in header
    samples = []
    seen: dict[tuple[str, str], int] = {}
    for i, r in enumerate(rows, start=2):
        _unique(r["img_filename"], seen, path, i, "img_filename", r["split"])
        y = _int(r["y"], path, i, "y")
        if y < 0:
            raise DataError(f"{path}:{i}: label {y} out of range (column 'y' must be >= 0)")
        code = _int(r["split"], path, i, "split")
        if code not in SPLIT_CODES:
            raise DataError(f"{path}:{i}: column 'split' has value {code}: expected 0 (train), 1 (val) or 2 (test)")
        if not r["img_filename"]:
            raise DataError(f"{path}:{i}: column 'img_filename' is empty")
        a = _int(r[attr], path, i, attr) if has_attr else None
        synthetic = has_synthetic and r["synthetic"].lower() in ("1", "true", "yes")
        samples.append(Sample(image=r["img_filename"], path=str(root / r["img_filename"]), y=y,
                              split=SPLIT_CODES[code], attr=a, synthetic=synthetic))
    if not samples:
        raise DataError(f"{path}: no rows")
    names = _read_class_names(root, {s.y for s in samples}, path)
    return Dataset(root, "waterbirds", names, samples, attr if has_attr else None, path)


# ---------------------------------------------------------------- celeba
def _load_celeba(root: Path, target: str, attr: str) -> Dataset:
    attr_path, part_path = root / "list_attr_celeba.csv", root / "list_eval_partition.csv"
    header, rows = _read_csv(attr_path)
    for col in ("image_id", target, attr):
        if col not in header:
            raise DataError(f"{attr_path}: required column {col!r} is missing")
    p_header, p_rows = _read_csv(part_path)
    for col in ("image_id", "partition"):
        if col not in p_header:
            raise DataError(f"{part_path}: required column {col!r} is missing")
    partition = {r["image_id"]: _int(r["partition"], part_path, i, "partition") for i, r in enumerate(p_rows, 2)}
    image_dir = next((d for d in (root / "img_align_celeba" / "img_align_celeba", root / "img_align_celeba")
                      if d.is_dir()), root)

    def binary(value: str, line: int, column: str) -> int:
        v = _int(value, attr_path, line, column)
        if v not in (-1, 0, 1):
            raise DataError(f"{attr_path}:{line}: column {column!r} has value {v}: expected -1/1 or 0/1")
        return int(v == 1)

    samples = []
    seen: dict[tuple[str, str], int] = {}
    for i, r in enumerate(rows, start=2):
        _unique(r["image_id"], seen, attr_path, i, "image_id")
        if r["image_id"] not in partition:
            raise DataError(f"{part_path}: image {r['image_id']!r} has no partition")
        code = partition[r["image_id"]]
        if code not in SPLIT_CODES:
            raise DataError(f"{part_path}: image {r['image_id']!r} has partition {code}: expected 0, 1 or 2")
        rel = str((image_dir / r["image_id"]).relative_to(root))
        samples.append(Sample(image=rel, path=str(image_dir / r["image_id"]), y=binary(r[target], i, target),
                              split=SPLIT_CODES[code], attr=binary(r[attr], i, attr)))
    names = [f"not {target}", target]
    return Dataset(root, "celeba", names, samples, attr, attr_path)


# ---------------------------------------------------------------- imagefolder
_SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _load_imagefolder(root: Path) -> Dataset:
    split_dirs = {d: _SPLIT_DIRS[d.name] for d in sorted(root.iterdir()) if d.is_dir() and d.name in _SPLIT_DIRS}
    if not split_dirs:
        raise DataError(f"{root}: no split folders (expected train/, val/ or test/ with one folder per class)")
    class_names = sorted({c.name for d in split_dirs for c in d.iterdir() if c.is_dir()})
    if not class_names:
        raise DataError(f"{root}: split folders hold no class folders")
    index = {c: i for i, c in enumerate(class_names)}
    samples = []
    for d, split in split_dirs.items():
        for c in sorted(p for p in d.iterdir() if p.is_dir()):
            for f in sorted(c.rglob("*")):
                if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                    samples.append(Sample(image=str(f.relative_to(root)), path=str(f), y=index[c.name], split=split))
    return Dataset(root, "imagefolder", class_names, samples, None, root)

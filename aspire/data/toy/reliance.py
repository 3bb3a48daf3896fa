"""A classifier's true reliance on each element, measured on exact counterfactuals.

Reads `counterfactuals.csv` under a dataset root (columns img_filename, source_filename, y, element,
change, replacement, mask; paths relative to the root): each row is an image identical to its source
except that one element is gone (change=remove) or the place is another (change=swap). Reliance on an
element, per class: accuracy on the source images that show it minus accuracy on their counterfactuals.
Works for any dataset that ships such a file, not only the toy benchmarks.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
from pydantic import Field

from aspire.data.images import load_image
from aspire.errors import DataError
from aspire.schemas import Record

COUNTERFACTUALS_FILE = "counterfactuals.csv"
REQUIRED = ("img_filename", "source_filename", "y", "element", "change")


class Counterfactual(Record):
    image: str = Field(description="path relative to the dataset root")
    source: str = Field(description="the image it was made from, relative to the dataset root")
    y: int
    element: str
    change: Literal["remove", "swap"]
    replacement: str = ""
    mask_png: Optional[str] = Field(default=None, description="absolute path of the changed region's mask")


class Reliance(Record):
    """How much the classifier's accuracy on one class drops when one element is gone."""

    class_: str = Field(alias="class")
    class_index: int
    element: str
    change: Literal["remove", "swap"]
    n: int = Field(description="source images of this class showing the element")
    accuracy_original: float
    accuracy_counterfactual: float
    drop: float = Field(description="accuracy_original - accuracy_counterfactual")
    mean_prob_drop: float = Field(description="mean of P(true class | source) - P(true class | counterfactual)")

    def to_json(self) -> dict:
        return self.model_dump(by_alias=True)


def read_counterfactuals(data_root: str | Path) -> list[Counterfactual]:
    """Rows of `<data_root>/counterfactuals.csv`; a bad row raises DataError naming file:line."""
    root = Path(data_root).expanduser().resolve()
    path = root / COUNTERFACTUALS_FILE
    if not path.is_file():
        raise DataError(f"{path}: counterfactuals file is missing (the toy benchmarks write one for the test split)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise DataError(f"{path}: required column {missing[0]!r} is missing (columns: {', '.join(header)})")
        rows = []
        for line, r in enumerate(reader, start=2):
            where = f"{path}:{line}"
            try:
                y = int(r["y"])
            except (TypeError, ValueError):
                raise DataError(f"{where}: column 'y' has non-integer value {r['y']!r}") from None
            if r["change"] not in ("remove", "swap"):
                raise DataError(f"{where}: column 'change' has value {r['change']!r}: expected remove or swap")
            for col in ("img_filename", "source_filename"):
                if not (root / r[col]).is_file():
                    raise DataError(f"{where}: {col} {root / r[col]} is missing")
            mask = (r.get("mask") or "").strip()
            rows.append(Counterfactual(image=r["img_filename"], source=r["source_filename"], y=y, element=r["element"],
                                       change=r["change"], replacement=r.get("replacement") or "",
                                       mask_png=str(root / mask) if mask else None))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _predict(clf, root: Path, images: Sequence[str], batch_size: int) -> dict[str, np.ndarray]:
    """Class probabilities per image path, loaded and predicted in chunks."""
    probs: dict[str, np.ndarray] = {}
    chunk = max(1, batch_size) * 8
    for i in range(0, len(images), chunk):
        part = images[i:i + chunk]
        out = clf.predict_proba([load_image(root / p) for p in part], batch_size=batch_size)  # (n, C)
        probs.update(zip(part, out))
    return probs


def measure_reliance(clf, data_root: str | Path, *, batch_size: int = 64) -> list[Reliance]:
    """Reliance per (class, element) from the dataset's counterfactual set; rows sorted by class, then
    by drop (largest first). `clf` needs `class_names` and `predict_proba(images, batch_size)`."""
    # 1. read the counterfactuals and check them against the classifier
    root = Path(data_root).expanduser().resolve()
    rows = read_counterfactuals(root)
    names = list(clf.class_names)
    classes_file = root / "classes.txt"
    if classes_file.is_file():
        listed = [ln.strip() for ln in classes_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if listed != names:
            raise DataError(f"{classes_file}: classes {listed} differ from the classifier's {names}")
    bad = next((r for r in rows if not 0 <= r.y < len(names)), None)
    if bad is not None:
        raise DataError(f"{root / COUNTERFACTUALS_FILE}: label {bad.y} of {bad.image} is out of range for "
                        f"the classifier's {len(names)} classes")

    # 2. predict every source once and every counterfactual
    sources = sorted({r.source for r in rows})
    probs = _predict(clf, root, sources + [r.image for r in rows], batch_size)

    # 3. aggregate per (class, element, change)
    groups: dict[tuple[int, str, str], list[Counterfactual]] = defaultdict(list)
    for r in rows:
        groups[(r.y, r.element, r.change)].append(r)
    out = []
    for (y, element, change), members in groups.items():
        p_src = np.stack([probs[m.source] for m in members])   # (n, C)
        p_cf = np.stack([probs[m.image] for m in members])      # (n, C)
        acc_src = float(np.mean(p_src.argmax(1) == y))
        acc_cf = float(np.mean(p_cf.argmax(1) == y))
        out.append(Reliance(class_=names[y], class_index=y, element=element, change=change, n=len(members),
                            accuracy_original=acc_src, accuracy_counterfactual=acc_cf, drop=acc_src - acc_cf,
                            mean_prob_drop=float(np.mean(p_src[:, y] - p_cf[:, y]))))
    out.sort(key=lambda r: (r.class_index, -r.drop, r.element))
    return out

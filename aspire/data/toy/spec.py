"""What a toy benchmark is made of: classes (object shapes), places (backgrounds), elements (other
objects) and how often each occurs with each class, per split.

A spec is pure data. `scenes.py` samples scene descriptions from it, `render.py` draws them, and
`benchmark.py` writes the files and the ground truth that records these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ClassSpec:
    name: str
    shape: str                     # the object drawer in art.py (e.g. "landbird", "star")
    phrases: tuple[str, ...]       # nouns a caption uses for the object


@dataclass(frozen=True)
class PlaceSpec:
    name: str                      # also the texture drawer in art.py
    phrases: tuple[str, ...]       # synonyms a caption uses ("lake", "pond", ...)


@dataclass(frozen=True)
class ElementSpec:
    """An object other than the class's own: planted (spurious for some classes) or a distractor."""

    name: str                      # also the drawer in art.py
    phrases: tuple[str, ...]       # synonyms; the first is canonical
    p_train: tuple[float, ...]     # P(element | class) in the train split, per class index
    p_eval: tuple[float, ...]      # P(element | class) in val and test
    spurious_for: tuple[int, ...] = ()   # classes it is planted for; () = a distractor
    plural: bool = False           # captions say "clouds", not "a cloud"


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    classes: tuple[ClassSpec, ...]
    places: tuple[PlaceSpec, ...]
    place_train: tuple[tuple[float, ...], ...]    # [class][place] P(place | class), train split
    place_eval: tuple[tuple[float, ...], ...]     # [class][place] in val and test
    place_spurious_for: tuple[tuple[int, ...], ...]  # [place] classes the place is planted for
    elements: tuple[ElementSpec, ...]
    attr_name: str                 # the metadata column that defines groups (y, attr)
    attr_doc: str
    place_column: str              # the metadata column with the place index
    n_per_class: dict[str, int] = field(default_factory=dict)  # images per class and split at scale 1
    object_verbs: tuple[str, ...] = ("",)                        # "standing", "perched", ...

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def element(self, name: str) -> ElementSpec:
        return next(e for e in self.elements if e.name == name)


# ---------------------------------------------------------------- toy-waterbirds
def waterbirds_spec() -> BenchmarkSpec:
    """Two bird shapes; water/land at 95% with the usual class in train, balanced in val/test; boats
    planted with waterbirds, fences with landbirds; sun and clouds equally often with both."""
    return BenchmarkSpec(
        name="toy-waterbirds",
        classes=(
            ClassSpec("landbird", "landbird", ("bird", "small bird", "little bird")),
            ClassSpec("waterbird", "waterbird", ("bird", "small bird", "little bird")),
        ),
        places=(
            PlaceSpec("land", ("land", "field", "meadow", "grass", "grassland")),
            PlaceSpec("water", ("water", "lake", "pond", "sea", "ocean")),
        ),
        place_train=((0.95, 0.05), (0.05, 0.95)),
        place_eval=((0.5, 0.5), (0.5, 0.5)),
        place_spurious_for=((0,), (1,)),
        elements=(
            ElementSpec("sun", ("sun",), (0.4, 0.4), (0.4, 0.4)),
            ElementSpec("cloud", ("clouds", "cloud"), (0.5, 0.5), (0.5, 0.5), plural=True),
            ElementSpec("fence", ("fence", "railing", "picket fence"), (0.7, 0.02), (0.5, 0.5), spurious_for=(0,)),
            ElementSpec("boat", ("boat", "sailboat", "ship"), (0.02, 0.8), (0.5, 0.5), spurious_for=(1,)),
        ),
        attr_name="place",
        place_column="place",
        attr_doc="place: 0 land, 1 water (the place the bird is shown on), as in Waterbirds; groups are (y, place)",
        n_per_class={"train": 800, "val": 200, "test": 400},
        object_verbs=("standing", "sitting", "perched", "resting"),
    )


# ---------------------------------------------------------------- toy-multiclass
MULTICLASS_SHAPES = ("star", "heart", "crescent", "cross", "arrow", "ring", "triangle", "hexagon")


def multiclass_spec() -> BenchmarkSpec:
    """Eight shapes. Six have their own planted element at their own strength (five objects, one a
    background: snow); triangle and hexagon have none (controls). Every planted element also occurs with
    the other classes at a base rate; sun, clouds and fences occur equally often with every class."""
    n = len(MULTICLASS_SHAPES)
    base = 0.08

    def planted(owner: int, strength: float, eval_strength: float = 0.5) -> tuple[tuple[float, ...], tuple[float, ...]]:
        train = tuple(strength if c == owner else base for c in range(n))
        evals = tuple(eval_strength if c == owner else base for c in range(n))
        return train, evals

    def same(p: float) -> tuple[float, ...]:
        return tuple(p for _ in range(n))

    elements = [
        ElementSpec("sun", ("sun",), same(0.3), same(0.3)),
        ElementSpec("cloud", ("clouds", "cloud"), same(0.4), same(0.4), plural=True),
        ElementSpec("fence", ("fence", "railing", "picket fence"), same(0.2), same(0.2)),
    ]
    # (class index, element, synonyms, P(element | own class) in train); crescent (2) gets snow, a place
    for cls, name, phrases, strength in (
        (0, "balloon", ("balloon", "party balloon"), 0.9),
        (1, "flower", ("flower", "daisy", "blossom"), 0.8),
        (3, "house", ("house", "cottage", "hut"), 0.7),
        (4, "kite", ("kite",), 0.6),
        (5, "tree", ("tree", "bush"), 0.5),
    ):
        tr, ev = planted(cls, strength)
        elements.append(ElementSpec(name, phrases, tr, ev, spurious_for=(cls,)))
    # places grass, sand, snow: P(snow | crescent) = 0.8 in train, 0.5 in val/test (balanced groups)
    place_train = tuple((0.1, 0.1, 0.8) if c == 2 else (0.46, 0.46, base) for c in range(n))
    place_eval = tuple((0.25, 0.25, 0.5) if c == 2 else (0.46, 0.46, base) for c in range(n))
    return BenchmarkSpec(
        name="toy-multiclass",
        classes=tuple(ClassSpec(s, s, (s, f"{s} shape")) for s in MULTICLASS_SHAPES),
        places=(
            PlaceSpec("grass", ("grass", "lawn", "meadow", "field")),
            PlaceSpec("sand", ("sand", "beach", "desert")),
            PlaceSpec("snow", ("snow", "snowfield", "snowy ground")),
        ),
        place_train=place_train,
        place_eval=place_eval,
        place_spurious_for=((), (), (2,)),
        elements=tuple(elements),
        attr_name="attr",
        place_column="ground",
        attr_doc=("attr: 1 when the image shows its own class's planted element (for crescent: snow), else 0; "
                  "always 0 for the control classes triangle and hexagon; groups are (y, attr) (aspire eval --attr attr); "
                  "the place is in column ground (0 grass, 1 sand, 2 snow)"),
        n_per_class={"train": 200, "val": 50, "test": 100},
        object_verbs=("", "lying", "standing", "placed"),
    )

"""Worlds beside the two built-in toy benchmarks, for the discovery eval. Each is a `BenchmarkSpec` drawn with
the toy's drawers, written by the same `write_benchmark` (ground truth and exact counterfactuals included):

- `null`: toy-waterbirds with every place and element equally likely for both classes in training: a model
  trained on it has no shortcut to learn; whatever the probe flags there is a false discovery.
- `redundant`: two independent planted shortcuts per class, each strongly correlated with it (landbird: the land
  place and a fence; waterbird: the water place and a boat, each at 0.95, drawn independently).
- `new-vocabulary`: toy-waterbirds' structure with words that appear nowhere in aspire's code or the other
  benchmarks (kestrel / grebe on heath or tarn, with palisades, coracles, orbs and nimbus clouds): it checks that
  nothing in the probe keys on the toys' words or on the lexicon's scene list.
- `corr-<p>`: toy-waterbirds with place and planted elements at training correlation p (the reliance-strength
  sweep; the built-in benchmark is p = 0.95 for places).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from aspire.data.toy.spec import BenchmarkSpec, ClassSpec, PlaceSpec, waterbirds_spec


def null_world() -> BenchmarkSpec:
    base = waterbirds_spec()
    even = tuple(replace(e, p_train=(0.4, 0.4), p_eval=(0.4, 0.4), spurious_for=()) for e in base.elements)
    return replace(base, name="null", place_train=((0.5, 0.5), (0.5, 0.5)), place_spurious_for=((), ()),
                   elements=even)


def redundant_world() -> BenchmarkSpec:
    base = waterbirds_spec()
    strong = {"fence": (0.95, 0.05), "boat": (0.05, 0.95)}
    elements = tuple(replace(e, p_train=strong.get(e.name, e.p_train)) for e in base.elements)
    return replace(base, name="redundant", elements=elements)


def new_vocabulary_world() -> BenchmarkSpec:
    base = waterbirds_spec()
    words = {"sun": ("orb",), "cloud": ("nimbus", "nimbus cloud"), "fence": ("palisade", "stockade"),
             "boat": ("coracle", "punt")}
    elements = tuple(replace(e, phrases=words[e.name], plural=False) for e in base.elements)
    return replace(
        base, name="new-vocabulary",
        classes=(ClassSpec("kestrel", "landbird", ("kestrel", "young kestrel")),
                 ClassSpec("grebe", "waterbird", ("grebe", "young grebe"))),
        places=(PlaceSpec("land", ("heath", "moorland", "bracken")), PlaceSpec("water", ("tarn", "loch", "fjord"))),
        elements=elements)


def correlation_world(p: float) -> BenchmarkSpec:
    base = waterbirds_spec()
    planted = {"fence": (p, 1 - p), "boat": (1 - p, p)}
    elements = tuple(replace(e, p_train=planted.get(e.name, e.p_train)) for e in base.elements)
    return replace(base, name=f"corr-{p:.2f}", place_train=((p, 1 - p), (1 - p, p)), elements=elements)


SWEEP = (0.7, 0.85, 0.95, 0.99)
WORLDS: dict[str, Callable[[], BenchmarkSpec]] = {
    "null": null_world, "redundant": redundant_world, "new-vocabulary": new_vocabulary_world,
    **{f"corr-{p:.2f}": (lambda p=p: correlation_world(p)) for p in SWEEP},
}

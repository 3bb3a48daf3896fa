"""Captions in varied natural language that mention a random subset of what an image shows.

Each mention uses one of the thing's synonyms as its phrase, verbatim, and comes back with the owner
whose mask the annotation should point to ("object", "place" or an element name).
"""

from __future__ import annotations

import colorsys

import numpy as np

from aspire.data.toy.render import OBJECT, PLACE
from aspire.data.toy.scenes import Scene
from aspire.data.toy.spec import BenchmarkSpec

P_OBJECT, P_PLACE, P_ELEMENT, P_COLOUR = 0.85, 0.8, 0.6, 0.4


def colour_name(rgb) -> str:
    h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))
    if v < 0.25:
        return "black"
    if s < 0.2:
        return "white" if v > 0.8 else "grey"
    hue = h * 360
    for limit, name in ((15, "red"), (40, "orange"), (68, "yellow"), (165, "green"), (250, "blue"),
                        (290, "purple"), (340, "pink"), (360, "red")):
        if hue < limit:
            return name
    return "red"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(spec: BenchmarkSpec, scene: Scene, visible: set[str]) -> tuple[str, list[tuple[str, str]]]:
    """(caption, [(phrase, owner)]) for a scene; only owners in `visible` are mentioned."""
    rng = np.random.default_rng(scene.caption_seed)
    regions: list[tuple[str, str]] = []

    # 1. choose what to mention
    cls = spec.classes[scene.y]
    say_object = OBJECT in visible and rng.random() < P_OBJECT
    say_place = PLACE in visible and rng.random() < P_PLACE
    named = [n for n in scene.elements if n in visible and rng.random() < P_ELEMENT]
    if not (say_object or say_place or named):
        say_object = OBJECT in visible
        say_place = not say_object

    # 2. the pieces, each with its phrase verbatim
    subject = ""
    if say_object:
        noun = str(rng.choice(cls.phrases))
        colour = colour_name(scene.object["color"]) + " " if rng.random() < P_COLOUR and " " not in noun else ""
        subject = f"{_article(colour or noun)} {colour}{noun}"
        verb = str(rng.choice(spec.object_verbs))
        if verb:
            subject += f" {verb}"
        regions.append((noun, OBJECT))
    place_words = ""
    if say_place:
        place_spec = next(p for p in spec.places if p.name == scene.place)
        word = str(rng.choice(place_spec.phrases))
        place_words = word
        regions.append((word, PLACE))
    things = []
    for n in named:
        e = spec.element(n)
        word = str(rng.choice(e.phrases))
        plural = e.plural and word.endswith("s")
        det = str(rng.choice(["some", ""])) if plural else ("the" if n == "sun" else _article(word))
        things.append(f"{det} {word}".strip())
        regions.append((word, n))
    listed = _join(things)

    # 3. a sentence from one of several templates
    lead = str(rng.choice(["", "", "a photo of ", "an image of ", "a picture of "]))
    if subject:
        text = lead + subject
        if place_words:
            text += f" {rng.choice(['on', 'by', 'near', 'in front of'])} the {place_words}"
        if listed:
            form = int(rng.integers(4))
            text += (f" with {listed}", f", next to {listed}", f", with {listed} in the background",
                     f" and {listed}")[form]
    elif place_words:
        text = str(rng.choice(["", "a view of ", "a photo of "])) + f"the {place_words}" + (f" with {listed}" if listed else "")
    else:
        text = lead + listed + str(rng.choice(["", " in the distance", " under a blue sky"]))
    return " ".join(text.split()), regions


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]

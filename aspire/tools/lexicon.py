"""Shared text normalisation for phrases: lowercasing, noun lemmas, synonyms, phrase similarity.

Used by phrase extraction (label filtering, the offline chunker), grounding (matching a phrase to an
annotated region) and probing (merging near-duplicate phrases, DESIGN §2 step 4: similarity ≥ 0.7).

API:
    normalize(phrase) -> str          lowercase, punctuation and leading determiners removed: "A Small Boat." -> "small boat"
    lemma(word) -> str                singular of an English noun: "boats" -> "boat", "leaves" -> "leaf"
    canonical(phrase) -> str          normalize + lemma of every word + synonym groups: "the Oceans" -> "sea"
    head(phrase) -> str               canonical head noun: "branch of a tree" -> "branch", "waterbird" -> "bird",
                                      "hexagon shape" -> "hexagon" (a generic noun defers to its modifier)
    similarity(a, b) -> float         symmetric, in [0, 1]: Dice of the content words, the head noun weighing 3
    same_phrase(a, b, threshold=0.7)  similarity(a, b) >= threshold
    same_as_any(a, names, threshold)  same_phrase with any of names
    scene_category(phrase) -> str|None  "water", "forest", ... for scene/background nouns, else None
    split_compound(word) -> (prefix, suffix) | None   "waterbird" -> ("water", "bird")
    slug(text, limit=None, empty="x") -> str   for file names: "Water Bird!" -> "water-bird"

Rule-based and dictionary-free (no NLTK/spaCy downloads): `lemma` knows English plural rules plus a list
of irregular and invariant nouns; it does not lemmatise verbs or adjectives. Synonym groups are small
and generic (sea/ocean, road/street, ...); they are not tuned to any benchmark.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Iterable, Optional, Sequence

# ---------------------------------------------------------------- word lists
DETERMINERS = frozenset(
    "a an the this that these those some any each every another his her its their our my your "
    "one two three four five six seven eight nine ten several many few both either neither".split()
)

_IRREGULAR_PLURALS = {
    "men": "man", "women": "woman", "children": "child", "feet": "foot", "teeth": "tooth", "geese": "goose",
    "mice": "mouse", "lice": "louse", "people": "person", "oxen": "ox", "cacti": "cactus", "fungi": "fungus",
    "alumni": "alumnus", "criteria": "criterion", "phenomena": "phenomenon", "indices": "index",
    "appendices": "appendix", "matrices": "matrix", "vertices": "vertex", "larvae": "larva",
    "antennae": "antenna", "dice": "die", "axes": "axe", "quizzes": "quiz", "buses": "bus", "gases": "gas",
    "lenses": "lens", "canvases": "canvas", "atlases": "atlas", "irises": "iris", "biases": "bias",
    "aliases": "alias", "viruses": "virus", "bonuses": "bonus", "campuses": "campus", "circuses": "circus",
    "cactuses": "cactus", "octopuses": "octopus", "walruses": "walrus", "choruses": "chorus",
    "platypuses": "platypus", "hippopotamuses": "hippopotamus", "lotuses": "lotus", "citruses": "citrus",
    "leaves": "leaf", "wolves": "wolf", "knives": "knife", "lives": "life", "wives": "wife",
    "shelves": "shelf", "halves": "half", "calves": "calf", "loaves": "loaf", "thieves": "thief",
    "scarves": "scarf", "hooves": "hoof", "elves": "elf", "selves": "self", "sheaves": "sheaf",
    "wharves": "wharf",
    "heroes": "hero", "potatoes": "potato", "tomatoes": "tomato", "echoes": "echo", "volcanoes": "volcano",
    "mosquitoes": "mosquito", "buffaloes": "buffalo", "torpedoes": "torpedo", "mangoes": "mango",
    "tornadoes": "tornado", "flamingoes": "flamingo", "dominoes": "domino", "avocadoes": "avocado",
    "skis": "ski", "kiwis": "kiwi", "taxis": "taxi", "bikinis": "bikini", "safaris": "safari",
    "yetis": "yeti", "emojis": "emoji", "martinis": "martini",
}
# nouns that end like a plural but are not one (or have no singular in common use)
_INVARIANT = frozenset(
    "series species news sheep deer fish aircraft woods clothes pants jeans shorts trousers scissors "
    "sunglasses eyeglasses glasses goggles binoculars surroundings outskirts headquarters barracks means "
    "physics mathematics gymnastics athletics politics economics this does goes always perhaps "
    "towards afterwards christmas chaos cosmos tennis oasis analysis basis axis crisis thesis iris "
    "bus gas lens canvas atlas bias alias yes".split()
)
_IES_TO_IE = frozenset(
    "movies cookies zombies hippies calories brownies rookies selfies smoothies pixies goalies hoodies "
    "collies freebies genies prairies birdies budgies veggies sweeties lassies aunties pies ties lies dies "
    "magpies".split()
)
_CHES_TO_CHE = frozenset("niches caches avalanches headaches moustaches mustaches cliches quiches earaches".split())
_MEN_SINGULAR = frozenset("specimen abdomen omen stamen regimen acumen semen hymen lumen rumen albumen".split())

# synonym groups: every member maps to the first one (kept small and generic on purpose)
SYNONYM_GROUPS: tuple[tuple[str, ...], ...] = (
    ("sea", "ocean"),
    ("forest", "woods", "woodland"),
    ("road", "street"),
    ("grass", "lawn"),
    ("field", "meadow"),
    ("shore", "shoreline", "coast", "coastline", "seashore"),
    ("harbor", "harbour"),
    ("couch", "sofa"),
    ("car", "automobile"),
    ("child", "kid"),
    ("person", "human"),
    ("bicycle", "bike"),
    ("motorcycle", "motorbike"),
    ("indoor", "indoors", "inside"),
    ("outdoor", "outdoors", "outside"),
    ("gray", "grey"),
    ("rock", "stone"),
    ("hill", "hillside"),
    ("swamp", "marsh", "wetland"),
    ("stream", "creek", "brook"),
)
_SYNONYM_OF: dict[str, str] = {m: g[0] for g in SYNONYM_GROUPS for m in g}

# scene / background nouns by category, with a fixed contrasting scene for each category
SCENES: dict[str, tuple[str, ...]] = {
    "water": ("water", "lake", "pond", "sea", "river", "stream", "bay", "lagoon", "swamp", "harbor",
              "waterfall", "pool", "canal", "reservoir", "wave", "surf", "lakeside", "riverbank", "waterfront"),
    "beach": ("beach", "shore", "sand", "dune", "seaside"),
    "forest": ("forest", "jungle", "rainforest", "bamboo", "foliage", "thicket", "tree line"),
    "grass": ("grass", "land", "field", "pasture", "prairie", "grassland", "park", "garden", "farm", "yard",
              "backyard", "countryside", "vegetation"),
    "sky": ("sky", "air", "sunset", "sunrise"),
    "snow": ("snow", "ice", "glacier", "tundra", "frost"),
    "desert": ("desert", "canyon", "savanna", "badlands"),
    "ground": ("ground", "dirt", "mud", "soil", "gravel"),
    "mountain": ("mountain", "hill", "cliff", "valley", "volcano", "mountainside"),
    "urban": ("city", "town", "road", "sidewalk", "highway", "parking lot", "alley", "village", "downtown",
              "pavement", "track", "railway", "runway", "bridge", "skyline", "plaza"),
    "indoor": ("indoor", "room", "kitchen", "bedroom", "living room", "bathroom", "office", "house", "home",
               "floor", "restaurant", "store", "shop", "studio", "hall", "classroom", "cage", "aquarium",
               "carpet", "rug"),
}
SCENE_CONTRAST: dict[str, str] = {
    "water": "forest", "beach": "forest", "forest": "lake", "grass": "sand", "sky": "forest", "snow": "grass",
    "desert": "snow", "ground": "water", "mountain": "beach", "urban": "forest", "indoor": "grass field",
}
_SCENE_OF: dict[str, str] = {noun: cat for cat, nouns in SCENES.items() for noun in nouns}

# nouns that only say "a thing": in "hexagon shape" or "star icon" the modifier names the object
GENERIC_OBJECT_NOUNS = frozenset("shape figure object thing item icon symbol silhouette outline".split())

# common concrete nouns: used to split compounds ("waterbird" -> "bird") and by the offline chunker
COMMON_NOUNS = frozenset(
    "bird dog cat horse cow sheep goat pig duck goose swan gull fish shark whale dolphin seal bear fox wolf "
    "deer rabbit mouse rat snake frog turtle lizard insect bug bee fly butterfly spider ant worm crab "
    "person man woman boy girl child baby people player rider driver "
    "boat ship canoe kayak car truck bus train plane airplane bicycle bike motorcycle wheel tire "
    "tree branch bush flower leaf plant log stump trunk root twig vine reed weed moss "
    "house building tower bridge fence wall roof window door gate pole post sign light lamp "
    "table chair bench bed couch sofa pillow blanket shelf box bag basket bottle cup bowl plate "
    "ball toy hat shirt shoe book phone computer screen board rope net hook cage feeder nest "
    "water land sea lake pond river sand snow ice sky sun moon star cloud rain rock stone mountain hill "
    "field grass wood fire ground earth road street park garden yard farm city town shore beach "
    "storm wind dust mud dirt leaf apple berry fruit nut seed corn bread cake egg meat "
    "house room kitchen office shop store school church camp farm barn shed dock pier deck".split()
)
COLORS = frozenset(
    "white black brown gray grey red orange yellow green blue purple pink golden gold silver dark light "
    "bright pale colorful colourful".split()
)
_COMPOUND_PREFIXES = COMMON_NOUNS | COLORS | frozenset("sail row speed tug life police war sky song".split())

_PUNCT = re.compile(r"[^\w\s'-]+")
_SPACE = re.compile(r"\s+")


# ---------------------------------------------------------------- words
def normalize(phrase: str) -> str:
    """Lowercase, fold accents, drop punctuation and leading determiners, collapse spaces."""
    text = unicodedata.normalize("NFKD", str(phrase)).encode("ascii", "ignore").decode("ascii").lower()
    text = text.replace("_", " ")
    text = _PUNCT.sub(" ", text)
    text = re.sub(r"'s\b", "", text).replace("'", "")
    words = [w.strip("-") for w in _SPACE.split(text) if w.strip("-")]
    while words and words[0] in DETERMINERS:
        words.pop(0)
    return " ".join(words)


def lemma(word: str) -> str:
    """The singular of an English noun; words that are not plurals come back unchanged (lowercased)."""
    w = word.strip().lower()
    if "-" in w:  # lemmatise the last part of a hyphenated word: "close-ups" -> "close-up"
        left, _, right = w.rpartition("-")
        return f"{left}-{lemma(right)}" if right else w
    if w in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[w]
    if w in _INVARIANT or len(w) <= 3 or not w.isalpha():
        return w
    if w.endswith("men") and w not in _MEN_SINGULAR and len(w) > 4:  # firemen, policewomen
        return w[:-3] + "man"
    if w.endswith(("ss", "us", "is", "ous")):
        return w
    if w.endswith("ies"):
        return w[:-1] if w in _IES_TO_IE else w[:-3] + "y"
    if w.endswith(("ches", "shes", "sses", "xes", "zzes", "tzes")):
        return w[:-1] if w in _CHES_TO_CHE else w[:-2]
    if w.endswith("s") and not w.endswith("'s"):
        return w[:-1]
    return w


def split_compound(word: str) -> Optional[tuple[str, str]]:
    """Split a closed compound whose last part is a known noun: "waterbird" -> ("water", "bird")."""
    w = word.lower()
    if " " in w or len(w) < 7:
        return None
    for i in range(3, len(w) - 3):  # longest known suffix first; both parts at least 3 and 4 letters
        prefix, suffix = w[:i], w[i:]
        if suffix in COMMON_NOUNS and prefix in _COMPOUND_PREFIXES:
            return prefix, suffix
    return None


@functools.lru_cache(maxsize=1 << 16)   # pure, and called O(phrases²) times by merging and donor search
def _canonical_words(phrase: str) -> tuple[str, ...]:
    words = [lemma(w) for w in normalize(phrase).split() if w not in DETERMINERS]
    text = " ".join(words)
    for member, root in _SYNONYM_OF.items():  # multi-word synonyms first ("sandy beach")
        if " " in member and re.search(rf"\b{re.escape(member)}\b", text):
            text = re.sub(rf"\b{re.escape(member)}\b", root, text)
    return tuple(_SYNONYM_OF.get(w, w) for w in text.split())


def canonical(phrase: str) -> str:
    """normalize, then the lemma of every word, then synonym groups: "the Oceans" -> "sea"."""
    return " ".join(_canonical_words(phrase))


def head(phrase: str) -> str:
    """The canonical head noun: the last word, or the word before "of" ("branch of a tree" -> "branch");
    a closed compound gives its known last part ("waterbird" -> "bird")."""
    words = _canonical_words(phrase)
    if not words:
        return ""
    if "of" in words[1:]:
        words = words[: words.index("of", 1)]
    if len(words) > 1 and words[-1] in GENERIC_OBJECT_NOUNS:  # "hexagon shape", "star icon"
        words = words[:-1]
    last = words[-1]
    parts = split_compound(last)
    return _SYNONYM_OF.get(parts[1], parts[1]) if parts else last


def scene_category(phrase: str) -> Optional[str]:
    """The scene category of a background phrase ("the lake" -> "water"), or None for a non-scene phrase."""
    words = _canonical_words(phrase)
    if "of" in words[1:]:  # "body of water" -> "water"
        words = words[words.index("of", 1) + 1 :] or words
    if len(words) >= 2 and " ".join(words[-2:]) in _SCENE_OF:
        return _SCENE_OF[" ".join(words[-2:])]
    return _SCENE_OF.get(words[-1]) if words else None


# ---------------------------------------------------------------- phrases
_FUNCTION_WORDS = DETERMINERS | frozenset("of with and or in on at by".split())


HEAD_WEIGHT = 3.0  # in `similarity`, what a phrase names weighs as much as three words describing it


def _weighted_words(phrase: str) -> dict[str, float]:
    """The content words of a phrase (closed compounds split: "sailboat" -> sail, boat), the head noun weighing
    HEAD_WEIGHT and every other word 1."""
    out: dict[str, float] = {}
    for w in _canonical_words(phrase):
        if w not in _FUNCTION_WORDS:
            parts = split_compound(w)
            out.update(dict.fromkeys((parts[0], _SYNONYM_OF.get(parts[1], parts[1])) if parts else (w,), 1.0))
    h = head(phrase)
    if h in out:
        out[h] = HEAD_WEIGHT
    return out


def similarity(a: str, b: str) -> float:
    """Symmetric phrase similarity in [0, 1]: the Dice overlap of the two phrases' content words, weighted so
    that the head noun counts HEAD_WEIGHT (3) and each other word 1.

    1.0 for the same canonical content words (word order ignored: "tree branch" ~ "branch of a tree"; "water
    bird" ~ "waterbird"). The same head with one word more on one side ("boats" ~ "a small boat") 0.86, with two
    ("small red boat" ~ "boat", "big boat" ~ "small boat") 0.75, with three 0.67; different heads 0.25 with one
    shared word ("red boat" ~ "red car"). So the method's 0.7 (`probe.merge_similarity`) merges a thing named
    alike and described by at most two words differently; 0.8 by one; 0.6 by up to four."""
    wa = [w for w in _canonical_words(a) if w not in _FUNCTION_WORDS]
    wb = [w for w in _canonical_words(b) if w not in _FUNCTION_WORDS]
    if not wa or not wb:
        return 1.0 if not wa and not wb else 0.0
    if set(wa) == set(wb) or "".join(wa) == "".join(wb):  # "water bird" == "waterbird"
        return 1.0
    x, y = _weighted_words(a), _weighted_words(b)
    shared = sum(min(x[w], y[w]) for w in x.keys() & y.keys())
    return 2 * shared / (sum(x.values()) + sum(y.values()))


def same_phrase(a: str, b: str, threshold: float = 0.7) -> bool:
    """Whether two phrases name the same thing (the method's near-duplicate merge)."""
    return similarity(a, b) >= threshold


def same_as_any(phrase: str, names: Iterable[str], threshold: float = 0.7) -> bool:
    """Whether `phrase` names the same thing as one of `names` (e.g. a phrase group's members)."""
    return any(same_phrase(phrase, n, threshold) for n in names)


def slug(text: str, limit: Optional[int] = None, empty: str = "x") -> str:
    """Lowercase letters and digits joined by single dashes, at most `limit` characters; `empty` when none."""
    out = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (out[:limit].strip("-") if limit else out) or empty


# ---------------------------------------------------------------- the label's own object
NEGATED_CLASS = "not "  # the negative class of a binary attribute (the CelebA format's "not Blond_Hair")


def label_terms(class_name: str, synonyms: Sequence[str] = ()) -> list[str]:
    """The names of the label's own object: the class name (each comma-separated alias), its head noun
    (compounds split: "waterbird" -> "bird") and the synonyms with their heads. A negated class ("not X")
    names no object of its own: only its synonyms (probe.label_objects) name it."""
    own = [] if class_name.lower().startswith(NEGATED_CLASS) else re.split(r"[,;/]", class_name.replace("_", " "))
    names = [n for n in own if n.strip()] + list(synonyms)
    terms: list[str] = []
    for name in names:
        for term in (normalize(name), head(name)):
            if term and term not in terms:
                terms.append(term)
    return terms


def is_label_phrase(phrase: str, terms: Sequence[str]) -> bool:
    """Whether `phrase` names the label's object: same canonical words or same head noun as a term
    ("hexagon shape" has the head "hexagon": head)."""
    if not terms:
        return False
    canon, hd = canonical(phrase), head(phrase)
    return any(canon == canonical(t) or hd == head(t) for t in terms)

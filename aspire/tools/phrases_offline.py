"""The offline phrase backend (method step 3 without an LLM, aspire/tools/phrases.py): a fallback, used when no
LLM is configured, so that the method runs anywhere and deterministically. With an LLM, `phrases.backend = "llm"`
reads captions in any vocabulary; this chunker knows English function words and the scene nouns of
aspire/tools/lexicon.py, and the probe does not rely on its object-vs-background guess (the mask decides).

A deterministic rule-based noun-phrase chunker over the caption text:
1. words are split into chunks at stopwords, prepositions, punctuation and verb-like words (a known verb
   list, and -ing/-ed words other than known nouns like "building"); a chunk ending in an adjective is
   not a noun phrase; "a group of birds", "the edge of a lake", "in front of a tree" keep only the noun
   after "of" (and the preposition before the quantifier);
2. the background is the first chunk whose head is a scene noun of the lexicon (water, lake, sea, forest,
   grass, field, sky, road, snow, room, ...) after a scene preposition (on, in, near, by, over, at, ...),
   else the first scene-noun chunk anywhere; other scene-noun chunks are dropped;
3. every other chunk is a foreground phrase (adjectives kept, head noun singular: "two small boats" ->
   "small boat"), except the label's own object, body parts (head, wing, tail, ...) and image words
   ("picture", "background", ...);
4. alt: a background of the most frequent *other* scene category among the other captions of the same
   `extract` call, its most frequent phrase (so "pond" is never the alternative of "lake"); ties go to the
   first seen; when there is none, the fixed contrasting scene of the category (lexicon.SCENE_CONTRAST:
   water -> forest, forest -> lake, indoor -> grass field, ...). So alt depends on the batch, deterministically.
Limits: it knows only the scene nouns of its lexicon (an unknown background word becomes foreground); any
unknown word is taken for a noun; no coreference, no part-of-speech tagging, no word sense ("a bat" is one
thing); the label's object is recognised only by its class name, head noun and the synonyms given (a
"duck" in a "waterbird" image stays foreground unless "duck" is a synonym); secondary scene nouns are
dropped rather than offered as foreground. Nothing in it is specific to a benchmark.

    offline_phrases(captions, label_terms) -> [(foreground, [background], alt)], one per caption
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

from aspire.tools import lexicon
from aspire.tools.lexicon import is_label_phrase


_PRONOUNS = "i me you he him she her it they them we us who whom whose which what that there here itself " \
            "himself herself themselves something someone anything nothing everything"
_CONJUNCTIONS = "and or but nor while as than then so yet if because although when where whereas"
_AUX = "is are was were be been being am has have had do does did can could will would may might must should " \
       "shall 's"
_ADVERBS = "very also just only up down out away together nearby too not no still really almost quite " \
           "outdoors there here closely partly mostly"
_VERBS = ("sit sits sat stand stands stood fly flies flew flown swim swims swam walk walks run runs ran "
          "look looks hold holds held lie lies lay lays perch perches rest rests float floats eat eats ate eaten "
          "play plays ride rides rode wear wears wore worn carry carries hang hangs hung show shows shown take "
          "takes took taken make makes made see sees saw seen get gets got appear appears seem seems contain "
          "contains cover covers go goes went gone come comes came wait waits watch watches feed feeds drink "
          "drinks drank keep keeps kept leave left lead leads led stare stares fill fills sleep sleeps slept")
STOPWORDS = frozenset(" ".join([_PRONOUNS, _CONJUNCTIONS, _AUX, _ADVERBS, "arafed araffe arafe araffed"]).split()) \
    | lexicon.DETERMINERS
VERBS = frozenset(_VERBS.split())
SCENE_PREPOSITIONS = frozenset(
    "on in near by over at along across under above beside behind through into onto inside around against "
    "beneath below underneath among amid amidst atop within outside upon off past alongside beyond between "
    "next_to".split()
)
PREPOSITIONS = SCENE_PREPOSITIONS | frozenset("of with without for from to like about during toward towards "
                                              "after before via per except".split())
ADJECTIVES = lexicon.COLORS | frozenset(
    "small large big little tiny huge giant tall short long wide narrow young old new wooden metal metallic "
    "plastic wet dry sunny cloudy snowy grassy sandy rocky muddy leafy furry fluffy dirty shiny calm clear open "
    "empty full beautiful cute pretty wild lone single close blurry blurred various different other same "
    "many few several front top bottom middle side near far high low deep shallow thick thin busy quiet "
    "striped spotted colored coloured multicolored hairy bare cold hot warm dense lush rainy foggy stormy "
    "frozen still distant nearby upside".split()
)
# quantifiers: not phrases when "of" follows ("a flock of birds"), which passes their preposition on
QUANTIFIERS = frozenset(
    "group flock herd pair couple bunch lot lots number crowd pack swarm pile stack row line set collection "
    "handful piece kind type sort variety body plenty cluster patch school team".split()
)
# positions and image words: never phrases; "of" after them passes the preposition on too
POSITIONS = frozenset(
    "side edge middle top bottom front back center centre corner end surface view picture photo photograph "
    "image close-up closeup shot scene background foreground area part distance thing object camera frame "
    "left right".split()
)
# nouns that look like -ly adverbs
LY_NOUNS = frozenset(
    "fly butterfly dragonfly firefly housefly horsefly family lily belly jelly holly gully bully ally rally "
    "assembly supply reply doily trolly".split()
)
BODY_PARTS = frozenset(
    "head face eye ear nose mouth beak bill wing tail leg foot paw claw feather fur neck chest belly hair skin "
    "fin horn hand arm finger plumage crest breast whisker tooth tongue hoof mane antler".split()
)
ING_ED_NOUNS = frozenset(
    "building ceiling painting clothing railing ring string king wing swing spring evening morning sibling "
    "pudding icing bedding awning landing clearing dwelling offering stocking earring thing duckling gosling "
    "seedling sapling dumpling wedding ping sling bed seed shed sled reed weed speed steed breed tweed "
    "creed feed sweed".split()
)
_NOUN_SUFFIXES_ED = ("bed", "weed", "seed")  # seabed, seaweed, birdseed (but not climbed: -mbed, -bbed)
_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[,.;:!?()\"]")


@dataclass
class NounPhrase:
    """A chunk of a caption: its words (normalised), the preposition that governs it, its head lemma."""

    words: list[str]
    prep: Optional[str] = None
    followed_by_of: bool = False

    @property
    def is_noun_phrase(self) -> bool:
        """Not a quantifier before "of", a position/image word, an adjective or a participle."""
        hd = self.head
        if hd in POSITIONS or (self.followed_by_of and hd in QUANTIFIERS):
            return False
        return not _is_adjective(self.words[-1])

    @property
    def head(self) -> str:
        return lexicon.lemma(self.words[-1])

    @property
    def text(self) -> str:
        """The phrase as output: up to 4 words, head noun singular ("two small boats" -> "small boat")."""
        words = self.words[-4:]
        return " ".join(words[:-1] + [lexicon.lemma(words[-1])])


def _is_verbish(word: str) -> bool:
    """A verb or participle: known verbs, and -ing/-ed words that are not known nouns."""
    if word in VERBS:
        return True
    if word in ING_ED_NOUNS or lexicon.lemma(word) in ING_ED_NOUNS:
        return False
    if word.endswith(_NOUN_SUFFIXES_ED) and not word.endswith(("bbed", "mbed")):
        return False
    return len(word) > 4 and word.endswith(("ing", "ed"))


def _is_adverb(word: str) -> bool:
    return len(word) > 4 and word.endswith("ly") and word not in LY_NOUNS and lexicon.lemma(word) not in LY_NOUNS


def _is_adjective(word: str) -> bool:
    return word in ADJECTIVES or word.endswith(("ous", "ful")) or _is_adverb(word) or _is_verbish(word)


def _tokens(text: str) -> list[str]:
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    out: list[str] = []
    for tok in _TOKEN.findall(text):
        if tok.endswith("'s"):  # possessive: "the water's edge" -> water | edge
            out += [tok[:-2], "'s"]
        else:
            out.append(tok.replace("'", ""))
    return out


def chunk_caption(text: str) -> list[NounPhrase]:
    """Split a caption into noun phrases, each with the preposition that governs it (see module doc)."""
    tokens = _tokens(text)
    chunks: list[NounPhrase] = []
    current: list[str] = []
    prep: Optional[str] = None  # the preposition governing the next chunk
    chunk_prep: Optional[str] = None

    def close(followed_by_of: bool = False) -> bool:
        nonlocal current
        closed = bool(current)
        if closed:
            chunks.append(NounPhrase(current, chunk_prep, followed_by_of))
        current = []
        return closed

    i = 0
    while i < len(tokens):
        tok = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if tok == "next" and nxt == "to":  # two-word preposition
            tok, i = "next_to", i + 1
        if tok == "of":
            # "a flock of birds", "the edge of a lake": the noun after "of" inherits the preposition
            last = chunks[-1] if close(followed_by_of=True) else None
            prep = last.prep if last is not None and last.head in QUANTIFIERS | POSITIONS else "of"
        elif tok in PREPOSITIONS:
            close()
            prep = tok
        elif tok == "'s":  # "the water's edge": the possessed noun keeps the possessor's preposition
            prep = chunks[-1].prep if close() else prep
        elif tok in lexicon.DETERMINERS or tok.isdigit():
            close()
        elif tok in STOPWORDS or tok in VERBS or not tok[0].isalnum():
            close()
            if tok not in ("and", "or"):  # "in the sand and water": coordination keeps the preposition
                prep = None
        elif _is_verbish(tok):
            # a participle after a noun ends it ("a bird flying over") and starts a modifier chunk
            # ("a flying bird"); right after a preposition/determiner it keeps the preposition ("in a living room")
            if current and all(_is_adjective(w) for w in current):  # "a small stuffed animal" stays one
                current.append(tok)
            else:
                if close():
                    prep = None
                chunk_prep = prep
                current = [tok]
        elif _is_adverb(tok):
            close()
            prep = None
        else:
            if not current:
                chunk_prep = prep
            current.append(tok)
        i += 1
    close()
    return [c for c in chunks if c.is_noun_phrase]


@dataclass
class _OfflineResult:
    foreground: list[str] = field(default_factory=list)
    background: Optional[str] = None


def _offline_one(caption: str, terms: Sequence[str]) -> _OfflineResult:
    chunks = chunk_caption(caption)
    result = _OfflineResult()
    # 1. the background: the first scene chunk after a scene preposition, else the first scene chunk
    scenes = [c for c in chunks if lexicon.scene_category(c.text) and not is_label_phrase(c.text, terms)]
    after_prep = [c for c in scenes if c.prep in SCENE_PREPOSITIONS]
    chosen = (after_prep or scenes or [None])[0]
    if chosen is not None:
        result.background = chosen.text
    # 2. the foreground: every other noun chunk but scenes, the label, relational nouns and body parts
    seen: set[str] = set()
    for c in chunks:
        if c in scenes or c.head in BODY_PARTS:
            continue
        if lexicon.scene_category(c.text) or is_label_phrase(c.text, terms):
            continue
        key = lexicon.canonical(c.text)
        if key not in seen:
            seen.add(key)
            result.foreground.append(c.text)
    return result


def _offline_alt(results: list[Optional[_OfflineResult]]) -> list[list[str]]:
    """alt per caption: the most frequent background phrase of the most frequent *other* scene category among
    the other captions ("lake" and "pond" count together as water), else the category's fixed contrast
    (module doc, step 4)."""
    counts: Counter[str] = Counter()
    surface: dict[str, str] = {}
    order: dict[str, int] = {}
    for r in results:
        if r is not None and r.background:
            key = lexicon.canonical(r.background)
            counts[key] += 1
            surface.setdefault(key, r.background)
            order.setdefault(key, len(order))
    category = {k: lexicon.scene_category(surface[k]) or k for k in counts}
    per_category: Counter[str] = Counter()
    for k, n in counts.items():
        per_category[category[k]] += n
    alts: list[list[str]] = []
    for r in results:
        if r is None or not r.background:
            alts.append([])
            continue
        own_cat = lexicon.scene_category(r.background) or lexicon.canonical(r.background)
        # this caption's own background has its own category, so it is never counted here
        others = [c for c in per_category if c != own_cat]
        if others:
            best_cat = max(others, key=lambda c: (per_category[c], -min(order[k] for k in counts if category[k] == c)))
            best = max((k for k in counts if category[k] == best_cat), key=lambda k: (counts[k], -order[k]))
            alts.append([surface[best]])
        else:
            alts.append([lexicon.SCENE_CONTRAST.get(own_cat or "", "plain background")])
    return alts


def offline_phrases(captions: Sequence[str], terms: Sequence[Sequence[str]]
                    ) -> list[tuple[list[str], list[str], list[str]]]:
    """(foreground, background (0 or 1), alt) per caption; `terms`: the names of each caption's label object."""
    results = [_offline_one(caption, t) for caption, t in zip(captions, terms)]
    alts = _offline_alt(list(results))
    return [(r.foreground, [r.background] if r.background else [], alt) for r, alt in zip(results, alts)]

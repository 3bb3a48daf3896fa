"""Method step 3: phrase extraction. Per caption, the foreground objects other than the label's own object,
the single predominant background, and an alternative background (DESIGN §2):

    {"foreground": ["wooden dock", "boat"], "background": ["lake"], "alt": ["forest"]}

    PhraseExtractor(settings).extract(captions, class_names_of, synonyms=None) -> list[PhraseSet]

One PhraseSet per caption, in input order. A caption that cannot be processed is a PhraseSet with
`failed="<reason>"` and empty lists: never a crash, never silently dropped. The label's own object (class
name, its head noun, the last part of a compound like "waterbird" -> "bird", given synonyms) is removed
from foreground and background after either backend answers, using aspire.tools.lexicon.

Backends (settings.backend):

"llm" — langchain-openai ChatOpenAI on any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, ...), the
few-shot prompt aspire/prompts/phrases.md, `captions_per_call` captions per request, answered as a list
of items keyed by the caption's index in the request. Structured output uses `function_calling` by
default: a forced tool call is supported by OpenAI, vLLM (named tool_choice runs guided decoding, no
server flags needed) and Ollama; `json_schema` (response_format) is the alternative. The schema is a
plain inlined JSON schema (no $ref, all fields required: accepted by strict and non-strict servers) and
the answer is parsed and validated here, item by item, from the tool call *or* from JSON in the message
content (servers that ignore tool_choice answer there, sometimes in a ```json fence). Valid items are
kept; the captions whose items are missing or invalid, or whose request failed (HTTP error, network
error, timeout), are sent again, up to `max_retries` times, then recorded as failed with the last reason.

"offline" — a deterministic rule-based noun-phrase chunker over the caption text, no downloads:
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
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aspire import llm
from aspire.config import PhraseSettings
from aspire.errors import DataError, one_line
from aspire.prompts import render_prompt
from aspire.schemas import Caption, PhraseSet
from aspire.tools import lexicon

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.tools import BaseTool

PROMPT_NAME = "phrases"


# ---------------------------------------------------------------- the method's contract
class CaptionPhrases(BaseModel):
    """One caption's phrases. Phrases are normalised (lowercase, no articles or punctuation) and
    de-duplicated (lemma and synonyms); at most one background; alt is non-empty when there is a
    background and is emptied when there is none; an alt equal to the background is dropped."""

    model_config = ConfigDict(extra="ignore")

    foreground: list[str] = []
    background: list[str] = []
    alt: list[str] = []

    @field_validator("foreground", "background", "alt", mode="before")
    @classmethod
    def _as_clean_list(cls, value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):  # a lone phrase where a list was asked for
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list of phrases, got {type(value).__name__}")
        out: list[str] = []
        seen: set[str] = set()
        for item in value:
            if not isinstance(item, str):
                raise ValueError(f"expected a phrase (string), got {item!r}")
            phrase = lexicon.normalize(item)
            key = lexicon.canonical(phrase)
            if phrase and key not in seen:
                seen.add(key)
                out.append(phrase)
        return out

    @model_validator(mode="after")
    def _background_rules(self) -> "CaptionPhrases":
        if len(self.background) > 1:
            raise ValueError(f"at most one background, got {self.background}")
        if not self.background:
            self.alt = []
            return self
        bg = lexicon.canonical(self.background[0])
        self.alt = [a for a in self.alt if lexicon.canonical(a) != bg]
        if not self.alt:
            raise ValueError(f"alt must name a different background than {self.background[0]!r}")
        return self


class IndexedPhrases(CaptionPhrases):
    """One item of the LLM's answer: a caption's phrases keyed by its index in the request."""

    index: int = Field(ge=0)


class PhrasesAnswer(BaseModel):
    """The LLM's whole answer (the wire schema); its items are validated one by one as IndexedPhrases."""

    items: list[IndexedPhrases]


ANSWER_SCHEMA = llm.wire_schema(
    PhrasesAnswer, "caption_phrases", "Per caption: foreground objects other than the label's object, the single "
    "predominant background, and one alternative background.")


# ---------------------------------------------------------------- label terms
def label_terms(class_name: str, synonyms: Sequence[str] = ()) -> list[str]:
    """The names of the label's own object: the class name (each comma-separated alias), its head noun
    (compounds split: "waterbird" -> "bird") and the synonyms with their heads."""
    names = [n for n in re.split(r"[,;/]", class_name.replace("_", " ")) if n.strip()] + list(synonyms)
    terms: list[str] = []
    for name in names:
        for term in (lexicon.normalize(name), lexicon.head(name)):
            if term and term not in terms:
                terms.append(term)
    return terms


def is_label_phrase(phrase: str, terms: Sequence[str]) -> bool:
    """Whether `phrase` names the label's object: same canonical words or same head noun as a term
    ("hexagon shape" has the head "hexagon": lexicon.head)."""
    if not terms:
        return False
    canon, hd = lexicon.canonical(phrase), lexicon.head(phrase)
    return any(canon == lexicon.canonical(t) or hd == lexicon.head(t) for t in terms)


# ---------------------------------------------------------------- offline chunker
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


# ---------------------------------------------------------------- LLM answer parsing
def parse_answer(message: Any) -> list[Any]:
    """The list of raw items in an LLM answer: from the first tool call, else from JSON in the content.
    Raises ValueError with a one-line reason for malformed answers."""
    data = llm.message_json(message)
    if isinstance(data, dict) and "items" in data:
        data = data["items"]
    elif isinstance(data, dict) and {"foreground", "background"} & data.keys():
        data = [data]  # a single item without the list around it
    if not isinstance(data, list):
        raise ValueError(f"expected a list of items, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------- the tool
@dataclass
class _Job:
    """One caption to extract: its position in the input, text and the label's names."""

    position: int
    caption: Caption
    class_name: str
    synonyms: list[str]
    terms: list[str]


class PhraseExtractor:
    """Method step 3. `extract(captions, class_names_of, synonyms)` -> one PhraseSet per caption.

    `chat_model` replaces the ChatOpenAI built from the settings (any LangChain chat model with
    `with_structured_output`); the llm backend builds its client lazily, on the first call."""

    def __init__(self, settings: Optional[PhraseSettings] = None, chat_model: Optional["BaseChatModel"] = None):
        self.settings = settings or PhraseSettings()
        self._chat_model = chat_model
        self._structured: Any = None

    @property
    def backend(self) -> str:
        return self.settings.backend

    def record(self) -> dict[str, Any]:
        """What produced the phrases, for the reproducibility record (no secrets)."""
        rec: dict[str, Any] = {"backend": self.backend}
        if self.backend == "llm":
            rec.update(llm.record(self.settings, PROMPT_NAME), captions_per_call=self.settings.captions_per_call)
        return rec

    # ------------------------------------------------------------ entry point
    def extract(
        self,
        captions: Sequence[Caption],
        class_names_of: Mapping[str, str],
        synonyms: Optional[Mapping[str, Sequence[str]]] = None,
    ) -> list[PhraseSet]:
        """Phrases for every caption, in order. `class_names_of` maps image -> the label's class name;
        `synonyms` maps a class name -> other names of its object (excluded from the foreground too)."""
        # 1. check inputs
        jobs: list[_Job] = []
        synonyms = synonyms or {}
        for pos, cap in enumerate(captions):
            if not isinstance(cap, Caption):
                raise DataError(f"captions[{pos}]: expected a Caption record, got {type(cap).__name__}")
            if cap.image not in class_names_of:
                raise DataError(f"no class name for image {cap.image!r} (class_names_of lacks it)")
            name = str(class_names_of[cap.image])
            if not name.strip():
                raise DataError(f"empty class name for image {cap.image!r}")
            syns = [str(s) for s in synonyms.get(name, ())]
            jobs.append(_Job(pos, cap, name, syns, label_terms(name, syns)))
        todo = [j for j in jobs if j.caption.caption.strip()]

        # 2. run the backend: position -> phrases, or the reason it failed
        answers: dict[int, CaptionPhrases | str] = {j.position: "empty caption" for j in jobs if j not in todo}
        if todo:
            answers.update(self._extract_llm(todo) if self.backend == "llm" else self._extract_offline(todo))

        # 3. drop the label's own object, build the records
        out: list[PhraseSet] = []
        for job in jobs:
            ans = answers[job.position]
            if isinstance(ans, str):
                out.append(PhraseSet(image=job.caption.image, failed=ans, backend=self.backend))
                continue
            foreground = [p for p in ans.foreground if not is_label_phrase(p, job.terms)]
            background = [p for p in ans.background if not is_label_phrase(p, job.terms)]
            out.append(PhraseSet(image=job.caption.image, foreground=foreground, background=background,
                                 alt=ans.alt if background else [], backend=self.backend))
        return out

    # ------------------------------------------------------------ offline backend
    def _extract_offline(self, jobs: Sequence[_Job]) -> dict[int, CaptionPhrases | str]:
        results = [_offline_one(j.caption.caption, j.terms) for j in jobs]
        alts = _offline_alt(list(results))
        return {
            j.position: CaptionPhrases(foreground=r.foreground, background=[r.background] if r.background else [],
                                       alt=alt)
            for j, r, alt in zip(jobs, results, alts)
        }

    # ------------------------------------------------------------ llm backend
    def _structured_model(self) -> Any:
        """The chat model bound to the answer schema (built once, lazily)."""
        if self._structured is None:
            chat = self._chat_model if self._chat_model is not None else llm.chat_model(self.settings, "phrases")
            self._structured = chat.with_structured_output(
                ANSWER_SCHEMA, method=self.settings.structured_output, include_raw=True)
        return self._structured

    def prompt_for(self, jobs: Sequence[_Job], indices: Sequence[int]) -> str:
        """The rendered prompt for captions `jobs`, shown to the LLM under `indices`."""
        captions = [{"index": i, "caption": j.caption.caption.strip(), "class_name": j.class_name,
                     "synonyms": j.synonyms} for i, j in zip(indices, jobs)]
        return render_prompt(PROMPT_NAME, captions=captions)

    def _extract_llm(self, jobs: Sequence[_Job]) -> dict[int, CaptionPhrases | str]:
        model = self._structured_model()
        n = self.settings.captions_per_call
        answers: dict[int, CaptionPhrases | str] = {}
        for start in range(0, len(jobs), n):
            chunk = jobs[start : start + n]
            for local, ans in self._ask(model, chunk).items():
                answers[chunk[local].position] = ans
        return answers

    def _ask(self, model: Any, chunk: Sequence[_Job]) -> dict[int, CaptionPhrases | str]:
        """One request's captions (indexed 0..n-1, kept across retries), retried until all are answered."""
        from langchain_core.messages import HumanMessage

        done: dict[int, CaptionPhrases | str] = {}
        pending = dict(enumerate(chunk))
        reasons: dict[int, str] = {}
        for _ in llm.attempts(self.settings):
            # 1. ask
            prompt = self.prompt_for(list(pending.values()), list(pending))
            try:
                message = llm.invoke(model, [HumanMessage(content=prompt)])
            except Exception as e:  # noqa: BLE001 - HTTP errors, network errors, timeouts: retried, then recorded
                reasons = {i: llm.describe_failure(e) for i in pending}
                continue
            # 2. parse the answer into items
            try:
                items = parse_answer(message)
            except ValueError as e:
                reasons = {i: f"malformed llm answer: {e}" for i in pending}
                continue
            # 3. validate item by item; keep the valid ones
            reasons = {i: "missing from the llm answer" for i in pending}
            for item in items:
                if isinstance(item, dict) and "index" not in item and len(pending) == 1 and len(items) == 1:
                    item = {**item, "index": next(iter(pending))}
                try:
                    parsed = IndexedPhrases.model_validate(item)
                except ValidationError as e:
                    idx = item.get("index") if isinstance(item, dict) else None
                    if isinstance(idx, int) and idx in pending:
                        reasons[idx] = f"invalid llm item: {llm.validation_reason(e, 'item')}"
                    continue
                if parsed.index in pending:
                    done[parsed.index] = CaptionPhrases(foreground=parsed.foreground, background=parsed.background,
                                                        alt=parsed.alt)
                    del pending[parsed.index]
            if not pending:
                break
        for i in pending:
            tries = 1 + self.settings.max_retries
            reason = f"{reasons.get(i, 'no answer')} (after {tries} attempt{'s' * (tries > 1)})"
            done[i] = one_line(reason, llm.MAX_REASON_CHARS)
        return done


# ---------------------------------------------------------------- LangChain adapter
def as_tool(extractor: PhraseExtractor) -> "BaseTool":
    """A LangChain tool over `extractor.extract`: content = JSON list of phrase sets, artifact = PhraseSets."""
    from langchain_core.tools import StructuredTool

    class ToolCaption(BaseModel):
        image: str
        caption: str
        class_name: str

    class ExtractPhrasesInput(BaseModel):
        captions: list[ToolCaption] = Field(description="captions with their image key and the label's class name")
        synonyms: dict[str, list[str]] = Field(default={}, description="class name -> other names of its object")

    def extract_phrases(captions: list[Any], synonyms: Optional[dict[str, list[str]]] = None):
        items = [c if isinstance(c, ToolCaption) else ToolCaption.model_validate(c) for c in captions]
        records = extractor.extract([Caption(image=c.image, caption=c.caption, backend="tool") for c in items],
                                    {c.image: c.class_name for c in items}, synonyms or {})
        return json.dumps([r.model_dump() for r in records]), records

    return StructuredTool.from_function(
        func=extract_phrases, name="extract_phrases", args_schema=ExtractPhrasesInput,
        response_format="content_and_artifact",
        description="Method step 3: per caption, the foreground objects other than the label's object, the "
                    "predominant background and an alternative background.",
    )

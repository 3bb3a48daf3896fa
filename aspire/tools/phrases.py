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

"offline" — the deterministic rule-based fallback of aspire/tools/phrases_offline.py (a noun-phrase chunker
over the caption text, no downloads, no model); see its docstring for the rules and their limits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aspire import llm
from aspire.config import PhraseSettings
from aspire.errors import DataError, one_line
from aspire.prompts import render_prompt
from aspire.schemas import Caption, PhraseSet
from aspire.tools import lexicon
from aspire.tools.lexicon import is_label_phrase, label_terms
from aspire.tools.phrases_offline import offline_phrases

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
        found = offline_phrases([j.caption.caption for j in jobs], [j.terms for j in jobs])
        return {j.position: CaptionPhrases(foreground=fg, background=bg, alt=alt)
                for j, (fg, bg, alt) in zip(jobs, found)}

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

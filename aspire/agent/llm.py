"""The agent's LLM: any OpenAI-compatible endpoint through langchain-openai's ChatOpenAI, and the LLM planner.

    llm_configured(settings) -> bool          an endpoint or key is set (settings, OPENAI_BASE_URL, OPENAI_API_KEY)
    chat_model(settings) -> ChatOpenAI        with the settings' timeout; retries are done here, with backoff
    LLMPlanner(settings, chat_model=None).propose(request) -> Plan

The planner renders aspire/prompts/hypothesize.md with the per-class phrase statistics and the results so
far, asks for structured output (a forced function call, or JSON in the content for servers that answer
there), validates every proposed hypothesis against the untested candidates, and retries a failed request
or a malformed or invalid answer `max_retries` times, waiting backoff_s * 2**(k-1) before retry k. When no
attempt succeeds, or the LLM call budget is spent, that round is planned by the offline planner instead and
the plan carries the reasons (the graph records them as `llm_failure` events): the run never dies of it.
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aspire.agent.planner import OfflinePlanner, Plan, PlanRequest, hypothesis, match_group
from aspire.config import AgentSettings
from aspire.errors import ConfigError
from aspire.prompts import prompt_hash, render_prompt
from aspire.tools.phrases import json_from_text

PROMPT_NAME = "hypothesize"
MAX_REASON_CHARS = 300

HYPOTHESES_SCHEMA: dict[str, Any] = {  # the wire schema; inlined (no $ref), every field required
    "title": "propose_hypotheses",
    "description": "The phrase groups to probe next, per class, each with a reason; or stop with a reason.",
    "type": "object",
    "properties": {
        "hypotheses": {"type": "array", "items": {
            "type": "object",
            "properties": {"class": {"type": "string"},
                           "kind": {"type": "string", "enum": ["foreground", "background"]},
                           "phrase": {"type": "string"}, "reason": {"type": "string"}},
            "required": ["class", "kind", "phrase", "reason"],
            "additionalProperties": False}},
        "stop": {"type": "boolean"},
        "reason": {"type": "string"},
    },
    "required": ["hypotheses", "stop", "reason"],
    "additionalProperties": False,
}


class ProposedHypothesis(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    class_: str = Field(alias="class", min_length=1)
    kind: Literal["foreground", "background"]
    phrase: str = Field(min_length=1)
    reason: str = Field(min_length=1)


class ProposedPlan(BaseModel):
    model_config = ConfigDict(extra="ignore")

    hypotheses: list[ProposedHypothesis] = []
    stop: bool = False
    reason: str = ""


# ---------------------------------------------------------------- the client
def base_url(settings: AgentSettings) -> Optional[str]:
    return settings.base_url or os.environ.get("OPENAI_BASE_URL") or None


def llm_configured(settings: AgentSettings) -> bool:
    """Whether an LLM endpoint is configured (settings or OPENAI_BASE_URL / OPENAI_API_KEY)."""
    return bool(base_url(settings) or settings.api_key or os.environ.get("OPENAI_API_KEY"))


def chat_model(settings: AgentSettings) -> Any:
    """ChatOpenAI for the settings: per-request timeout; no client retries (callers retry with backoff)."""
    from langchain_openai import ChatOpenAI

    url = base_url(settings)
    api_key = settings.api_key or os.environ.get("OPENAI_API_KEY") or ("EMPTY" if url else None)
    if not api_key:
        raise ConfigError("no LLM configured: set OPENAI_API_KEY (and OPENAI_BASE_URL for another endpoint), "
                          "or agent.base_url / agent.api_key in --config")
    kwargs: dict[str, Any] = {}
    if settings.temperature is not None:
        kwargs["temperature"] = settings.temperature
    return ChatOpenAI(model=settings.model, base_url=url, api_key=api_key, timeout=settings.timeout_s,
                      max_retries=0, **kwargs)


def llm_record(settings: AgentSettings) -> dict[str, Any]:
    """What plans the investigation, for the reproducibility record (no secrets)."""
    return {"model": settings.model, "base_url": base_url(settings), "prompt": PROMPT_NAME,
            "prompt_sha256": prompt_hash(PROMPT_NAME), "structured_output": settings.structured_output,
            "temperature": settings.temperature}


# ---------------------------------------------------------------- answers


def json_from_message(message: Any) -> Any:
    """The JSON of an answer: the first tool call's arguments, else a JSON object in the content."""
    tool_calls = getattr(message, "tool_calls", None) or []
    if tool_calls:
        return tool_calls[0].get("args")
    invalid = getattr(message, "invalid_tool_calls", None) or []
    if invalid:
        raise ValueError(f"the tool call's arguments are not valid JSON: {str(invalid[0].get('args'))[:80]!r}")
    content = getattr(message, "content", message)
    if isinstance(content, list):
        content = "".join(b.get("text", "") if isinstance(b, dict) else str(b) for b in content)
    if not isinstance(content, str) or not content.strip():
        raise ValueError("the answer is empty (no tool call, no content)")
    return json_from_text(content)


def _short(text: Any) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 3] + "..."


# ---------------------------------------------------------------- the planner
class LLMPlanner:
    """Plans each round with an LLM; falls back to the offline planner when the LLM does not answer usefully."""

    name = "llm"

    def __init__(self, settings: Optional[AgentSettings] = None, chat_model: Any = None,
                 fallback: Optional[OfflinePlanner] = None, sleep=time.sleep):
        self.settings = settings or AgentSettings()
        self._chat_model = chat_model
        self._structured: Any = None
        self.fallback = fallback or OfflinePlanner()
        self._sleep = sleep

    def _model(self) -> Any:
        if self._structured is None:
            chat = self._chat_model if self._chat_model is not None else chat_model(self.settings)
            self._structured = chat.with_structured_output(HYPOTHESES_SCHEMA, method=self.settings.structured_output,
                                                           include_raw=True)
        return self._structured

    def prompt(self, request: PlanRequest) -> str:
        classes = []
        for y in sorted(request.stats):
            stats = request.stats[y]
            groups = request.candidates(y)[: self.settings.groups_in_prompt]
            n_images = stats[0].n_images_class if stats else 0
            classes.append({"name": stats[0].class_name if stats else str(y), "n_images": n_images,
                            "groups": [g.to_prompt() for g in groups]})
        return render_prompt(PROMPT_NAME, round=request.round, groups_per_round=request.groups_per_round,
                             min_occurrences=request.min_occurrences, classes=classes, history=request.history)

    def propose(self, request: PlanRequest) -> Plan:
        """A plan from the LLM, or the offline planner's plan with the reasons the LLM's was not used."""
        from langchain_core.messages import HumanMessage

        calls_left = self.settings.max_llm_calls if request.llm_calls_left is None else request.llm_calls_left
        failures: list[str] = []
        calls = 0
        attempts = 1 + self.settings.max_retries
        prompt = None
        for attempt in range(attempts):
            if calls >= calls_left:
                failures.append(f"the LLM call budget (agent.max_llm_calls={self.settings.max_llm_calls}) is spent")
                break
            if attempt and self.settings.backoff_s:
                self._sleep(self.settings.backoff_s * 2 ** (attempt - 1))
            calls += 1
            try:  # 1. ask
                prompt = prompt or self.prompt(request)
                raw = self._model().invoke([HumanMessage(content=prompt)])
                message = raw["raw"] if isinstance(raw, dict) and "raw" in raw else raw
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - HTTP errors, network errors, timeouts: retried, then recorded
                failures.append(_short(f"llm request failed: {type(e).__name__}: {e}"))
                continue
            try:  # 2. parse and validate
                plan = self._resolve(json_from_message(message), request)
            except (ValueError, ValidationError) as e:
                reason = _validation_reason(e) if isinstance(e, ValidationError) else str(e)
                failures.append(_short(f"malformed llm answer: {reason}"))
                continue
            plan.llm_calls, plan.failures = calls, failures
            return plan
        plan = self.fallback.propose(request)
        plan.llm_calls, plan.failures = calls, failures
        return plan

    def _resolve(self, data: Any, request: PlanRequest) -> Plan:
        """The proposed hypotheses that name untested candidates; ValueError when none is usable."""
        answer = ProposedPlan.model_validate(data)
        names = {s.class_name: y for y, group in request.stats.items() for s in group}
        names.update({str(y): y for y in request.stats})
        candidates = {y: request.candidates(y) for y in request.stats}
        open_any = any(candidates.values())
        if answer.stop and not answer.hypotheses:
            if request.round == 1 and open_any:
                raise ValueError("stop was proposed before anything was tested")
            return Plan([], stop=True, reason=_short(answer.reason or "the LLM proposed to stop"), source=self.name)
        chosen, seen, ignored = [], set(), []
        per_class: dict[int, int] = {}
        for item in answer.hypotheses:
            y = names.get(item.class_.strip())
            if y is None:
                ignored.append(f"unknown class {item.class_!r}")
                continue
            stat = match_group(candidates[y], item.kind, item.phrase, request.similarity)
            if stat is None:
                ignored.append(f"{item.kind} {item.phrase!r} of {item.class_} is not an untested candidate")
                continue
            if stat.key in seen or per_class.get(y, 0) >= request.groups_per_round:
                continue
            seen.add(stat.key)
            per_class[y] = per_class.get(y, 0) + 1
            chosen.append(hypothesis(stat, _short(item.reason), self.name))
        if not chosen:
            if not open_any:
                return Plan([], stop=True, reason="no untested phrase group is named in enough images to test",
                            source=self.name)
            raise ValueError("no usable hypothesis: " + ("; ".join(ignored[:3]) or "none proposed"))
        reason = _short(answer.reason or f"round {request.round}: the LLM's hypotheses")
        if ignored:
            reason = _short(f"{reason} (ignored: {'; '.join(ignored[:3])})")
        return Plan(chosen, reason=reason, source=self.name)


def _validation_reason(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "answer"
    return f"{where}: {err['msg']}"

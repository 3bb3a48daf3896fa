"""The LLM planner: each round's hypotheses from an LLM (aspire/llm.py: any OpenAI-compatible endpoint).

    LLMPlanner(settings, chat_model=None).propose(request) -> Plan

The planner renders aspire/prompts/hypothesize.md with the per-class phrase statistics and the results so
far, asks for structured output (a forced function call, or JSON in the content for servers that answer
there), validates every proposed hypothesis against the untested candidates, and retries a failed request
or a malformed or invalid answer `max_retries` times, waiting backoff_s * 2**(k-1) before retry k. When no
attempt succeeds, or the LLM call budget is spent, that round is planned by the offline planner instead and
the plan carries the reasons (the graph records them as `llm_failure` events): the run never dies of it.
"""

from __future__ import annotations

import time
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aspire import llm
from aspire.agent.planner import OfflinePlanner, Plan, PlanRequest, hypothesis, match_group
from aspire.config import AgentSettings
from aspire.errors import ConfigError, one_line
from aspire.prompts import render_prompt

PROMPT_NAME = "hypothesize"


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


HYPOTHESES_SCHEMA = llm.wire_schema(
    ProposedPlan, "propose_hypotheses",
    "The phrase groups to probe next, per class, each with a reason; or stop with a reason.")


def planner_record(settings: AgentSettings) -> str | dict[str, Any]:
    """What plans the investigation, for the reproducibility record (no secrets): the LLM, or "offline" when the
    offline planner plans (asked for, or no LLM configured)."""
    if settings.offline or not llm.configured(settings):
        return "offline"
    return llm.record(settings, PROMPT_NAME)


def _short(text: Any) -> str:
    return one_line(text, llm.MAX_REASON_CHARS)


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
            chat = self._chat_model if self._chat_model is not None else llm.chat_model(self.settings, "agent")
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
        prompt = None
        for _ in llm.attempts(self.settings, self._sleep):
            if calls >= calls_left:
                failures.append(f"the LLM call budget (agent.max_llm_calls={self.settings.max_llm_calls}) is spent")
                break
            calls += 1
            try:  # 1. ask
                prompt = prompt or self.prompt(request)
                message = llm.invoke(self._model(), [HumanMessage(content=prompt)])
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - HTTP errors, network errors, timeouts: retried, then recorded
                failures.append(llm.describe_failure(e))
                continue
            try:  # 2. parse and validate
                plan = self._resolve(llm.message_json(message), request)
            except (ValueError, ValidationError) as e:
                failures.append(_short(f"malformed llm answer: {llm.validation_reason(e)}"))
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
            return Plan(hypotheses=[], stop=True, reason=_short(answer.reason or "the LLM proposed to stop"), source=self.name)
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
                return Plan(hypotheses=[], stop=True, reason="no untested phrase group is named in enough images to test",
                            source=self.name)
            raise ValueError("no usable hypothesis: " + ("; ".join(ignored[:3]) or "none proposed"))
        reason = _short(answer.reason or f"round {request.round}: the LLM's hypotheses")
        if ignored:
            reason = _short(f"{reason} (ignored: {'; '.join(ignored[:3])})")
        return Plan(hypotheses=chosen, reason=reason, source=self.name)

"""The LLM planner through the real ChatOpenAI client against a loopback OpenAI-compatible server: tool calls,
JSON in the content, malformed JSON, HTTP 500 and timeouts (degraded to the offline planner and recorded)."""

from __future__ import annotations

import json

import pytest

from aspire.agent import run_audit
from aspire.agent.llm_planner import LLMPlanner
from aspire.agent.planner import GroupStat, OfflinePlanner, PlanRequest
from aspire.config import AgentSettings
from llm_server import Delay, LoopbackLLM, content, structured, tool_call
from test_agent_graph import make_ctx, world  # noqa: F401 - the world fixture


def stat(y, name, phrase, n, lift, kind="foreground"):
    return GroupStat(y, name, kind, phrase, (phrase,), n, 20, 2, 20, n / 20, 0.1, lift)


def request(round_=1, tested=()):
    stats = {0: [stat(0, "landbird", "wooden fence", 12, 6.0), stat(0, "landbird", "sun", 5, 1.0)],
             1: [stat(1, "waterbird", "boat", 14, 7.0), stat(1, "waterbird", "lake", 18, 9.0, "background"),
                 stat(1, "waterbird", "cloud", 2, 1.0)]}
    return PlanRequest(round=round_, stats=stats, tested=set(tested), history=[], groups_per_round=2,
                       min_occurrences=3)


def planner(llm, **kw):
    settings = AgentSettings(base_url=llm.base_url, api_key="x", model="loop-model", timeout_s=kw.pop("timeout_s", 5),
                             max_retries=kw.pop("max_retries", 1), backoff_s=0, **kw)
    return LLMPlanner(settings)


ANSWER = {"hypotheses": [{"class": "waterbird", "kind": "background", "phrase": "lake", "reason": "lift 9"},
                         {"class": "landbird", "kind": "foreground", "phrase": "fence", "reason": "lift 6"}],
          "stop": False, "reason": "highest lift first"}


def test_tool_call_answer_becomes_the_plan():
    with LoopbackLLM([structured(ANSWER)]) as llm:
        plan = planner(llm).propose(request())
        body = llm.requests[0]
    assert plan.source == "llm" and plan.llm_calls == 1 and plan.failures == []
    assert [(h["class_name"], h["kind"], h["phrase"], h["reason"]) for h in plan.hypotheses] == [
        ("waterbird", "background", "lake", "lift 9"), ("landbird", "foreground", "wooden fence", "lift 6")]
    # the request: the model, a forced function call with our schema, the statistics in the prompt
    assert body["model"] == "loop-model"
    assert body["tools"][0]["function"]["name"] == "propose_hypotheses"
    assert body["tool_choice"]["function"]["name"] == "propose_hypotheses"
    prompt = body["messages"][-1]["content"]
    assert 'foreground "wooden fence"' in prompt and "lift=6.0" in prompt
    assert '"cloud"' not in prompt          # named in too few images to test: not a candidate


def test_json_in_the_content_is_accepted():
    with LoopbackLLM([content("Here you go:\n```json\n" + json.dumps(ANSWER) + "\n```")]) as llm:
        plan = planner(llm).propose(request())
    assert plan.source == "llm" and len(plan.hypotheses) == 2


def test_malformed_json_is_retried_and_recorded():
    with LoopbackLLM([tool_call("propose_hypotheses", '{"hypotheses": [{"class": "waterbird",'),
                      structured(ANSWER)]) as llm:
        plan = planner(llm).propose(request())
        assert len(llm.requests) == 2
    assert plan.source == "llm" and plan.llm_calls == 2
    assert len(plan.failures) == 1 and "malformed llm answer" in plan.failures[0]


@pytest.mark.parametrize("failure, expect", [(500, "Error code: 500"), (Delay(3.0), "Timeout")])
def test_http_errors_and_timeouts_degrade_to_the_offline_planner(failure, expect):
    with LoopbackLLM([failure, failure]) as llm:
        plan = planner(llm, timeout_s=0.5).propose(request())
        assert len(llm.requests) == 2          # one try and one retry
    assert plan.source == "planner" and plan.llm_calls == 2
    assert len(plan.failures) == 2 and all(expect in f for f in plan.failures)
    offline = OfflinePlanner().propose(request())
    assert plan.hypotheses == offline.hypotheses


def test_retries_back_off_exponentially():
    waits = []
    with LoopbackLLM([500, 500, 500]) as llm:
        p = planner(llm, max_retries=2)
        p.settings.backoff_s = 0.25
        p._sleep = waits.append
        plan = p.propose(request())
    assert waits == [0.25, 0.5] and plan.source == "planner"


def test_the_llm_call_budget_is_kept():
    with LoopbackLLM([structured(ANSWER)]) as llm:
        req = request()
        req.llm_calls_left = 0
        plan = planner(llm).propose(req)
        assert llm.requests == []
    assert plan.source == "planner" and "budget" in plan.failures[0]


def test_stop_is_refused_before_anything_was_tested_but_accepted_later():
    stop = {"hypotheses": [], "stop": True, "reason": "nothing to see"}
    with LoopbackLLM([structured(stop), structured(stop)]) as llm:
        first = planner(llm, max_retries=0).propose(request(1))
        later = planner(llm, max_retries=0).propose(request(2, tested={"1|background|lake"}))
    assert first.source == "planner" and "stop was proposed before" in first.failures[0]
    assert later.stop and later.source == "llm" and later.reason == "nothing to see"


def test_a_failing_llm_does_not_stop_the_audit_and_is_recorded(world, tmp_path):  # noqa: F811
    with LoopbackLLM([500, 500]) as llm:
        ctx = make_ctx(world, tmp_path / "run", offline=False, max_rounds=1, max_retries=1)
        ctx.config.agent.base_url = llm.base_url
        ctx.config.agent.api_key = "x"
        ctx.planner = LLMPlanner(ctx.config.agent)
        result = run_audit(ctx, approve=lambda payload: "reject")
    store = ctx.pipeline.store
    failures = store.events("llm_failure")
    assert len(failures) == 2 and all("500" in f["reason"] for f in failures)
    assert all(f["degraded_to_planner"] and f["stage"] == "hypothesize" for f in failures)
    assert {h["source"] for h in store.events("hypothesis")} == {"planner"}
    assert result.status == "done" and any(f.spurious for f in result.findings)

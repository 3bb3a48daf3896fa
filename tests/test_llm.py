"""aspire/llm.py, the one LLM client: endpoint resolution, the retry schedule, the wire schemas generated from
the pydantic models, answer parsing and one-line failure reasons (the HTTP paths run in test_agent_llm,
test_phrases, test_caption and test_chat against a loopback server)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

from aspire import llm
from aspire.agent.llm_planner import HYPOTHESES_SCHEMA
from aspire.config import AgentSettings, CaptionSettings, LLMSettings, PhraseSettings, load_config
from aspire.errors import ConfigError
from aspire.tools.phrases import ANSWER_SCHEMA


def test_endpoint_and_configuration(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert not llm.configured(AgentSettings())
    with pytest.raises(ConfigError, match="OPENAI_API_KEY.*phrases.base_url"):
        llm.chat_model(PhraseSettings(), "phrases")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    assert llm.configured(AgentSettings())
    assert llm.endpoint(LLMSettings()) == ("http://127.0.0.1:9/v1", "EMPTY")  # a local server without a key
    assert llm.endpoint(LLMSettings(base_url="http://h/v1", api_key="k")) == ("http://h/v1", "k")
    model = llm.chat_model(AgentSettings(timeout_s=7, model="m"))
    assert model.request_timeout == 7 and model.max_retries == 0 and model.model_name == "m"


def test_attempts_wait_backoff_doubling():
    waits: list[float] = []
    assert list(llm.attempts(LLMSettings(max_retries=3, backoff_s=0.5), waits.append)) == [0, 1, 2, 3]
    assert waits == [0.5, 1.0, 2.0]
    waits.clear()
    assert list(llm.attempts(LLMSettings(max_retries=0), waits.append)) == [0] and waits == []


def test_every_llm_user_shares_one_settings_model():
    assert issubclass(PhraseSettings, LLMSettings) and issubclass(AgentSettings, LLMSettings)
    caption = CaptionSettings(backend="openai", chat_model="vision-x", base_url="http://h/v1", max_retries=4)
    assert caption.llm() == LLMSettings(model="vision-x", base_url="http://h/v1", max_retries=4, temperature=0.0)
    # the phrase extractor's old name of backoff_s is still read, from a file as from code
    assert PhraseSettings(retry_wait_s=0.25).backoff_s == 0.25
    assert load_config(overrides={"phrases": {"retry_wait_s": 3}}).phrases.backoff_s == 3
    # keys are never written out with the settings
    assert "api_key" not in caption.model_copy(update={"api_key": "secret"}).model_dump()


def test_wire_schema_is_inlined_strict_and_unconstrained():
    class Inner(BaseModel):
        name: str = Field(min_length=1, description="not sent")
        n: int = Field(0, ge=0)

    class Outer(BaseModel):
        items: list[Inner]
        note: str = ""

    assert llm.wire_schema(Outer, "outer", "what it is") == {
        "title": "outer", "description": "what it is", "type": "object",
        "properties": {"items": {"type": "array", "items": {
            "type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
            "required": ["name", "n"], "additionalProperties": False}},
            "note": {"type": "string"}},
        "required": ["items", "note"], "additionalProperties": False}
    for schema in (ANSWER_SCHEMA, HYPOTHESES_SCHEMA):
        assert "$ref" not in str(schema) and "$defs" not in schema and schema["additionalProperties"] is False
    item = ANSWER_SCHEMA["properties"]["items"]["items"]
    assert sorted(item["required"]) == ["alt", "background", "foreground", "index"]
    assert HYPOTHESES_SCHEMA["properties"]["hypotheses"]["items"]["properties"]["kind"] == {
        "enum": ["foreground", "background"], "type": "string"}


class Msg:
    def __init__(self, content="", tool_calls=None, invalid_tool_calls=None):
        self.content, self.tool_calls, self.invalid_tool_calls = content, tool_calls or [], invalid_tool_calls or []


def test_message_json_shapes():
    assert llm.message_json(Msg(tool_calls=[{"args": {"a": 1}}])) == {"a": 1}
    assert llm.message_json(Msg(content='Here it is:\n```json\n{"a": [1, 2]}\n```')) == {"a": [1, 2]}
    assert llm.message_json(Msg(content=[{"type": "text", "text": 'so [1] it is'}])) == [1]
    for bad, reason in ((Msg(invalid_tool_calls=[{"args": '{"a": '}]), "not valid JSON"),
                        (Msg(), "empty"), (Msg(content="no json here"), "not valid JSON")):
        with pytest.raises(ValueError, match=reason):
            llm.message_json(bad)


def test_failures_are_one_line_with_the_http_status():
    class Status(Exception):
        status_code = 503

    assert llm.describe_failure(Status("busy\nretry later")) == "llm request failed: Status: busy (HTTP 503)"
    assert llm.describe_failure(TimeoutError()) == "llm request failed: TimeoutError"
    assert len(llm.describe_failure(RuntimeError("x" * 1000))) <= llm.MAX_REASON_CHARS

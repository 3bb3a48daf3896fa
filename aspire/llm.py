"""The one LLM client: any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp, ...) through
langchain-openai, shared by the phrase extractor, the vision captioner, the planner and chat.

    endpoint(settings) -> (base_url, api_key)   the settings' own, else OPENAI_BASE_URL / OPENAI_API_KEY
    configured(settings) -> bool                an endpoint or a key is set
    chat_model(settings) -> ChatOpenAI          the settings' model, temperature and timeout; no client retries
    attempts(settings, sleep) -> 0, 1, ...      the one retry schedule: 1 + max_retries attempts, waiting
                                                backoff_s * 2**(k-1) before retry k
    wire_schema(Model, name, description)       a pydantic model as the schema sent for structured output
    message_json(message) -> Any                an answer's JSON: the first tool call's arguments, else the
                                                JSON in the content (bare, fenced or among prose)
    invoke(model, messages) -> message          one request; a structured model's raw message
    describe_failure(error) -> str              "llm request failed: <type>: <message> (HTTP 500)" on one line
    record(settings, prompt) -> dict            what answered, for the reproducibility record (no secrets)

Every caller retries with `attempts` and decides itself what a failed attempt is (a request error, a malformed
or invalid answer), because what is retried differs: the planner asks again and then falls back to the offline
planner, the phrase extractor sends again only the captions still unanswered, chat retries only while
nothing has been shown, a caption is an error after the last attempt. LangChain's `with_retry` retries
exceptions only, not answers that parse but do not validate, so it is not used.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Callable, Iterator, Optional

from pydantic import BaseModel

from aspire.config import LLMSettings
from aspire.errors import ConfigError, describe, one_line
from aspire.prompts import prompt_hash

MAX_REASON_CHARS = 300
CONFIGURE = ("set OPENAI_API_KEY (OpenAI), or OPENAI_BASE_URL (and OPENAI_API_KEY if the server wants one) for "
             "any OpenAI-compatible server (vLLM, Ollama, ...)")


# ---------------------------------------------------------------- the client
def endpoint(settings: LLMSettings) -> tuple[Optional[str], Optional[str]]:
    """(base URL, API key): the settings' own, else the environment's; a local server without a key gets "EMPTY"."""
    url = settings.base_url or os.environ.get("OPENAI_BASE_URL") or None
    key = settings.api_key or os.environ.get("OPENAI_API_KEY") or ("EMPTY" if url else None)
    return url, key


def configured(settings: LLMSettings) -> bool:
    """Whether an LLM endpoint is configured (settings or OPENAI_BASE_URL / OPENAI_API_KEY)."""
    return endpoint(settings)[1] is not None


def chat_model(settings: LLMSettings, what: str = "the LLM") -> Any:
    """ChatOpenAI for the settings: per-request timeout, no client retries (callers retry with `attempts`).
    `what` names the user in the error when nothing is configured ("agent", "phrases", ...)."""
    from langchain_openai import ChatOpenAI

    url, key = endpoint(settings)
    if key is None:
        raise ConfigError(f"no LLM configured for {what}: {CONFIGURE}, or {what}.base_url / {what}.api_key "
                          "in --config")
    kwargs: dict[str, Any] = {}
    if settings.temperature is not None:
        kwargs["temperature"] = settings.temperature
    return ChatOpenAI(model=settings.model, base_url=url, api_key=key, timeout=settings.timeout_s,
                      max_retries=0, **kwargs)


def attempts(settings: LLMSettings, sleep: Callable[[float], Any] = time.sleep) -> Iterator[int]:
    """Attempt numbers 0 .. max_retries; before attempt k > 0 waits backoff_s * 2**(k-1) seconds."""
    for attempt in range(1 + settings.max_retries):
        if attempt and settings.backoff_s:
            sleep(settings.backoff_s * 2 ** (attempt - 1))
        yield attempt


def record(settings: LLMSettings, prompt: str) -> dict[str, Any]:
    """What answers, for the reproducibility record (no secrets)."""
    return {"model": settings.model, "base_url": endpoint(settings)[0], "prompt": prompt,
            "prompt_sha256": prompt_hash(prompt), "structured_output": settings.structured_output,
            "temperature": settings.temperature}


# ---------------------------------------------------------------- structured output
_NOT_SENT = {"title", "default", "description", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum",
             "exclusiveMaximum", "pattern", "format", "minItems", "maxItems"}


def wire_schema(model: type[BaseModel], name: str, description: str) -> dict[str, Any]:
    """The JSON schema sent for structured output, generated from `model`: nested models inlined (no $ref:
    some servers reject it), every property required and no other allowed (what strict servers ask), without
    titles, defaults and value constraints (strict servers reject some; the answer is validated here)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def clean(node: Any) -> Any:
        if isinstance(node, list):
            return [clean(n) for n in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            return clean(defs[node["$ref"].rsplit("/", 1)[-1]])
        out = {k: clean(v) for k, v in node.items() if k not in _NOT_SENT}
        if out.get("type") == "object" and "properties" in node:
            out["properties"] = {k: clean(v) for k, v in node["properties"].items()}
            out["required"] = list(node["properties"])
            out["additionalProperties"] = False
        return out

    return {"title": name, "description": description, **clean(schema)}


def invoke(model: Any, messages: list) -> Any:
    """One request; the raw message of a structured model bound with include_raw=True."""
    answer = model.invoke(messages)
    return answer["raw"] if isinstance(answer, dict) and "raw" in answer else answer


def text_of(content: Any) -> str:
    """A message's text: a string, or the text of its content blocks."""
    if isinstance(content, list):
        return "".join(b.get("text", "") if isinstance(b, dict) else str(b) for b in content)
    return content if isinstance(content, str) else ""


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def json_from_text(text: str) -> Any:
    """The JSON object or list in a message's text (bare, fenced, or surrounded by prose)."""
    text = text.strip()
    fenced = _FENCE.search(text)
    candidates = [fenced.group(1)] if fenced else []
    candidates.append(text)
    for open_, close_ in (("{", "}"), ("[", "]")):
        a, b = text.find(open_), text.rfind(close_)
        if 0 <= a < b:
            candidates.append(text[a : b + 1])
    for cand in candidates:
        try:
            return json.loads(cand)
        except json.JSONDecodeError:
            continue
    raise ValueError("the answer is not valid JSON")


def message_json(message: Any) -> Any:
    """The JSON of an answer: the first tool call's arguments, else a JSON value in the content.
    ValueError with a one-line reason when there is none."""
    tool_calls = getattr(message, "tool_calls", None) or []
    if tool_calls:
        return tool_calls[0].get("args")
    invalid = getattr(message, "invalid_tool_calls", None) or []
    if invalid:
        raise ValueError(f"the tool call's arguments are not valid JSON: {str(invalid[0].get('args'))[:80]!r}")
    content = text_of(getattr(message, "content", message))
    if not content.strip():
        raise ValueError("the answer is empty (no tool call, no content)")
    return json_from_text(content)


def describe_failure(error: BaseException) -> str:
    """A failed request on one line: `llm request failed: InternalServerError: ... (HTTP 500)`."""
    status = getattr(error, "status_code", None)
    return one_line(f"llm request failed: {describe(error)}" + (f" (HTTP {status})" if status else ""),
                    MAX_REASON_CHARS)


def validation_reason(error: Exception, where: str = "answer") -> str:
    """The first problem of a pydantic ValidationError (`items.0.alt: ...`), or the error's message."""
    errors = getattr(error, "errors", None)
    if callable(errors):
        err = errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or where
        return f"{loc}: {err['msg']}"
    return str(error)

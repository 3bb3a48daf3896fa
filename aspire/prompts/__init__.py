"""Prompt templates as files (package data), rendered with Jinja2 `StrictUndefined`.

A prompt is `aspire/prompts/<name>.md` (or `.txt` / `.j2`). It must open with a Jinja comment that
declares its variables with example values, as JSON after `vars:`; the comment renders to nothing and
tests/test_prompts.py renders every prompt with these values:

    {#- vars: {"captions": [{"index": 0, "caption": "a dog on a couch", "class_name": "dog", "synonyms": []}]} -#}

    render_prompt(name, **vars) -> str     a missing variable raises ConfigError naming it
    prompt_hash(name) -> str               sha256 of the template file, for the reproducibility record
    prompt_variables(name) -> dict         the declared example values
    prompt_names() -> list[str]
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import jinja2

from aspire.errors import ConfigError

PROMPTS_DIR = Path(__file__).resolve().parent
_SUFFIXES = (".md", ".txt", ".j2")
_VARS = re.compile(r"\A\s*\{#-?\s*vars:\s*(?P<json>.*?)\s*-?#\}", re.DOTALL)


def prompt_names() -> list[str]:
    return sorted(p.stem for p in PROMPTS_DIR.iterdir() if p.suffix in _SUFFIXES and not p.name.startswith("."))


def prompt_path(name: str) -> Path:
    """The template file of prompt `name` ("phrases" or "phrases.md")."""
    if Path(name).suffix in _SUFFIXES and (PROMPTS_DIR / Path(name).name).is_file():
        return PROMPTS_DIR / Path(name).name
    for suffix in _SUFFIXES:
        path = PROMPTS_DIR / f"{name}{suffix}"
        if path.is_file():
            return path
    raise ConfigError(f"unknown prompt {name!r} (known: {', '.join(prompt_names()) or 'none'})")


@functools.lru_cache(maxsize=None)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(PROMPTS_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def prompt_variables(name: str) -> dict[str, Any]:
    """The variables a prompt declares in its leading `{#- vars: {...} -#}` comment, with example values."""
    path = prompt_path(name)
    match = _VARS.match(path.read_text(encoding="utf-8"))
    if not match:
        raise ConfigError(f"{path}: prompt does not open with a '{{#- vars: {{...}} -#}}' comment")
    try:
        declared = json.loads(match.group("json"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: the vars comment is not valid JSON ({e})") from None
    if not isinstance(declared, dict):
        raise ConfigError(f"{path}: the vars comment must be a JSON object")
    return declared


def render_prompt(name: str, **variables: Any) -> str:
    """Render prompt `name` with `variables`; an undefined variable raises ConfigError naming it."""
    path = prompt_path(name)
    try:
        return _environment().get_template(path.name).render(**variables)
    except jinja2.UndefinedError as e:
        raise ConfigError(f"prompt {path.name}: {e.message}") from None
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"prompt {path.name} line {e.lineno}: {e.message}") from None


def prompt_hash(name: str) -> str:
    """sha256 (hex) of the template file's bytes: which prompt text produced a result."""
    return hashlib.sha256(prompt_path(name).read_bytes()).hexdigest()

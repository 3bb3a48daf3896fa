"""Every prompt file in aspire/prompts/ declares its variables and renders with them (StrictUndefined)."""

from __future__ import annotations

import hashlib

import jinja2
import jinja2.meta
import pytest

from aspire.errors import ConfigError
from aspire.prompts import PROMPTS_DIR, prompt_hash, prompt_names, prompt_path, prompt_variables, render_prompt


def test_there_are_prompts():
    assert "phrases" in prompt_names()


@pytest.mark.parametrize("name", prompt_names())
def test_prompt_declares_its_variables_and_renders(name):
    declared = prompt_variables(name)  # raises ConfigError when the leading {#- vars: {...} -#} is missing
    source = prompt_path(name).read_text(encoding="utf-8")
    used = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(source))
    assert used <= set(declared), f"{name}: variables used but not declared: {sorted(used - set(declared))}"
    text = render_prompt(name, **declared)
    assert text.strip()
    assert "vars:" not in text and "{{" not in text and "{%" not in text


@pytest.mark.parametrize("name", prompt_names())
def test_prompt_with_a_missing_variable_raises(name):
    declared = prompt_variables(name)
    for missing in declared:
        variables = {k: v for k, v in declared.items() if k != missing}
        with pytest.raises(ConfigError, match=missing):
            render_prompt(name, **variables)


def test_phrases_prompt_lists_every_caption_with_its_label():
    captions = [{"index": 0, "caption": "a dog on a beach", "class_name": "dog", "synonyms": ["puppy"]},
                {"index": 1, "caption": "a tractor in a field", "class_name": "tractor", "synonyms": []}]
    text = render_prompt("phrases", captions=captions)
    assert "index 0\nlabel: dog (also called: puppy)\ncaption: a dog on a beach" in text
    assert "index 1\nlabel: tractor\ncaption: a tractor in a field" in text
    assert render_prompt("phrases.md", captions=captions) == text


def test_unknown_prompt_is_a_config_error():
    with pytest.raises(ConfigError, match="no-such-prompt"):
        render_prompt("no-such-prompt")


def test_prompt_hash_is_the_sha256_of_the_file():
    digest = prompt_hash("phrases")
    assert digest == hashlib.sha256((PROMPTS_DIR / "phrases.md").read_bytes()).hexdigest()
    assert len(digest) == 64

"""Method step 3: the phrase schema, the offline chunker, and the LLM backend against a loopback server."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from aspire.config import PhraseSettings
from aspire.errors import ConfigError, DataError
from aspire.prompts import render_prompt
from aspire.schemas import Caption, PhraseSet
from aspire.tools.lexicon import is_label_phrase, label_terms
from aspire.tools.phrases import CaptionPhrases, PhraseExtractor, as_tool, parse_answer
from aspire.tools.phrases_offline import chunk_caption
from llm_server import Delay, LoopbackLLM, content, structured, tool_call


def caps(*texts: str) -> list[Caption]:
    return [Caption(image=f"img{i}.jpg", caption=t, backend="annotations") for i, t in enumerate(texts)]


def names(captions: list[Caption], *class_names: str) -> dict[str, str]:
    return {c.image: n for c, n in zip(captions, class_names)}


# ---------------------------------------------------------------- schema
def test_schema_cleans_phrases():
    p = CaptionPhrases(foreground=["  The Boat ", "boats", "a Wooden Dock.", ""], background="Lake", alt=["forest"])
    assert p.foreground == ["boat", "wooden dock"]
    assert p.background == ["lake"]
    assert p.alt == ["forest"]


def test_schema_background_rules():
    with pytest.raises(ValidationError, match="at most one background"):
        CaptionPhrases(background=["lake", "forest"], alt=["sand"])
    with pytest.raises(ValidationError, match="alt must name a different background"):
        CaptionPhrases(background=["lake"], alt=[])
    with pytest.raises(ValidationError, match="alt must name a different background"):
        CaptionPhrases(background=["lake"], alt=["the lakes"])
    assert CaptionPhrases(background=[], alt=["forest"]).alt == []  # no background: no alternative
    assert CaptionPhrases(background=["lake", "Lakes"], alt=["forest"]).background == ["lake"]  # duplicates merge


def test_label_terms_and_matching():
    assert label_terms("waterbird", ["duck"]) == ["waterbird", "bird", "duck"]
    assert label_terms("tench, Tinca tinca") == ["tench", "tinca tinca", "tinca"]
    terms = label_terms("golden_retriever", ["dog"])
    assert all(is_label_phrase(p, terms) for p in ["retriever", "golden retrievers", "small dog", "dogs"])
    assert not any(is_label_phrase(p, terms) for p in ["dog bed", "ball", "golden field"])


# ---------------------------------------------------------------- offline backend
def offline(texts_and_classes, synonyms=None):
    captions = caps(*[t for t, _ in texts_and_classes])
    out = PhraseExtractor(PhraseSettings(backend="offline")).extract(
        captions, names(captions, *[c for _, c in texts_and_classes]), synonyms)
    return out


def test_offline_foreground_background_and_label_excluded():
    out = offline([
        ("a bird standing on a rock in the water", "waterbird"),
        ("two small boats on the ocean with a lighthouse in the background", "waterbird"),
        ("a dog lying on a couch next to a pillow in a living room", "golden retriever"),
        ("a man holding a large fish in front of green trees", "tench"),
    ], synonyms={"golden retriever": ["dog"]})
    assert [p.image for p in out] == [f"img{i}.jpg" for i in range(4)]
    assert all(isinstance(p, PhraseSet) and p.backend == "offline" and p.failed is None for p in out)
    assert (out[0].foreground, out[0].background) == (["rock"], ["water"])
    assert (out[1].foreground, out[1].background) == (["small boat", "lighthouse"], ["ocean"])
    assert (out[2].foreground, out[2].background) == (["couch", "pillow"], ["living room"])  # "dog" is a synonym
    assert out[3].foreground == ["man", "large fish", "green tree"] and out[3].background == []
    assert out[3].alt == []


def test_offline_classes_it_has_never_seen():
    out = offline([
        ("a red tractor parked in a muddy field next to a barn", "tractor"),
        ("an espresso machine on a kitchen counter beside a mug", "espresso maker"),
        ("a zorblax sitting on a glorp under the sky", "zorblax"),
        ("a flock of flamingos wading in a shallow lagoon", "flamingo"),
    ], synonyms={"espresso maker": ["espresso machine"]})
    assert (out[0].foreground, out[0].background) == (["barn"], ["muddy field"])
    assert (out[1].foreground, out[1].background) == (["kitchen counter", "mug"], [])  # a counter is no scene noun
    assert (out[2].foreground, out[2].background) == (["glorp"], ["sky"])  # unknown words are taken for nouns
    assert (out[3].foreground, out[3].background) == ([], ["shallow lagoon"])  # "flock of" dropped, label out


def test_offline_compound_class_and_synonyms():
    out = offline([
        ("a small bird perched on a tree branch in the woods", "landbird"),
        ("a duck swimming in a pond near some tall reeds", "waterbird"),
        ("a seagull standing on the shore by the ocean", "seagull"),
    ], synonyms={"waterbird": ["duck"]})
    assert out[0].foreground == ["tree branch"] and out[0].background == ["woods"]   # "bird" from "landbird"
    assert out[1].foreground == ["tall reed"] and out[1].background == ["pond"]      # "duck" is a synonym
    assert out[2].foreground == [] and out[2].background == ["shore"]               # "gull" from "seagull"


def test_offline_synonyms_are_normalised():
    # the same thing said twice is one phrase; a synonym is never the alternative background
    out = offline([
        ("a boat on the ocean near the sea with boats", "kayak"),
        ("a kayak on the sea", "kayak"),
        ("a kayak on the ocean", "kayak"),
        ("a kayak on a lake", "kayak"),
        ("a kayak on a street", "kayak"),
    ])
    assert out[0].foreground == ["boat"] and out[0].background == ["ocean"]
    for p in out[:4]:  # water scenes: the alternative is the street, not another water body
        assert p.alt == ["street"], p
    assert out[4].alt == ["ocean"]  # the most frequent background of the others (ocean ~ sea: 3)


def test_offline_alt_falls_back_to_the_lexicon_contrast():
    out = offline([("a dog running on a sandy beach", "dog"), ("a dog on a beach", "dog")])
    assert [p.alt for p in out] == [["forest"], ["forest"]]  # the other background is the same kind


def test_offline_is_deterministic_and_handles_empty_captions():
    items = [("a cat sitting on a rug in a bedroom with a ball of yarn", "cat"), ("", "cat"),
             ("a yellow school bus driving down a snowy road", "school bus")]
    a, b = offline(items), offline(items)
    assert a == b
    assert a[1].failed == "empty caption" and a[1].foreground == [] and a[1].background == []
    assert a[2].foreground == [] and a[2].background == ["snowy road"]


def test_chunker_prepositions_and_possessives():
    chunks = chunk_caption("a bird on the water's edge, next to a flock of geese")
    assert [(c.text, c.prep) for c in chunks] == [("bird", None), ("water", "on"), ("goose", "next_to")]


def test_extract_checks_inputs():
    ex = PhraseExtractor()
    with pytest.raises(DataError, match="img0.jpg"):
        ex.extract(caps("a dog"), {})
    with pytest.raises(DataError, match=r"captions\[0\]"):
        ex.extract([{"image": "x", "caption": "y"}], {"x": "dog"})  # type: ignore[list-item]


def test_as_tool_wraps_the_extractor():
    tool = as_tool(PhraseExtractor())
    msg = tool.invoke({"type": "tool_call", "id": "call_1", "name": "extract_phrases", "args": {
        "captions": [{"image": "a.jpg", "caption": "a dog on a beach with a ball", "class_name": "dog"}]}})
    assert json.loads(msg.content) == [{"image": "a.jpg", "foreground": ["ball"], "background": ["beach"],
                                        "alt": ["forest"], "failed": None, "backend": "offline"}]
    assert msg.artifact[0].background == ["beach"]


# ---------------------------------------------------------------- llm backend
def llm_settings(server: LoopbackLLM, **kw) -> PhraseSettings:
    base = dict(backend="llm", model="phrase-model-x", base_url=server.base_url, api_key="sk-test",
                backoff_s=0, timeout_s=10, max_retries=2)
    return PhraseSettings(**{**base, **kw})


def item(index, fg=(), bg=(), alt=()):
    return {"index": index, "foreground": list(fg), "background": list(bg), "alt": list(alt)}


CAPTIONS = caps("a bird on a lake near a wooden dock", "a dog on the grass with a ball", "a cat on a sofa")
CLASSES = names(CAPTIONS, "waterbird", "dog", "cat")
GOOD = {"items": [item(2, ["sofa"]), item(0, ["wooden dock"], ["lake"], ["forest"]),
                  item(1, ["ball"], ["grass"], ["sand"])]}  # out of order on purpose


def test_llm_good_answer_and_request():
    with LoopbackLLM([structured(GOOD)]) as server:
        out = PhraseExtractor(llm_settings(server)).extract(CAPTIONS, CLASSES)
    assert [(p.foreground, p.background, p.alt, p.failed) for p in out] == [
        (["wooden dock"], ["lake"], ["forest"], None), (["ball"], ["grass"], ["sand"], None), (["sofa"], [], [], None)]
    assert all(p.backend == "llm" for p in out)
    assert len(server.requests) == 1 and server.unscripted == 0
    body = server.requests[0]
    assert server.paths[0] == "/v1/chat/completions"
    assert server.headers[0]["authorization"] == "Bearer sk-test"
    assert body["model"] == "phrase-model-x"
    assert body["tool_choice"]["function"]["name"] == "caption_phrases"
    expected_prompt = render_prompt("phrases", captions=[
        {"index": i, "caption": c.caption, "class_name": CLASSES[c.image], "synonyms": []}
        for i, c in enumerate(CAPTIONS)])
    assert body["messages"] == [{"role": "user", "content": expected_prompt}]


def test_llm_json_schema_method_reads_json_content():
    fenced = "Here you go:\n```json\n" + json.dumps(GOOD) + "\n```"
    with LoopbackLLM([content(fenced)]) as server:
        out = PhraseExtractor(llm_settings(server, structured_output="json_schema")).extract(CAPTIONS, CLASSES)
    assert server.requests[0]["response_format"]["type"] == "json_schema"
    assert [p.background for p in out] == [["lake"], ["grass"], []]


def test_llm_malformed_json_then_good_answer():
    with LoopbackLLM([structured('{"items": [{"index": 0, "foreground": ['), content("I cannot do that."),
                      structured(GOOD)]) as server:
        out = PhraseExtractor(llm_settings(server)).extract(CAPTIONS, CLASSES)
    assert len(server.requests) == 3 and server.unscripted == 0
    assert all(p.failed is None for p in out) and out[1].foreground == ["ball"]


def test_llm_partial_answer_records_the_missing_caption():
    partial = {"items": [GOOD["items"][0], GOOD["items"][1]]}  # caption 1 missing
    with LoopbackLLM([structured(partial)]) as server:
        out = PhraseExtractor(llm_settings(server, max_retries=0)).extract(CAPTIONS, CLASSES)
    assert out[0].failed is None and out[0].background == ["lake"]
    assert out[2].failed is None and out[2].foreground == ["sofa"]
    assert out[1].failed == "missing from the llm answer (after 1 attempt)"
    assert (out[1].foreground, out[1].background, out[1].alt) == ([], [], [])


def test_llm_retry_asks_only_for_the_missing_captions():
    partial = {"items": [GOOD["items"][0], GOOD["items"][1]]}
    with LoopbackLLM([structured(partial), structured({"items": [item(1, ["ball"], ["grass"], ["sand"])]})]) as server:
        out = PhraseExtractor(llm_settings(server)).extract(CAPTIONS, CLASSES)
    assert all(p.failed is None for p in out)
    second = server.requests[1]["messages"][0]["content"]
    assert CAPTIONS[1].caption in second
    assert CAPTIONS[0].caption not in second and CAPTIONS[2].caption not in second


def test_llm_schema_violation_is_retried_then_recorded():
    bad = {"items": [item(0, [], ["lake", "forest"], ["sand"]), GOOD["items"][0], GOOD["items"][2]]}
    with LoopbackLLM([structured(bad), structured({"items": [item(0, [], ["lake", "forest"], ["sand"])]})]) as server:
        out = PhraseExtractor(llm_settings(server, max_retries=1)).extract(CAPTIONS, CLASSES)
    assert out[0].failed is not None and "at most one background" in out[0].failed and "2 attempts" in out[0].failed
    assert out[1].failed is None and out[2].failed is None
    assert server.unscripted == 0


def test_llm_http_500_becomes_failed_records():
    with LoopbackLLM([500, 500, 500]) as server:
        out = PhraseExtractor(llm_settings(server)).extract(CAPTIONS, CLASSES)
    assert len(server.requests) == 3 and server.unscripted == 0
    for p in out:
        assert p.failed is not None and "500" in p.failed and "after 3 attempts" in p.failed
        assert (p.foreground, p.background, p.alt) == ([], [], [])


def test_llm_timeout_becomes_failed_records():
    with LoopbackLLM([Delay(5.0, structured(GOOD))]) as server:
        out = PhraseExtractor(llm_settings(server, timeout_s=0.3, max_retries=0)).extract(CAPTIONS, CLASSES)
    assert all(p.failed is not None and "timed out" in p.failed.lower() for p in out)


def test_llm_network_error_becomes_failed_records():
    with LoopbackLLM() as server:
        url = server.base_url
    settings = PhraseSettings(backend="llm", base_url=url, api_key="x", backoff_s=0, max_retries=1, timeout_s=2)
    out = PhraseExtractor(settings).extract(CAPTIONS[:1], CLASSES)  # the server is gone
    assert out[0].failed is not None and "Connection" in out[0].failed


def test_llm_label_object_is_filtered_out():
    answer = {"items": [item(0, ["waterbird", "small birds", "duck", "wooden dock"], ["lake"], ["forest"])]}
    with LoopbackLLM([structured(answer)]) as server:
        out = PhraseExtractor(llm_settings(server)).extract(CAPTIONS[:1], CLASSES, {"waterbird": ["duck"]})
    assert out[0].foreground == ["wooden dock"]
    assert "(also called: duck)" in server.requests[0]["messages"][0]["content"]


def test_llm_captions_per_call_splits_requests():
    with LoopbackLLM([structured({"items": [GOOD["items"][1], GOOD["items"][2]]}),
                      structured({"items": [item(0, ["sofa"])]})]) as server:
        out = PhraseExtractor(llm_settings(server, captions_per_call=2)).extract(CAPTIONS, CLASSES)
    assert len(server.requests) == 2
    assert [p.foreground for p in out] == [["wooden dock"], ["ball"], ["sofa"]]


def test_llm_empty_caption_is_not_sent():
    captions = caps("", "a cat on a sofa")
    with LoopbackLLM([structured({"items": [item(0, ["sofa"])]})]) as server:
        out = PhraseExtractor(llm_settings(server)).extract(captions, names(captions, "cat", "cat"))
    assert out[0].failed == "empty caption" and out[1].foreground == ["sofa"]
    assert "a cat on a sofa" in server.requests[0]["messages"][0]["content"]


def test_llm_settings_fall_back_to_openai_env(monkeypatch):
    with LoopbackLLM([tool_call("caption_phrases", {"items": [item(0, ["sofa"])]})]) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
        ex = PhraseExtractor(PhraseSettings(backend="llm", backoff_s=0))
        out = ex.extract(CAPTIONS[2:], CLASSES)
    assert out[0].foreground == ["sofa"]
    assert server.headers[0]["authorization"] == "Bearer sk-from-env"
    assert ex.record()["base_url"] == server.base_url and "api_key" not in ex.record()


def test_llm_without_api_key_is_a_config_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ConfigError, match="api_key"):
        PhraseExtractor(PhraseSettings(backend="llm")).extract(CAPTIONS, CLASSES)


def test_parse_answer_shapes():
    class Msg:
        def __init__(self, content="", tool_calls=(), invalid_tool_calls=()):
            self.content, self.tool_calls, self.invalid_tool_calls = content, list(tool_calls), list(invalid_tool_calls)

    assert parse_answer(Msg(content='[{"index": 0}]')) == [{"index": 0}]
    assert parse_answer(Msg(content='{"foreground": ["x"]}')) == [{"foreground": ["x"]}]
    assert parse_answer(Msg(tool_calls=[{"args": {"items": [1]}}])) == [1]
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_answer(Msg(invalid_tool_calls=[{"args": '{"items": ['}]))
    with pytest.raises(ValueError, match="empty"):
        parse_answer(Msg())


def test_generic_noun_modified_by_the_label_is_the_label():
    terms = label_terms("hexagon")
    assert is_label_phrase("a hexagon shape", terms) and is_label_phrase("hexagon icons", terms)
    assert not is_label_phrase("a red kite", terms) and not is_label_phrase("shape", terms)

"""The run store: idempotent records, derived results replaced whole, events kept in order."""

import pytest

from aspire.schemas import Caption, Finding
from aspire.store import RunStore


def test_records_are_idempotent_and_survive_reopening(tmp_path):
    store = RunStore(tmp_path / "run")
    cap = Caption(image="a.png", caption="a bird on a lake", backend="annotations")
    store.put("caption", "a.png", cap)
    store.put("caption", "a.png", Caption(image="a.png", caption="changed", backend="annotations"))
    store.put_many("caption", [("b.png", Caption(image="b.png", caption="x", backend="annotations"))])
    store.close()

    store = RunStore(tmp_path / "run")
    assert store.count("caption") == 2
    assert store.get("caption", "a.png", Caption) == cap          # the first write is kept
    assert store.keys("caption") == {"a.png", "b.png"}
    assert store.get("caption", "zzz", Caption) is None and not store.has("caption", "zzz")


def test_replace_all_meta_and_events(tmp_path):
    store = RunStore(tmp_path)
    f = dict(occurrences=4, flips=3, flip_rate=0.75, control_occurrences=4, control_flips=0, control_flip_rate=0.0,
             mean_prob_drop=0.5, p_value=0.07, spurious=False, kind="foreground", class_index=1)
    store.replace_all("finding", [("1|boat", Finding(**{"class": "waterbird"}, phrase="boat", **f))])
    store.replace_all("finding", [("1|sea", Finding(**{"class": "waterbird"}, phrase="sea", **f))])
    assert [x.phrase for x in store.all("finding", Finding)] == ["sea"]
    assert store.all("finding", Finding)[0].to_json()["class"] == "waterbird"
    store.set_meta("holdout", ["a.png"])
    assert store.get_meta("holdout") == ["a.png"] and store.get_meta("none", 7) == 7
    store.log_event("hypothesis", {"phrase": "boat"})
    store.log_event("outcome", {"phrase": "boat", "spurious": True})
    store.log_event("hypothesis", {"phrase": "sea", "kind": "background"})
    assert [e["event"] for e in store.events()] == ["hypothesis", "outcome", "hypothesis"]
    assert store.events()[2]["kind"] == "background"
    assert store.events("outcome")[0]["spurious"] is True


def test_undocumented_keys_are_refused_and_the_doc_is_generated(tmp_path):
    from pathlib import Path

    from aspire.store import GENERATED_BEGIN, GENERATED_END, run_store_docs

    store = RunStore(tmp_path / "run")
    for write in (lambda: store.set_meta("holdotu", []), lambda: store.put("captoin", "k", {}),
                  lambda: store.log_event("stgae", {})):
        with pytest.raises(KeyError, match="is not documented"):
            write()
    store.set_meta("holdout", [])    # documented ones pass
    doc = (Path(__file__).parent.parent / "docs" / "RUN_STORE.md").read_text(encoding="utf-8")
    generated = doc.split(GENERATED_BEGIN)[1].split(GENERATED_END)[0]
    assert generated.strip() == run_store_docs().strip(), "docs/RUN_STORE.md is stale: run python -m aspire.store"

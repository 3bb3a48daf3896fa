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
    step = {"round": 1, "class": "waterbird", "class_index": 1, "kind": "foreground", "source": "planner"}
    store.log_event("hypothesis", {**step, "phrase": "boat"})
    store.log_event("outcome", {**step, "phrase": "boat", "spurious": True})     # outcomes carry their evidence
    store.log_event("hypothesis", {**step, "phrase": "sea", "kind": "background"})
    assert [e["event"] for e in store.events()] == ["hypothesis", "outcome", "hypothesis"]
    assert store.events()[2]["kind"] == "background"
    assert store.events("outcome")[0]["spurious"] is True


def test_meta_and_events_are_checked_against_their_types_and_read_typed(tmp_path):
    from aspire.store_schema import AuditMeta, Reprobe

    store = RunStore(tmp_path)
    with pytest.raises(ValueError, match=r"meta 'reprobe' does not match its type `Reprobe \{model: str, digest: str"):
        store.set_meta("reprobe", {"model": "after.pt"})                       # no digest
    with pytest.raises(ValueError, match=r"meta 'audit' .*\('thread\b"):
        store.set_meta("audit", {"thread": "t-1"})                             # a misspelt field
    with pytest.raises(ValueError, match=r"meta 'holdout' .*\(0,\) Input should be a valid string"):
        store.set_meta("holdout", [3])
    with pytest.raises(ValueError, match=r"event 'skipped' .*\('phrase',\) Field required"):
        store.log_event("skipped", {"image": "a.png", "reason": "not found"})
    assert store.events() == [] and store.get_meta("reprobe") is None        # nothing half-written

    store.set_meta("reprobe", Reprobe(model="after.pt", digest="ab12"))      # a model, or its JSON
    store.set_meta("audit", {"thread_id": "t-1"})
    reprobe = store.meta("reprobe")
    assert isinstance(reprobe, Reprobe) and reprobe.verdicts == {} and reprobe.edits is None   # defaults filled in
    assert store.get_meta("reprobe") == {"model": "after.pt", "digest": "ab12"}       # stored as written
    assert store.meta("audit") == AuditMeta(thread_id="t-1") and store.meta("models") is None
    assert store.meta("holdout", []) == []


def test_undocumented_keys_are_refused_and_the_doc_is_generated(tmp_path):
    from pathlib import Path

    from aspire.store_docs import GENERATED_BEGIN, GENERATED_END, run_store_docs

    store = RunStore(tmp_path / "run")
    for write in (lambda: store.set_meta("holdotu", []), lambda: store.put("captoin", "k", {}),
                  lambda: store.log_event("stgae", {})):
        with pytest.raises(KeyError, match="is not documented"):
            write()
    store.set_meta("holdout", [])    # documented ones pass
    doc = (Path(__file__).parent.parent / "docs" / "RUN_STORE.md").read_text(encoding="utf-8")
    generated = doc.split(GENERATED_BEGIN)[1].split(GENERATED_END)[0]
    assert generated.strip() == run_store_docs().strip(), "docs/RUN_STORE.md is stale: run python -m aspire.store_docs"

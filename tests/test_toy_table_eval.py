"""evals/toy_table_eval.py --debug on toy-waterbirds: every (method, augmentation) cell, JSON and Markdown."""

from __future__ import annotations

import json

import pytest

from evals import toy_table_eval

pytestmark = pytest.mark.slow


def test_debug_run_writes_every_cell(tmp_path):
    out = tmp_path / "results"
    results = toy_table_eval.main(["--debug", "--benchmarks", "toy-waterbirds", "--workdir", str(tmp_path / "work"),
                                   "--out", str(out)])["toy-waterbirds"]
    saved = json.loads((out / "toy_table_toy-waterbirds_debug.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(results["summary"])) and saved["complete"]
    assert saved["args"]["seeds"] == [0] and saved["args"]["epochs"] == toy_table_eval.DEBUG_EPOCHS
    # every (method, augmentation) cell of the one seed, with accuracies in [0, 1]
    (run,) = saved["runs"]
    assert run["benchmark"] == "toy-waterbirds" and run["seed"] == 0
    for method in toy_table_eval.METHODS:
        for aug in toy_table_eval.AUGMENTATIONS:
            cell = run["cells"][method][aug]
            assert cell is not None, (method, aug)
            for key in ("worst_group_accuracy", "average_accuracy"):
                assert 0.0 <= cell[key] <= 1.0
                ms = saved["summary"]["toy-waterbirds"][method][aug][key]
                assert ms["n"] == 1 and ms["mean"] == pytest.approx(cell[key]) and ms["std"] == 0.0
            assert (cell["n_added"] > 0) == (aug != "none")
    # the two augmented sets: same images per class; the rule the aspire set used is recorded
    sets = run["sets"]
    assert sets["aspire"]["select"] in toy_table_eval.ASPIRE_SELECTS
    assert [f["select"] for f in sets["aspire_fallback"]] == \
        list(toy_table_eval.ASPIRE_SELECTS[:toy_table_eval.ASPIRE_SELECTS.index(sets["aspire"]["select"])])
    assert sets["generic"]["per_class"] == sets["aspire"]["per_class"] and sets["generic"]["counts_from"] == "aspire"
    # the Markdown table: one row per method, a column per augmentation for both accuracies
    md = (out / "toy_table_toy-waterbirds_debug.md").read_text()
    assert "### toy-waterbirds" in md and "n/a" not in md
    for aug in toy_table_eval.AUGMENTATIONS:
        assert f"worst-group % ({aug})" in md and f"average % ({aug})" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split("|")[1].strip() for r in rows] == list(toy_table_eval.METHODS)
    assert all(len(r.strip("|").split("|")) == 1 + 2 * len(toy_table_eval.AUGMENTATIONS) for r in rows)
    assert f"augment.select = {sets['aspire']['select']}" in md
    # a re-run resumes from the cache: the same numbers
    again = toy_table_eval.main(["--debug", "--benchmarks", "toy-waterbirds", "--workdir", str(tmp_path / "work"),
                                 "--out", str(out)])["toy-waterbirds"]
    assert again["summary"] == results["summary"]

    # seeds run on separate machines merge into one table; a seed given twice is refused
    other = json.loads(json.dumps(saved))
    other["runs"][0]["seed"] = 1
    other["runs"][0]["cells"]["erm"]["none"]["worst_group_accuracy"] = 1.0
    (tmp_path / "other.json").write_text(json.dumps(other))
    parts = [str(out / "toy_table_toy-waterbirds_debug.json"), str(tmp_path / "other.json")]
    merged = toy_table_eval.main(["--merge", *parts, "--out", str(tmp_path / "merged")])["toy-waterbirds"]
    assert merged["args"]["seeds"] == [0, 1] and [r["seed"] for r in merged["runs"]] == [0, 1]
    erm = merged["summary"]["toy-waterbirds"]["erm"]["none"]["worst_group_accuracy"]
    assert erm["n"] == 2 and erm["mean"] == pytest.approx((run["cells"]["erm"]["none"]["worst_group_accuracy"] + 1) / 2)
    assert json.loads((tmp_path / "merged" / "toy_table_toy-waterbirds.json").read_text())["summary"] == merged["summary"]
    with pytest.raises(SystemExit, match="each seed once"):
        toy_table_eval.main(["--merge", str(tmp_path / "other.json"), str(tmp_path / "other.json"),
                             "--out", str(tmp_path / "twice")])

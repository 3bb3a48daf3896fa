"""The evals run end to end in --debug mode and write JSON + Markdown whose numbers are consistent."""

import json

import pytest

from evals import calibration_eval, discovery_eval, erm_eval


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("evals")


def test_erm_eval_debug(workdir):
    out = workdir / "results"
    res = erm_eval.main(["--debug", "--benchmarks", "toy-waterbirds", "--workdir", str(workdir), "--out", str(out)])
    run, = res["runs"]
    assert 0 <= run["worst_group_accuracy"] <= run["average_accuracy"] <= 1
    saved = json.loads((out / "erm_debug.json").read_text())
    assert saved["summary"]["toy-waterbirds"]["average_accuracy"]["mean"] == pytest.approx(run["average_accuracy"])
    assert "| toy-waterbirds | 1 | 1 |" in (out / "erm_debug.md").read_text()   # epochs, seeds


def test_discovery_eval_debug(workdir):
    out = workdir / "results"
    res = discovery_eval.main(["--debug", "--benchmarks", "toy-waterbirds", "--workdir", str(workdir),
                               "--out", str(out)])
    run, = res["runs"]
    assert set(run["per_class"]) == {"landbird", "waterbird"}
    for c in run["per_class"].values():
        # planted elements come from ground_truth.json; scores are consistent with the sets
        assert c["planted"] and c["vs_planted"]["relevant"] == len(c["planted"])
        assert c["vs_planted"]["tp"] == len(set(c["flagged"]) & set(c["planted"]))
    elements = {r["element"] for r in run["reliance"]}
    assert {"boat", "fence", "sun", "cloud", "land", "water"} <= elements
    # the ceiling: the exact probability drops as the verdict, scored against the accuracy drops
    relied = {(r["class"], r["element"]) for r in run["reliance"] if r["drop"] >= 0.1}
    for exact in run["exact_prob_drop"].values():
        said = {(r["class"], r["element"]) for r in run["reliance"] if r["mean_prob_drop"] >= exact["at"]}
        assert exact["precision"] == (len(said & relied) / len(said) if said else None)
        assert exact["recall"] == (len(said & relied) / len(relied) if relied else None)
    assert (out / "discovery_debug.md").is_file() and "ceiling" in (out / "discovery_debug.md").read_text()


def test_element_matching_and_ranking_metrics():
    elements = {"boat": {"kind": "foreground", "phrases": ["boat", "sailboat"]},
                "water": {"kind": "background", "phrases": ["water", "lake"]}}
    assert discovery_eval.match_element(["small boats"], elements) == "boat"
    # a merged group is matched by most of its members (groups merged by appearance carry several words)
    assert discovery_eval.match_element(["pond", "lake", "water"], elements) == "water"
    assert discovery_eval.match_element(["tree"], elements) is None
    assert discovery_eval.score({"boat", "?tree"}, {"boat", "water"}) == {
        "tp": 1, "flagged": 2, "relevant": 2, "precision": 0.5, "recall": 0.5}
    # average precision: hits at ranks 1 and 3 of two relevant -> (1/1 + 2/3) / 2; a miss counts 0
    assert discovery_eval.average_precision(["boat", None, "water"], {"boat", "water"}) == pytest.approx(5 / 6)
    assert discovery_eval.average_precision(["boat"], {"boat", "water"}) == pytest.approx(0.5)
    assert discovery_eval.precision_at_k(["boat", None, "water"], {"boat", "water"}, 2) == 0.5


def test_calibration_eval_debug(workdir):
    out = workdir / "results"
    res = calibration_eval.main(["--debug", "--benchmarks", "toy-waterbirds", "--workdir", str(workdir),
                                 "--out", str(out)])
    run, = res["runs"]
    assert run["repaired"] and run["before"] and len(run["after"]) == len(run["before"])
    # every point is a probed (class, element) with counterfactuals, read from the same findings before and after
    assert {(p["class"], p["element"]) for p in run["before"]} == {(p["class"], p["element"]) for p in run["after"]}
    s = res["summary"]["toy-waterbirds"]["mean_prob_drop_before"]
    assert s["points"] == len(run["before"])
    assert s["pooled"] == pytest.approx(calibration_eval.correlation(run["before"], "mean_prob_drop"))
    assert (out / "calibration_debug.md").is_file() and (out / "calibration_debug.png").is_file()


def test_correlation_is_undefined_on_too_few_or_constant_points():
    rows = [{"effect": e, "drop": d} for e, d in ((0.1, 0.2), (0.2, 0.3), (0.3, 0.5), (0.0, 0.1))]
    assert calibration_eval.correlation(rows, "drop") == pytest.approx(1.0)
    assert calibration_eval.correlation(rows[:2], "drop") is None
    assert calibration_eval.correlation([{**r, "effect": 0.0} for r in rows], "drop") is None
    assert calibration_eval.correlation(rows, "drop", "pearson") == pytest.approx(0.9827, abs=1e-4)

"""The audit report, rendered from real runs: a probe-only run, and the same run completed as a full audit.

The runs are built for real: a toy benchmark, a quickly trained smallcnn, the probe pipeline with the
offline backends. The full run then gets what the later stages record: an augmented set (the real
`augment_run`), a second checkpoint and its evaluation, and the agent's trail, written into the store as
those stages write it, so every section of the report is exercised. The runs are built once per session
(`report_runs`) and shared with tests/test_report_browser.py.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from html.parser import HTMLParser
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aspire import cli
from aspire.data.augmented import read_manifest
from aspire.errors import AspireError
from aspire.report import build_report
from aspire.schemas import Edit, EvalResult, Finding
from aspire.store import RunStore

TRAIL = [  # what the agent records: hypotheses, outcomes, approvals, LLM failures (with reasons)
    ("hypothesis", {"round": 1, "class": "waterbird", "class_index": 1, "phrase": "boat", "kind": "foreground",
                    "source": "llm", "reason": "boats appear mostly beside waterbirds"}),
    ("llm_failure", {"stage": "hypothesize", "reason": "response was not valid JSON; retried"}),
    ("outcome", {"round": 1, "class": "waterbird", "class_index": 1, "phrase": "boat", "kind": "foreground",
                 "source": "llm", "spurious": False, "reason": "edits flip no more often than controls"}),
    ("approval", {"stage": "augment", "decision": "approved", "dropped": [], "added": [],
                  "reason": "reviewer accepted the findings"}),
]


# ---------------------------------------------------------------- building the runs
def make_runs(base: Path) -> dict[str, Path]:
    """Build (once; later calls reuse it) a probe run and a full audit run under `base`."""
    runs = {"data": base / "data", "probe": base / "probe-run", "full": base / "full-run",
            "before": base / "model.pt", "after": base / "model-after.pt"}
    if (base / "done").is_file():
        return runs
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    from aspire.workflows.repair import augment_run, run_config
    from aspire.config import load_config
    from aspire.data.formats import load_dataset
    from aspire.data.toy.benchmark import write_benchmark
    from aspire.models.classifier import build_classifier, load_checkpoint, save_checkpoint
    from aspire.models.evaluate import evaluate
    from aspire.models.train import train_classifier
    from aspire.workflows.probe import ProbePipeline
    from aspire.provenance import run_record

    # 1. data and the audited classifier
    write_benchmark("toy-waterbirds", runs["data"], seed=0, size_px=64, sizes={"train": 24, "val": 6, "test": 8})
    ds = load_dataset(runs["data"])
    clf = build_classifier("smallcnn", ds.class_names, seed=0)
    train_classifier(clf, ds.split("train"), ds.split("val"), epochs=8, batch_size=16, lr=0.05,
                     weight_decay=5e-4, seed=0, augment=False, progress=False)
    save_checkpoint(clf, runs["before"])

    # 2. the probe run, assembled as `aspire probe` does
    ann = str(runs["data"] / "annotations.jsonl")
    cfg = load_config(None, {"caption": {"annotations": ann}, "ground": {"annotations": ann},
                             "holdout": {"fraction": 0.5}})
    store = RunStore(runs["probe"])
    store.set_meta("kind", "probe")
    store.set_meta("args", {"data": str(runs["data"].resolve()), "format": "waterbirds",
                            "model": str(runs["before"].resolve()), "classes": None, "seed": 0})
    store.set_meta("record", run_record(cfg, seed=0, classifier={"arch": clf.arch, "classes": clf.class_names}))
    ProbePipeline(ds, clf, cfg, store, seed=0).run()
    store.close()

    # 3. the full audit: the same run, then a retrained model, its evaluation, an augmented set, a trail
    shutil.copytree(runs["probe"], runs["full"])
    after = load_checkpoint(runs["before"], device="cpu")
    train_classifier(after, ds.split("train"), ds.split("val"), epochs=1, batch_size=16, lr=0.02,
                     weight_decay=5e-4, seed=1, augment=False, progress=False)
    save_checkpoint(after, runs["after"])
    aug_config = run_config(runs["full"])           # the repair, as `aspire augment` does it (offline backend)
    aug_config.augment.select = "flipping"
    aug_config.generate.images_per_class = 6
    augment_run(runs["full"], base / "aug", aug_config, seed=0, on_message=lambda message: None)
    store = RunStore(runs["full"])
    store.set_meta("kind", "audit")
    store.set_meta("models", {"before": str(runs["before"]), "after": str(runs["after"])})
    store.set_meta("evaluation", {"before": evaluate(load_checkpoint(runs["before"], device="cpu"), ds).model_dump(),
                                  "after": evaluate(after, ds).model_dump()})
    for kind, payload in TRAIL:
        store.log_event(kind, payload)
    store.close()
    (base / "done").write_text("ok")
    return runs


@pytest.fixture(scope="session")
def report_runs(tmp_path_factory):
    return make_runs(tmp_path_factory.getbasetemp() / "report-runs")


@pytest.fixture(scope="module")
def probe_report(report_runs, tmp_path_factory):
    return build_report(report_runs["probe"], tmp_path_factory.mktemp("probe-report"))


@pytest.fixture(scope="module")
def full_report(report_runs, tmp_path_factory):
    return build_report(report_runs["full"], tmp_path_factory.mktemp("full-report"))


# ---------------------------------------------------------------- reading the HTML
class _Page(HTMLParser):
    """The findings table's rows (cell texts), every <img> src, every href, and figure captions."""

    def __init__(self, html: str):
        super().__init__()
        self.rows: list[list[str]] = []
        self.srcs: list[str] = []
        self.hrefs: list[str] = []
        self.captions: list[str] = []
        self._in_table = self._in_cell = self._in_caption = False
        self._cell: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and "findings" in (a.get("class") or ""):
            self._in_table = True
        elif self._in_table and tag == "tr" and a.get("id", "").startswith("finding-"):
            self.rows.append([])
        elif self._in_table and tag == "td" and self.rows:
            self._in_cell, self._cell = True, []
        elif tag == "img":
            self.srcs.append(a.get("src") or "")
        elif tag == "figcaption":
            self._in_caption, self._cell = True, []
        if tag != "img":
            self.hrefs += [a[k] or "" for k in ("href", "src") if k in a]

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_table = False
        elif tag == "td" and self._in_cell:
            self.rows[-1].append(" ".join(" ".join(self._cell).split()))
            self._in_cell = False
        elif tag == "figcaption":
            self.captions.append("".join(self._cell).strip())
            self._in_caption = False

    def handle_data(self, data):
        if self._in_cell or self._in_caption:
            self._cell.append(data)


def _store_findings(run: Path) -> list[Finding]:
    store = RunStore(run)
    try:
        return store.all("finding", Finding)
    finally:
        store.close()


def _expected_row(f: Finding) -> list[str]:
    phrase = f.phrase + (f" merged: {', '.join(f.phrases)}" if len(f.phrases) > 1 else "")
    return [f.class_, phrase, f.kind, str(f.occurrences),
            f"{f.effect:+.3f} [{f.effect_ci[0]:+.3f}, {f.effect_ci[1]:+.3f}]", f"{f.q_value:.2g}", f.control_kind or "none",
            f"{f.flip_rate:.2f}", f"{f.control_flip_rate:.2f} ({f.control_flips}/{f.control_occurrences})",
            f"{f.flip_p_value:.2g}", "spurious" if f.spurious else "no"]


def _check_self_contained(page: _Page) -> None:
    assert page.srcs and all(s.startswith("data:image/") for s in page.srcs), page.srcs[:3]
    assert any(s.startswith("data:image/png;base64,") for s in page.srcs)
    assert all(h.startswith("#") for h in page.hrefs), page.hrefs
    assert not any(re.match(r"(?i)\s*(https?:)?//", v) for v in page.srcs + page.hrefs)


# ---------------------------------------------------------------- tests
def test_probe_only_report_shows_the_stores_findings_and_says_what_is_missing(report_runs, probe_report):
    html = probe_report["html"].read_text(encoding="utf-8")
    page = _Page(html)
    findings = _store_findings(report_runs["probe"])
    assert findings, "the probe run recorded no findings"
    # 1. the findings table: one row per finding of the store, with its numbers
    assert len(page.rows) == len(findings)
    expected = {(f.class_, f.kind, f.phrase): _expected_row(f) for f in findings}
    for row in page.rows:
        assert row[1:] in expected.values(), row
    assert sorted(tuple(r[1:]) for r in page.rows) == sorted(tuple(r) for r in expected.values())
    # 2. images embedded, nothing external; the galleries show originals, edits, controls and Grad-CAM
    _check_self_contained(page)
    assert {"original", "edited", "control", "Grad-CAM"} <= set(page.captions)
    assert "Grad-CAM after" not in page.captions and "Grad-CAM before" not in page.captions
    # 3. what a probe run does not have is said
    assert "no retrained model in this run" in html
    assert "This run has no evaluation" in html
    assert "No hypotheses, outcomes or approvals recorded" in html
    assert "Generated images" not in html


def test_full_report_shows_accuracy_gradcam_generated_images_and_the_trail(report_runs, full_report):
    html = full_report["html"].read_text(encoding="utf-8")
    page = _Page(html)
    _check_self_contained(page)
    store = RunStore(report_runs["full"])
    evaluation = {k: EvalResult.model_validate(v) for k, v in store.get_meta("evaluation").items()}
    generated = read_manifest(store.get_meta("augmented")["dir"])["images"]
    store.close()
    # 1. accuracy before -> after, as recorded
    for stage in ("before", "after"):
        for metric in ("worst_group_accuracy", "average_accuracy", "weighted_average_accuracy"):
            assert f"{100 * getattr(evaluation[stage], metric):.1f}%" in html
    assert evaluation["before"].worst_group in html
    # 2. Grad-CAM before and after, on the same examples; generated images beside their source edits
    n_examples = page.captions.count("original")
    assert n_examples > 0
    assert page.captions.count("Grad-CAM before") == page.captions.count("Grad-CAM after") == n_examples
    shown = json.loads(full_report["json"].read_text())
    shown_edits = {e["edit_id"] for f in shown["findings"] for e in f["examples"]}
    per_edit = Counter(edit_id for row in generated for edit_id in row["edits"])
    assert html.count('alt="generated from this edit"') == sum(min(2, per_edit[e]) for e in shown_edits) > 0
    assert html.count("no image generated from this edit") == sum(per_edit[e] == 0 for e in shown_edits)
    assert 'id="augmented"' in html
    # 3. the trail, in order, with its reasons
    positions = [html.index(payload["reason"]) for _, payload in TRAIL]
    assert positions == sorted(positions)
    assert "no retrained model" not in html


def test_markdown_has_the_same_findings_and_its_image_links_resolve(report_runs, full_report):
    md = full_report["md"].read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) > 5
    for link in links:
        assert not re.match(r"(?i)https?://", link)
        assert (full_report["md"].parent / link).is_file(), link
    for f in _store_findings(report_runs["full"]):
        cells = _expected_row(f)
        assert f"| {f.class_} | {f.phrase}" in md
        assert f"| {cells[5]} | {cells[6]} | {cells[7]} |" in md
    assert "Grad-CAM before | Grad-CAM after" in md and "reviewer accepted the findings" in md


def test_json_summary_matches_the_store(report_runs, full_report):
    summary = json.loads(full_report["json"].read_text())
    store = RunStore(report_runs["full"])
    try:
        recorded = {(f.class_, f.kind, f.phrase): f.to_json() for f in store.all("finding", Finding)}
        shown = {(f["class"], f["kind"], f["phrase"]): {k: v for k, v in f.items() if k != "examples"}
                 for f in summary["findings"]}
        assert shown == recorded
        edits = store.all("edit", Edit)
        removal = [e for e in edits if e.test == "removal"]
        assert summary["counts"]["edits"] == sum(not e.control for e in removal)
        assert summary["counts"]["control_edits"] == sum(e.control for e in removal)
        assert summary["counts"]["insertion_edits"] == sum(e.test == "insertion" for e in edits) > 0
        assert summary["counts"]["joint_edits"] == sum(e.test == "joint" for e in edits)
        assert summary["counts"]["holdout"] == len(store.get_meta("holdout"))
        assert summary["counts"]["skipped"] == len(store.events("skipped"))
        assert summary["accuracy"] == store.get_meta("evaluation")
        assert summary["record"] == store.get_meta("record")
        assert [t["event"] for t in summary["trail"]] == [k for k, _ in TRAIL]
        assert [t.get("reason") for t in summary["trail"]] == [p["reason"] for _, p in TRAIL]
        assert summary["gradcam"]["after"] == store.get_meta("models")["after"]
    finally:
        store.close()
    root = full_report["json"].parent
    assert all((root / p).is_file() for p in summary["paths"]["images"])
    assert summary["paths"]["chart"] == "img/flip_rates.png" and (root / "img" / "flip_rates.png").is_file()
    for f in summary["findings"]:
        for e in f["examples"]:
            assert e["original"] and (root / e["original"]).is_file()
            assert (root / e["edited"]).is_file() and (root / e["cam_before"]).is_file()
        # every finding's gallery (there are fewer than 12): up to 6 of its edits, the flipping ones first
        flags = [e["flipped"] for e in f["examples"]]
        assert len(flags) == min(6, f["occurrences"]) and flags == sorted(flags, reverse=True)
        assert sum(flags) == min(6, f["flips"])


def test_report_renders_when_a_recorded_checkpoint_is_missing(report_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(report_runs["probe"], run)
    store = RunStore(run)
    store.set_meta("models", {"before": str(report_runs["before"]), "after": str(tmp_path / "gone.pt")})
    store.close()
    paths = build_report(run)
    assert paths["html"].parent == run / "report"
    html = paths["html"].read_text(encoding="utf-8")
    assert "Grad-CAM of the after model failed" in html and "gone.pt" in html
    assert "Grad-CAM after" not in _Page(html).captions


def test_rerendering_replaces_the_report_and_drops_stale_images(report_runs, tmp_path):
    out = tmp_path / "out"
    first = build_report(report_runs["probe"], out)
    stale = out / "img" / ("0" * 16 + ".png")
    stale.write_bytes(b"old")
    again = build_report(report_runs["probe"], out)
    assert first == again and not stale.exists()
    listed = json.loads(again["json"].read_text())["paths"]["images"]
    assert sorted(p.name for p in (out / "img").iterdir()) == sorted(Path(p).name for p in listed)


def test_not_a_run_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    with pytest.raises(AspireError, match="not a run folder"):
        build_report(empty)
    assert not (empty / RunStore.DB_NAME).exists()   # nothing created in a folder that is not a run
    monkeypatch.setattr(sys, "argv", ["aspire", "report", "--run-dir", str(empty)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert str(empty) in err.replace("\n", "") and "Traceback" not in err


def test_cli_report_prints_paths(report_runs, tmp_path):
    result = CliRunner().invoke(cli.app, ["report", "--run-dir", str(report_runs["probe"]), "--out",
                                          str(tmp_path / "r"), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    paths = json.loads(result.stdout)
    assert set(paths) == {"html", "md", "json"}
    assert all(Path(p).is_file() and Path(p).parent == (tmp_path / "r").resolve() for p in paths.values())


def _record_rows(html: str) -> dict[str, str]:
    """The 'backends, models and seeds' table: setting -> value."""
    table = html.split("<summary>backends, models and seeds</summary>", 1)[1].split("</table>", 1)[0]
    return dict(re.findall(r"<tr><td>([^<]+)</td><td><code>([^<]*)</code></td></tr>", table))


def test_the_record_lists_only_the_backends_and_models_used(report_runs, probe_report, full_report):
    probe_rows = _record_rows(probe_report["html"].read_text(encoding="utf-8"))
    full_rows = _record_rows(full_report["html"].read_text(encoding="utf-8"))
    assert {k: probe_rows[k] for k in ("caption.backend", "phrases.backend", "ground.backend",
                                       "edit.remove_backend", "edit.background_backend")} == {
        "caption.backend": "annotations", "phrases.backend": "offline", "ground.backend": "annotations",
        "edit.remove_backend": "opencv", "edit.background_backend": "replace"}
    # the offline backends load no model: no default model id of a backend that did not run
    for rows in (probe_rows, full_rows):
        assert not any(k.endswith(("_id", ".model", "chat_model")) for k in rows), rows
        assert not any(m in " ".join(rows.values()) for m in ("git-large-coco", "grounding-dino", "gpt-4o",
                                                              "stable-diffusion", "instruct-pix2pix"))
    # step 5's generator appears only in the run that generated images
    assert "generate.backend" not in probe_rows and full_rows["generate.backend"] == "offline"


def test_used_models_follow_the_chosen_backends():
    from aspire.config import load_config

    cfg = load_config(None, {"caption": {"backend": "transformers"}, "ground": {"backend": "transformers"},
                             "edit": {"remove_backend": "sd-inpaint"}, "generate": {"backend": "textual-inversion"}})
    used = dict(cfg.used_models(generated=True))
    assert used["caption.model_id"] == cfg.caption.model_id and used["ground.segmenter_id"] == cfg.ground.segmenter_id
    assert used["edit.inpaint_model_id"] == cfg.edit.inpaint_model_id and used["generate.model_id"] == cfg.generate.model_id
    assert "edit.pix2pix_model_id" not in used and "phrases.model" not in used
    assert "generate.backend" not in dict(cfg.used_models(generated=False))


def test_evidence_names_the_donor_and_collapses_unconfirmed_findings(report_runs, full_report):
    html = full_report["html"].read_text(encoding="utf-8")
    shown = json.loads(full_report["json"].read_text())
    store = RunStore(report_runs["full"])
    edits = {e.edit_id: e for e in store.all("edit", Edit)}
    store.close()
    # every background change from another image names that image, as its edit recorded it
    swaps = [edits[e["edit_id"]] for f in shown["findings"] for e in f["examples"]
             if edits[e["edit_id"]].kind == "background"]
    assert swaps, "the test world has no background example"
    for edit in swaps:
        assert edit.donor and edit.donor != edit.image and edit.donor_background
        assert f"background from <code>{edit.donor} ({edit.donor_background})</code>" in html
    # a finding's evidence is open when it is spurious, collapsed to its summary line otherwise
    galleries = re.findall(r'<details class="finding" id="gallery-[^"]*"( open)?>\s*<summary><h3>([^<]*)<', html)
    spurious = {f"{f['class']}: {f['phrase']} " for f in shown["findings"] if f["spurious"]}
    assert galleries and any(o for o, _ in galleries) and any(not o for o, _ in galleries)
    assert all(bool(opened) == (title in spurious) for opened, title in galleries)

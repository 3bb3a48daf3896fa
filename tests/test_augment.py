"""aspire augment (step 5): selection from a real probe run, offline generation, filter, atomic commit with
a verifiable manifest, load_augmented / mix_in, and the failure paths. Tiny toy benchmark, real pipeline."""

from __future__ import annotations

import csv
import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from aspire import cli
from aspire.workflows.repair import augment_run, run_config
from aspire.data.augmented import load_augmented, mix_in, verify_manifest
from aspire.errors import AspireError, DataError
from aspire.tools.probe import rank_key
from aspire.schemas import Finding, PhraseSet, Sample
from aspire.store import RunStore
from aspire.tools import lexicon
from cli_main import run_main

pytestmark = pytest.mark.slow
IMAGES = 12  # per class


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny toy-waterbirds (32 px), a smallcnn trained 10 epochs on it, and a finished `aspire probe` run.
    Generation uses every group with a flip (augment.select = flipping), so both classes have edits to use."""
    from aspire.data.formats import load_dataset
    from aspire.data.toy.benchmark import write_benchmark
    from aspire.models.classifier import build_classifier, save_checkpoint
    from aspire.models.train import train_classifier

    root = tmp_path_factory.mktemp("augment")
    write_benchmark("toy-waterbirds", root / "data", seed=0, size_px=32, sizes={"train": 40, "val": 10, "test": 16})
    ds = load_dataset(root / "data")
    clf = build_classifier("smallcnn", ds.class_names, input_size=32, seed=0)
    train_classifier(clf, ds.split("train"), ds.split("val"), epochs=10, batch_size=16, lr=0.05, weight_decay=5e-4,
                     seed=0, augment=False, progress=False)
    save_checkpoint(clf, root / "model.pt")
    (root / "probe.json").write_text(json.dumps({"holdout": {"fraction": 1.0}}))
    result = CliRunner().invoke(cli.app, ["probe", "--data", str(root / "data"), "--model", str(root / "model.pt"),
                                          "--run-dir", str(root / "run"), "--config", str(root / "probe.json")])
    assert result.exit_code == 0, result.output
    (root / "augment.json").write_text(json.dumps({"generate": {"images_per_class": IMAGES},
                                                   "augment": {"select": "flipping"}}))
    return root


def config(root: Path, **augment):
    cfg = run_config(root / "run", root / "augment.json")
    for k, v in augment.items():
        setattr(cfg.augment, k, v)
    return cfg


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_leftovers(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


@pytest.fixture(scope="module")
def reference(run, tmp_path_factory):
    """One committed set (seed 0), to compare re-runs against."""
    out = tmp_path_factory.mktemp("ref") / "aug"
    result = augment_run(run / "run", out, config(run), seed=0, on_message=lambda m: None)
    return out, result


# ---------------------------------------------------------------- the CLI end to end
def test_cli_augment_end_to_end(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "aug"
    code, stdout, stderr = run_main(monkeypatch, capsys, "augment", "--run-dir", str(run / "run"), "--out", str(out),
                                "--config", str(run / "augment.json"), "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    store = RunStore(run / "run")
    names = ["landbird", "waterbird"]
    assert result["per_class"] == {n: IMAGES for n in names} and result["n_images"] == 2 * IMAGES
    assert result["generator"]["name"] == "offline-recombination" and not result["skipped"]
    # a dataset in the waterbirds format: train split, synthetic, the classifier's classes
    rows = list(csv.DictReader((out / "metadata.csv").open()))
    assert list(rows[0]) == ["img_filename", "y", "split", "synthetic"]
    assert {r["split"] for r in rows} == {"0"} and {r["synthetic"] for r in rows} == {"1"}
    assert (out / "classes.txt").read_text().split() == names
    samples = load_augmented(out, class_names=names)
    assert len(samples) == 2 * IMAGES and all(s.synthetic and s.split == "train" and s.attr is None for s in samples)
    assert sorted({s.y for s in samples}) == [0, 1]
    # the manifest: every image with its sources, edits, generator, seed and hash; edits are flipped ones
    manifest = verify_manifest(out)
    flipped = {e for f in store.all("finding", Finding) for e in f.flipped_edits}
    for img in manifest["images"]:
        assert img["edits"] and set(img["edits"]) <= flipped
        assert img["sources"][0].startswith("images/train/") and img["generator"] == "offline-recombination"
        assert isinstance(img["seed"], int) and len(img["sha256"]) == 64
    assert store.get_meta("augmented") == {"dir": str(out), "n_images": 2 * IMAGES, "per_class": result["per_class"],
                                           "manifest": str(out / "manifest.json"), "generator": result["generator"]}
    # human output; and the same commit again is verified and reused, not rewritten
    code, stdout, _ = run_main(monkeypatch, capsys, "augment", "--run-dir", str(run / "run"), "--out", str(out),
                           "--config", str(run / "augment.json"))
    assert code == 0 and "already committed" in stdout and "landbird" in stdout


def test_donor_backgrounds_lack_the_class_spurious_phrases(reference, run):
    out, _ = reference
    manifest = verify_manifest(out)
    from aspire.data.annotations import read_annotations
    from aspire.data.formats import load_dataset

    store = RunStore(run / "run")
    phrases = {p.image: [*p.foreground, *p.background] for p in store.all("phrases", PhraseSet) if p.background}
    annotations = read_annotations(run / "data" / "annotations.jsonl")
    annotated = {k: [r.phrase for r in a.regions] for k, a in annotations.items()}
    split = {s.image: s.split for s in load_dataset(run / "data").samples}
    donors = 0
    for img in manifest["images"]:
        donor = img["donor"]
        if donor is None:
            continue
        donors += 1
        assert split[donor] == "train"  # never a validation or test image
        avoid = manifest["selection"][img["class"]]["avoid"]
        shown = phrases.get(donor) or annotated[donor]
        assert any(lexicon.scene_category(p) for p in shown)  # a known background
        for a in avoid:
            for p in shown:
                assert not lexicon.same_phrase(p, a)
                assert lexicon.scene_category(p) is None or lexicon.scene_category(p) != lexicon.scene_category(a)
    assert donors == len(manifest["images"])


# ---------------------------------------------------------------- idempotence and atomic commits
def test_same_inputs_and_seed_give_byte_identical_sets(reference, run, tmp_path):
    ref, _ = reference
    again = augment_run(run / "run", tmp_path / "again", config(run), seed=0, on_message=lambda m: None)
    assert files(tmp_path / "again") == files(ref) and not again.reused
    other = augment_run(run / "run", tmp_path / "other", config(run), seed=1, on_message=lambda m: None)
    assert other.n_images == again.n_images and files(tmp_path / "other") != files(ref)


def test_an_existing_output_is_never_overwritten(reference, run, monkeypatch, capsys):
    ref, _ = reference
    before = files(ref)
    code, stdout, stderr = run_main(monkeypatch, capsys, "augment", "--run-dir", str(run / "run"), "--out", str(ref),
                                "--config", str(run / "augment.json"), "--seed", "7")
    assert code == 1 and stdout == ""
    assert stderr.strip().count("\n") == 0 and "already exists" in stderr and "never overwrites" in stderr
    assert files(ref) == before


def test_a_commit_killed_midway_leaves_nothing_and_reruns_to_the_same_set(reference, run, tmp_path, monkeypatch):
    import aspire.workflows.repair as augment

    ref, _ = reference
    out = tmp_path / "aug"

    def crash(*a, **k):
        raise RuntimeError("killed while writing the manifest")

    with monkeypatch.context() as m:
        m.setattr(augment, "write_set_files", crash)
        with pytest.raises(RuntimeError, match="killed"):
            augment_run(run / "run", out, config(run), seed=0, on_message=lambda m: None)
    assert no_leftovers(out)
    # a temporary folder left by a SIGKILLed commit is removed by the next commit
    stale = tmp_path / ".aug.abc123.tmp"
    (stale / "synthetic").mkdir(parents=True)
    augment_run(run / "run", out, config(run), seed=0, on_message=lambda m: None)
    assert not stale.exists() and files(out) == files(ref)


@pytest.mark.parametrize("error, message", [(errno.ENOSPC, "no space left on device"),
                                            (errno.EACCES, "permission denied")])
def test_disk_full_or_permission_denied_leaves_nothing_and_one_line(run, tmp_path, monkeypatch, capsys, error,
                                                                      message):
    import aspire.workflows.repair as augment

    calls = []
    real = augment._write_file

    def failing(path, data):
        calls.append(path)
        if len(calls) == 3:  # after two images were written
            exc = PermissionError if error == errno.EACCES else OSError
            raise exc(error, "simulated", str(path))
        real(path, data)

    monkeypatch.setattr(augment, "_write_file", failing)
    out = tmp_path / "aug"
    code, stdout, stderr = run_main(monkeypatch, capsys, "augment", "--run-dir", str(run / "run"), "--out", str(out),
                                "--config", str(run / "augment.json"))
    assert code == 1 and message in stderr and "Traceback" not in stderr
    assert len([ln for ln in stderr.splitlines() if ln.startswith("error:")]) == 1
    assert no_leftovers(out) and len(calls) == 3


# ---------------------------------------------------------------- manifest, load_augmented, mix_in
def test_tampered_missing_or_extra_files_fail_verification(reference, tmp_path):
    ref, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(ref, copy)
    verify_manifest(copy)
    image = next((copy / "synthetic").rglob("*.png"))
    original = image.read_bytes()
    image.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(DataError, match="sha256 differs"):
        verify_manifest(copy)
    with pytest.raises(DataError, match="sha256 differs"):
        load_augmented(copy)
    image.write_bytes(original)
    (copy / "synthetic" / "extra.png").write_bytes(original)
    with pytest.raises(DataError, match="not listed"):
        verify_manifest(copy)
    (copy / "synthetic" / "extra.png").unlink()
    (copy / "classes.txt").write_text("landbird\nwaterbird\nheron\n")
    with pytest.raises(DataError, match="classes.txt"):
        verify_manifest(copy)
    image.unlink()
    with pytest.raises(DataError, match="missing"):
        verify_manifest(copy)
    with pytest.raises(DataError, match="manifest is missing"):
        verify_manifest(tmp_path)


def test_load_augmented_checks_the_classes(reference):
    ref, _ = reference
    with pytest.raises(DataError, match="differ from the training data"):
        load_augmented(ref, class_names=["cat", "dog"])


def test_mix_in(reference, run):
    from aspire.data.formats import load_dataset

    ref, _ = reference
    train = load_dataset(run / "data").split("train")
    augmented = load_augmented(ref)
    assert mix_in(train, augmented) == train + augmented  # None: all
    half = mix_in(train, augmented, ratio=0.1, seed=3)
    added = half[len(train):]
    assert half[:len(train)] == train and len(added) == round(0.1 * len(train))
    assert added == [s for s in augmented if s in added]  # in the set's order
    assert mix_in(train, augmented, ratio=0.1, seed=3) == half and mix_in(train, augmented, ratio=0.1, seed=4) != half
    assert len(mix_in(train, augmented, ratio=10.0)) == len(train) + len(augmented)  # capped, no repeats
    with pytest.raises(DataError, match="ratio"):
        mix_in(train, augmented, ratio=0)
    with pytest.raises(DataError, match="mixed in twice"):
        mix_in(train + augmented, augmented)
    bad = [Sample(image="x.png", path="/nowhere/x.png", y=5, split="train", synthetic=True)]
    with pytest.raises(DataError, match="not a training label"):
        mix_in(train, bad)


# ---------------------------------------------------------------- selection, skipped classes, filter
def test_a_class_without_flipped_edits_is_skipped_and_the_others_go_on(run, tmp_path):
    store = RunStore(run / "run")
    landbird = next(f for f in store.all("finding", Finding) if f.class_index == 0 and f.flips)
    messages = []
    result = augment_run(run / "run", tmp_path / "aug", config(run), seed=0, groups=[landbird.key],
                         on_message=messages.append)
    assert result.per_class == {"landbird": IMAGES} and list(result.skipped) == ["waterbird"]
    assert "none of the chosen phrase groups" in result.skipped["waterbird"]
    assert any("'waterbird' skipped" in m for m in messages)
    assert verify_manifest(tmp_path / "aug")["skipped"] == result.skipped
    # no class left: a one-line error, nothing written
    with pytest.raises(AspireError, match="no class has flipped edits"):
        augment_run(run / "run", tmp_path / "none", config(run), seed=0, groups=[], on_message=messages.append)
    assert no_leftovers(tmp_path / "none")


def test_select_modes_and_the_edit_limit(run):
    from aspire.workflows.repair import select_edits

    store = RunStore(run / "run")
    findings = store.all("finding", Finding)
    names = ["landbird", "waterbird"]
    for mode, rule in (("spurious", lambda f: f.spurious), ("flipping", lambda f: bool(f.flipped_edits)),
                       ("significant", lambda f: f.q_value < 0.05)):
        cfg = config(run, select=mode)
        cfg.probe.max_edits_per_class = 3
        selections, skipped = select_edits(store, names, [0, 1], cfg)
        for y, name in enumerate(names):
            qualifying = [f for f in findings if f.class_index == y and rule(f) and f.evidence_edits]
            sel = next((s for s in selections if s.class_index == y), None)
            if not qualifying:  # skipped, with the rule in the reason
                assert sel is None and f"augment.select = {mode}" in skipped[name]
                continue
            strongest = min(qualifying, key=rank_key)
            assert sel.groups[0] == strongest.phrase and set(sel.groups) <= {f.phrase for f in qualifying}
            assert len(sel.edits) == min(3, len({e for f in qualifying for e in f.evidence_edits}))
            # flipped edits first, then those with the largest paired drop
            assert [e.edit_id for e in sel.edits] == strongest.evidence_edits[:3]
            assert all(not e.control for e in sel.edits)
            assert {f.phrase for f in sel.avoid} >= {f.phrase for f in findings if f.class_index == y and f.spurious}


def test_filter_drops_near_duplicates_and_reports_them(run, tmp_path, monkeypatch):
    # a near-duplicate threshold at its maximum keeps one image per class; the set still verifies
    strict = augment_run(run / "run", tmp_path / "dup", config(run, filter=True, duplicate_rms=1.0, outlier_std=1e6),
                         seed=0, on_message=lambda m: None)
    assert strict.per_class == {"landbird": 1, "waterbird": 1}
    assert strict.dropped == {n: {"near_duplicate": IMAGES - 1, "far_from_class": 0} for n in strict.per_class}
    manifest = verify_manifest(tmp_path / "dup")
    assert len(manifest["images"]) == 2 == len(load_augmented(tmp_path / "dup"))

    # a filter that drops every image: an error that says what to loosen, and nothing committed
    def drop_all(rows, *args):
        return [], {"near_duplicate": 0, "far_from_class": len(rows)}, {}

    monkeypatch.setattr("aspire.workflows.repair.filter_generated", drop_all)
    with pytest.raises(DataError, match="dropped every generated image.*outlier_std"):
        augment_run(run / "run", tmp_path / "none", config(run, filter=True), seed=0, on_message=lambda m: None)
    assert no_leftovers(tmp_path / "none")


class MeanColour:
    """A classifier stand-in whose feature is the image's mean colour (for the far-from-class filter)."""

    def eval(self):
        return self

    def preprocess(self, images):
        import torch

        return torch.tensor(np.array([np.asarray(im, dtype=np.float32).mean((0, 1)) for im in images]))

    def features(self, x):
        return x


def test_far_filter_drops_exactly_the_images_beyond_the_limit(tmp_path):
    from aspire.workflows.repair import filter_generated
    from aspire.config import AspireConfig

    def save(name: str, level: int) -> Path:
        path = tmp_path / name
        Image.fromarray(np.full((8, 8, 3), level, np.uint8)).save(path)
        return path

    real = [Sample(image=f"r{i}.png", path=str(save(f"r{i}.png", level)), y=0, split="train")
            for i, level in enumerate([90, 100, 110, 120])]       # centroid 105; distances 15√3, 5√3, 5√3, 15√3
    levels = [105, 112, 150, 60, 98]                               # distances 0, 7√3, 45√3, 45√3, 7√3
    rows = [{"img_filename": save(f"g{i}.png", v).name} for i, v in enumerate(levels)]
    cfg = AspireConfig()
    cfg.augment.duplicate_rms, cfg.augment.outlier_std = 0.0, 1.0   # limit: (10 + 5) √3
    kept, dropped, info = filter_generated(rows, tmp_path, real, MeanColour(), cfg, seed=0)
    assert [r["img_filename"] for r in kept] == ["g0.png", "g1.png", "g4.png"]
    assert dropped == {"near_duplicate": 0, "far_from_class": 2}
    assert info["distance_limit"] == pytest.approx(15 * np.sqrt(3)) and info["reference_images"] == 4


def test_bad_runs(run, tmp_path):
    from aspire.errors import ConfigError

    for inside in ("", "edits", "augmented/x"):   # only RUN/augmented itself (the audit's set) is allowed inside
        with pytest.raises(ConfigError, match=r"--out must be outside the run folder .* \(or its augmented/\)"):
            augment_run(run / "run", run / "run" / inside)
    with pytest.raises(DataError, match="not a run folder"):
        augment_run(tmp_path / "nothing", tmp_path / "aug")
    assert not (tmp_path / "nothing").exists()
    empty = RunStore(tmp_path / "empty")
    empty.set_meta("args", {"data": str(run / "data"), "format": "waterbirds", "model": str(run / "model.pt")})
    with pytest.raises(DataError, match="no findings"):
        augment_run(tmp_path / "empty", tmp_path / "aug")


def test_textual_inversion_backend_commits_tokens_and_prompts(run, tmp_path):
    from tiny_diffusers import build_tiny_sd

    sd = build_tiny_sd(tmp_path / "sd")
    cfg = config(run)
    cfg.generate = cfg.generate.model_copy(update=dict(
        backend="textual-inversion", model_id=str(sd), train_steps=2, train_batch_size=2, resolution_px=32,
        seeds=[0], images_per_seed=2, num_inference_steps=2, batch_size=2, device="cpu"))
    result = augment_run(run / "run", tmp_path / "aug", cfg, seed=0, on_message=lambda m: None)
    assert result.per_class == {"landbird": 2, "waterbird": 2}
    manifest = verify_manifest(tmp_path / "aug")
    tokens = sorted(p.name for p in (tmp_path / "aug" / "tokens").iterdir())
    assert len(tokens) == 2 and all(f"tokens/{t}" in manifest["files"] for t in tokens)
    img = manifest["images"][0]
    assert img["token"] == "<landbird-s0>" and img["prompt"] == "a photo of a <landbird-s0>"
    assert img["model_id"] == str(sd) and img["embedding_file"] in tokens and img["generator"] == "textual-inversion"
    assert manifest["generator"]["model_id"] == str(sd) and manifest["generator"]["train_steps"] == 2
    assert all(s.synthetic for s in load_augmented(tmp_path / "aug"))
    assert np.asarray(Image.open(tmp_path / "aug" / img["img_filename"])).shape == (32, 32, 3)


def test_read_only_parent_folder_is_one_line_permission_denied(run, tmp_path, monkeypatch, capsys):
    import os

    if os.geteuid() == 0:
        pytest.skip("running as root: chmod does not make a folder read-only (the simulated EACCES test covers it)")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code, _, stderr = run_main(monkeypatch, capsys, "augment", "--run-dir", str(run / "run"), "--out",
                               str(parent / "aug"), "--config", str(run / "augment.json"))
    finally:
        parent.chmod(0o755)
    assert code == 1 and "permission denied" in stderr and not list(parent.iterdir())


# ---------------------------------------------------------------- generic augmentation (the baseline)
def test_generic_set_has_the_aspire_count_from_holdout_images_on_unfiltered_backgrounds(reference, run, tmp_path):
    from aspire.workflows.repair.sources import mentions
    from aspire.data.annotations import read_annotations
    from aspire.data.formats import load_dataset

    _, aspire = reference
    store = RunStore(run / "run")
    before = store.get_meta("augmented")
    out = tmp_path / "generic"
    result = augment_run(run / "run", out, config(run, select="generic"), seed=0, counts=aspire.per_class,
                         on_message=lambda m: None)
    # the same images per class as the aspire set
    assert result.per_class == aspire.per_class and result.n_images == aspire.n_images and not result.skipped
    manifest = verify_manifest(out)
    assert manifest["select"] == "generic" and len(load_augmented(out)) == aspire.n_images
    # sources: the class's hold-out images, unedited; no phrase group targeted, nothing avoided
    samples = {s.image: s for s in load_dataset(run / "data").samples}
    holdout = set(store.get_meta("holdout"))
    for name, sel in manifest["selection"].items():
        assert sel["groups"] == [] and sel["edits"] == [] and sel["avoid"] == []
        assert sel["originals"] and set(sel["originals"]) <= holdout
        assert {samples[k].y for k in sel["originals"]} == {manifest["classes"].index(name)}
    # backgrounds: the class's own training images, not filtered: they show what the aspire set avoided
    findings = {(f.class_index, f.phrase): f for f in store.all("finding", Finding)}
    annotated = {k: [r.phrase for r in a.regions] for k, a in read_annotations(run / "data" / "annotations.jsonl").items()}
    aspire_avoid = verify_manifest(reference[0])["selection"]
    shows_avoided = 0
    for img in manifest["images"]:
        assert img["edits"] == [] and img["sources"][0] in manifest["selection"][img["class"]]["originals"]
        donor = img["donor"]
        assert donor is not None and samples[donor].split == "train" and samples[donor].y == img["y"]
        avoid = [findings[(img["y"], p)] for p in aspire_avoid[img["class"]]["avoid"]]
        shows_avoided += any(mentions(p, avoid, 0.8) for p in annotated[donor])
    assert shows_avoided > 0
    # recorded beside the method's set, not over it
    assert store.get_meta("augmented") == before
    assert store.get_meta("augmented-generic")["dir"] == str(out)
    # deterministic: the same inputs give the same bytes; another seed another set of the same size
    again = augment_run(run / "run", tmp_path / "again", config(run, select="generic"), seed=0,
                        counts=aspire.per_class, on_message=lambda m: None)
    assert files(tmp_path / "again") == files(out) and not again.reused
    other = augment_run(run / "run", tmp_path / "other", config(run, select="generic"), seed=1,
                        counts=aspire.per_class, on_message=lambda m: None)
    assert other.per_class == result.per_class and files(tmp_path / "other") != files(out)


def test_counts_cap_and_skip_classes(run, tmp_path):
    from aspire.workflows.repair import select_edits
    from aspire.errors import ConfigError

    result = augment_run(run / "run", tmp_path / "aug", config(run), seed=0, counts={"landbird": 5},
                         on_message=lambda m: None)
    assert result.per_class == {"landbird": 5} and "counts" in result.skipped["waterbird"]
    with pytest.raises(ConfigError, match="unknown class 'heron'"):
        augment_run(run / "run", tmp_path / "bad", config(run), seed=0, counts={"heron": 5})
    assert no_leftovers(tmp_path / "bad")
    with pytest.raises(ConfigError, match="generic"):
        select_edits(RunStore(run / "run"), ["landbird", "waterbird"], [0, 1], config(run, select="generic"))


@pytest.mark.parametrize("backend", ["offline", "textual-inversion"])
def test_one_stage_of_models_at_a_time_with_the_callers_classifier(run, tmp_path, monkeypatch, backend):
    """The agent's pipeline is reused (its classifier not loaded again). Offline generation: the editor's Stable
    Diffusion inpainting (the class's backgrounds) is gone, collected, before the class's images are generated.
    Textual inversion: the generator's models are released before the next class."""
    import weakref

    from tiny_diffusers import build_tiny_sd, build_tiny_sd_inpaint

    from aspire.tools.generate import Generator
    from aspire.workflows import repair
    from aspire.workflows.probe import ProbePipeline
    from aspire.workflows.runs import load_inputs, recorded_args

    cfg = config(run)
    if backend == "offline":
        cfg.generate.images_per_class, cfg.generate.max_backgrounds = 1, 2
        cfg.edit = cfg.edit.model_copy(update=dict(remove_backend="sd-inpaint", num_inference_steps=1, device="cpu",
                                                   inpaint_model_id=str(build_tiny_sd_inpaint(tmp_path / "inpaint"))))
    else:
        cfg.generate = cfg.generate.model_copy(update=dict(
            backend=backend, model_id=str(build_tiny_sd(tmp_path / "sd")), train_steps=1, train_batch_size=2,
            resolution_px=32, seeds=[0], images_per_seed=1, num_inference_steps=1, batch_size=1, device="cpu"))
    store = RunStore(run / "run")
    args = recorded_args(store)
    pipeline = ProbePipeline(*load_inputs(args), cfg, store, classes=args.classes, seed=args.seed)
    monkeypatch.setattr(repair, "load_inputs", lambda *a, **k: pytest.fail("the classifier was loaded again"))
    seen, generators, unets = [], [], []
    real_job, real_generate = repair.Sources.job, Generator.generate

    def job(self, sel, notes):
        out = real_job(self, sel, notes)
        inpaint = pipeline.tool("editor").models._inpaint_pipe
        if inpaint is not None:
            unets.append(weakref.ref(inpaint.unet))
        seen.append(("backgrounds", pipeline.resident(), [g.resident for g in generators]))
        return out

    def generate(self, job, work=None):
        generators.append(self)
        seen.append(("generate", pipeline.resident(), [u() is None for u in unets]))
        yield from real_generate(self, job, work)

    monkeypatch.setattr(repair.Sources, "job", job)
    monkeypatch.setattr(Generator, "generate", generate)
    result = augment_run(run / "run", tmp_path / "aug", cfg, seed=0, on_message=lambda m: None, pipeline=pipeline)
    assert result.per_class == {"landbird": 1, "waterbird": 1}
    if backend == "offline":   # the inpainting UNet is collected before each class's generation
        assert seen == [("backgrounds", ["editor"], []), ("generate", [], [True]),
                        ("backgrounds", ["editor"], [False]), ("generate", [], [True, True])]
    else:                      # nothing is inpainted; Stable Diffusion is released after each class
        assert seen == [("backgrounds", [], []), ("generate", [], []),
                        ("backgrounds", [], [False]), ("generate", [], [])]
    assert pipeline.resident() == [] and not any(g.resident for g in generators)

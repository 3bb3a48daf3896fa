"""Bad input, case by case through the console script's real path: each is refused with exit code 1 (2 for a
usage error) and one line naming the file, line, column, setting or value, and leaves no file behind: no run
folder, nothing in the dataset, nothing in the working folder."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
from PIL import Image

from cli_main import run_main
from test_pipeline import make_world


@dataclass
class Case:
    name: str
    argv: str                      # {data}, {model}, {three} (a 3-class checkpoint), {tmp} are filled in
    fragment: str                  # in the one-line error ({data}, {tmp} filled in too)
    broken: Optional[Callable[[Path, Path], None]] = None   # (data copy, tmp): break the inputs
    code: int = 1


def _sed(rel: str, old: str, new: str, line: Optional[int] = None) -> Callable[[Path, Path], None]:
    def edit(data: Path, tmp: Path) -> None:
        lines = (data / rel).read_text().splitlines()
        for i, text in enumerate(lines):
            if line is None or i == line - 1:
                lines[i] = text.replace(old, new, 1)
        (data / rel).write_text("\n".join(lines) + "\n")
    return edit


def _write(rel: str, text: str, under: str = "tmp") -> Callable[[Path, Path], None]:
    def write(data: Path, tmp: Path) -> None:
        path = (tmp if under == "tmp" else data) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return write


def _repeat_row(data: Path, tmp: Path) -> None:
    lines = (data / "metadata.csv").read_text().splitlines()
    (data / "metadata.csv").write_text("\n".join(lines + [lines[1]]) + "\n")


def _delete(rel: str) -> Callable[[Path, Path], None]:
    return lambda data, tmp: (data / rel).unlink()


PROBE = "probe --data {data} --model {model}"
CASES = [
    # the dataset
    Case("no data folder", "probe --data {tmp}/nothing --model {model}", "{tmp}/nothing: dataset folder does not exist"),
    Case("column missing", PROBE, "required column 'img_filename' is missing",
         _sed("metadata.csv", "img_filename", "image", line=1)),
    Case("label not a number", PROBE, "{data}/metadata.csv:2: column 'y' has non-integer value 'abc'",
         _sed("metadata.csv", ",0,0", ",abc,0", line=2)),
    Case("unknown split", PROBE, "{data}/metadata.csv:2: column 'split' has value 7",
         _sed("metadata.csv", ",0,0", ",0,7", line=2)),
    Case("image file missing", PROBE, "{data}/images/000.png: image file is missing", _delete("images/000.png")),
    Case("row repeated", PROBE, "repeats 'images/000.png' (first on line 2)", _repeat_row),
    Case("fewer class names than labels", PROBE, "label 1 out of range: {data}/classes.txt names 1 classes",
         _write("classes.txt", "gizmo\n", under="data")),
    Case("celeba files missing", "probe --data {data} --format celeba --model {model}",
         "{data}/list_attr_celeba.csv: file is missing"),
    Case("a class without training images", "train --data {data} --arch smallcnn --out {tmp}/m.pt",
         "{data}: class 'sprocket' has no training images", _write("classes.txt", "gizmo\nwidget\nsprocket\n", under="data")),
    Case("not an image folder dataset", "probe --data {tmp}/empty --format imagefolder --model {model}",
         "no split folders", broken=lambda data, tmp: (tmp / "empty").mkdir()),
    Case("unknown format", "probe --data {data} --format parquet --model {model}", "'parquet' is not one of", code=2),
    # the classifier
    Case("checkpoint missing", "probe --data {data} --model {tmp}/none.pt", "{tmp}/none.pt: checkpoint file is missing"),
    Case("checkpoint not a checkpoint", "probe --data {data} --model {tmp}/junk.pt", "{tmp}/junk.pt: not a readable checkpoint",
         _write("junk.pt", "junk")),
    Case("checkpoint of other classes", "probe --data {data} --model {three}", "has 3 classes (a, b, c) but"),
    Case("eval with other classes", "eval --data {data} --model {three}", "has 3 classes (a, b, c) but"),
    Case("unknown --classes", PROBE + " --classes sprocket", "unknown class 'sprocket'"),
    Case("label objects of an unknown class in a batch",
         "batch --data {data} --model {model} --config {tmp}/lo.toml --out {tmp}/b",
         "probe.label_objects names 'sprocket'", _write("lo.toml", '[probe]\nlabel_objects = { sprocket = ["cog"] }\n')),
    Case("unknown --classes in a batch", "batch --data {data} --model {model} --classes sprocket --out {tmp}/b",
         "unknown class 'sprocket'"),
    # annotations
    Case("annotations line not JSON", PROBE, "{data}/annotations.jsonl:1: invalid JSON",
         _sed("annotations.jsonl", '{"image"', '{oops', line=1)),
    Case("annotations line without image", PROBE, "{data}/annotations.jsonl:1: field 'image' is missing",
         _sed("annotations.jsonl", '"image"', '"img"', line=1)),
    Case("annotated mask missing", PROBE, "{data}/annotations.jsonl:1: mask file {data}/masks/000_gizmo.png is missing",
         _delete("masks/000_gizmo.png")),
    # settings
    Case("config file missing", PROBE + " --config {tmp}/none.toml", "{tmp}/none.toml: config file is missing"),
    Case("config not TOML", PROBE + " --config {tmp}/bad.toml", "{tmp}/bad.toml: invalid config file",
         _write("bad.toml", "[ground\nx = 1\n")),
    Case("config key misspelt", PROBE + " --config {tmp}/typo.toml", "setting ground.box_treshold: Extra inputs",
         _write("typo.toml", "[ground]\nbox_treshold = 0.3\n")),
    Case("config value out of range", PROBE + " --config {tmp}/range.toml",
         "setting ground.box_threshold: Input should be less than or equal to 1 (got 2)",
         _write("range.toml", "[ground]\nbox_threshold = 2\n")),
    Case("device not a device", PROBE + " --device tpu9", "--device 'tpu9': not a device name"),
    # run folders
    Case("run folder is a file", PROBE + " --run-dir {tmp}/afile", "{tmp}/afile: is a file, not a run folder",
         _write("afile", "x")),
    Case("run folder holds the user's files", PROBE + " --run-dir {tmp}/mine", "{tmp}/mine: exists and is not a run folder",
         _write("mine/thesis.tex", "my thesis")),
    Case("run folder is the dataset", PROBE + " --run-dir {data}", "{data}: exists and is not a run folder"),
    Case("resume a folder that is no run", "audit --resume {tmp}/mine", "{tmp}/mine: not a run folder",
         _write("mine/thesis.tex", "my thesis")),
    Case("resume with other inputs", "audit --resume {tmp}/mine --data {data}", "leave out --data, --model and --run-dir"),
    Case("audit without a model", "audit --data {data}", "aspire audit needs --data DIR and --model MODEL.pt"),
    Case("report of no run", "report --run-dir {tmp}/mine", "{tmp}/mine: not a run folder",
         _write("mine/thesis.tex", "my thesis")),
    Case("reprobe of no run", "reprobe --run-dir {tmp}/mine --model {model}", "{tmp}/mine: not a run folder",
         _write("mine/thesis.tex", "my thesis")),
    Case("chat on no run", "chat --run-dir {tmp}/mine", "{tmp}/mine: not a run folder", _write("mine/thesis.tex", "x")),
    # other commands
    Case("train into a path under a file", "train --data {data} --arch smallcnn --epochs 1 --out {tmp}/afile/m.pt",
         "{tmp}/afile/m.pt: cannot be written: {tmp}/afile is a file", _write("afile", "x")),
    Case("train into a folder", "train --data {data} --arch smallcnn --epochs 1 --out {tmp}/folder",
         "{tmp}/folder: is a folder", lambda data, tmp: (tmp / "folder").mkdir()),
    Case("train on an image too small for the classifier", "train --data {data} --arch smallcnn --epochs 1 --out {tmp}/m.pt",
         "{data}/images/000.png: image 2x2 is too small for the classifier: each side must be at least 32 px",
         lambda data, tmp: Image.new("RGB", (2, 2)).save(data / "images" / "000.png")),
    Case("evaluate an image too small for the classifier", "eval --data {data} --model {model}",
         "{data}/images/000.png: image 2x2 is too small for the classifier: each side must be at least 16 px",
         lambda data, tmp: Image.new("RGB", (2, 2)).save(data / "images" / "000.png")),
    Case("unknown split to evaluate", "eval --data {data} --model {model} --split holdout", "'holdout' is not one of",
         code=2),
    Case("reliance without counterfactuals", "reliance --data {data} --model {model}",
         "{data}/counterfactuals.csv: counterfactuals file is missing"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A small annotated world and two real (untrained) checkpoints: its classes, and three others."""
    from aspire.data.formats import load_dataset
    from aspire.models.classifier import build_classifier, save_checkpoint

    root = tmp_path_factory.mktemp("bad-inputs")
    world = make_world(root / "world", n_per_class=4)
    names = load_dataset(world).class_names
    save_checkpoint(build_classifier("smallcnn", names, input_size=32, seed=0), root / "model.pt")
    save_checkpoint(build_classifier("smallcnn", ["a", "b", "c"], input_size=32, seed=0), root / "three.pt")
    return root


def _files(*roots: Path) -> set[Path]:
    return {p for root in roots for p in root.rglob("*")}


def test_there_are_enough_cases():
    assert len(CASES) >= 25 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, inputs, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    shutil.copytree(inputs / "world", data)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    if case.broken is not None:
        case.broken(data, tmp)
    cwd = tmp_path / "cwd"      # where a default ./runs/... would go
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for key in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    fill = {"data": str(data), "model": str(inputs / "model.pt"), "three": str(inputs / "three.pt"), "tmp": str(tmp)}
    before = _files(data, tmp, cwd, inputs)
    code, out, err = run_main(monkeypatch, capsys, *case.argv.format(**fill).split())
    assert code == case.code, (code, err[-1500:])
    assert case.fragment.format(**fill) in " ".join(err.split()), err[-1500:]
    if code == 1:   # a user error: exactly one line, no traceback
        assert err.strip().count("\n") == 0 and err.startswith("error: "), err[-1500:]
    assert _files(data, tmp, cwd, inputs) == before          # nothing written anywhere

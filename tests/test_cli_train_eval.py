"""`aspire train` and `aspire eval`: CliRunner for the happy path, main() for exit codes and one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from aspire import cli
from cli_main import run_main


def write_waterbirds(root: Path, n: int = 48, size: int = 32) -> Path:
    """Separable two-class data in the waterbirds format (class = colour of a central square)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["img_filename,y,split,place"]
    for i in range(n):
        y, place = i % 2, (i % 2 if i % 8 < 6 else 1 - i % 2)
        img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        img[..., 1 + place] += 80
        img[size // 4:3 * size // 4, size // 4:3 * size // 4] = (230, 40, 40) if y else (40, 40, 230)
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,{y},{0 if i < n // 2 else (1 if i < 3 * n // 4 else 2)},{place}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("landbird\nwaterbird\n")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = write_waterbirds(root / "ds")
    runner = CliRunner()
    result = runner.invoke(cli.app, ["train", "--data", str(data), "--arch", "smallcnn", "--out",
                                     str(root / "model.pt"), "--epochs", "3", "--batch-size", "8",
                                     "--input-size", "32", "--seed", "1", "--json"])
    assert result.exit_code == 0, result.output
    return data, root / "model.pt", json.loads(result.stdout)


def test_train_json_then_eval_json(trained):
    data, model, train_out = trained
    assert Path(train_out["checkpoint"]) == model.resolve() and model.is_file()
    assert train_out["arch"] == "smallcnn" and train_out["epochs"] == 3 and len(train_out["history"]) == 3
    assert train_out["val"]["n"] == 12 and {g["key"] for g in train_out["val"]["groups"]} == {
        "y=landbird,place=0", "y=landbird,place=1", "y=waterbird,place=0", "y=waterbird,place=1"}

    result = CliRunner().invoke(cli.app, ["eval", "--data", str(data), "--model", str(model), "--json"])
    assert result.exit_code == 0, result.output
    ev = json.loads(result.stdout)
    for key in ("worst_group_accuracy", "average_accuracy", "weighted_average_accuracy", "groups"):
        assert key in ev
    assert ev["split"] == "test" and ev["n"] == 12 and sum(g["n"] for g in ev["groups"]) == 12
    assert all({"key", "n", "accuracy"} <= set(g) for g in ev["groups"])
    assert ev["worst_group_accuracy"] == min(g["accuracy"] for g in ev["groups"])
    weighted = sum(g["train_fraction"] * g["accuracy"] for g in ev["groups"])
    assert ev["weighted_average_accuracy"] == pytest.approx(weighted)
    assert ev["average_accuracy"] >= 0.9  # colour-separable classes


def test_eval_table_and_train_summary(trained, tmp_path, monkeypatch, capsys):
    data, model, _ = trained
    code, out, _ = run_main(monkeypatch, capsys, "train", "--data", str(data), "--arch", "smallcnn", "--out",
                            str(tmp_path / "m.pt"), "--epochs", "1", "--input-size", "32", "--no-crop-flip")
    assert code == 0 and out.startswith("trained smallcnn (erm) on 24 images, 1 epochs")
    assert "validation" in out and "y=landbird,place=0" in out and (tmp_path / "m.pt").is_file()
    code, out, _ = run_main(monkeypatch, capsys, "eval", "--data", str(data), "--model", str(model), "--split", "val")
    assert code == 0
    assert "y=waterbird,place=1" in out and "worst-group accuracy" in out and "weighted average" in out


def test_bad_checkpoint_exits_1_with_one_line(trained, tmp_path, monkeypatch, capsys):
    data, _, _ = trained
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00corrupt")
    code, out, err = run_main(monkeypatch, capsys, "eval", "--data", str(data), "--model", str(bad), "--json")
    assert code == 1 and out == ""
    assert err.strip().count("\n") == 0 and "bad.pt" in err and "not a readable checkpoint" in err


def test_missing_metadata_column_exits_1(trained, tmp_path, monkeypatch, capsys):
    data, model, _ = trained
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metadata.csv").write_text("img_filename,split\nimages/0.png,0\n")
    code, _, err = run_main(monkeypatch, capsys, "train", "--data", str(broken), "--arch", "smallcnn",
                            "--out", str(tmp_path / "m.pt"))
    assert code == 1 and err.strip().count("\n") == 0
    assert "metadata.csv" in err and "'y'" in err
    assert not (tmp_path / "m.pt").exists()


def test_method_errors_and_usage_errors(trained, tmp_path, monkeypatch, capsys):
    data, model, _ = trained
    code, _, err = run_main(monkeypatch, capsys, "train", "--data", str(data), "--arch", "smallcnn",
                            "--out", str(tmp_path / "m.pt"), "--method", "groupdro", "--init", str(model))
    assert code == 1 and "--init is for --method dfr" in err and err.strip().count("\n") == 0
    code, _, err = run_main(monkeypatch, capsys, "train", "--data", str(data), "--arch", "smallcnn",
                            "--out", str(tmp_path / "m.pt"), "--method", "magic")
    assert code == 1 and "unknown --method 'magic'" in err
    usage = CliRunner().invoke(cli.app, ["train", "--data", str(data), "--arch", "vgg", "--out", "m.pt"])
    assert usage.exit_code == 2 and "vgg" in usage.output


def test_cli_arch_choices_match_the_package():
    from typing import get_args

    from aspire.cli.options import ArchName, FormatName
    from aspire.data.formats import FORMATS
    from aspire.models.classifier import ARCHS

    assert get_args(ArchName) == ARCHS and get_args(FormatName) == FORMATS


def test_version_and_devices_this_machine_lacks(trained, monkeypatch, capsys):
    import torch

    from aspire import __version__
    from cli_main import run_main

    code, out, _ = run_main(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip() == f"aspire {__version__}"
    data, model, _ = trained
    for device, message in (("tpu9", "not a device name"), ("cuda:7", "CUDA device")):
        if device.startswith("cuda") and torch.cuda.device_count() > 7:
            continue
        code, _, err = run_main(monkeypatch, capsys, "eval", "--data", str(data), "--model", str(model),
                                "--device", device)
        assert code == 1 and message in err and "Traceback" not in err

"""Atomic writes and typed configuration."""

import json

import pytest

from aspire.atomic import atomic_dir, write_json, write_text
from aspire.config import load_config
from aspire.errors import ConfigError


def test_atomic_write_leaves_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        from aspire.atomic import atomic_path
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_dir_renames_on_success_and_cleans_up_on_failure(tmp_path):
    with atomic_dir(tmp_path / "set") as d:
        write_text(d / "a.txt", "x")
    assert (tmp_path / "set" / "a.txt").read_text() == "x"
    with pytest.raises(ValueError):
        with atomic_dir(tmp_path / "other") as d:
            write_text(d / "a.txt", "x")
            raise ValueError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    with pytest.raises(FileExistsError):
        with atomic_dir(tmp_path / "set"):
            pass


def test_config_precedence_and_validation(tmp_path, monkeypatch):
    cfg_file = tmp_path / "aspire.toml"
    cfg_file.write_text("[ground]\nbox_threshold = 0.4\ntext_threshold = 0.2\n")
    monkeypatch.setenv("ASPIRE_GROUND__TEXT_THRESHOLD", "0.33")
    cfg = load_config(cfg_file, {"probe": {"alpha": 0.01}})
    assert cfg.ground.box_threshold == 0.4
    assert cfg.ground.text_threshold == 0.33
    assert cfg.probe.alpha == 0.01
    assert cfg.edit.instruction == "turn the background of {bg} into {alt}"
    with pytest.raises(ConfigError, match=r"ground.box_threshold"):
        load_config(None, {"ground": {"box_threshold": 2}})
    with pytest.raises(ConfigError, match="missing"):
        load_config(tmp_path / "none.toml")


def test_pixel_dtype_follows_the_first_convolution_not_the_first_parameter():
    import torch

    from aspire.devices import pixel_dtype

    class HalfVisionModel(torch.nn.Module):   # a part kept in float32 comes first, as in BLIP-2 / SAM
        def __init__(self):
            super().__init__()
            self.kept_in_float32 = torch.nn.Parameter(torch.zeros(4))
            self.patch_embed = torch.nn.Conv2d(3, 8, 4).to(torch.float16)

    model = HalfVisionModel()
    assert next(model.parameters()).dtype == torch.float32 and pixel_dtype(model) == torch.float16
    assert pixel_dtype(torch.nn.Linear(2, 2).to(torch.bfloat16)) == torch.bfloat16   # no convolution


def test_deterministic_cudnn_restores_the_flags():
    import torch

    from aspire.devices import deterministic_cudnn

    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    with deterministic_cudnn():
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == before

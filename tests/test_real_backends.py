"""The real backends together, end to end, on tiny random-weight models saved to folders (the boundary we cannot
reach here is the weights, and the LLM server: a loopback one): GIT captions, LLM phrases over HTTP, Stable
Diffusion inpainting and InstructPix2Pix edits, textual inversion + Stable Diffusion, retraining, evaluation
and the report. `aspire probe` killed (kill -9) in the middle of its edits and resumed ends with the same records
as an uninterrupted run; a planted whole-image mask is skipped with its reason.

The probe's grounding is the annotations backend (that is where the whole-image mask is planted); the audit's is
GroundingDINO + SAM. At random weights every query box of the tiny GroundingDINO scores near 1 and SAM's masks spill
over the whole image: kept inside their boxes (`ground.clip_to_box`, the default), they are partial regions an edit
can remove. Those small regions make every phrase an object, so InstructPix2Pix runs in the probe's test only.
With ASPIRE_TEST_DEVICE=cuda both run on the GPU, where every tool's `dtype = "auto"` is half precision."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_main import run_main
from llm_server import LoopbackLLM, structured
from target_device import DEVICE

pytestmark = pytest.mark.slow
PHRASE = "bird feeder"   # named by the LLM for every caption; annotated only in one image, as the whole image
RECORDS = ("caption", "phrases", "propagated", "region", "edit", "probe", "failure")


def answer(body: dict) -> dict:
    """The phrase extractor's structured answer for a request of one caption (captions_per_call = 1)."""
    return structured({"items": [{"index": 0, "foreground": ["boat", "fence", PHRASE], "background": ["water"],
                                  "alt": ["land"]}]})(body)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root, planted, server = build_world(tmp_path_factory.mktemp("real"))
    yield root, planted
    server.__exit__(None, None, None)


def build_world(root: Path) -> tuple[Path, str, LoopbackLLM]:
    """Under `root`: a tiny toy-waterbirds with a planted whole-image mask, its smallcnn, the tiny models and
    config.json selecting them; returns the planted image and the running loopback LLM (exit it when done)."""
    from tiny_caption import build_tiny_git
    from tiny_diffusers import build_tiny_pix2pix, build_tiny_sd, build_tiny_sd_inpaint

    from aspire.data.formats import load_dataset
    from aspire.data.toy.benchmark import write_benchmark
    from aspire.models.classifier import build_classifier, save_checkpoint
    from aspire.models.evaluate import predict_samples
    from aspire.models.train import train_classifier

    write_benchmark("toy-waterbirds", root / "data", seed=0, size_px=32, sizes={"train": 6, "val": 2, "test": 2})
    ds = load_dataset(root / "data")
    clf = build_classifier("smallcnn", ds.class_names, input_size=32, seed=0)
    train_classifier(clf, ds.split("train"), [], epochs=1, batch_size=8, lr=0.05, weight_decay=5e-4, seed=0,
                     augment=False, progress=False)
    save_checkpoint(clf, root / "model.pt")
    train = ds.split("train")
    right = [s for s, p in zip(train, predict_samples(clf, train).argmax(1)) if p == s.y]   # the hold-out's pool
    planted = right[0].image
    plant_whole_image_mask(root / "data", planted)
    m = root / "models"
    server = LoopbackLLM([answer] * 2000)
    llm = server.__enter__()
    config = {
        "holdout": {"fraction": 1.0, "min_per_class": 6, "min_group_images": 0},
        "caption": {"backend": "transformers", "model_id": str(build_tiny_git(m / "git")), "max_new_tokens": 4},
        "phrases": {"backend": "llm", "base_url": llm.base_url, "api_key": "sk-test", "model": "tiny",
                    "captions_per_call": 1, "max_retries": 0, "backoff_s": 0},
        "ground": {"backend": "annotations", "annotations": str(root / "data" / "annotations.jsonl")},
        "edit": {"remove_backend": "sd-inpaint", "background_backend": "instruct-pix2pix",
                 "inpaint_model_id": str(build_tiny_sd_inpaint(m / "inpaint")),
                 "pix2pix_model_id": str(build_tiny_pix2pix(m / "pix2pix")), "num_inference_steps": 1,
                 "working_size_px": 32},
        "probe": {"insertion_images": 2, "joint_images": 2},
        "generate": {"backend": "textual-inversion", "model_id": str(build_tiny_sd(m / "sd")), "train_steps": 1,
                     "train_batch_size": 2, "resolution_px": 32, "seeds": [0], "images_per_seed": 2,
                     "num_inference_steps": 1, "batch_size": 2},
        "augment": {"select": "flipping", "filter": False},
    }
    (root / "config.json").write_text(json.dumps(config))
    from tiny_ground import build_tiny_gdino, build_tiny_sam

    config["ground"] = {"backend": "transformers", "detector_id": str(build_tiny_gdino(m / "gdino")),
                        "segmenter_id": str(build_tiny_sam(m / "sam"))}
    (root / "config-gdino.json").write_text(json.dumps(config))
    return root, planted, server


def plant_whole_image_mask(data: Path, image: str) -> None:
    """The image's annotations gain PHRASE with a mask of the whole image (what close-up objects, SAM and dilation
    produce on real data)."""
    import numpy as np
    from PIL import Image

    lines = (data / "annotations.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    entry = next(e for e in entries if e["image"] == image)
    size = Image.open(data / image).size
    Image.fromarray(np.full(size[::-1], 255, np.uint8)).save(data / "masks" / "planted_whole.png")
    entry["regions"].append({"phrase": PHRASE, "mask": "masks/planted_whole.png"})
    (data / "annotations.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))


def probe_args(root: Path, run: Path) -> list[str]:
    return ["probe", "--data", str(root / "data"), "--model", str(root / "model.pt"), "--run-dir", str(run),
            "--config", str(root / "config.json"), "--device", DEVICE, "--json"]


def aspire(*args: str) -> subprocess.Popen:
    """`aspire ARGS` in its own process (the console script's main())."""
    return subprocess.Popen([sys.executable, "-c", "from aspire.cli import main; main()", *args],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def records(run: Path) -> dict[str, dict[str, str]]:
    """Every record of the steps, paths inside the run folder written relative to it."""
    with sqlite3.connect(run / "run.sqlite") as db:
        rows = db.execute(f"SELECT kind, key, json FROM records WHERE kind IN ({','.join('?' * len(RECORDS))})",
                          RECORDS).fetchall()
    out: dict[str, dict[str, str]] = {}
    for kind, key, text in rows:
        out.setdefault(kind, {})[key] = text.replace(str(run.resolve()), "RUN")
    return out


def test_probe_with_every_real_backend_resumes_to_the_same_records(setup, tmp_path):
    root, planted_image = setup
    # 1. uninterrupted
    whole = aspire(*probe_args(root, tmp_path / "whole"))
    out, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err
    result = json.loads(out)
    counts = result["counts"]
    assert counts["captions"] == counts["holdout"] > 0 and counts["phrase_failures"] == 0
    assert counts["edits"] > 0 and counts["control_edits"] > 0
    done = records(tmp_path / "whole")
    edits = [json.loads(e) for e in done["edit"].values()]
    assert {e["backend"] for e in edits if e["test"] == "removal"} >= {"sd-inpaint", "instruct-pix2pix"}
    captions = [json.loads(c) for c in done["caption"].values()]
    assert {c["backend"] for c in captions} == {"transformers"}
    assert {json.loads(p)["backend"] for p in done["phrases"].values()} == {"llm"}
    # the planted whole-image mask: that edit is skipped with its reason, and the run went on
    with sqlite3.connect(tmp_path / "whole" / "run.sqlite") as db:
        skipped = [json.loads(r[0]) for r in db.execute("SELECT json FROM events WHERE kind = 'skipped'")]
    planted = [s for s in skipped if s["image"] == planted_image and s["phrase"] == PHRASE]
    assert planted and all(s["reason"] for s in planted)

    # 2. killed (SIGKILL) once some edits are recorded, then resumed
    run = tmp_path / "killed"
    proc = aspire(*probe_args(root, run))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if (run / "run.sqlite").is_file():
            try:
                with sqlite3.connect(run / "run.sqlite", timeout=1) as db:
                    if db.execute("SELECT COUNT(*) FROM records WHERE kind = 'edit'").fetchone()[0] >= 4:
                        break
            except sqlite3.OperationalError:
                pass
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the probe ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    partial = records(run)
    assert 0 < len(partial.get("edit", {})) < len(done["edit"])
    resumed = aspire(*probe_args(root, run))
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    again = records(run)
    for kind in RECORDS:
        assert again.get(kind, {}) == done.get(kind, {}), kind


def test_audit_with_every_real_backend_generates_retrains_and_reports(setup, tmp_path, monkeypatch, capsys):
    root, _ = setup
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for key in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):   # the planner: the deterministic one
        monkeypatch.delenv(key, raising=False)
    run = tmp_path / "audit"
    code, out, err = run_main(monkeypatch, capsys, "audit", "--data", str(root / "data"), "--model",
                              str(root / "model.pt"), "--run-dir", str(run), "--config",
                              str(root / "config-gdino.json"), "--device", DEVICE, "--yes", "--json")
    assert code == 0, err
    result = json.loads(out)
    # grounded by GroundingDINO + SAM, and edited from those masks
    done = records(run)
    regions = [json.loads(r) for r in done["region"].values()]
    assert {r["backend"] for r in regions} == {"transformers"}
    assert any(r["grounded"] and 0 < r["area_px"] < 32 * 32 for r in regions)
    edits = [json.loads(e) for e in done["edit"].values()]
    assert "sd-inpaint" in {e["backend"] for e in edits if e["test"] == "removal" and not e["control"]}
    assert result["augmented"]["n_images"] > 0
    assert Path(result["augmented"]["dir"]) == run.resolve() / "augmented"   # everything inside the run folder
    manifest = json.loads(Path(result["augmented"]["dir"], "manifest.json").read_text())
    assert {img["generator"] for img in manifest["images"]} == {"textual-inversion"}
    assert Path(result["models"]["after"]).is_file()
    assert result["accuracy"] and result["accuracy"]["split"]
    assert all(Path(p).is_file() for p in result["report"].values())
    assert result["reprobe"] is not None   # the stored edits scored again on the retrained model

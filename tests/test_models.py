"""Classifier build/save/load, pretrained loading, checkpoint errors, training and evaluation (tiny)."""

import io
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from aspire.data.formats import load_dataset
from aspire.data.images import load_image
from aspire.errors import CheckpointError, ConfigError, DataError, ModelLoadError
from aspire.models.classifier import ARCHS, Classifier, build_classifier, load_checkpoint, save_checkpoint
from aspire.models.evaluate import evaluate
from aspire.models.train import ResizedImages, augment_batch, train_classifier

NAMES = ["landbird", "waterbird"]


def write_waterbirds(root: Path, n: int = 64, size: int = 32, seed: int = 0) -> Path:
    """A separable two-class dataset in the waterbirds format: the class is the colour of a central
    square, the `place` attribute the background tint (matching the class 3 times out of 4)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["img_filename,y,split,place"]
    for i in range(n):
        y = i % 2
        place = y if i % 8 < 6 else 1 - y
        img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        img[..., 1 + place] += 80
        q = size // 4
        img[q:3 * q, q:3 * q] = (230, 40, 40) if y else (40, 40, 230)
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        split = 0 if i < n // 2 else (1 if i < 3 * n // 4 else 2)
        rows.append(f"images/{i}.png,{y},{split},{place}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    return root


def random_images(n: int, size: int = 40, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 8, 3)).astype(np.uint8)) for _ in range(n)]


# ---------------------------------------------------------------- build, predict, save, load
@pytest.mark.parametrize("arch", ["smallcnn", "resnet18"])
def test_save_load_round_trip(tmp_path, arch):
    torch.manual_seed(0)
    clf = build_classifier(arch, ["a", "b", "c"], input_size=32)
    clf.train_info = {"method": "erm", "seed": 3}
    x = torch.randn(2, 3, 32, 32)
    clf.eval()
    with torch.no_grad():
        before = clf(x)
    path = save_checkpoint(clf, tmp_path / "sub" / "model.pt")
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    loaded = load_checkpoint(path, device="cpu")
    assert (loaded.arch, loaded.class_names, loaded.input_size) == (arch, ["a", "b", "c"], 32)
    assert loaded.mean == clf.mean and loaded.std == clf.std and not loaded.training
    assert loaded.train_info == {"method": "erm", "seed": 3}
    with torch.no_grad():
        assert torch.equal(loaded(x), before)
    images = random_images(3)
    assert np.array_equal(loaded.predict_proba(images), clf.predict_proba(images))


def test_predict_proba_and_feature_access():
    clf = build_classifier("smallcnn", NAMES, input_size=32)
    clf.train()
    probs = clf.predict_proba(random_images(5), batch_size=2)
    assert probs.shape == (5, 2) and probs.dtype == np.float32
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert clf.training, "predict_proba restores the previous mode"
    assert clf.predict_proba([]).shape == (0, 2)
    x = clf.preprocess(random_images(2))
    assert x.shape == (2, 3, 32, 32)
    clf.eval()
    with torch.no_grad():
        feats = clf.features(x)
        assert feats.shape == (2, clf.feature_dim)
        assert torch.allclose(clf.head(feats), clf(x))
    assert isinstance(clf.target_layer, torch.nn.Module)
    assert build_classifier("resnet18", NAMES, input_size=32).target_layer is not None


def test_defaults_and_bad_arguments():
    assert build_classifier("smallcnn", NAMES).input_size == 64
    assert Classifier("resnet50", NAMES).input_size == 224
    assert set(ARCHS) == {"smallcnn", "resnet18", "resnet34", "resnet50"}
    with pytest.raises(ConfigError, match="vgg"):
        build_classifier("vgg", NAMES)
    with pytest.raises(ConfigError, match="2 classes"):
        build_classifier("smallcnn", ["only"])
    with pytest.raises(ConfigError, match="smallcnn has no ImageNet"):
        build_classifier("smallcnn", NAMES, pretrained="imagenet")


# ---------------------------------------------------------------- pretrained weights
def test_local_imagenet_state_dict_loads_into_backbone(tmp_path):
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()  # fc: 1000 classes
    assert state["fc.weight"].shape == (1000, 512)
    torch.save(state, tmp_path / "resnet18.pth")
    clf = build_classifier("resnet18", ["a", "b", "c"], input_size=32, pretrained=str(tmp_path / "resnet18.pth"))
    for k, v in clf.backbone.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert clf.head.out_features == 3 and clf.head.in_features == 512
    assert clf.train_info["pretrained"].endswith("resnet18.pth")
    # DataParallel's "module." prefix and a {"state_dict": ...} wrapper are accepted too
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    clf2 = build_classifier("resnet18", ["a", "b"], input_size=32, pretrained=str(tmp_path / "wrapped.pth"))
    assert torch.equal(clf2.backbone.conv1.weight, state["conv1.weight"])


def test_bad_pretrained_files(tmp_path):
    with pytest.raises(ModelLoadError, match="missing"):
        build_classifier("resnet18", NAMES, pretrained=str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="junk.pth.*not a readable"):
        build_classifier("resnet18", NAMES, pretrained=str(tmp_path / "junk.pth"))
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ModelLoadError, match="not an ImageNet resnet18 state dict"):
        build_classifier("resnet18", NAMES, input_size=32, pretrained=str(tmp_path / "r34.pth"))


def test_imagenet_download_failure_is_one_line(monkeypatch):
    import torchvision.models._api as api

    def offline(*args, **kwargs):  # the download boundary: this machine has no internet
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(ModelLoadError) as e:
        build_classifier("resnet18", NAMES, pretrained="imagenet")
    msg = str(e.value)
    assert "\n" not in msg and "resnet18" in msg and "--pretrained /path/to/resnet18-" in msg


# ---------------------------------------------------------------- checkpoint errors
@pytest.fixture
def good_payload(tmp_path):
    clf = build_classifier("smallcnn", NAMES, input_size=32)
    path = save_checkpoint(clf, tmp_path / "good.pt")
    return path, torch.load(path, weights_only=True)


def _expect_checkpoint_error(path, pattern):
    with pytest.raises(CheckpointError, match=pattern) as e:
        load_checkpoint(path, device="cpu")
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_missing_and_corrupt_checkpoints(tmp_path, good_payload):
    path, _ = good_payload
    _expect_checkpoint_error(tmp_path / "absent.pt", "missing")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    _expect_checkpoint_error(tmp_path / "text.pt", "not a readable checkpoint")
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    _expect_checkpoint_error(tmp_path / "truncated.pt", "not a readable checkpoint")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled_module.pt")  # refused by weights_only loading
    _expect_checkpoint_error(tmp_path / "pickled_module.pt", "not a readable checkpoint")


def test_foreign_and_mismatched_checkpoints(tmp_path, good_payload):
    _, payload = good_payload

    def save(name, obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        (tmp_path / name).write_bytes(buf.getvalue())
        return tmp_path / name

    _expect_checkpoint_error(save("bare.pt", payload["state_dict"]), "not an aspire classifier checkpoint.*bare state dict")
    _expect_checkpoint_error(save("other.pt", {"epoch": 3}), "not an aspire classifier checkpoint")
    _expect_checkpoint_error(save("arch.pt", {**payload, "arch": "vgg11"}), "unknown architecture 'vgg11'")
    _expect_checkpoint_error(save("mismatch.pt", {**payload, "arch": "resnet18"}),
                             "does not match architecture resnet18.*missing keys")
    _expect_checkpoint_error(save("classes.pt", {**payload, "class_names": ["a", "b", "c"]}),
                             "does not match.*3 classes.*head")
    _expect_checkpoint_error(save("version.pt", {**payload, "version": 99}), "version 99")
    _expect_checkpoint_error(save("size.pt", {**payload, "input_size": "big"}), "'input_size'")


# ---------------------------------------------------------------- training
def test_training_reduces_loss_and_is_deterministic(tmp_path):
    ds = load_dataset(write_waterbirds(tmp_path / "ds"))
    train, val = ds.split("train"), ds.split("val")

    def run():
        clf = build_classifier("smallcnn", ds.class_names, input_size=32, seed=7)
        info = train_classifier(clf, train, val, epochs=4, batch_size=8, lr=0.05, weight_decay=5e-4, seed=7,
                                augment=True, progress=False)
        return clf, info

    clf, info = run()
    losses = [h["train_loss"] for h in info["history"]]
    assert losses[-1] < 0.5 * losses[0], losses
    assert info["best_epoch"] in range(1, 5)
    assert info["best_val_average_accuracy"] == max(h["val_average_accuracy"] for h in info["history"])
    assert info["best_val_average_accuracy"] >= 0.9
    assert info["history"][0]["val_worst_group_accuracy"] is not None
    assert clf.train_info["method"] == "erm" and clf.train_info["seed"] == 7 and not clf.training
    clf2, info2 = run()
    assert [h["train_loss"] for h in info2["history"]] == losses
    assert all(torch.equal(a, b) for a, b in zip(clf.state_dict().values(), clf2.state_dict().values()))


def test_training_without_validation_keeps_last_epoch(tmp_path):
    ds = load_dataset(write_waterbirds(tmp_path / "ds", n=16))
    clf = build_classifier("smallcnn", ds.class_names, input_size=32)
    info = train_classifier(clf, ds.split("train"), [], epochs=2, batch_size=4, lr=0.01, weight_decay=0, seed=0,
                            augment=False, progress=False, schedule="step")
    assert info["best_epoch"] == 2 and info["select_by"] == "last_epoch"


def test_label_out_of_range_names_value_and_file(tmp_path):
    ds = load_dataset(write_waterbirds(tmp_path / "ds", n=16))
    bad = ds.split("train")[0].model_copy(update={"y": 5})
    clf = build_classifier("smallcnn", ds.class_names, input_size=32)
    with pytest.raises(DataError, match=r"0\.png: label 5 out of range"):
        train_classifier(clf, [bad], [], epochs=1, batch_size=4, lr=0.01, weight_decay=0, seed=0, augment=False,
                         progress=False)
    with pytest.raises(ConfigError):
        train_classifier(clf, ds.split("train"), [], epochs=0, batch_size=4, lr=0.01, weight_decay=0, seed=0,
                         augment=False, progress=False)


def test_streamed_images_equal_cached_and_augmentation_is_seeded(tmp_path):
    ds = load_dataset(write_waterbirds(tmp_path / "ds", n=8))
    samples = ds.split("train")
    cached, streamed = ResizedImages(samples, 24, cache=True), ResizedImages(samples, 24, cache=False)
    assert cached.images is not None and streamed.images is None
    for i in range(len(samples)):
        assert torch.equal(cached[i][0], streamed[i][0]) and cached[i][0].shape == (3, 24, 24)
    x = cached.images  # (N, 3, 24, 24) uint8
    a = augment_batch(x, torch.Generator().manual_seed(0))
    b = augment_batch(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == torch.float32 and torch.equal(a, b)
    assert 0 <= a.min() and a.max() <= 1
    assert not torch.equal(a, augment_batch(x, torch.Generator().manual_seed(1)))


# ---------------------------------------------------------------- evaluation
def test_evaluate_matches_predictions_and_checks_labels(tmp_path):
    ds = load_dataset(write_waterbirds(tmp_path / "ds"))
    clf = build_classifier("smallcnn", ds.class_names, input_size=32)
    result = evaluate(clf, ds, "test")
    test = ds.split("test")
    pred = clf.predict_proba([load_image(s.path) for s in test]).argmax(1)
    assert result.n == len(test) and sum(g.n for g in result.groups) == len(test)
    assert result.average_accuracy == pytest.approx(np.mean(pred == np.array([s.y for s in test])))
    assert {g.key for g in result.groups} <= {"y=landbird,place=0", "y=landbird,place=1",
                                               "y=waterbird,place=0", "y=waterbird,place=1"}
    # a classifier of other classes than the dataset's is refused (tests/test_formats.py has the cases)
    other = build_classifier("smallcnn", ["x", "y"], input_size=32)
    with pytest.raises(DataError, match="class 0 is 'x' but .*metadata.csv's is 'landbird'"):
        evaluate(other, ds, "test")
    # a label the classifier has no output for
    ds.samples[-1] = ds.samples[-1].model_copy(update={"y": 2})
    with pytest.raises(DataError, match="label 2 out of range"):
        evaluate(clf, ds, "test")

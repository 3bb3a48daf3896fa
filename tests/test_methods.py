"""Retraining methods (aspire.models.methods) and `aspire train --method ... --augment AUGDIR`.

Unit tests on the pieces with known answers (GroupDRO's weights, JTT's upsampling, SUBG's subsample, DFR's
last layer on constructed features), then every method end to end on a tiny planted-group dataset."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from aspire import cli
from aspire.errors import DataError
from aspire.models.classifier import Classifier, load_checkpoint
from aspire.models.dfr import DFR_C_GRID, LastLayerFit, class_weight_grid, fit_last_layer, write_head
from aspire.models.methods import GroupDROLoss, group_table, jtt_upsample, subsample_groups
from aspire.schemas import Sample
from cli_main import run_main

GROUPS_PER_SPLIT = {  # (y, place) -> images: place follows y in 80% of train, balanced in val and test
    "train": {(0, 0): 26, (0, 1): 6, (1, 0): 6, (1, 1): 26},
    "val": {g: 8 for g in [(0, 0), (0, 1), (1, 0), (1, 1)]},
    "test": {g: 4 for g in [(0, 0), (0, 1), (1, 0), (1, 1)]},
}
SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


def _image(rng, y: int, place: int, size: int = 32) -> np.ndarray:
    """Background tint = place (spurious), central square colour = class (core)."""
    img = rng.integers(0, 50, (size, size, 3)).astype(np.uint8)
    img[..., 1 + place] += 100
    q = size // 4
    img[q:3 * q, q:3 * q] = (220, 50, 50) if y else (50, 50, 220)
    return img


def write_planted(root: Path, *, with_place: bool = True) -> Path:
    """A tiny waterbirds-format dataset with a planted spurious attribute."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = ["img_filename,y,split" + (",place" if with_place else "")]
    for split, groups in GROUPS_PER_SPLIT.items():
        for (y, place), n in groups.items():
            for i in range(n):
                name = f"images/{split}_{y}{place}_{i}.png"
                Image.fromarray(_image(rng, y, place)).save(root / name)
                rows.append(f"{name},{y},{SPLIT_CODE[split]}" + (f",{place}" if with_place else ""))
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("landbird\nwaterbird\n")
    return root


def write_augdir(root: Path, per_class: int = 5) -> Path:
    """An augmented set as `aspire augment` writes it (images + metadata.csv + manifest.json): the class
    without its usual place (an even place mix), as ASPIRE's generated images lack the spurious feature."""
    from aspire.data.augmented import FORMAT, IMAGE_DIR, VERSION, sha256_bytes, write_set_files

    rng = np.random.default_rng(1)
    images = []
    for y, name in enumerate(("landbird", "waterbird")):
        (root / IMAGE_DIR / f"{y}-{name}").mkdir(parents=True)
        for i in range(per_class):
            rel = f"{IMAGE_DIR}/{y}-{name}/{i}.png"
            Image.fromarray(_image(rng, y, i % 2)).save(root / rel)
            images.append({"img_filename": rel, "y": y, "sha256": sha256_bytes((root / rel).read_bytes())})
    write_set_files(root, ["landbird", "waterbird"], {"format": FORMAT, "version": VERSION, "images": images})
    return root


FAST = ["--arch", "smallcnn", "--input-size", "32", "--epochs", "2", "--batch-size", "16", "--seed", "0", "--json"]


def train(data: Path, out: Path, *args: str) -> dict:
    result = CliRunner().invoke(cli.app, ["train", "--data", str(data), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return write_planted(tmp_path_factory.mktemp("methods") / "ds")


@pytest.fixture(scope="module")
def erm_model(planted, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("erm") / "erm.pt"
    train(planted, out, *FAST)
    return out


# ---------------------------------------------------------------- GroupDRO
def test_groupdro_weights_move_toward_the_worst_group():
    loss = GroupDROLoss([0, 1, 2, 3], [10, 10, 10, 10], eta=0.1)
    fixed = torch.tensor([0.1, 0.5, 2.0, 0.3])
    history = [loss.update(fixed)[2].item() for _ in range(30)]
    assert all(b > a for a, b in zip(history, history[1:])) and history[-1] > 0.9
    expected = torch.softmax(0.1 * 30 * fixed, 0)  # q_g ∝ exp(eta * t * loss_g) from uniform
    assert torch.allclose(loss.q, expected, atol=1e-5) and loss.q.sum().item() == pytest.approx(1.0)
    # the adjustment C / sqrt(n_g) favours small groups when the losses are equal
    adjusted = GroupDROLoss([0, 1], [100, 4], eta=0.1, adjustment=2.0)
    for _ in range(10):
        adjusted.update(torch.tensor([1.0, 1.0]))
    assert adjusted.q[1] > 0.6


def test_groupdro_loss_is_the_weighted_group_mean():
    loss = GroupDROLoss([0, 0, 1, 2], [2, 1, 1], eta=0.01)
    per_sample = torch.tensor([1.0, 3.0, 5.0, 7.0])
    assert loss.group_losses(per_sample, torch.tensor([0, 0, 1, 1])).tolist() == [2.0, 6.0, 0.0]  # group 2 absent
    logits = torch.randn(4, 2, requires_grad=True)
    y = torch.tensor([0, 1, 0, 1])
    value = loss(logits, y, torch.full((4,), -1), torch.tensor([3, 2, 1, 0]))
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none").detach()
    group_loss = torch.stack([ce[2:].mean(), ce[1], ce[0]])  # index 3 -> group 2, 2 -> 1, 1 and 0 -> 0
    expected_q = torch.softmax(0.01 * group_loss, 0)
    assert value.item() == pytest.approx(float(group_loss @ expected_q), rel=1e-5)
    value.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_group_table_gives_synthetic_images_a_group_per_class():
    def s(y, attr, synthetic=False):
        return Sample(image=f"{y}{attr}", path=f"/x/{y}{attr}.png", y=y, split="train", attr=attr, synthetic=synthetic)

    samples = [s(1, 1), s(0, 0), s(1, None, True), s(0, 1), s(0, None, True), s(1, None, True)]
    groups, names = group_table(samples, ["land", "water"], "place")
    assert names == ["y=land,place=0", "y=land,place=1", "y=water,place=1", "y=land,synthetic", "y=water,synthetic"]
    assert groups == [2, 0, 4, 1, 3, 4]
    with pytest.raises(DataError, match="no group attribute"):
        group_table([s(0, None)], ["land", "water"], "place")


# ---------------------------------------------------------------- JTT and SUBG
def test_jtt_upsamples_the_error_set_lambda_times():
    index = jtt_upsample(10, [7, 2, 5], upweight=20)
    counts = Counter(index)
    assert len(index) == 10 + 3 * 19
    assert {i: counts[i] for i in (2, 5, 7)} == {2: 20, 5: 20, 7: 20}
    assert all(counts[i] == 1 for i in range(10) if i not in (2, 5, 7))
    assert jtt_upsample(4, [1], upweight=1) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        jtt_upsample(4, [4], upweight=3)


def test_subg_subsample_has_equal_group_sizes(planted):
    from aspire.data.formats import load_dataset

    train = load_dataset(planted).split("train")
    sub = subsample_groups(train, seed=3)
    sizes = Counter((s.y, s.attr) for s in sub)
    assert sizes == {(0, 0): 6, (0, 1): 6, (1, 0): 6, (1, 1): 6}
    assert set(sub) <= set(train) and len(set(sub)) == len(sub)
    assert subsample_groups(train, seed=3) == sub and subsample_groups(train, seed=4) != sub


# ---------------------------------------------------------------- DFR
def _spurious_features(n: int, majority: float, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (n, 10): column 0 core (class ±1, noisy), column 1 spurious (attribute ±1, clean), 8 noise columns.
    The attribute equals the class with probability `majority`. Groups g = 2 y + a."""
    y = rng.integers(0, 2, n)
    a = np.where(rng.random(n) < majority, y, 1 - y)
    x = rng.normal(0, 1, (n, 10))
    x[:, 0] = (2 * y - 1) + rng.normal(0, 0.7, n)
    x[:, 1] = (2 * a - 1) + rng.normal(0, 0.2, n)
    return x, y, 2 * y + a


def _worst(pred, y, g) -> float:
    return min(float((pred == y)[g == k].mean()) for k in np.unique(g))


def test_dfr_group_balancing_puts_the_weight_on_the_core_feature():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x_val, y_val, g_val = _spurious_features(1200, 0.9, rng)
    x_test, y_test, g_test = _spurious_features(2000, 0.5, rng)
    fit = fit_last_layer(x_val, y_val, g_val, num_classes=2, refits=5, seed=0)
    w = fit.weight[1] - fit.weight[0]  # logit of class 1 minus class 0, on raw features
    assert w[0] > 0 and abs(w[1]) < 0.2 * w[0]
    plain = LogisticRegression().fit(x_val, y_val)  # no group balancing: leans on the spurious column
    assert plain.coef_[0, 1] > 0.4 * plain.coef_[0, 0]
    dfr_worst, plain_worst = _worst(fit.predict(x_test), y_test, g_test), _worst(plain.predict(x_test), y_test, g_test)
    assert dfr_worst > 0.8 and dfr_worst > plain_worst + 0.1
    assert len(fit.grid) == len(DFR_C_GRID) * 9 and fit.refits == 5
    assert fit.tune_worst_group_accuracy == max(c["worst_group_accuracy"] for c in fit.grid)


def test_dfr_grid_search_picks_the_known_best_config():
    rng = np.random.default_rng(1)
    x_val, y_val, g_val = _spurious_features(800, 0.7, rng)
    # C 1e-4 zeroes every weight (one class predicted: worst group 0); class 1 weighted 1000 predicts mostly class 1
    fit = fit_last_layer(x_val, y_val, g_val, num_classes=2, c_grid=(1e-4, 1.0), class_weights=(1.0, 1000.0),
                         refits=2, seed=0)
    scores = {(c["c"], tuple(c["class_weight"])): c["worst_group_accuracy"] for c in fit.grid}
    assert set(scores) == {(1e-4, (1.0, 1.0)), (1e-4, (1.0, 1000.0)), (1e-4, (1000.0, 1.0)),
                           (1.0, (1.0, 1.0)), (1.0, (1.0, 1000.0)), (1.0, (1000.0, 1.0))}
    assert scores[(1e-4, (1.0, 1.0))] == 0.0
    assert scores[(1.0, (1.0, 1.0))] > max(scores[(1.0, (1.0, 1000.0))], scores[(1.0, (1000.0, 1.0))]) + 0.1
    assert (fit.c, fit.class_weight) == (1.0, (1.0, 1.0))


def test_dfr_extra_features_join_training_and_multiclass_is_one_vs_rest():
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1, 2], 40)
    x = rng.normal(0, 1, (120, 4))
    x[np.arange(120), y] += 3  # class k lights up column k
    g = y * 2 + rng.integers(0, 2, 120)
    x_extra, y_extra = rng.normal(0, 1, (30, 4)), np.full(30, 2)
    x_extra[:, 2] += 3
    fit = fit_last_layer(x, y, g, num_classes=3, x_extra=x_extra, y_extra=y_extra, c_grid=(1.0,), refits=3, seed=0)
    assert fit.weight.shape == (3, 4) and fit.bias.shape == (3,) and fit.n_extra == 30
    assert len(fit.grid) == len(class_weight_grid(3)) == 1 + 3 * 4
    assert (fit.predict(x) == y).mean() > 0.9
    assert class_weight_grid(2, (1, 2)) == [(1.0, 1.0), (1.0, 2.0), (2.0, 1.0)]


def test_dfr_head_written_into_the_classifier_predicts_like_the_fit():
    rng = np.random.default_rng(3)
    clf = Classifier("smallcnn", ["a", "b"], input_size=32)
    x, y, g = _spurious_features(400, 0.5, rng)
    x = np.concatenate([x, rng.normal(0, 1, (400, clf.feature_dim - 10))], 1)
    fit = fit_last_layer(x, y, g, num_classes=2, c_grid=(0.3,), class_weights=(1.0,), refits=2, seed=0)
    write_head(clf, fit)
    with torch.no_grad():
        logits = clf.head(torch.as_tensor(x, dtype=torch.float32)).numpy()
    assert (logits.argmax(1) == fit.predict(x)).all()
    z = (x @ (fit.weight[1] - fit.weight[0]) + fit.bias[1] - fit.bias[0])  # softmax of (-z/2, z/2) = sigmoid(z)
    probs = torch.softmax(torch.as_tensor(logits), 1)[:, 1].numpy()
    assert np.allclose(probs, 1 / (1 + np.exp(-z)), atol=1e-4)
    bad = LastLayerFit(np.zeros((2, 3)), np.zeros(2), 1.0, (1.0, 1.0), 0.0, [], 0, 0, 1)
    with pytest.raises(ValueError, match="does not fit the head"):
        write_head(clf, bad)


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize("method", ["erm", "groupdro", "jtt", "subg"])
def test_each_method_writes_a_loadable_checkpoint(planted, tmp_path, method):
    result = train(planted, tmp_path / "m.pt", *FAST, "--method", method, "--jtt-epochs", "1", "--jtt-upweight", "5")
    clf = load_checkpoint(tmp_path / "m.pt", device="cpu")
    assert result["method"] == method and clf.train_info["method"] == method and clf.arch == "smallcnn"
    assert result["val"]["n"] == 32 and len(result["history"]) == 2
    assert clf.train_info["select_by"] == ("average" if method == "erm" else "worst_group")
    if method == "groupdro":
        groups = clf.train_info["groupdro"]["groups"]
        assert {k: v["n"] for k, v in groups.items()} == {"y=landbird,place=0": 26, "y=landbird,place=1": 6,
                                                          "y=waterbird,place=0": 6, "y=waterbird,place=1": 26}
        assert sum(v["final_weight"] for v in groups.values()) == pytest.approx(1.0)
        assert clf.train_info["weighted_sampling"] is True
    if method == "jtt":
        jtt = clf.train_info["jtt"]
        assert clf.train_info["n_train"] == 64 + jtt["n_errors"] * 4
        assert sum(jtt["errors_per_group"].values()) == jtt["n_errors"]
    if method == "subg":
        assert clf.train_info["n_train"] == 24 and clf.train_info["subg"]["group_size"] == 6


def test_dfr_from_init_keeps_the_backbone_and_refits_the_head(planted, erm_model, tmp_path):
    result = train(planted, tmp_path / "dfr.pt", "--method", "dfr", "--init", str(erm_model), "--json")
    base, dfr = load_checkpoint(erm_model, device="cpu"), load_checkpoint(tmp_path / "dfr.pt", device="cpu")
    assert result["method"] == "dfr" and result["dfr"]["refits"] == 10
    for k, v in base.backbone.state_dict().items():
        assert torch.equal(v, dfr.backbone.state_dict()[k]), k
    assert not torch.equal(base.head.weight, dfr.head.weight)
    assert dfr.train_info["base"]["method"] == "erm" and dfr.train_info["dfr"]["n_train_per_refit"] == 32


def test_dfr_without_init_trains_erm_first(planted, tmp_path):
    train(planted, tmp_path / "dfr.pt", *FAST, "--method", "dfr")
    info = load_checkpoint(tmp_path / "dfr.pt", device="cpu").train_info
    assert info["method"] == "dfr" and info["base"]["method"] == "erm" and info["base"]["epochs"] == 2


@pytest.mark.parametrize("method", ["groupdro", "jtt", "dfr", "subg"])
def test_group_methods_need_group_labels(tmp_path, monkeypatch, capsys, method):
    data = write_planted(tmp_path / "nogroups", with_place=False)
    code, _, err = run_main(monkeypatch, capsys, "train", "--data", str(data), "--out", str(tmp_path / "m.pt"),
                            *FAST, "--method", method)
    assert code == 1 and err.strip().count("\n") == 0
    assert f"--method {method} needs group labels" in err and "metadata.csv" in err
    assert not (tmp_path / "m.pt").exists()


def test_cli_argument_errors(planted, erm_model, tmp_path, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "train", "--data", str(planted), "--out", str(tmp_path / "m.pt"),
                            "--method", "dfr", "--init", str(erm_model), "--arch", "resnet18")
    assert code == 1 and "--arch resnet18 conflicts with --init" in err and err.strip().count("\n") == 0
    usage = CliRunner().invoke(cli.app, ["train", "--data", str(planted), "--out", str(tmp_path / "m.pt")])
    assert usage.exit_code == 2 and "--arch" in usage.output
    code, _, err = run_main(monkeypatch, capsys, "train", "--data", str(planted), "--out", str(tmp_path / "m.pt"),
                            *FAST, "--augment-ratio", "0.5")
    assert code == 1 and "--augment-ratio needs --augment" in err
    help_text = CliRunner().invoke(cli.app, ["train", "--help"]).output
    assert all(m in help_text for m in ("groupdro", "jtt", "dfr", "subg"))


# ---------------------------------------------------------------- the augmented set
@pytest.fixture(scope="module")
def augdir(tmp_path_factory) -> Path:
    return write_augdir(tmp_path_factory.mktemp("aug") / "augdir")


@pytest.mark.parametrize("method", ["erm", "groupdro", "jtt", "subg"])
def test_augment_mixes_the_synthetic_images_in(planted, augdir, tmp_path, method):
    train(planted, tmp_path / "m.pt", *FAST, "--method", method, "--augment", str(augdir), "--jtt-epochs", "1",
          "--jtt-upweight", "3")
    info = load_checkpoint(tmp_path / "m.pt", device="cpu").train_info
    aug = info["augmentation"]
    assert aug == {"dir": str(augdir.resolve()), "n_available": 10, "n_added": 10, "ratio": None}
    if method == "erm":
        assert info["n_train"] == 64 + 10
    if method == "groupdro":
        groups = info["groupdro"]["groups"]
        assert groups["y=landbird,synthetic"]["n"] == 5 and groups["y=waterbird,synthetic"]["n"] == 5
        assert sum(v["n"] for v in groups.values()) == 74
    if method == "jtt":
        assert sum(info["jtt"]["n_per_group"].values()) == 74
        assert info["n_train"] == 74 + info["jtt"]["n_errors"] * 2
    if method == "subg":
        assert info["n_train"] == 24 + 10


def test_augment_ratio_limits_the_images_added(planted, augdir, tmp_path):
    from aspire.data.augmented import load_augmented, mix_in
    from aspire.data.formats import load_dataset

    train_samples = load_dataset(planted).split("train")
    expected = len(mix_in(train_samples, load_augmented(augdir), 0.1, 0)) - len(train_samples)
    assert 0 < expected < 10
    train(planted, tmp_path / "m.pt", *FAST, "--augment", str(augdir), "--augment-ratio", "0.1")
    info = load_checkpoint(tmp_path / "m.pt", device="cpu").train_info
    assert info["augmentation"]["n_added"] == expected and info["augmentation"]["ratio"] == 0.1
    assert info["n_train"] == 64 + expected


def test_dfr_augment_adds_features_to_the_last_layer_set(planted, augdir, erm_model, tmp_path):
    train(planted, tmp_path / "dfr.pt", "--method", "dfr", "--init", str(erm_model), "--augment", str(augdir), "--json")
    info = load_checkpoint(tmp_path / "dfr.pt", device="cpu").train_info
    assert info["augmentation"]["n_added"] == 10 and info["dfr"]["n_extra"] == 10
    assert info["dfr"]["n_train_per_refit"] == 32 + 10


def test_dfr_augmented_images_weigh_as_one_group_per_class(planted, erm_model, tmp_path):
    """20 generated images per class join the 4 balanced groups of 8 as 8 per class, not all 40."""
    big = write_augdir(tmp_path / "big", per_class=20)
    train(planted, tmp_path / "dfr.pt", "--method", "dfr", "--init", str(erm_model), "--augment", str(big), "--json")
    info = load_checkpoint(tmp_path / "dfr.pt", device="cpu").train_info
    assert info["augmentation"]["n_available"] == 40 and info["augmentation"]["per_class_cap"] == 8
    assert info["augmentation"]["n_added"] == 16 and info["dfr"]["n_extra"] == 16
    assert info["dfr"]["n_train_per_refit"] == 32 + 16


def test_cap_per_class_keeps_order_and_small_classes():
    from aspire.models.methods import cap_per_class
    from aspire.schemas import Sample

    samples = [Sample(image=f"i{i}", path=f"i{i}.png", y=int(i >= 3), split="train") for i in range(13)]
    kept = cap_per_class(samples, 4, seed=0)
    assert [s.y for s in kept] == [0, 0, 0, 1, 1, 1, 1]              # class 0 (3 images) whole, class 1 capped
    assert kept == sorted(kept, key=lambda s: int(s.image[1:]))       # the set's order
    assert kept == cap_per_class(samples, 4, seed=0)                     # seeded

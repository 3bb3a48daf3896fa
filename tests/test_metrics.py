"""Group metrics against hand-computed cases."""

import pytest

from aspire.errors import DataError
from aspire.models.metrics import count_groups, group_key, group_metrics

NAMES = ["cat", "dog"]
#        0  1  2  3  4  5  6
Y = [0, 0, 0, 1, 1, 1, 1]
ATTR = [0, 0, 1, 1, 1, 0, 1]
PRED = [0, 1, 0, 1, 1, 1, 0]
# groups: (cat,0) = {0,1}: 1/2   (cat,1) = {2}: 1/1   (dog,0) = {5}: 1/1   (dog,1) = {3,4,6}: 2/3
TRAIN = {(0, 0): 40, (0, 1): 10, (1, 0): 10, (1, 1): 40}


def by_key(result):
    return {g.key: g for g in result.groups}


def test_groups_worst_average_and_weighted_average():
    r = group_metrics(Y, PRED, ATTR, class_names=NAMES, attr_name="bg", train_group_counts=TRAIN, split="test")
    groups = by_key(r)
    assert list(groups) == ["y=cat,bg=0", "y=cat,bg=1", "y=dog,bg=0", "y=dog,bg=1"]
    assert [(g.n, g.correct) for g in r.groups] == [(2, 1), (1, 1), (1, 1), (3, 2)]
    assert groups["y=dog,bg=1"].accuracy == pytest.approx(2 / 3)
    assert [g.train_fraction for g in r.groups] == pytest.approx([0.4, 0.1, 0.1, 0.4])
    assert r.worst_group == "y=cat,bg=0" and r.worst_group_accuracy == pytest.approx(0.5)
    assert r.average_accuracy == pytest.approx(5 / 7)
    # DFR/WILDS: 0.4 * 1/2 + 0.1 * 1 + 0.1 * 1 + 0.4 * 2/3
    assert r.weighted_average_accuracy == pytest.approx(0.2 + 0.1 + 0.1 + 0.8 / 3)
    assert r.n == 7 and r.split == "test" and r.attr_name == "bg" and r.class_names == NAMES


def test_without_training_counts_weights_are_the_split_shares():
    r = group_metrics(Y, PRED, ATTR, class_names=NAMES, attr_name="bg", split="val")
    assert r.weighted_average_accuracy == pytest.approx(r.average_accuracy)
    assert all(g.train_fraction is None for g in r.groups)


def test_classes_are_the_groups_without_an_attribute():
    r = group_metrics(Y, PRED, None, class_names=NAMES, train_group_counts={(0, None): 3, (1, None): 1})
    assert [(g.key, g.n, g.correct) for g in r.groups] == [("y=cat", 3, 2), ("y=dog", 4, 3)]
    assert r.worst_group == "y=cat" and r.worst_group_accuracy == pytest.approx(2 / 3)
    assert r.weighted_average_accuracy == pytest.approx(0.75 * 2 / 3 + 0.25 * 3 / 4)
    assert r.attr_name is None


def test_training_group_without_samples_in_the_split_is_an_error():
    train = {**TRAIN, (1, 2): 5}  # a (dog, bg=2) group the test split lacks
    with pytest.raises(DataError, match=r"y=dog,bg=2.*'test'"):
        group_metrics(Y, PRED, ATTR, class_names=NAMES, attr_name="bg", train_group_counts=train, split="test")


def test_group_absent_from_training_gets_zero_weight():
    train = {(0, 0): 1, (0, 1): 1, (1, 1): 2}  # no (dog, bg=0) in training
    r = group_metrics(Y, PRED, ATTR, class_names=NAMES, attr_name="bg", train_group_counts=train)
    assert by_key(r)["y=dog,bg=0"].train_fraction == 0
    assert r.weighted_average_accuracy == pytest.approx(0.25 * 0.5 + 0.25 * 1 + 0.5 * 2 / 3)


def test_bad_inputs():
    with pytest.raises(DataError, match="no samples"):
        group_metrics([], [], None, class_names=NAMES, split="val")
    with pytest.raises(ValueError):
        group_metrics([0, 1], [0], None, class_names=NAMES)
    with pytest.raises(DataError, match="attribute"):
        group_metrics([0, 1], [0, 1], [0, None], class_names=NAMES)


def test_helpers():
    assert count_groups(Y, ATTR) == {(0, 0): 2, (0, 1): 1, (1, 1): 3, (1, 0): 1}
    assert count_groups([1, 1, 0]) == {(1, None): 2, (0, None): 1}
    assert group_key((1, 0), NAMES, "place") == "y=dog,place=0"
    assert group_key((1, None), NAMES) == "y=dog"

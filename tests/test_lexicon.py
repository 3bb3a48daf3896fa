"""aspire.tools.lexicon: normalisation, noun lemmas, synonyms, phrase similarity."""

from __future__ import annotations

import itertools

import pytest

from aspire.tools import lexicon
from aspire.tools.lexicon import canonical, head, lemma, normalize, same_phrase, scene_category, similarity


@pytest.mark.parametrize("plural, singular", [
    ("boats", "boat"), ("ponds", "pond"), ("bushes", "bush"), ("leaves", "leaf"), ("berries", "berry"),
    ("boxes", "box"), ("beaches", "beach"), ("horses", "horse"), ("waves", "wave"), ("knives", "knife"),
    ("people", "person"), ("children", "child"), ("geese", "goose"), ("potatoes", "potato"), ("shoes", "shoe"),
    ("movies", "movie"), ("firemen", "fireman"), ("glasses", "glasses"), ("buses", "bus"), ("Trees", "tree"),
])
def test_lemma_of_plurals(plural, singular):
    assert lemma(plural) == singular


@pytest.mark.parametrize("word", ["grass", "boat", "bus", "cactus", "tennis", "woods", "species", "sheep", "sky"])
def test_lemma_leaves_singulars_and_invariants_alone(word):
    assert lemma(word) == word


def test_normalize_lowercases_and_strips_articles_and_punctuation():
    assert normalize("  A Small  Boat. ") == "small boat"
    assert normalize("The water's edge!") == "water edge"
    assert normalize("golden_retriever") == "golden retriever"
    assert normalize("Café") == "cafe"


def test_canonical_applies_lemmas_and_synonym_groups():
    assert canonical("the Oceans") == canonical("a sea") == "sea"
    assert canonical("two busy streets") == "busy road"
    assert canonical("woods") == "forest"  # "woods" is not the plural of "wood" here


def test_head_noun_of_phrases_and_compounds():
    assert head("branch of a tree") == "branch"
    assert head("a small wooden boat") == "boat"
    assert head("waterbird") == "bird"
    assert head("seagull") == "gull"
    assert head("carpet") == "carpet"  # no known split
    assert lexicon.split_compound("waterbird") == ("water", "bird")


def test_same_phrase_merges_near_duplicates_and_only_them():
    assert same_phrase("a small boat", "boats")
    assert same_phrase("tree branch", "branch of a tree")
    assert same_phrase("ocean", "the sea")
    assert same_phrase("waterbird", "water bird")
    assert not same_phrase("bird feeder", "bird")
    assert not same_phrase("wooden dock", "wooden boat")
    assert not same_phrase("lake", "forest")


PHRASES = ["a small boat", "boats", "wooden dock", "lake", "the ocean", "sea", "bird feeder", "bird",
           "branch of a tree", "tree branch", "", "red car", "blue car", "waterbird"]


def test_similarity_is_symmetric_and_bounded():
    for a, b in itertools.product(PHRASES, repeat=2):
        s = similarity(a, b)
        assert 0.0 <= s <= 1.0, (a, b, s)
        assert s == pytest.approx(similarity(b, a)), (a, b)
    for a in PHRASES:
        assert similarity(a, a) == 1.0


def test_similarity_orders_closer_phrases_higher():
    assert similarity("small boat", "boat") > similarity("small boat", "small dock") > similarity("boat", "lake")


def test_the_merge_threshold_says_how_differently_a_thing_may_be_described():
    # the same head noun, described by one, two or three words differently: merged at thresholds 0.8, 0.7, 0.6
    one, two, three = ("boat", "small boat"), ("big boat", "small boat"), ("small red boat", "big boat")
    assert [same_phrase(*one, 0.8), same_phrase(*two, 0.8), same_phrase(*three, 0.8)] == [True, False, False]
    assert [same_phrase(*one, 0.7), same_phrase(*two, 0.7), same_phrase(*three, 0.7)] == [True, True, False]
    assert [same_phrase(*one, 0.6), same_phrase(*two, 0.6), same_phrase(*three, 0.6)] == [True, True, True]
    assert same_phrase("boat", "sailboat") and not same_phrase("water", "waterbird")   # compounds by their parts
    assert not same_phrase("red boat", "red car", 0.3)                                  # another thing


def test_scene_category():
    assert scene_category("the lake") == scene_category("Oceans") == scene_category("body of water") == "water"
    assert scene_category("a living room") == "indoor"
    assert scene_category("a busy street") == "urban"
    assert scene_category("boat") is None
    for category in lexicon.SCENES:  # every category has a contrast of another category
        contrast = lexicon.SCENE_CONTRAST[category]
        assert scene_category(contrast) not in (None, category)

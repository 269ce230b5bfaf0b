"""trainer.tasks.metrics: every metric on known values, its edge cases, and its chance level.

Expected values are worked out by hand from the definitions, not read back from scikit-learn.
"""

from __future__ import annotations

import numpy as np
import pytest

from trainer.tasks.metrics import METRICS, chance_level, compute

# Every metric of trainer.tasks.metrics must have a test here: a new one fails this until it gets one.
TESTED = {"accuracy", "f1", "matthews_correlation", "pearson", "spearmanr", "entity_f1"}


def test_every_metric_is_tested_here():
    assert set(METRICS) == TESTED


# ------------------------------------------------------------------------------ accuracy
def test_accuracy():
    assert compute("accuracy", [0, 1, 2, 1], [0, 1, 1, 1]) == 0.75
    assert compute("accuracy", ["O", "B-x"], ["O", "O"]) == 0.5
    assert compute("accuracy", [], []) == 0.0


# ------------------------------------------------------------------------------ f1
def test_f1_of_a_two_label_task_is_the_f1_of_label_1():
    # label 1: tp=1, fp=1, fn=1 -> precision 1/2, recall 1/2, F1 1/2
    assert compute("f1", [1, 1, 0, 0], [1, 0, 1, 0], num_labels=2) == pytest.approx(0.5)


def test_f1_of_a_two_label_task_stays_binary_when_the_data_holds_one_class():
    # Only label 0 in the references: label 1 has no true positive, F1(label 1) = 0.
    assert compute("f1", [0, 0, 1], [0, 0, 0], num_labels=2) == 0.0
    # Only label 1: tp=2, fn=1 -> precision 1, recall 2/3, F1 0.8.
    assert compute("f1", [1, 1, 0], [1, 1, 1], num_labels=2) == pytest.approx(0.8)


def test_f1_of_a_three_label_task_is_the_macro_average_over_all_its_labels():
    # The data holds labels 0 and 1 only; label 2 is neither true nor predicted and scores 0.
    # label 0: tp=1, fp=0, fn=1 -> P 1, R 1/2, F1 2/3; label 1: tp=1, fp=1, fn=0 -> P 1/2, R 1, F1 2/3.
    value = compute("f1", [0, 1, 1], [0, 0, 1], num_labels=3)
    assert value == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    # The same predictions scored as a two-label task: binary F1 of label 1 (2/3), not a macro average.
    assert compute("f1", [0, 1, 1], [0, 0, 1], num_labels=2) == pytest.approx(2 / 3)


def test_f1_does_not_depend_on_which_labels_the_model_predicts():
    # Old behaviour: predicting label 2 once switched the average from binary to macro.
    refs = [0, 1, 1, 0]
    with_2 = compute("f1", [0, 1, 2, 0], refs, num_labels=3)
    # label 0: F1 1; label 1: tp=1, fn=1 -> 2/3; label 2: tp=0 -> 0.
    assert with_2 == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_f1_needs_the_number_of_labels():
    with pytest.raises(ValueError, match="number of labels"):
        compute("f1", [0, 1], [0, 1])


# ------------------------------------------------------------------------------ matthews
def test_matthews_correlation():
    # tp=1, tn=1, fp=1, fn=1 -> (1*1 - 1*1) / sqrt(2*2*2*2) = 0
    assert compute("matthews_correlation", [1, 0, 1, 0], [1, 0, 0, 1]) == 0.0
    assert compute("matthews_correlation", [1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert compute("matthews_correlation", [0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    # tp=2, tn=1, fp=1, fn=0 -> (2*1 - 1*0) / sqrt(3*2*2*1) = 2 / sqrt(12)
    assert compute("matthews_correlation", [1, 1, 1, 0], [1, 1, 0, 0]) == pytest.approx(2 / np.sqrt(12))
    assert compute("matthews_correlation", [0, 0, 0], [0, 0, 0]) == 0.0  # one class: no correlation


# ------------------------------------------------------------------------------ correlations
def test_pearson():
    assert compute("pearson", [1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert compute("pearson", [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    # x = (-1, 0, 1), y = (1, -1, 0) centred: sum xy = -1, |x| = |y| = sqrt 2 -> -1/2
    assert compute("pearson", [1.0, 2.0, 3.0], [3.0, 1.0, 2.0]) == pytest.approx(-0.5)


def test_spearman_uses_ranks():
    assert compute("spearmanr", [1.0, 2.0, 3.0, 4.0], [1.0, 10.0, 100.0, 1000.0]) == pytest.approx(1.0)
    # ranks (1, 2, 3) against (3, 1, 2): as the Pearson case above, -1/2
    assert compute("spearmanr", [0.1, 0.5, 0.9], [30.0, 10.0, 20.0]) == pytest.approx(-0.5)


@pytest.mark.parametrize("name", ["pearson", "spearmanr"])
def test_correlations_of_constant_or_tiny_inputs_are_zero(name):
    assert compute(name, [2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
    assert compute(name, [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]) == 0.0
    assert compute(name, [1.0], [1.0]) == 0.0


# ------------------------------------------------------------------------------ entity F1
def test_entity_f1_over_sentences_of_different_lengths():
    ref = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"], ["B-LOC", "O", "O", "O", "B-PER", "I-PER"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["O", "B-ORG"], ["B-LOC", "O", "O", "O", "B-PER", "O"]]
    # reference entities: PER(0-2), LOC(3), ORG, LOC, PER(4-6) = 5; predicted: PER(0-2), ORG, LOC, PER(4) = 4
    # correct: PER(0-2), ORG, LOC = 3 -> precision 3/4, recall 3/5, F1 = 2/3
    assert compute("entity_f1", pred, ref) == pytest.approx(2 / 3)


def test_entity_f1_spans_follow_conlleval():
    # An I- tag after O opens an entity; an I- of another type closes one and opens another.
    assert compute("entity_f1", [["O", "I-x", "I-x"]], [["O", "B-x", "I-x"]]) == 1.0
    assert compute("entity_f1", [["B-x", "I-y"]], [["B-x", "B-y"]]) == 1.0
    assert compute("entity_f1", [["B-x", "I-x"]], [["B-x", "B-x"]]) == 0.0
    assert compute("entity_f1", [["O", "O"]], [["O", "O"]]) == 0.0  # no entity anywhere
    assert compute("entity_f1", [], []) == 0.0


def test_unknown_metric_is_a_key_error():
    with pytest.raises(KeyError):
        compute("bleu", [0], [0])


# ------------------------------------------------------------------------------ chance levels
def test_chance_of_accuracy_is_the_majority_share():
    assert chance_level("accuracy", [0, 1, 1, 1]) == 0.75
    assert chance_level("accuracy", []) == 0.0


def test_chance_of_f1_is_the_majority_guess_scored_on_the_task_labels():
    # Two labels, majority 1 (3 of 4): precision 3/4, recall 1 -> F1 6/7.
    assert chance_level("f1", [0, 1, 1, 1], num_labels=2) == pytest.approx(6 / 7)
    # Two labels, majority 0: label 1 is never predicted -> 0.
    assert chance_level("f1", [0, 0, 0, 1], num_labels=2) == 0.0
    # Four labels, majority 2 (2 of 3): F1(label 2) = 2 * (2/3) / (1 + 2/3) = 0.8, the other three 0.
    assert chance_level("f1", [2, 2, 0], num_labels=4) == pytest.approx(0.8 / 4)


@pytest.mark.parametrize("name", ["matthews_correlation", "pearson", "spearmanr", "entity_f1"])
def test_chance_of_correlations_and_entity_f1_is_zero(name):
    assert chance_level(name, [0, 1, 1]) == 0.0

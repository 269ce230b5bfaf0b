"""trainer.tasks.metrics: every metric on known values, its edge cases, and its chance level.

Expected values are worked out by hand from the definitions, not read back from scikit-learn,
sacrebleu or rouge-score.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT
from trainer.tasks.metrics import (
    CLASS_METRICS,
    GENERATION_METRICS,
    METRICS,
    answer_scores,
    chance_level,
    compute,
    generation_chance,
    normalize_answer,
)

# Every metric of trainer.tasks.metrics must have a test here: a new one fails this until it gets one.
TESTED = {"accuracy", "f1", "matthews_correlation", "pearson", "spearmanr", "entity_f1", "exact_match", "chrf", "bleu", "rougeL",
          "masked_accuracy", "f1_micro", "f1_macro", "subset_accuracy"}


def test_every_metric_is_tested_here():
    assert set(METRICS) == TESTED


# ------------------------------------------------------------------------------ accuracy
def test_accuracy():
    assert compute("accuracy", [0, 1, 2, 1], [0, 1, 1, 1]) == 0.75
    assert compute("accuracy", ["O", "B-x"], ["O", "O"]) == 0.5
    assert compute("accuracy", [], []) == 0.0


def test_masked_accuracy_is_the_accuracy_of_the_masked_tokens_ids():
    assert compute("masked_accuracy", [5, 9, 7], [5, 8, 7]) == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------ extractive answers (SQuAD)
def test_answers_are_normalized_as_the_official_squad_evaluation_does():
    assert normalize_answer("The  Farm!") == "farm"
    assert normalize_answer("an apple, a pear.") == "apple pear"
    assert normalize_answer("Theatre") == "theatre"  # articles as words only


def test_squad_scores_take_the_best_gold_answer_and_the_empty_answer_to_no_question():
    scores = answer_scores(["the farm", "red car", "", "blue"], [["Farm"], ["a red bus", "car"], [], ["green"]])
    assert scores["exact_match"] == pytest.approx(2 / 4)  # "farm", and the empty answer to an unanswerable question
    # "red car" against "red bus" has F1 1/2, against "car" 2/3 (precision 1/2, recall 1): the best counts.
    assert scores["f1"] == pytest.approx((1 + 2 / 3 + 1 + 0) / 4)
    assert answer_scores(["x"], [[]]) == {"exact_match": 0.0, "f1": 0.0}  # an answer where there is none
    assert answer_scores([], []) == {"exact_match": 0.0, "f1": 0.0}
    with pytest.raises(ValueError, match="2 answers for 1 questions"):
        answer_scores(["a", "b"], [["a"]])


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
        compute("meteor", [0], [0])


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


# ------------------------------------------------------------------------------ label sets (multi-label)
# Four rows, three labels. Predictions against references:
#   row 0: {0} for {0, 2}  row 1: {1, 2} for {1}  row 2: {} for {}  row 3: {0, 1} for {0, 1}
LABEL_SETS_REF = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 0]])
LABEL_SETS_PRED = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 0]])


def test_label_set_metrics_on_a_hand_computed_example():
    pred, ref = LABEL_SETS_PRED, LABEL_SETS_REF
    # Pooled: TP 4 (row 0's 0, row 1's 1, row 3's two), FP 1 (row 1's 2), FN 1 (row 0's 2): 8 / 10.
    assert compute("f1_micro", pred, ref, 3) == pytest.approx(0.8)
    # Per label: 0 and 1 are perfect (F1 1), label 2 has FP 1 and FN 1 (F1 0): 2 / 3.
    assert compute("f1_macro", pred, ref, 3) == pytest.approx(2 / 3)
    # Exact sets: rows 2 and 3.
    assert compute("subset_accuracy", pred, ref, 3) == 0.5


def test_label_set_metrics_average_over_the_tasks_labels_and_refuse_other_shapes():
    # A fourth label that no row has and none predicts scores 0 in the macro average (as f1 does).
    pred, ref = np.pad(LABEL_SETS_PRED, ((0, 0), (0, 1))), np.pad(LABEL_SETS_REF, ((0, 0), (0, 1)))
    assert compute("f1_macro", pred, ref, 4) == pytest.approx(2 / 4)
    assert compute("f1_micro", pred, ref, 4) == pytest.approx(0.8)
    assert compute("f1_micro", np.zeros((2, 3)), np.zeros((2, 3)), 3) == 0.0  # nothing to find, nothing found
    assert compute("subset_accuracy", np.zeros((0, 3)), np.zeros((0, 3)), 3) == 0.0
    for name in ("f1_micro", "f1_macro", "subset_accuracy"):
        with pytest.raises(ValueError, match="rows x 4"):
            compute(name, LABEL_SETS_PRED, LABEL_SETS_REF, 4)
        with pytest.raises(ValueError, match="multi-hot arrays"):
            compute(name, [1, 0], [1, 0], 2)  # class ids, not label sets


def test_chance_of_label_set_metrics_is_the_best_constant_label_set():
    # On LABEL_SETS_REF (labels 0 and 1 in half the rows, 2 in a quarter: none in more than half):
    #   {}: micro 0, macro 0, subset 1/4 (row 2)
    #   every label: TP 5, FP 7, FN 0: micro 10/17; per label 2/3, 2/3, 2/5: macro 26/45; subset 0
    #   the most frequent row set, {0, 2} (all rows differ: the first): micro 6/13, macro 16/45, subset 1/4
    assert chance_level("f1_micro", LABEL_SETS_REF, 3) == pytest.approx(10 / 17)
    assert chance_level("f1_macro", LABEL_SETS_REF, 3) == pytest.approx(26 / 45)
    assert chance_level("subset_accuracy", LABEL_SETS_REF, 3) == pytest.approx(0.25)
    # Label 0 in 3 rows of 4: the set of the labels of most rows, {0}, is the best constant for
    # micro F1 (TP 3, FP 1, FN 2: 6 / 9), above every label (TP 5, FP 7: 10 / 17).
    refs = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1], [0, 0, 0]])
    assert chance_level("f1_micro", refs, 3) == pytest.approx(6 / 9)
    # Rows {2}, {2}, {0, 1}, {0, 3}, {1, 3}: no label in more than half the rows, so only the most
    # frequent row set, {2}, gets any row exactly right.
    refs = np.array([[0, 0, 1, 0], [0, 0, 1, 0], [1, 1, 0, 0], [1, 0, 0, 1], [0, 1, 0, 1]])
    assert chance_level("subset_accuracy", refs, 4) == pytest.approx(2 / 5)
    assert chance_level("subset_accuracy", np.zeros((0, 2)), 2) == 0.0


# ------------------------------------------------------------------------------ generated texts
def test_generation_metrics_are_the_text_metrics():
    assert GENERATION_METRICS == {"exact_match", "chrf", "bleu", "rougeL"} and GENERATION_METRICS <= set(METRICS)
    assert not GENERATION_METRICS & CLASS_METRICS


def test_exact_match_collapses_whitespace_and_keeps_case():
    pred = ["Paris", " Paris\n", "paris", "New  York", "New\tYork", "New York City"]
    ref = ["Paris", "Paris", "Paris", "New York", "New York", "New York"]
    # equal once whitespace is collapsed: rows 1, 2, 4, 5; "paris" (case) and "New York City" are not
    assert compute("exact_match", pred, ref) == pytest.approx(4 / 6)
    assert compute("exact_match", ["", " "], ["", ""]) == 1.0  # an empty answer can be right


@pytest.mark.parametrize("name", sorted(GENERATION_METRICS))
def test_generation_metrics_of_identical_and_disjoint_texts(name):
    same = ["the cat sat on the mat", "a dog ran across the road today"]
    assert compute(name, same, same) == pytest.approx(1.0)  # 0-1, not sacrebleu's 0-100
    assert compute(name, ["xyz qqq vvv www", "kkk jjj"], same) == 0.0


@pytest.mark.parametrize("name", sorted(GENERATION_METRICS))
def test_generation_metrics_of_no_rows_are_zero(name):
    assert compute(name, [], []) == 0.0


@pytest.mark.parametrize("name", sorted(GENERATION_METRICS))
def test_generation_metrics_need_one_prediction_per_reference(name):
    with pytest.raises(ValueError, match="1 predictions for 2 references"):
        compute(name, ["a b c d"], ["a b c d", "e f g h"])


def test_chrf_is_the_corpus_f2_of_character_ngrams():
    # "abc" against "abd": 1-grams 2 of 3 match (P = R = 2/3), 2-grams 1 of 2 (1/2), 3-grams 0 of 1;
    # P and R averaged over the 3 orders both present: 7/18 each, so F2 = 7/18.
    assert compute("chrf", ["abc"], ["abd"]) == pytest.approx(7 / 18)
    # "ab" against "abc": P = (1 + 1) / 2 = 1, R = (2/3 + 1/2) / 2 = 7/12 (no 3-gram predicted):
    # F2 = 5PR / (4P + R) = 7/11, recall weighs more.
    assert compute("chrf", ["ab"], ["abc"]) == pytest.approx(7 / 11)
    # Both as one corpus: counts summed over rows, not a mean of the two scores.
    # 1-grams 4/5 predicted, 4/6 reference; 2-grams 2/3, 2/4; 3-grams 0/1, 0/2.
    p, r = (4 / 5 + 2 / 3 + 0) / 3, (4 / 6 + 2 / 4 + 0) / 3
    assert compute("chrf", ["abc", "ab"], ["abd", "abc"]) == pytest.approx(5 * p * r / (4 * p + r))
    assert compute("chrf", ["a b c"], ["abc"]) == pytest.approx(1.0)  # whitespace is not a character n-gram


def test_bleu_is_the_geometric_mean_of_ngram_precisions():
    # "the cat sat on the mat" against "the cat sat on a mat" (6 words each, brevity penalty 1):
    # 1-grams 5/6 (one "the" clipped), 2-grams 3/5, 3-grams 2/4, 4-grams 1/3 -> (1/12) ** (1/4).
    assert compute("bleu", ["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx((1 / 12) ** 0.25)
    # 4 of 6 words: every n-gram precision 1, brevity penalty exp(1 - 6/4).
    assert compute("bleu", ["the cat sat on"], ["the cat sat on a mat"]) == pytest.approx(np.exp(1 - 6 / 4))
    assert compute("bleu", ["the cat sat"], ["the cat sat on a mat"]) == 0.0  # no 4-gram predicted at all


def test_bleu_of_answers_shorter_than_four_words_is_zero():
    assert compute("bleu", ["yes", "New York"], ["yes", "New York"]) == 0.0  # why short answers use exact_match or chrf


def test_rouge_l_is_the_mean_lcs_f_measure_with_stemming():
    # "cats" stems to "cat": common subsequence the cat sat on mat = 5 of 6 words each way -> F 5/6
    # (4/6 without the stemmer); the second row shares no word -> 0.
    pred, ref = ["the cats sat on the mat", "hello"], ["the cat sat on a mat", "goodbye"]
    assert compute("rougeL", pred, ref) == pytest.approx((5 / 6 + 0) / 2)
    # subsequence, not substring: "a b c d" against "a x b y c": LCS a b c, P 3/4, R 3/5 -> F 2/3
    assert compute("rougeL", ["a b c d"], ["a x b y c"]) == pytest.approx(2 / 3)
    assert compute("rougeL", ["The Cat, sat!"], ["the cat sat"]) == 1.0  # lowercased, punctuation dropped
    assert compute("rougeL", ["日本語"], ["日本語"]) == 0.0  # outside a-z0-9 nothing is a token (documented)


def test_modules_import_neither_sacrebleu_nor_rouge_score():
    code = ("import sys, trainer.tasks.metrics; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('sacrebleu', 'rouge_score', 'nltk', 'absl')); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generation_metrics_need_no_network_and_no_nltk_data():
    # Sockets refuse to connect and NLTK finds no data: a download or a data lookup fails the run.
    code = ("import socket, sys\n"
            "def refuse(*a, **k): raise OSError('no network in this test')\n"
            "socket.socket.connect = socket.create_connection = refuse\n"
            "import nltk; nltk.data.path[:] = []\n"
            "from trainer.tasks.metrics import GENERATION_METRICS, compute\n"
            "for name in sorted(GENERATION_METRICS):\n"
            "    print(name, compute(name, ['the cats sat on the mat'], ['the cat sat on a mat']))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    scores = dict(line.split() for line in result.stdout.splitlines())
    assert set(scores) == GENERATION_METRICS and float(scores["rougeL"]) == pytest.approx(5 / 6)


# ------------------------------------------------------------------------------ chance of generated texts
def test_generation_chance_without_prompts_is_the_better_of_empty_and_majority_outputs():
    # The majority answer "yes" (whitespace collapsed) on every row: 3 of 4.
    assert generation_chance("exact_match", ["yes", "no", "yes", " yes "]) == 0.75
    assert generation_chance("exact_match", ["", "", "a"]) == pytest.approx(2 / 3)  # empty answers are right
    # Every reference differs: no majority answer, and an empty output scores 0.
    assert generation_chance("exact_match", ["a", "b", "c"]) == 0.0
    assert generation_chance("rougeL", ["the cat sat on the mat", "a dog ran"]) == 0.0
    # A repeated reference on every row: ROUGE-L 1 on two rows, 0 on the third.
    assert generation_chance("rougeL", ["a dog ran", "the cat sat", "a dog ran"]) == pytest.approx(2 / 3)
    assert generation_chance("bleu", []) == 0.0


def test_generation_chance_with_prompts_counts_copying_the_prompt():
    refs = ["the cat sat on the mat", "a dog ran"]
    prompts = ["the cat sat on the mat today", "a dog ran off"]
    # Copying: row 1 LCS 6, P 6/7, R 1 -> F 12/13; row 2 LCS 3, P 3/4, R 1 -> F 6/7.
    assert generation_chance("rougeL", refs, prompts) == pytest.approx((12 / 13 + 6 / 7) / 2)
    assert generation_chance("rougeL", refs, ["x", "y"]) == 0.0  # a prompt that shares nothing adds nothing
    # Where copying scores less than the majority answer, the majority stays the chance level.
    assert generation_chance("exact_match", ["yes", "yes", "no"], ["Is it?", "Is it?", "Is it?"]) == pytest.approx(2 / 3)


def test_generation_chance_refuses_other_metrics_and_unmatched_prompts():
    with pytest.raises(ValueError, match="not a generation metric.*chance_level"):
        generation_chance("accuracy", ["a"])
    with pytest.raises(KeyError):
        generation_chance("meteor", ["a"])
    with pytest.raises(ValueError, match="1 prompts for 2 references"):
        generation_chance("chrf", ["a", "b"], ["a"])


@pytest.mark.parametrize("name", sorted(GENERATION_METRICS))
def test_chance_level_of_a_generation_metric_points_to_generation_chance(name):
    with pytest.raises(ValueError, match="generation_chance"):
        chance_level(name, ["a", "b"])

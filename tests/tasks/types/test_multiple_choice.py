"""The multiple-choice type's interface on a few rows: choices as a list column or as columns,
an optional question, one encoding per choice."""

from __future__ import annotations

import numpy as np
import pytest

from tests.tasks.types.conftest import make_spec, rows
from trainer.tasks import TaskError
from trainer.tasks.types import TASK_TYPES

TYPE = TASK_TYPES["multiple_choice"]
DATA = rows(question=["is there a tool", "is there a dog"], choices=[["a saw", "a dog", "a cat"], ["a saw", "a dog", "a cat"]],
            label=[0, 1])


def spec(**declaration):
    return make_spec("multiple_choice", columns={"question": "question"}, **declaration)


def test_declaration_and_labels_from_the_number_of_choices():
    assert TYPE.head_class().__name__ == "AutoModelForMultipleChoice" and TYPE.pipeline is None
    resolved = TYPE.resolve_labels(spec(), DATA)
    assert resolved.labels == ("0", "1", "2")
    TYPE.check_labels(resolved, "train", DATA)
    with pytest.raises(TaskError, match="every example needs the same number of choices as 'labels' \\(3\\); found \\[2, 3\\]"):
        TYPE.check_labels(resolved, "validation", rows(question=["q", "r"], choices=[["a", "b"], ["a", "b", "c"]], label=[0, 1]))
    with pytest.raises(TaskError, match="1 choice\\(s\\) per example"):
        TYPE.resolve_labels(spec(), rows(question=["q"], choices=[["a"]], label=[0]))
    with pytest.raises(TaskError, match="must hold a list of choices"):
        TYPE.resolve_labels(spec(), rows(question=["q"], choices=["a, b"], label=[0]))
    letters = spec(labels=["A", "B", "C"])
    TYPE.check_labels(letters, "train", rows(question=["q"], choices=[{"label": ["A", "B", "C"], "text": ["x", "y", "z"]}],
                                             label=["C"]))


def test_encode_one_row_per_choice_grouped_and_collate(tokenizer):
    resolved = TYPE.resolve_labels(spec(), DATA)
    enc = TYPE.encode(resolved, DATA.to_dict(), tokenizer, 16, with_labels=True)
    assert [len(row) for row in enc["input_ids"]] == [3, 3] and enc["labels"] == [0, 1]
    assert tokenizer.decode(enc["input_ids"][0][1], skip_special_tokens=True) == "is there a tool a dog"
    as_columns = make_spec("multiple_choice", columns={"choices": ["c0", "c1"]})
    plain = TYPE.encode(as_columns, {"c0": ["a saw"], "c1": ["a dog"], "label": [1]}, tokenizer, 16, with_labels=False)
    assert [tokenizer.decode(ids, skip_special_tokens=True) for ids in plain["input_ids"][0]] == ["a saw", "a dog"]
    examples = [{k: enc[k][i] for k in enc} for i in range(2)]
    collated = TYPE.collator(tokenizer)(examples)
    assert tuple(collated["input_ids"].shape[:2]) == (2, 3) and collated["labels"].tolist() == [0, 1]


def test_head_config_predictions_scores_and_chance(encoder_config):
    resolved = TYPE.resolve_labels(spec(), DATA)
    cfg = TYPE.head_config(encoder_config, resolved)
    assert cfg.num_labels == 3 and cfg.problem_type is None
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert TYPE.decode(resolved, logits).tolist() == [0, 2]
    assert TYPE.score(resolved, logits, np.array([0, 1])) == {"accuracy": 0.5}
    assert TYPE.chance(resolved, np.array([0, 1])) == {"accuracy": 0.5}
    assert [r["label"] for r in TYPE.prediction_rows(resolved, logits, None)] == ["0", "2"]


# The official CommonsenseQA files: choices as a list of {label, text} objects, the label naming one.
def _objects(*labels: str) -> list[dict]:
    return [{"label": label, "text": {"A": "a saw", "B": "a dog", "C": "a cat"}.get(label, "a")} for label in labels]


LABELLED = rows(question=["is there a dog", "is there a cat", "is there a dog"], choices=[_objects("A", "B", "C"), _objects("A", "B", "C"), _objects("C", "A", "B")],
                label=["B", "C", "A"])


def test_choices_as_labelled_objects_name_the_right_one_by_its_label(tokenizer):
    resolved = TYPE.resolve_labels(spec(), LABELLED)
    assert resolved.labels == ("A", "B", "C")  # the first train row's choice labels
    assert TYPE.first_label_problem(resolved, LABELLED) is None
    TYPE.check_labels(resolved, "train", LABELLED)
    enc = TYPE.encode(resolved, LABELLED.to_dict(), tokenizer, 16, with_labels=True)
    assert enc["labels"] == [1, 2, 1]  # row 2's "A" is its second choice
    assert tokenizer.decode(enc["input_ids"][2][1], skip_special_tokens=True) == "is there a dog a saw"
    hub = rows(question=["q"], choices=[{"label": ["A", "B"], "text": ["x", "y"]}], label=["B"])  # the Hub's form
    assert TYPE.encode(TYPE.resolve_labels(spec(), hub), hub.to_dict(), tokenizer, 16, with_labels=True)["labels"] == [1]
    declared = spec(labels=["first", "second", "third"])  # declared names win; the index is still the row's
    assert TYPE.encode(declared, LABELLED.to_dict(), tokenizer, 16, with_labels=True)["labels"] == [1, 2, 1]


def test_a_label_not_among_the_rows_choice_labels_and_choices_without_text():
    bad = rows(question=["q0", "q1"], choices=[_objects("A", "B"), _objects("A", "B")], label=["A", "E"])
    assert TYPE.first_label_problem(spec(), bad) == (
        1, "label 'E' in column 'label' is not among the row's choice labels (A, B); fix the label or the choices")
    with pytest.raises(TaskError, match=r"^task 't': column 'choices' holds objects with fields label, value; each choice needs a 'text' field"):
        TYPE.resolve_labels(spec(), rows(question=["q"], choices=[[{"label": "A", "value": "x"}, {"label": "B", "value": "y"}]], label=["A"]))
    with pytest.raises(TaskError, match="the first row's choice labels repeat"):
        TYPE.resolve_labels(spec(), rows(question=["q"], choices=[_objects("A", "A")], label=["A"]))


def test_predict_inputs_with_labelled_choices_get_a_label_their_rows_name(encoder_config):
    resolved = TYPE.resolve_labels(spec(), LABELLED)
    inputs = TYPE.placeholder_labels(resolved, LABELLED.remove_columns("label"))
    assert inputs["label"] == ["A", "A", "C"]
    logits = np.array([[0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    assert [(r["label"], r["index"]) for r in TYPE.prediction_rows(resolved, logits, None)] == [("B", 1), ("C", 2)]

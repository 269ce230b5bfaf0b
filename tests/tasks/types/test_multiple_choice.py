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

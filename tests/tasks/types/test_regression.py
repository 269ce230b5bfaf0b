"""The regression type's interface on a few rows: a number per row, no label set."""

from __future__ import annotations

import numpy as np
import pytest

from tests.tasks.types.conftest import make_spec, rows
from trainer.tasks import TaskError
from trainer.tasks.types import TASK_TYPES

TYPE = TASK_TYPES["regression"]


def test_declaration_takes_no_labels_and_one_output():
    assert not TYPE.has_label_set and TYPE.default_metrics == ("pearson", "spearmanr")
    assert make_spec("regression").num_labels == 1
    with pytest.raises(TaskError, match="a regression task has num_labels=1, got 3"):
        make_spec("regression", num_labels=3)
    with pytest.raises(TaskError, match="predicts a number and takes no 'labels'"):
        make_spec("regression", labels=["low", "high"])
    with pytest.raises(TaskError, match="accuracy do not apply to type regression"):
        make_spec("regression", metrics=["accuracy"])


@pytest.mark.parametrize(("value", "problem"), [
    ("", "no label in column 'label'"), ("high", "label 'high' in column 'label' is not a number"),
    ("nan", "label 'nan' in column 'label' is not a finite number"), (float("inf"), "is not a finite number")])
def test_a_label_that_is_not_a_finite_number_is_named(value, problem):
    first = 1.5 if isinstance(value, float) else "1.5"  # a column holds one type
    found = TYPE.first_label_problem(make_spec("regression"), rows(text=["a", "b"], label=[first, value]))
    assert found[0] == 1 and problem in found[1]


def test_encode_scores_and_predictions(tokenizer, encoder_config):
    spec = make_spec("regression")
    assert TYPE.resolve_labels(spec, rows(text=["a"], label=["1"])) is spec  # nothing to resolve
    TYPE.check_labels(spec, "train", rows(text=["a"], label=["4.5"]))
    enc = TYPE.encode(spec, {"text": ["a saw", "a dog"], "label": ["0.5", 4]}, tokenizer, 16, with_labels=True)
    assert enc["labels"] == [0.5, 4.0] and len(enc["input_ids"]) == 2
    cfg = TYPE.head_config(encoder_config, spec)
    assert (cfg.num_labels, cfg.problem_type, cfg.id2label) == (1, "regression", {0: "score"})
    logits = np.array([[0.5], [1.0], [3.0]])
    assert TYPE.decode(spec, logits).tolist() == [0.5, 1.0, 3.0]
    assert TYPE.score(spec, logits, np.array([0.0, 1.0, 2.0])) == {"pearson": pytest.approx(0.9449, abs=1e-4),
                                                                   "spearmanr": pytest.approx(1.0)}
    assert TYPE.chance(spec, np.array([0.0, 1.0, 2.0])) == {"pearson": 0.0, "spearmanr": 0.0}
    assert TYPE.prediction_rows(spec, logits, None) == [{"score": 0.5}, {"score": 1.0}, {"score": 3.0}]
    assert TYPE.placeholder_labels(spec, rows(text=["x"]))["label"] == [0.0]

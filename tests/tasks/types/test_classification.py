"""The classification type's interface on a few rows: declaration, label checks, encoding,
collation, head, predictions, scores and chance."""

from __future__ import annotations

import numpy as np
import pytest

from tests.tasks.types.conftest import make_spec, rows
from trainer.tasks import TaskError
from trainer.tasks.types import TASK_TYPES

TYPE = TASK_TYPES["classification"]
DATA = rows(text=["a saw", "a dog", "the cat", "a saw"], text_pair=["a tool", "an animal", "an animal", "a tool"],
            label=["tool", "animal", "animal", "tool"])


def spec(**declaration):
    return make_spec("classification", columns={"text_pair": "text_pair"}, **declaration)


def test_declaration_roles_head_and_export():
    assert TYPE.required_columns == ("text", "label") and TYPE.optional_columns == ("text_pair",)
    assert TYPE.head_class().__name__ == "AutoModelForSequenceClassification"
    assert TYPE.pipeline == "text-classification" and TYPE.default_metrics == ("accuracy",)
    with pytest.raises(TaskError, match="num_labels=1 is regression"):
        spec(num_labels=1)
    with pytest.raises(TaskError, match="metric.* pearson do not apply to type classification"):
        spec(metrics=["pearson"])


def test_labels_are_read_from_the_train_split_sorted_and_checked_on_every_split():
    resolved = TYPE.resolve_labels(spec(), DATA)
    assert resolved.labels == ("animal", "tool") and resolved.num_labels == 2
    assert TYPE.first_label_problem(resolved, rows(text=["x", "y"], label=["tool", " "])) == (
        1, "no label in column 'label'; give the row its label or remove it (check for a missing field)")
    with pytest.raises(TaskError, match="label 'plant' in column 'label' is not in the label set \\[animal, tool\\]"):
        TYPE.check_labels(resolved, "validation", rows(text=["x"], label=["plant"]))
    with pytest.raises(TaskError, match="every label in column 'label' is 'tool'"):
        TYPE.resolve_labels(spec(), rows(text=["x", "y"], label=["tool", "tool"]))
    declared = spec(labels=["tool", "animal"])
    assert TYPE.resolve_labels(declared, DATA).labels == ("tool", "animal")  # the declared order is kept


def test_encode_pairs_with_and_without_labels_and_collate(tokenizer):
    resolved = TYPE.resolve_labels(spec(), DATA)
    batch = DATA.to_dict()
    enc = TYPE.encode(resolved, batch, tokenizer, 16, with_labels=True)
    assert enc["labels"] == [1, 0, 0, 1]
    assert tokenizer.decode(enc["input_ids"][0], skip_special_tokens=True) == "a saw a tool"
    assert "labels" not in TYPE.encode(resolved, batch, tokenizer, 16, with_labels=False)
    examples = [{k: enc[k][i] for k in enc} for i in range(2)]
    collated = TYPE.collator(tokenizer)(examples)
    assert collated["input_ids"].shape[0] == 2 and collated["labels"].tolist() == [1, 0]


def test_head_config_predictions_scores_and_chance(encoder_config):
    resolved = TYPE.resolve_labels(spec(), DATA)
    cfg = TYPE.head_config(encoder_config, resolved)
    assert (cfg.num_labels, cfg.problem_type, cfg.id2label) == (2, "single_label_classification", {0: "animal", 1: "tool"})
    assert encoder_config.num_labels == 2 and encoder_config.problem_type is None  # a copy was changed
    logits = np.array([[0.1, 2.0], [3.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    labels = np.array([1, 0, 0, 1])
    assert TYPE.decode(resolved, logits).tolist() == [1, 0, 1, 0]
    assert TYPE.score(resolved, logits, labels) == {"accuracy": 0.5}
    assert TYPE.chance(resolved, labels) == {"accuracy": 0.5}
    first = TYPE.prediction_rows(resolved, logits, labels)[0]
    assert first["label"] == "tool" and first["index"] == 1 and sum(first["probabilities"]) == pytest.approx(1)
    placeholder = TYPE.placeholder_labels(resolved, rows(text=["x", "y"]))
    assert placeholder["label"] == ["animal", "animal"]

"""The token-classification type's interface on a few rows: a tag per word, the first sub-token
labelled, -100 elsewhere, entity F1 on tag sequences."""

from __future__ import annotations

import numpy as np
import pytest

from tests.tasks.types.conftest import make_spec, rows
from trainer.tasks import TaskError
from trainer.tasks.types import TASK_TYPES

TYPE = TASK_TYPES["token_classification"]
DATA = rows(tokens=[["the", "saw"], ["a", "dog", "is"]], label=[["O", "B-TOOL"], ["O", "B-ANIMAL", "O"]])


def spec(**declaration):
    return make_spec("token_classification", **declaration)


def test_declaration_and_tags_read_from_every_row():
    assert TYPE.tokenizer_kwargs == {"add_prefix_space": True} and TYPE.pipeline == "token-classification"
    assert "entity_f1" in TYPE.metrics
    resolved = TYPE.resolve_labels(spec(), DATA)
    assert resolved.labels == ("B-ANIMAL", "B-TOOL", "O")
    with pytest.raises(TaskError, match="label 'I-TOOL' in column 'label' is not in the label set"):
        TYPE.check_labels(resolved, "validation", rows(tokens=[["a"]], label=[["I-TOOL"]]))


@pytest.mark.parametrize(("tags", "problem"), [
    (None, "no tags in column 'label'"), (["O", ""], "tag 2 in column 'label' is empty"),
    (["O"], "2 tokens but 1 tags in column 'label'")])
def test_a_row_whose_tags_do_not_fit_its_words_is_named(tags, problem):
    data = rows(tokens=[["a", "b"], ["c", "d"]], label=[["O", "O"], tags])
    found = TYPE.first_label_problem(spec(), data)
    assert found[0] == 1 and found[1].startswith(problem)


def test_encode_labels_the_first_sub_token_of_each_word_and_collate(tokenizer):
    resolved = TYPE.resolve_labels(spec(), DATA)
    enc = TYPE.encode(resolved, DATA.to_dict(), tokenizer, 16, with_labels=True)
    assert enc["labels"] == [[-100, 2, 1, -100], [-100, 2, 0, 2, -100]]  # [CLS] the saw [SEP]
    collated = TYPE.collator(tokenizer)([{k: enc[k][i] for k in enc} for i in range(2)])
    assert collated["labels"].tolist()[0] == [-100, 2, 1, -100, -100]  # padded with -100
    TYPE.check_tokenizer(resolved, tokenizer)

    class Slow:
        is_fast = False

    with pytest.raises(TaskError, match="needs a fast \\(Rust\\) tokenizer"):
        TYPE.check_tokenizer(resolved, Slow())


def test_predictions_scores_and_chance_at_the_words_only(encoder_config):
    resolved = TYPE.resolve_labels(spec(metrics=["accuracy", "entity_f1"]), DATA)
    assert TYPE.head_config(encoder_config, resolved).num_labels == 3
    labels = np.array([[-100, 2, 1, -100, -100], [-100, 2, 0, 2, -100]])
    logits = np.zeros((2, 5, 3))
    logits[0, :, 2] = 1  # all O: misses the tool
    logits[1, :, 0], logits[1, 1, 2], logits[1, 3, 2] = 1, 2, 2  # O B-ANIMAL O: right
    pred, ref = TYPE.decode(resolved, logits, labels)
    assert pred == [["O", "O"], ["O", "B-ANIMAL", "O"]] and ref == [["O", "B-TOOL"], ["O", "B-ANIMAL", "O"]]
    assert TYPE.score(resolved, logits, labels) == {"accuracy": 0.8, "entity_f1": pytest.approx(2 / 3)}
    ragged = [[-100, 2, 1, -100], [-100, 2, 0, 2, -100]]  # a tokenized split's labels
    assert TYPE.chance(resolved, ragged) == {"accuracy": 0.6, "entity_f1": 0.0}
    assert TYPE.prediction_rows(resolved, logits, labels) == [{"tags": ["O", "O"]}, {"tags": ["O", "B-ANIMAL", "O"]}]
    assert TYPE.placeholder_labels(resolved, rows(tokens=[["a", "b", "c"]]))["label"] == [["B-ANIMAL"] * 3]

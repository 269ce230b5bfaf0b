"""The masked-LM type: unlabeled text masked by transformers' collator in training, masked the
same way at every evaluation without touching the training's random stream, the user's mask
tokens filled in `predict`, and masked-token accuracy against the most frequent token."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tasks.types.conftest import make_spec, rows
from trainer.tasks import TaskError
from trainer.tasks.types import TASK_TYPES
from trainer.tasks.types.base import IGNORED
from trainer.tasks.types.masked_lm import TOP_K

TYPE = TASK_TYPES["masked_lm"]
TEXTS = ["the cat is near the park", "the dog is near the red car", "a bird is near the farm", "the cow is near the bus"] * 4


def spec(**declaration):
    return make_spec("masked_lm", **declaration)


def encoded(tokenizer, texts=TEXTS):
    import datasets

    return datasets.Dataset.from_dict(TYPE.encode(spec(), {"text": texts}, tokenizer, 32, with_labels=True))


def test_the_declaration_takes_a_text_column_and_no_labels():
    assert spec().columns == {"text": "text"} and spec().metrics == ("masked_accuracy",)
    assert TYPE.pipeline == "fill-mask" and TYPE.auto_class == "AutoModelForMaskedLM" and TYPE.label_columns == ()
    with pytest.raises(TaskError, match="masked_lm learns from unlabeled text and takes no 'labels'"):
        spec(labels=["a", "b"])
    with pytest.raises(TaskError, match="metric\\(s\\) accuracy do not apply to type masked_lm"):
        spec(metrics=["accuracy"])


def test_an_empty_text_is_named_and_a_tokenizer_without_a_mask_token_refused(tokenizer):
    found = TYPE.first_label_problem(spec(), rows(text=["the cat", "  ", "a dog"]))
    assert found == (1, "empty text in column 'text' (role 'text'): a masked-LM row needs text to mask; remove the row")
    assert TYPE.first_label_problem(spec(), rows(text=["the cat"])) is None

    class NoMask:
        mask_token_id = None

    with pytest.raises(TaskError, match="the tokenizer has no mask token, which masked_lm needs"):
        TYPE.check_tokenizer(spec(), NoMask())
    TYPE.check_tokenizer(spec(), tokenizer)


def test_training_masks_from_the_global_generator_and_labels_only_masked_tokens(tokenizer):
    data = encoded(tokenizer)
    collate = TYPE.collator(tokenizer)
    torch.manual_seed(0)
    first = collate([data[i] for i in range(len(data))])
    again = collate([data[i] for i in range(len(data))])
    torch.manual_seed(0)
    replayed = collate([data[i] for i in range(len(data))])
    assert torch.equal(first["labels"], replayed["labels"])  # the Trainer's saved RNG state replays it on resume
    assert not torch.equal(first["labels"], again["labels"])  # fresh masks every batch
    masked = first["labels"] != IGNORED
    assert 0 < masked.float().mean() < 0.5
    original = torch.nn.utils.rnn.pad_sequence([torch.tensor(x) for x in data["input_ids"]], batch_first=True,
                                               padding_value=tokenizer.pad_token_id)
    assert torch.equal(first["labels"][masked], original[masked])
    specials = torch.tensor([tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id])
    assert not torch.isin(original[masked], specials).any()  # [CLS], [SEP] and padding are never masked


def test_evaluation_masks_the_same_positions_every_time_and_leaves_the_global_generator_alone(tokenizer):
    data = encoded(tokenizer)
    collate = TYPE.eval_collator(tokenizer)
    examples = [data[i] for i in range(len(data))]
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    first = collate(examples)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(2)
    second = collate(examples)
    assert torch.equal(first["input_ids"], second["input_ids"]) and torch.equal(first["labels"], second["labels"])
    assert (first["labels"] != IGNORED).any()


def test_predict_fills_the_inputs_mask_tokens_and_masks_nothing_else(tokenizer):
    import datasets

    texts = ["the cat is near the [MASK]", "[MASK] dog is [MASK] the car"]
    data = datasets.Dataset.from_dict(TYPE.encode(spec(), {"text": texts}, tokenizer, 32, with_labels=True))
    batch = TYPE.predict_collator(tokenizer)([data[0], data[1]])
    mask = tokenizer.mask_token_id
    assert torch.equal(batch["labels"] != IGNORED, batch["input_ids"] == mask)
    assert (batch["input_ids"] == mask).sum(1).tolist() == [1, 2]
    logits = torch.randn(*batch["input_ids"].shape, len(tokenizer))
    ids, probabilities = TYPE.reduce_logits(logits, batch["labels"])
    assert ids.shape == (*batch["input_ids"].shape, TOP_K)
    out = TYPE.split_prediction_rows(spec(), (ids.numpy(), probabilities.numpy()), batch["labels"].numpy(), data, tokenizer)
    assert [len(r["masks"]) for r in out] == [1, 2]
    best = out[0]["masks"][0][0]
    position = int((batch["input_ids"][0] == mask).nonzero()[0])
    expected = int(logits[0, position].argmax())
    assert best["token"] == expected and best["token_str"] == tokenizer.decode([expected]).strip()
    assert best["score"] == pytest.approx(float(torch.softmax(logits[0, position], -1).max()), abs=1e-6)


def test_masked_accuracy_counts_masked_positions_only_and_chance_is_the_most_frequent_token(tokenizer):
    labels = np.array([[IGNORED, 5, IGNORED, 7], [6, IGNORED, IGNORED, IGNORED]])
    best = np.array([[9, 5, 9, 1], [6, 9, 9, 9]])
    ids = np.stack([best] + [np.zeros_like(best)] * (TOP_K - 1), axis=-1)
    assert TYPE.score(spec(), (ids, np.zeros(ids.shape)), labels) == {"masked_accuracy": pytest.approx(2 / 3)}
    data = encoded(tokenizer, ["the cat the dog", "the bird"])
    # Maskable tokens: the cat the dog the bird -> "the" is 3 of 6.
    assert TYPE.split_chance(spec(), data, tokenizer) == {"masked_accuracy": pytest.approx(3 / 6)}

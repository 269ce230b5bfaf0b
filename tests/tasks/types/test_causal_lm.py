"""The causal_lm type's interface on a few rows: prompt, separator and target become one
sequence with labels on the target and EOS only; prompts are cut from the left; predict encodes
prompts; scores and chance are on texts."""

from __future__ import annotations

import pytest

from tests.tasks.types.conftest import make_spec, rows
from trainer.tasks import TaskError
from trainer.tasks.types import TASK_TYPES

TYPE = TASK_TYPES["causal_lm"]


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt2):
    from transformers import AutoTokenizer

    from trainer.modeling import prepare_tokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_gpt2), ["<sep>"])


def spec(**declaration):
    return make_spec("causal_lm", columns={"prompt": "prompt", "target": "target"}, separator="<sep>",
                     special_tokens=["<sep>"], **declaration)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_declaration():
    assert TYPE.required_columns == ("target",) and TYPE.optional_columns == ("prompt",) and TYPE.generates
    assert TYPE.head_class().__name__ == "AutoModelForCausalLM" and TYPE.pipeline == "text-generation"
    assert set(TYPE.metrics) == {"exact_match", "chrf", "bleu", "rougeL"} and spec().primary_metric == "chrf"
    with pytest.raises(TaskError, match="generates text and takes no 'labels'"):
        spec(labels=["a", "b"])
    with pytest.raises(TaskError, match="accuracy do not apply to type causal_lm"):
        spec(metrics=["accuracy"])
    with pytest.raises(TaskError, match="'separator' applies to type causal_lm, not to type"):
        make_spec("classification", separator="<sep>")
    plain = make_spec("causal_lm")  # language modelling of `target` alone
    assert plain.columns == {"target": "target"} and plain.separator is None


def test_a_row_is_prompt_separator_target_eos_with_labels_on_the_target_only(tokenizer):
    data = {"prompt": ["red dog", "a cat"], "target": ["dog red", "cat a"]}
    enc = TYPE.encode(spec(), data, tokenizer, 32, with_labels=True)
    sep, eos = tokenizer.convert_tokens_to_ids("<sep>"), tokenizer.eos_token_id
    first = ids(tokenizer, "red dog") + [sep] + ids(tokenizer, "dog red") + [eos]
    assert enc["input_ids"][0] == first and enc["attention_mask"][0] == [1] * len(first)
    prompt_part = len(ids(tokenizer, "red dog")) + 1
    assert enc["labels"][0] == [-100] * prompt_part + ids(tokenizer, "dog red") + [eos]
    assert TYPE.split_texts(enc["input_ids"][0], enc["labels"][0]) == (first[:prompt_part], ids(tokenizer, "dog red"))
    # predict: the prompt and the separator only, where generation starts
    assert TYPE.encode(spec(), data, tokenizer, 32, with_labels=False)["input_ids"][1] == ids(tokenizer, "a cat") + [sep]


def test_a_long_row_loses_the_start_of_its_prompt_and_keeps_its_target(tokenizer):
    prompt = "the red dog is near the blue car"
    enc = TYPE.encode(spec(), {"prompt": [prompt], "target": ["dog red"]}, tokenizer, 8, with_labels=True)
    target = ids(tokenizer, "dog red") + [tokenizer.eos_token_id]
    assert len(enc["input_ids"][0]) == 8 and enc["input_ids"][0][-len(target):] == target
    kept = 8 - len(target) - 1
    assert enc["input_ids"][0][:kept] == ids(tokenizer, prompt)[-kept:]  # the end of the prompt, next to the target
    assert TYPE.encode(spec(), {"prompt": [prompt]}, tokenizer, 8, with_labels=False)["input_ids"][0][:-1] == \
        ids(tokenizer, prompt)[-7:]
    no_room = TYPE.encode(spec(), {"prompt": [prompt], "target": [prompt]}, tokenizer, 6, with_labels=True)
    assert len(no_room["input_ids"][0]) == 6 and no_room["labels"][0][0] == -100  # the separator stays before the target


def test_padding_is_on_the_right_with_labels_ignored_there_even_when_pad_is_eos(tokenizer):
    enc = TYPE.encode(spec(), {"prompt": ["red", "a red dog"], "target": ["red", "dog red a"]}, tokenizer, 32, with_labels=True)
    batch = TYPE.collator(tokenizer)([{k: enc[k][i] for k in enc} for i in range(2)])
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    short = len(enc["input_ids"][0])
    assert batch["attention_mask"][0].tolist()[short:] == [0] * (batch["input_ids"].shape[1] - short)
    assert batch["labels"][0].tolist()[short:] == [-100] * (batch["input_ids"].shape[1] - short)
    assert batch["labels"][0].tolist()[short - 1] == tokenizer.eos_token_id  # the real EOS is learned


def test_bad_targets_are_named():
    assert TYPE.first_label_problem(spec(), rows(prompt=["a", "b"], target=["x", " "]))[0] == 1
    assert "no text in column 'target'" in TYPE.first_label_problem(spec(), rows(prompt=["a"], target=[None]))[1]


def test_scores_chance_and_predictions_are_texts(tokenizer):
    s = spec(metrics=["exact_match", "chrf"])
    assert TYPE.score_texts(s, ["dog red", "cat"], ["dog red", "a cat"]) == {"exact_match": 0.5,
                                                                           "chrf": pytest.approx(0.8, abs=0.2)}
    enc = TYPE.encode(s, {"prompt": ["red dog", "blue cat"], "target": ["dog red", "cat blue"]}, tokenizer, 32, True)
    chance = TYPE.split_chance(s, enc, tokenizer)
    assert chance["exact_match"] == 0.0 and 0 < chance["chrf"] < 1  # copying the prompt shares its characters
    assert TYPE.prediction_rows(s, ["dog red"]) == [{"text": "dog red"}]
    with pytest.raises(TypeError, match="scored on generated texts"):
        TYPE.score(s, None, None)

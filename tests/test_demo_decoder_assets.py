"""The decoder demo's assets (trainer/demo/decoder/): a GPT-2 byte-level BPE tokenizer that loads
offline, with `<|endoftext|>` as bos/eos/unk, no pad and a one-token `<sep>`; a tiny GPT-2 config
that covers it; data files that follow their rules; and a generator that reproduces them all."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import DEMO
from trainer.demo.generate import CATEGORIES

DECODER = DEMO / "decoder"
LABELS = ("animal", "color", "food")
CATEGORY = {word: category for category in LABELS for word in CATEGORIES[category]}
SIZES = {"train": 600, "validation": 100}


def declarations() -> dict[str, dict]:
    return {t["name"]: t for t in json.loads((DECODER / "tasks.json").read_text())["tasks"]}


def read(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def rows(task: str) -> dict[str, list[dict]]:
    return {split: read(DECODER / path) for split, path in declarations()[task]["files"].items()}


def texts() -> list[str]:
    found = [r[c] for split in rows("demo_reverse").values() for r in split for c in ("prompt", "target")]
    return found + [r["text"] for split in rows("demo_majority").values() for r in split]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DECODER / "model")


def test_the_tokenizer_is_a_fast_gpt2_one_with_eos_for_bos_and_unk_and_no_pad(tokenizer):
    assert tokenizer.is_fast and type(tokenizer).__name__ == "GPT2Tokenizer"
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.pad_token is None  # as GPT-2's: the trainer chooses one
    assert tokenizer.model_max_length == 128
    assert 300 <= len(tokenizer) <= 600


def test_sep_is_one_special_token_that_never_splits(tokenizer):
    sep = tokenizer.convert_tokens_to_ids("<sep>")
    assert sep != tokenizer.unk_token_id and tokenizer.encode("<sep>") == [sep]
    assert "<sep>" in tokenizer.extra_special_tokens and "<sep>" in tokenizer.all_special_tokens
    ids = tokenizer("cat red<sep>red cat")["input_ids"]
    assert ids.count(sep) == 1 and tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "cat redred cat"


def test_every_demo_text_round_trips_one_token_a_word(tokenizer):
    for text in texts():
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert len(ids) == len(text.split()), text  # "cat" first, "Ġcat" after a space: both learned


def test_the_config_builds_a_tiny_gpt2_whose_vocabulary_covers_the_tokenizer(tokenizer):
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(DECODER / "model")
    assert config.model_type == "gpt2" and config.n_layer == 2
    assert config.vocab_size == len(tokenizer)
    assert config.eos_token_id == config.bos_token_id == tokenizer.eos_token_id and config.pad_token_id is None
    assert config.n_positions == tokenizer.model_max_length
    model = AutoModel.from_config(config)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert 60_000 <= sum(p.numel() for p in model.parameters()) <= 200_000


def test_the_declarations_name_the_files_columns_and_labels():
    from trainer.tasks.spec import build_spec

    tasks = declarations()
    assert tasks["demo_reverse"]["type"] == "causal_lm"
    assert tasks["demo_reverse"]["columns"] == {"prompt": "prompt", "target": "target"}
    # causal_lm is not registered yet; the classification declaration is valid as it stands
    spec = build_spec(tasks["demo_majority"], base_dir=DECODER)
    assert spec.labels == LABELS and all(Path(p).is_file() for p in spec.files.values())
    for task, declaration in tasks.items():
        for split, found in rows(task).items():
            assert len(found) == SIZES[split], (task, split)
            assert all(set(r) == set(declaration["columns"].values()) for r in found), (task, split)


@pytest.mark.parametrize("task, column", [("demo_reverse", "prompt"), ("demo_majority", "text")])
def test_texts_are_two_to_four_words_and_no_validation_text_is_in_training(task, column):
    split = rows(task)
    for r in split["train"] + split["validation"]:
        assert 2 <= len(r[column].split()) <= 4 and set(r[column].split()) <= set(CATEGORY), r
    assert not {r[column] for r in split["train"]} & {r[column] for r in split["validation"]}


def test_every_target_is_its_prompt_reversed():
    for found in rows("demo_reverse").values():
        for r in found:
            assert r["target"] == " ".join(reversed(r["prompt"].split())), r


def test_every_label_is_the_category_of_most_words():
    for found in rows("demo_majority").values():
        for r in found:
            (first, n), *rest = Counter(CATEGORY[w] for w in r["text"].split()).most_common()
            assert r["label"] == first and all(m < n for _, m in rest), r
        assert {r["label"] for r in found} == set(LABELS)


def test_regenerating_reproduces_the_committed_files(tmp_path):
    from trainer.demo.decoder.generate import main

    main(tmp_path)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert made == sorted(p.relative_to(DECODER) for sub in ("data", "model") for p in (DECODER / sub).iterdir())
    for name in made:
        new, old = (tmp_path / name).read_bytes(), (DECODER / name).read_bytes()
        if name.name == "config.json":  # the one line that names the transformers version writing it
            new, old = (json.loads(b) for b in (new, old))
            new.pop("transformers_version"), old.pop("transformers_version")
        assert new == old, name

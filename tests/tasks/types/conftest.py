"""Shared by the task-type tests: the demo's tokenizer, a declaration made a spec, a few rows."""

from __future__ import annotations

import pytest

from tests.conftest import DEMO


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO / "model")


@pytest.fixture(scope="session")
def encoder_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)


def make_spec(task_type: str, **declaration):
    from trainer.tasks import build_spec

    return build_spec({"name": "t", "type": task_type, "files": {"train": "/data/train.jsonl"}, **declaration})


def rows(**columns):
    import datasets

    return datasets.Dataset.from_dict(columns)

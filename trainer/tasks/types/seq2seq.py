"""Sequence to sequence on an encoder-decoder backbone (T5, BART): the encoder reads `source`, the
decoder learns to write `target` (the labels: its tokens and EOS, -100 on the padding). Both are
truncated at the task's maximum length. Evaluation and `predict` generate from the source and
score the text against the target, as `causal_lm` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import IGNORED, GenerationType

if TYPE_CHECKING:
    from ..spec import TaskSpec


class Seq2Seq(GenerationType):
    name = "seq2seq"
    required_columns = ("source", "target")
    auto_class = "AutoModelForSeq2SeqLM"
    pipeline = None  # transformers 5 has no text2text pipeline: the export loads with AutoModelForSeq2SeqLM
    prompt_padding = "right"  # the encoder reads the source as in training (BART's positions are absolute)

    def encode(self, spec: TaskSpec, batch: dict, tokenizer, max_length: int, with_labels: bool) -> dict:
        sources = [str(s) for s in batch[spec.columns["source"]]]
        enc = dict(tokenizer(sources, truncation=True, max_length=max_length))
        if with_labels:
            targets = [str(t) for t in batch[spec.columns["target"]]]
            enc["labels"] = tokenizer(text_target=targets, truncation=True, max_length=max_length)["input_ids"]
        return enc

    def split_texts(self, input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        target = [t for t in labels if t != IGNORED]
        return input_ids, target[:-1]  # the target's EOS

    def generated_tokens(self, row: list[int], prompt_width: int) -> list[int]:
        return row[1:]  # a decoder's output starts with its decoder_start_token_id

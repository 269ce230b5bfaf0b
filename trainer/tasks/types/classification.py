"""Sequence classification: a text (or a text pair) and one class per row."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import TaskError
from .base import LabelSetType, encode_text_pairs, label_to_id

if TYPE_CHECKING:
    from ..spec import TaskSpec


class Classification(LabelSetType):
    name = "classification"
    required_columns = ("text", "label")
    optional_columns = ("text_pair",)
    auto_class = "AutoModelForSequenceClassification"
    pipeline = "text-classification"
    metrics = ("accuracy", "f1", "matthews_correlation")
    default_metrics = ("accuracy",)

    def check_declaration(self, where: str, labels, num_labels: int | None) -> None:
        if num_labels == 1:
            raise TaskError(f"{where}: num_labels=1 is regression; set type: regression or list the classes")

    def encode(self, spec: TaskSpec, batch: dict, tokenizer, max_length: int, with_labels: bool) -> dict:
        enc = encode_text_pairs(spec, batch, tokenizer, max_length)
        if with_labels:
            enc["labels"] = [label_to_id(spec, v) for v in batch[spec.columns["label"]]]
        return enc

    def configure_head(self, cfg, spec: TaskSpec) -> None:
        super().configure_head(cfg, spec)
        cfg.problem_type = "single_label_classification"

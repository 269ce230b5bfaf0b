"""Regression: a text (or a text pair) and one real-valued score per row (STS-B)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import TaskError
from .base import TaskType, encode_text_pairs, logits_of

if TYPE_CHECKING:
    from ..spec import TaskSpec


class Regression(TaskType):
    name = "regression"
    required_columns = ("text", "label")
    optional_columns = ("text_pair",)
    auto_class = "AutoModelForSequenceClassification"
    pipeline = "text-classification"  # with function_to_apply="none" for the raw score
    has_label_set = False
    metrics = ("pearson", "spearmanr")
    default_metrics = ("pearson", "spearmanr")

    def check_declaration(self, where: str, labels, num_labels: int | None) -> None:
        if labels is not None:
            raise TaskError(f"{where}: type {self.name} predicts a number and takes no 'labels'")
        if num_labels not in (None, 1):
            raise TaskError(f"{where}: a regression task has num_labels=1, got {num_labels}")

    def default_num_labels(self) -> int:
        return 1

    def label_problem(self, spec: TaskSpec, col: str, value: Any) -> str | None:
        problem = super().label_problem(spec, col, value)
        if problem:
            return problem
        try:
            number = float(value)
        except (TypeError, ValueError):
            return f"label {value!r} in column {col!r} is not a number; a regression target must be a number"
        if not math.isfinite(number):
            return f"label {value!r} in column {col!r} is not a finite number; fix the row or remove it"
        return None

    def encode(self, spec: TaskSpec, batch: dict, tokenizer, max_length: int, with_labels: bool) -> dict:
        enc = encode_text_pairs(spec, batch, tokenizer, max_length)
        if with_labels:
            enc["labels"] = [float(v) for v in batch[spec.columns["label"]]]
        return enc

    def configure_head(self, cfg, spec: TaskSpec) -> None:
        cfg.num_labels, cfg.problem_type = 1, "regression"
        cfg.id2label, cfg.label2id = {0: "score"}, {"score": 0}

    def decode(self, spec: TaskSpec, logits, label_ids=None):
        return np.asarray(logits_of(logits)).reshape(-1)

    def prediction_rows(self, spec: TaskSpec, logits, label_ids) -> list[dict[str, Any]]:
        """`{"score"}` per input."""
        return [{"score": float(v)} for v in self.decode(spec, logits)]

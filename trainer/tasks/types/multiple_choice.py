"""Multiple choice: an optional question and a list of choices per row, the label naming the
right one (CommonsenseQA, SWAG). Each choice is encoded with the question; the head scores them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import TaskError
from .base import LabelSetType, label_to_id

if TYPE_CHECKING:
    from ..spec import TaskSpec


def choices(spec: TaskSpec, row_or_batch: dict, i: int | None = None) -> list[str]:
    """The choices of one row (`i` None: `row_or_batch` is a row; else row `i` of a batch): a
    list of columns, or one column holding a list (or CommonsenseQA's {"label": [...], "text": [...]}).

    Raises:
        TaskError: the choices column holds something else.
    """
    col = spec.columns["choices"]
    if isinstance(col, list):
        values = [row_or_batch[c] if i is None else row_or_batch[c][i] for c in col]
        return [str(v) for v in values]
    value = row_or_batch[col] if i is None else row_or_batch[col][i]
    if isinstance(value, dict):
        value = value.get("text")
    if not isinstance(value, list):
        raise TaskError(f"task {spec.name!r}: column {col!r} must hold a list of choices (or {{text: [...]}}), got {type(value).__name__}")
    return [str(v) for v in value]


class MultipleChoice(LabelSetType):
    name = "multiple_choice"
    required_columns = ("choices", "label")
    optional_columns = ("question",)
    auto_class = "AutoModelForMultipleChoice"
    pipeline = None  # transformers has no multiple-choice pipeline
    metrics = ("accuracy", "f1", "matthews_correlation")
    default_metrics = ("accuracy",)

    def resolve_labels(self, spec: TaskSpec, train_ds) -> TaskSpec:
        """The declared labels, else one per choice ("0", "1", …).

        Raises:
            TaskError: fewer than two choices per example.
        """
        if spec.labels is not None:
            return spec
        n = len(choices(spec, train_ds[0]))
        if n < 2:
            raise TaskError(f"task {spec.name!r}, split train: {n} choice(s) per example in column "
                            f"{spec.columns['choices']!r}; multiple choice needs at least two")
        return spec.with_labels([str(i) for i in range(n)])

    def check_labels(self, spec: TaskSpec, split: str, ds) -> None:
        """Raises TaskError: a label outside the label set, or examples with another number of choices."""
        super().check_labels(spec, split, ds)
        counts = {len(choices(spec, ds[i])) for i in range(len(ds))}
        if len(counts) != 1 or len(spec.labels) != next(iter(counts)):
            raise TaskError(f"task {spec.name!r}, split {split}: every example needs the same number of choices as "
                            f"'labels' ({len(spec.labels)}); found {sorted(counts)}")

    def encode(self, spec: TaskSpec, batch: dict, tokenizer, max_length: int, with_labels: bool) -> dict:
        """Per row, one encoding per choice (question first when declared), grouped back by row."""
        n_rows = len(next(iter(batch.values())))
        options_of = [choices(spec, batch, i) for i in range(n_rows)]
        q_col = spec.columns.get("question")
        firsts, seconds = [], []
        for i, options in enumerate(options_of):
            question = str(batch[q_col][i]) if q_col else None
            firsts.extend([question] * len(options) if question is not None else options)
            seconds.extend(options if question is not None else [None] * len(options))
        enc = tokenizer(firsts, seconds if q_col else None, truncation=True, max_length=max_length)
        out: dict[str, list] = {}
        for key, values in enc.items():
            grouped, start = [], 0
            for options in options_of:
                grouped.append(values[start : start + len(options)])
                start += len(options)
            out[key] = grouped
        if with_labels:
            out["labels"] = [label_to_id(spec, v) for v in batch[spec.columns["label"]]]
        return out

    def collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        from transformers import DataCollatorForMultipleChoice

        return DataCollatorForMultipleChoice(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

"""Multiple choice: an optional question and a list of choices per row, the label naming the
right one (CommonsenseQA, SWAG). Each choice is encoded with the question; the head scores them.

The choices of a row are a list of columns, or one column holding a list of texts, a list of
`{label, text}` objects (the official CommonsenseQA files) or `{"label": [...], "text": [...]}`
(CommonsenseQA on the Hub). When they carry labels, a row's label names its right choice by
that label (`answerKey: "C"`), whatever the labels of the other rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import TaskError
from .base import LabelSetType, label_to_id, missing

if TYPE_CHECKING:
    from ..spec import TaskSpec


def _fields(value: dict) -> str:
    return ", ".join(sorted(str(k) for k in value)) or "no fields"


def _parse(spec: TaskSpec, value: Any) -> tuple[list[str], list[str] | None]:
    """(texts, labels or None) of one row's choices column value.

    Raises:
        TaskError: the value holds no choices in a form above; the message names the column
            and the fix, not the task (`choices` and `first_label_problem` add where).
    """
    col = spec.columns["choices"]
    if isinstance(value, dict):
        texts, labels = value.get("text"), value.get("label")
        if not isinstance(texts, list):
            raise TaskError(f"column {col!r} holds an object with fields {_fields(value)}, not choices; "
                            "set columns.choices to the column (or dotted path) that holds the list of choices")
        if isinstance(labels, list) and len(labels) == len(texts) and not any(missing(x) for x in labels):
            return [str(t) for t in texts], [str(x) for x in labels]
        return [str(t) for t in texts], None
    if not isinstance(value, list):
        kind = "nothing" if value is None else f"a {type(value).__name__}"
        raise TaskError(f"column {col!r} must hold a list of choices (or {{label, text}} objects, or {{text: [...]}}), got {kind}")
    if value and all(isinstance(v, dict) for v in value):
        without = next((v for v in value if "text" not in v), None)
        if without is not None:
            raise TaskError(f"column {col!r} holds objects with fields {_fields(without)}; each choice needs a 'text' field "
                            "(and a 'label' the row's label can name)")
        labels = [v.get("label") for v in value]
        carried = None if any(missing(x) for x in labels) else [str(x) for x in labels]
        return [str(v["text"]) for v in value], carried
    return [str(v) for v in value], None


def _parsed(spec: TaskSpec, value: Any) -> tuple[list[str], list[str] | None]:
    """`_parse`, its message starting with the task."""
    try:
        return _parse(spec, value)
    except TaskError as e:
        raise TaskError(f"task {spec.name!r}: {e}") from None


def _value(spec: TaskSpec, row_or_batch: dict, i: int | None):
    col = spec.columns["choices"]
    if isinstance(col, list):
        return [row_or_batch[c] if i is None else row_or_batch[c][i] for c in col]
    return row_or_batch[col] if i is None else row_or_batch[col][i]


def choices(spec: TaskSpec, row_or_batch: dict, i: int | None = None) -> list[str]:
    """The choices of one row (`i` None: `row_or_batch` is a row; else row `i` of a batch).

    Raises:
        TaskError: the choices column holds something else than choices.
    """
    if isinstance(spec.columns["choices"], list):
        return [str(v) for v in _value(spec, row_or_batch, i)]
    return _parsed(spec, _value(spec, row_or_batch, i))[0]


def choice_labels(spec: TaskSpec, row_or_batch: dict, i: int | None = None) -> list[str] | None:
    """The labels of one row's choices (["A", "B", …]), or None when they carry none."""
    if isinstance(spec.columns["choices"], list):
        return None
    return _parsed(spec, _value(spec, row_or_batch, i))[1]


def _rows(spec: TaskSpec, ds):
    """(texts, labels or None) of every row's choices, a column at a time (not row by row)."""
    col = spec.columns["choices"]
    if isinstance(col, list):
        for values in zip(*(ds[c] for c in col)):
            yield [str(v) for v in values], None
    else:
        for value in ds[col]:
            yield _parsed(spec, value)


def _choice_index(spec: TaskSpec, labels: list[str] | None, value: Any) -> int | None:
    """The position of the row's right choice: its label among the row's choice labels when they
    carry labels, else the label as a name in `labels` or an index (`label_to_id`)."""
    if labels is not None:
        return labels.index(str(value)) if str(value) in labels else None
    return label_to_id(spec, value)


class MultipleChoice(LabelSetType):
    name = "multiple_choice"
    required_columns = ("choices", "label")
    optional_columns = ("question",)
    auto_class = "AutoModelForMultipleChoice"
    pipeline = None  # transformers has no multiple-choice pipeline
    metrics = ("accuracy", "f1", "matthews_correlation")
    default_metrics = ("accuracy",)

    def first_label_problem(self, spec: TaskSpec, ds) -> tuple[int, str] | None:
        """A row whose choices are not choices, whose label is missing, or whose label is not
        among its choice labels (when they carry labels)."""
        col, choices_col = spec.columns["label"], spec.columns["choices"]
        values = zip(*(ds[c] for c in choices_col)) if isinstance(choices_col, list) else ds[choices_col]
        for i, (value, held) in enumerate(zip(ds[col], values)):
            if isinstance(choices_col, list):
                labels = None
            else:
                try:
                    labels = _parse(spec, held)[1]
                except TaskError as e:
                    return i, str(e)
            problem = self.label_problem(spec, col, value)
            if problem:
                return i, problem
            if labels is not None and str(value) not in labels:
                return i, (f"label {value!r} in column {col!r} is not among the row's choice labels ({', '.join(labels)}); "
                           "fix the label or the choices")
        return None

    def resolve_labels(self, spec: TaskSpec, train_ds) -> TaskSpec:
        """The declared labels, else the first train row's choice labels (A, B, C, …) when the
        choices carry labels, else one per choice ("0", "1", …).

        Raises:
            TaskError: fewer than two choices per example, or choice labels that repeat.
        """
        if spec.labels is not None:
            return spec
        texts, labels = next(_rows(spec, train_ds.select([0])))
        if len(texts) < 2:
            raise TaskError(f"task {spec.name!r}, split train: {len(texts)} choice(s) per example in column "
                            f"{spec.columns['choices']!r}; multiple choice needs at least two")
        if labels is not None:
            if len(set(labels)) != len(labels):
                raise TaskError(f"task {spec.name!r}, split train: the first row's choice labels repeat ({', '.join(labels)}); "
                                "give every choice its own label, or list the task's 'labels'")
            return spec.with_labels(labels)
        return spec.with_labels([str(i) for i in range(len(texts))])

    def check_labels(self, spec: TaskSpec, split: str, ds) -> None:
        """Raises TaskError: a label outside the label set (rows whose choices carry labels are
        checked against those, in `first_label_problem`), or examples with another number of choices."""
        col = spec.columns["label"]
        counts = set()
        for value, (texts, labels) in zip(ds[col], _rows(spec, ds)):
            counts.add(len(texts))
            if labels is None and label_to_id(spec, value) is None:
                raise TaskError(f"task {spec.name!r}, split {split}: label {value!r} in column {col!r} is not in the "
                                f"label set [{', '.join(spec.labels)}]; fix the data or add it to 'labels'")
        if len(counts) != 1 or len(spec.labels) != next(iter(counts)):
            raise TaskError(f"task {spec.name!r}, split {split}: every example needs the same number of choices as "
                            f"'labels' ({len(spec.labels)}); found {sorted(counts)}")

    def encode(self, spec: TaskSpec, batch: dict, tokenizer, max_length: int, with_labels: bool) -> dict:
        """Per row, one encoding per choice (question first when declared), grouped back by row."""
        n_rows = len(next(iter(batch.values())))
        parsed = [(choices(spec, batch, i), choice_labels(spec, batch, i)) for i in range(n_rows)]
        q_col = spec.columns.get("question")
        firsts, seconds = [], []
        for i, (options, _) in enumerate(parsed):
            question = str(batch[q_col][i]) if q_col else None
            firsts.extend([question] * len(options) if question is not None else options)
            seconds.extend(options if question is not None else [None] * len(options))
        enc = tokenizer(firsts, seconds if q_col else None, truncation=True, max_length=max_length)
        out: dict[str, list] = {}
        for key, values in enc.items():
            grouped, start = [], 0
            for options, _ in parsed:
                grouped.append(values[start : start + len(options)])
                start += len(options)
            out[key] = grouped
        if with_labels:
            out["labels"] = [_choice_index(spec, labels, v) for (_, labels), v in zip(parsed, batch[spec.columns["label"]])]
        return out

    def placeholder_labels(self, spec: TaskSpec, ds):
        """Each row's first choice label when the choices carry labels (a label the row can name), else the first label."""
        labelled = [labels for _, labels in _rows(spec, ds)]
        if all(labels for labels in labelled):
            return ds.add_column(spec.columns["label"], [labels[0] for labels in labelled])
        return super().placeholder_labels(spec, ds)

    def name_predictions(self, spec: TaskSpec, rows: list[dict[str, Any]], inputs) -> list[dict[str, Any]]:
        """A row whose choices carry labels names its chosen one by that row's own label (ARC's
        rows are labelled A-D or 1-4), not by the task's label names (the first train row's)."""
        for row, (_, labels) in zip(rows, _rows(spec, inputs)):
            if labels is not None:
                row["label"] = labels[row["index"]]
        return rows

    def collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        from transformers import DataCollatorForMultipleChoice

        return DataCollatorForMultipleChoice(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

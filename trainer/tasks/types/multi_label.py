"""Multi-label classification: a text (or a text pair) and a set of labels per row, any number of
them (none included). The head scores every label on its own (sigmoid, BCEWithLogits: the
head's own loss for problem_type multi_label_classification); a label is predicted when its
probability reaches the task's `threshold`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import metrics as metric_fns
from ..errors import TaskError
from .base import LabelSetType, encode_text_pairs, label_to_id, logits_of, missing, sort_key

if TYPE_CHECKING:
    from ..spec import TaskSpec


def row_labels(value: Any) -> list[Any]:
    """The labels of one row: a list (JSON, parquet, a Hub Sequence), or a text of labels separated
    by commas (how a CSV/TSV field holds them; an empty field is no label); a lone number is one label.

    Raises:
        ValueError: no value (null), an empty label, a label that is not a name or a number, or a
            JSON list written into a text; the message says what is wrong, not where.
    """
    if value is None:
        raise ValueError("no label list (null); give the row its labels, [] (or an empty CSV/TSV field) when none applies")
    if isinstance(value, str):
        if not value.strip():
            return []
        if value.lstrip().startswith("["):
            raise ValueError(f"{value!r} is a JSON list in a text; write the labels separated by commas (a,b) in a "
                             "CSV/TSV field, or use a JSON list in a .jsonl file")
        items = [item.strip() for item in value.split(",")]
        empty = next((k for k, item in enumerate(items) if not item), None)
        if empty is not None:
            raise ValueError(f"label {empty + 1} of {value!r} is empty; remove the extra comma")
        return items
    if isinstance(value, (list, tuple, np.ndarray)):
        items = list(value)
        for k, item in enumerate(items):
            if missing(item):
                raise ValueError(f"label {k + 1} of {items!r} is empty or null; remove it")
            if isinstance(item, (list, tuple, dict, np.ndarray)):
                raise ValueError(f"label {k + 1} of {items!r} is a {type(item).__name__}, not a label; give a flat list of labels")
        return items
    if isinstance(value, dict):
        raise ValueError(f"{value!r} is a mapping; give a list of labels")
    return [value]


def probabilities(logits) -> np.ndarray:
    """Each label's probability (sigmoid of its logit), in float64 so the threshold sees the same numbers everywhere."""
    from scipy.special import expit

    return expit(np.asarray(logits_of(logits), dtype=np.float64))


class MultiLabel(LabelSetType):
    name = "multi_label"
    required_columns = ("text", "label")
    optional_columns = ("text_pair",)
    auto_class = "AutoModelForSequenceClassification"
    pipeline = "text-classification"  # with top_k=None: the pipeline applies the sigmoid for this problem type
    metrics = ("f1_micro", "f1_macro", "subset_accuracy")
    default_metrics = ("f1_micro", "f1_macro", "subset_accuracy")
    default_threshold = 0.5

    # ---------------------------------------------------------------- raw data
    def label_problem(self, spec: TaskSpec, col: str, value: Any) -> str | None:
        """A row's label list that does not parse; with declared labels, one outside them."""
        try:
            labels = row_labels(value)
        except ValueError as e:
            return f"column {col!r}: {e}"
        if spec.labels is not None:
            bad = next((v for v in labels if label_to_id(spec, v) is None), None)
            if bad is not None:
                return (f"label {bad!r} in column {col!r} is not in the declared labels [{', '.join(spec.labels)}]; "
                        "fix the row or add it to 'labels'")
        return None

    def label_values(self, spec: TaskSpec, ds) -> list[Any]:
        """Every distinct label of the split's rows, in `sort_key` order."""
        seen = {v for value in ds[spec.columns["label"]] for v in row_labels(value)}
        return sorted(seen, key=sort_key)

    def resolve_labels(self, spec: TaskSpec, train_ds) -> TaskSpec:
        """The declared labels, else the label column's ClassLabel names (Hub), else every label of the
        train split, sorted. Rows without labels are allowed; a split with none at all is not.

        Raises:
            TaskError: no row of the train split has a label (and none are declared), or
                num_labels disagrees with the labels found.
        """
        if spec.labels is not None:
            return spec
        where, col = f"task {spec.name!r}, split train", spec.columns["label"]
        names = self.label_feature_names(spec, train_ds)
        if names is None:
            names = list(dict.fromkeys(str(v) for v in self.label_values(spec, train_ds)))
        if not names:
            raise TaskError(f"{where}: no row has a label in column {col!r}; give rows their labels or declare 'labels' "
                            "(MAX_TRAIN_SAMPLES, if set, keeps the first rows only)")
        if spec.num_labels is not None and spec.num_labels != len(names):
            raise TaskError(f"{where}: num_labels={spec.num_labels} but column {col!r} has {len(names)} distinct labels "
                            f"({', '.join(names[:10])}); fix num_labels or list the labels")
        return spec.with_labels(names)

    def check_labels(self, spec: TaskSpec, split: str, ds) -> None:
        """Raises TaskError: a row's label outside the label set (the row and its file named)."""
        col = spec.columns["label"]
        for i, value in enumerate(ds[col]):
            bad = next((v for v in row_labels(value) if label_to_id(spec, v) is None), None)
            if bad is not None:
                path = spec.files.get(split) if spec.files else None
                raise TaskError(
                    f"task {spec.name!r}, split {split}, row {i + 1}" + (f" of {path}" if path else "") +
                    f": label {bad!r} in column {col!r} is not in the label set [{', '.join(spec.labels)}]; "
                    "fix the row or add it to 'labels'")

    # ---------------------------------------------------------------- encoding
    def encode(self, spec: TaskSpec, batch: dict, tokenizer, max_length: int, with_labels: bool) -> dict:
        """Labels as float multi-hot vectors (BCEWithLogits takes float targets), one slot per label."""
        enc = encode_text_pairs(spec, batch, tokenizer, max_length)
        if with_labels:
            rows = []
            for value in batch[spec.columns["label"]]:
                hot = [0.0] * len(spec.labels)
                for v in row_labels(value):
                    hot[label_to_id(spec, v)] = 1.0
                rows.append(hot)
            enc["labels"] = rows
        return enc

    def placeholder_labels(self, spec: TaskSpec, ds):
        return ds.add_column(spec.columns["label"], [""] * len(ds))  # an empty field: no label

    # ---------------------------------------------------------------- the head
    def configure_head(self, cfg, spec: TaskSpec) -> None:
        super().configure_head(cfg, spec)
        cfg.problem_type = "multi_label_classification"  # sigmoid + BCEWithLogits in the head and the pipeline

    # ---------------------------------------------------------------- outputs
    def threshold(self, spec: TaskSpec) -> float:
        return spec.threshold if spec.threshold is not None else self.default_threshold

    def decode(self, spec: TaskSpec, logits, label_ids=None):
        """Multi-hot predictions (rows x labels): 1 where a label's probability is at least the threshold."""
        return (probabilities(logits) >= self.threshold(spec)).astype(np.int64)

    def references(self, label_ids) -> np.ndarray:
        """The multi-hot labels (rows x labels) as 0/1 ids."""
        return (np.asarray(label_ids, dtype=np.float64) >= 0.5).astype(np.int64)

    def score(self, spec: TaskSpec, logits, label_ids) -> dict[str, float]:
        pred, ref = self.decode(spec, logits), self.references(label_ids)
        return {name: metric_fns.compute(name, pred, ref, self.num_labels(spec)) for name in spec.metrics}

    def prediction_rows(self, spec: TaskSpec, logits, label_ids) -> list[dict[str, Any]]:
        """`{"labels": [...], "probabilities": {label: p}}` per input: the labels at or above the threshold."""
        threshold, rows = self.threshold(spec), []
        for p in probabilities(logits):
            rows.append({"labels": [spec.labels[k] for k in np.flatnonzero(p >= threshold)],
                         "probabilities": {label: round(float(x), 6) for label, x in zip(spec.labels, p)}})
        return rows

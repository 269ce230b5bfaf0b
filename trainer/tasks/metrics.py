"""Task metrics computed locally with numpy, scipy and scikit-learn.

`evaluate` fetches metric code from the Hugging Face Hub at run time, which an offline job
cannot do, so the standard GLUE-style metrics are computed here. Each metric takes
``(predictions, references, num_labels)``: predictions and references already decoded (class
ids, scores, or per-sentence tag lists) and the task's number of labels (None for
regression). A metric that depends on the label set takes it from `num_labels`, never from the
classes that happen to be in the data, so its definition is the same at every evaluation. Each
also has a chance level: what a constant guess scores on the same references, so a log can say
whether a model learned anything.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np


def _accuracy(pred: np.ndarray, ref: np.ndarray, num_labels: int | None = None) -> float:
    return float(np.mean(pred == ref)) if len(ref) else 0.0


def _f1(pred: np.ndarray, ref: np.ndarray, num_labels: int | None = None) -> float:
    """Binary F1 of label 1 for a two-label task, else the macro average over all its labels
    (a label absent from both predictions and references scores 0).

    Raises:
        ValueError: `num_labels` is not given (the averaging depends on it).
    """
    from sklearn.metrics import f1_score

    if num_labels is None:
        raise ValueError("f1 needs the task's number of labels (num_labels)")
    if num_labels == 2:
        return float(f1_score(ref, pred, average="binary", pos_label=1, labels=[0, 1], zero_division=0))
    return float(f1_score(ref, pred, average="macro", labels=list(range(num_labels)), zero_division=0))


def _matthews(pred: np.ndarray, ref: np.ndarray, num_labels: int | None = None) -> float:
    # Labels absent from the data add zero rows and columns to the confusion matrix, which leave
    # the multiclass MCC unchanged: it needs no label set.
    from sklearn.metrics import matthews_corrcoef

    if len(set(ref.tolist()) | set(pred.tolist())) < 2:
        return 0.0  # one class everywhere: no correlation to measure (scikit-learn warns, then says 0)
    return float(matthews_corrcoef(ref, pred))


def _correlation(kind: str) -> Callable[..., float]:
    def corr(pred: np.ndarray, ref: np.ndarray, num_labels: int | None = None) -> float:
        from scipy import stats

        if len(ref) < 2 or np.std(pred) == 0 or np.std(ref) == 0:
            return 0.0  # undefined for constant inputs; a constant predictor has no correlation
        fn = stats.pearsonr if kind == "pearson" else stats.spearmanr
        return float(fn(pred, ref)[0])

    return corr


def _entity_spans(tags: Sequence[str]) -> set[tuple[int, int, str]]:
    """Spans (start, end, type) of BIO/IOB2 tags; an I- after O or another type opens a span (conlleval)."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-")
        if start is not None and (prefix != "I" or label != kind):
            spans.add((start, i, kind))
            start, kind = None, None
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = i, label
    return spans


def _entity_f1(pred: Sequence[Sequence[str]], ref: Sequence[Sequence[str]], num_labels: int | None = None) -> float:
    # seqeval-style entity F1 over sentences; written here because seqeval is unmaintained.
    tp = n_pred = n_ref = 0
    for p, r in zip(pred, ref):
        ps, rs = _entity_spans(p), _entity_spans(r)
        tp, n_pred, n_ref = tp + len(ps & rs), n_pred + len(ps), n_ref + len(rs)
    if tp == 0:
        return 0.0
    precision, recall = tp / n_pred, tp / n_ref
    return 2 * precision * recall / (precision + recall)


METRICS: dict[str, Callable] = {
    "accuracy": _accuracy,
    "f1": _f1,
    "matthews_correlation": _matthews,
    "pearson": _correlation("pearson"),
    "spearmanr": _correlation("spearman"),
    "entity_f1": _entity_f1,
}

# Metrics that compare class ids (the others compare scores or tag sequences).
CLASS_METRICS = {"accuracy", "f1", "matthews_correlation"}


def compute(name: str, predictions, references, num_labels: int | None = None) -> float:
    """Compute metric `name`; `num_labels` is the task's number of labels (None for regression).

    Raises:
        KeyError: an unknown metric name.
        ValueError: a metric that depends on the label set (f1) without `num_labels`.
    """
    fn = METRICS[name]
    if name == "entity_f1":
        return fn(predictions, references, num_labels)
    return fn(np.asarray(predictions), np.asarray(references), num_labels)


def chance_level(name: str, references, num_labels: int | None = None) -> float:
    """Score of the best constant guess (majority class, or no correlation) on `references`.

    Raises:
        ValueError: as `compute`.
    """
    if name in ("pearson", "spearmanr", "matthews_correlation", "entity_f1"):
        return 0.0
    ref = np.asarray(references)
    if not len(ref):
        return 0.0
    majority = Counter(ref.tolist()).most_common(1)[0][0]
    return compute(name, np.full_like(ref, majority), ref, num_labels)

"""Task metrics computed locally with numpy, scipy and scikit-learn.

`evaluate` fetches metric code from the Hugging Face Hub at run time, which an offline job
cannot do, so the standard GLUE-style metrics are computed here. Each metric takes
``(predictions, references)`` already decoded (class ids, scores, or flat token/tag lists)
and returns a float. Each also has a chance level: what a constant guess scores on the same
references, so a log can say whether a model learned anything.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np


def _accuracy(pred: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean(pred == ref)) if len(ref) else 0.0


def _f1(pred: np.ndarray, ref: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    average = "binary" if len(set(ref.tolist()) | set(pred.tolist())) <= 2 and set(ref.tolist()) <= {0, 1} else "macro"
    return float(f1_score(ref, pred, average=average, zero_division=0))


def _matthews(pred: np.ndarray, ref: np.ndarray) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(ref, pred))


def _correlation(kind: str) -> Callable[[np.ndarray, np.ndarray], float]:
    def corr(pred: np.ndarray, ref: np.ndarray) -> float:
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


def _entity_f1(pred: Sequence[Sequence[str]], ref: Sequence[Sequence[str]]) -> float:
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


def compute(name: str, predictions, references) -> float:
    """Compute metric `name`. Raises KeyError for an unknown metric name."""
    fn = METRICS[name]
    if name == "entity_f1":
        return fn(predictions, references)
    return fn(np.asarray(predictions), np.asarray(references))


def chance_level(name: str, references) -> float:
    """Score of the best constant guess (majority class, or no correlation) on `references`."""
    if name in ("pearson", "spearmanr", "matthews_correlation", "entity_f1"):
        return 0.0
    ref = np.asarray(references)
    if not len(ref):
        return 0.0
    majority = Counter(ref.tolist()).most_common(1)[0][0]
    return compute(name, np.full_like(ref, majority), ref)

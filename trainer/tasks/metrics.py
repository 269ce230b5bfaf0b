"""Task metrics computed locally with numpy, scipy, scikit-learn, sacrebleu and rouge-score.

`evaluate` fetches metric code from the Hugging Face Hub at run time, which an offline job
cannot do, so the standard GLUE-style metrics are computed here. Each metric takes
``(predictions, references, num_labels)``: predictions and references already decoded (class
ids, scores, per-sentence tag lists, multi-hot label sets, or texts) and the task's number of labels (None for
regression and generation). A metric that depends on the label set takes it from `num_labels`,
never from the classes that happen to be in the data, so its definition is the same at every
evaluation. Every metric is on one scale, 0 to 1 (the correlations -1 to 1): the macro average
mixes the tasks' metrics, and a metric counts as learned at a fixed margin above its chance
level. Each also has a chance level: what a constant guess (for texts, also a copy of the
prompt) scores on the same references, so a log can say whether a model learned anything
(`chance_level`; `generation_chance` for texts).
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


# ------------------------------------------------------------------------------ label sets (multi-label)
# Predictions and references are multi-hot arrays, one row per example and one column per label
# (0/1). Like f1, the per-label average is over the task's num_labels labels, and an F1 with
# nothing predicted and nothing to find (0 / 0) scores 0.


def _label_sets(pred, ref, num_labels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """`pred` and `ref` as boolean (rows x labels) arrays.

    Raises:
        ValueError: they are not two arrays of the same shape rows x num_labels.
    """
    pred, ref = np.asarray(pred).astype(bool), np.asarray(ref).astype(bool)
    width = ref.shape[1] if ref.ndim == 2 else None
    if pred.shape != ref.shape or width is None or (num_labels is not None and width != num_labels):
        raise ValueError(f"a multi-label metric compares multi-hot arrays of rows x {num_labels or 'labels'}; "
                         f"got predictions {pred.shape} and references {ref.shape}")
    return pred, ref


def _f1_of_counts(tp, fp, fn):
    """F1 = 2TP / (2TP + FP + FN) of counts (arrays: per label), 0 where nothing was predicted or found."""
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros_like(denominator), where=denominator > 0)


def _f1_micro(pred, ref, num_labels: int | None = None) -> float:
    """F1 over every (row, label) decision pooled: frequent labels weigh more.

    Raises:
        ValueError: as `_label_sets`.
    """
    p, r = _label_sets(pred, ref, num_labels)
    return float(_f1_of_counts((p & r).sum(), (p & ~r).sum(), (~p & r).sum()))


def _f1_macro(pred, ref, num_labels: int | None = None) -> float:
    """Mean of each label's F1 over the task's labels: rare labels weigh as much as frequent ones.

    Raises:
        ValueError: as `_label_sets`.
    """
    p, r = _label_sets(pred, ref, num_labels)
    per_label = _f1_of_counts((p & r).sum(0), (p & ~r).sum(0), (~p & r).sum(0))
    return float(per_label.mean()) if per_label.size else 0.0


def _subset_accuracy(pred, ref, num_labels: int | None = None) -> float:
    """Share of rows whose predicted label set is exactly the reference set (exact match).

    Raises:
        ValueError: as `_label_sets`.
    """
    p, r = _label_sets(pred, ref, num_labels)
    return float(np.mean((p == r).all(axis=1))) if len(r) else 0.0


def _label_set_chance(name: str, references, num_labels: int | None) -> float:
    """The best score of a constant label set on `references`: the empty set, every label, the
    labels present in more than half the rows, and the most frequent row set (the best constant
    for subset accuracy; the others for the F1s)."""
    ref = np.asarray(references).astype(np.int64)
    if ref.ndim != 2 or not len(ref):
        return 0.0
    rows, width = ref.shape
    [(most_frequent, _)] = Counter(map(tuple, ref.tolist())).most_common(1)
    guesses = [np.zeros(width, dtype=np.int64), np.ones(width, dtype=np.int64),
               (ref.mean(axis=0) > 0.5).astype(np.int64), np.asarray(most_frequent, dtype=np.int64)]
    return max(compute(name, np.tile(guess, (rows, 1)), ref, num_labels) for guess in guesses)


# ------------------------------------------------------------------------------ generated texts
# Predictions and references are lists of strings, one prediction per reference. sacrebleu and
# rouge-score are imported where they are used: importing this module must not pull them (nor
# NLTK, which rouge-score imports).


def _texts(pred: Sequence[str], ref: Sequence[str]) -> tuple[list[str], list[str]]:
    """`pred` and `ref` as lists of strings.

    Raises:
        ValueError: a different number of predictions and references (sacrebleu would score the
            pairs it can make and not say so).
    """
    pred, ref = list(pred), list(ref)
    if len(pred) != len(ref):
        raise ValueError(f"{len(pred)} predictions for {len(ref)} references; a generation metric needs one prediction per reference")
    return pred, ref


def _collapse_whitespace(text: str) -> str:
    return " ".join(text.split())


def _exact_match(pred: Sequence[str], ref: Sequence[str], num_labels: int | None = None) -> float:
    """Share of predictions equal to their reference, on 0-1, after stripping surrounding
    whitespace and collapsing inner runs of whitespace to one space (a generated answer often ends
    in a newline or doubles a space); case and punctuation count.

    Raises:
        ValueError: as `_texts`.
    """
    pred, ref = _texts(pred, ref)
    if not ref:
        return 0.0
    return sum(_collapse_whitespace(p) == _collapse_whitespace(r) for p, r in zip(pred, ref)) / len(ref)


def _chrf(pred: Sequence[str], ref: Sequence[str], num_labels: int | None = None) -> float:
    """Corpus chrF (character 6-grams, beta 2: recall weighs more) with sacrebleu's defaults, on
    0-1: sacrebleu's 0-100 score / 100. It needs no word boundaries, so it also suits short
    answers and languages that BLEU and ROUGE tokenize badly.

    Raises:
        ValueError: as `_texts`.
    """
    from sacrebleu.metrics import CHRF

    pred, ref = _texts(pred, ref)
    return CHRF().corpus_score(pred, [ref]).score / 100 if ref else 0.0


def _bleu(pred: Sequence[str], ref: Sequence[str], num_labels: int | None = None) -> float:
    """Corpus BLEU with sacrebleu's defaults (13a tokenizer, case kept, exponential smoothing), on
    0-1: sacrebleu's 0-100 score / 100, so a published sacreBLEU score reads here divided by 100.
    It counts word n-grams up to 4: a corpus in which no prediction has 4 words scores 0 however
    right it is (exact_match or chrf suit short answers).

    Raises:
        ValueError: as `_texts`.
    """
    from sacrebleu.metrics import BLEU

    pred, ref = _texts(pred, ref)
    return BLEU().corpus_score(pred, [ref]).score / 100 if ref else 0.0


def _rouge_l(pred: Sequence[str], ref: Sequence[str], num_labels: int | None = None) -> float:
    """Mean ROUGE-L F-measure (longest common word subsequence) over the rows, on 0-1, from
    rouge-score with its Porter stemmer, as the transformers summarization example and the
    published summarization scores use it ("cats" matches "cat"). Its tokenizer lowercases and
    keeps only a-z and 0-9: text in another script scores 0 (use chrf there). The stemmer is
    rule-based and needs no NLTK data.

    Raises:
        ValueError: as `_texts`.
    """
    from rouge_score import rouge_scorer

    pred, ref = _texts(pred, ref)
    if not ref:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(pred, ref)) / len(ref)


def normalize_answer(text: str) -> str:
    """An answer as the official SQuAD evaluation compares it: lowercased, without punctuation,
    without the articles a, an and the, with whitespace collapsed."""
    import re
    import string

    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _answer_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of two normalized answers; an empty one matches only an empty one."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """`exact_match` and `f1` of extractive answers as the official SQuAD v1.1/v2.0 evaluation
    computes them, on 0-1: per question the best over its gold answers (a question without one
    is answered right by the empty answer), averaged over the questions.

    Raises:
        ValueError: a different number of predictions and questions.
    """
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} answers for {len(golds)} questions; give one answer per question")
    if not golds:
        return {"exact_match": 0.0, "f1": 0.0}
    em = f1 = 0.0
    for prediction, answers in zip(predictions, golds):
        answers = list(answers) or [""]
        em += max(float(normalize_answer(prediction) == normalize_answer(a)) for a in answers)
        f1 += max(_answer_f1(prediction, a) for a in answers)
    return {"exact_match": em / len(golds), "f1": f1 / len(golds)}


METRICS: dict[str, Callable] = {
    "accuracy": _accuracy,
    "f1": _f1,
    "matthews_correlation": _matthews,
    "pearson": _correlation("pearson"),
    "spearmanr": _correlation("spearman"),
    "entity_f1": _entity_f1,
    "exact_match": _exact_match,
    "chrf": _chrf,
    "bleu": _bleu,
    "rougeL": _rouge_l,
    "masked_accuracy": _accuracy,  # token ids at the masked positions (masked_lm)
    "f1_micro": _f1_micro,
    "f1_macro": _f1_macro,
    "subset_accuracy": _subset_accuracy,
}

# Metrics that compare class ids (the others compare scores, tag sequences, label sets or texts).
CLASS_METRICS = {"accuracy", "f1", "matthews_correlation"}
# Metrics that compare a generated text with a reference text (lists of strings).
GENERATION_METRICS = {"exact_match", "chrf", "bleu", "rougeL"}
# Metrics that compare label sets (multi-hot rows x labels arrays).
LABEL_SET_METRICS = {"f1_micro", "f1_macro", "subset_accuracy"}


def compute(name: str, predictions, references, num_labels: int | None = None) -> float:
    """Compute metric `name`; `num_labels` is the task's number of labels (None for regression and generation).

    Raises:
        KeyError: an unknown metric name.
        ValueError: a metric that depends on the label set (f1) without `num_labels`; a generation
            metric with a different number of predictions and references; a label-set metric on
            arrays that are not both rows x num_labels.
    """
    fn = METRICS[name]
    if name == "entity_f1" or name in GENERATION_METRICS:
        return fn(predictions, references, num_labels)
    return fn(np.asarray(predictions), np.asarray(references), num_labels)


def chance_level(name: str, references, num_labels: int | None = None) -> float:
    """Score of the best constant guess (majority class, a constant label set, or no correlation) on `references`.

    Raises:
        ValueError: as `compute`; a generation metric, whose chance depends on the prompts as well
            (see `generation_chance`): a chance level from the references alone could be too low
            and call a model that copies its input learned.
    """
    if name in GENERATION_METRICS:
        raise ValueError(f"{name} is a generation metric: its chance level is generation_chance(name, references, prompts)")
    if name in ("pearson", "spearmanr", "matthews_correlation", "entity_f1"):
        return 0.0
    if name in LABEL_SET_METRICS:
        return _label_set_chance(name, references, num_labels)
    ref = np.asarray(references)
    if not len(ref):
        return 0.0
    majority = Counter(ref.tolist()).most_common(1)[0][0]
    return compute(name, np.full_like(ref, majority), ref, num_labels)


def generation_chance(name: str, references: Sequence[str], prompts: Sequence[str] | None = None) -> float:
    """What a model that learned nothing scores with generation metric `name` on `references`:
    the best of an empty text on every row; the most frequent reference (whitespace collapsed) on
    every row, when one occurs more than once: the majority guess of a task whose answers are a
    few fixed words (where every reference differs, this would only win one row by picking its
    answer); and, when `prompts` (one per reference) are given, each row's prompt copied, which
    scores well where the output shares many words with the input (a summary, a paraphrase, a
    correction). 0.0 without references.

    Raises:
        KeyError: an unknown metric name.
        ValueError: a metric that is not a generation metric (see `chance_level`), or a different
            number of prompts and references.
    """
    if name not in METRICS:
        raise KeyError(name)
    if name not in GENERATION_METRICS:
        raise ValueError(f"{name} is not a generation metric: its chance level is chance_level(name, references, num_labels)")
    references = list(references)
    if prompts is not None and len(prompts) != len(references):
        raise ValueError(f"{len(prompts)} prompts for {len(references)} references; give one prompt per reference")
    if not references:
        return 0.0
    guesses = [[""] * len(references)]
    [(majority, count)] = Counter(_collapse_whitespace(r) for r in references).most_common(1)
    if count > 1:
        guesses.append([majority] * len(references))
    if prompts is not None:
        guesses.append(list(prompts))
    return max(compute(name, guess, references) for guess in guesses)

"""Extractive question answering (SQuAD v1.1 and v2.0): a question, a context, and answers as
spans of the context (their text and the character offset where each starts). The head scores
every token as the start and as the end of the answer.

A context longer than the model takes is split into windows of MAX_SEQ_LENGTH (or the task's
max_length) tokens, consecutive windows sharing `stride` tokens; each window is one model input,
labelled with the answer's first and last token when it holds the whole answer, else with the
first token (the "no answer" position). Evaluation and `predict` map the windows' scores back to
text as transformers' question-answering post-processing does: per window, the probabilities of
start and end (softmax over the context's tokens and the first token), the best span of at most
`max_answer_length` tokens among the 20 most likely starts and ends; the best span over the
windows; with `unanswerable: true`, no answer when the windows' least "no answer" probability
beats it. Scores are SQuAD's exact match and F1, with its answer normalisation.

Each window keeps what post-processing needs (`context_offsets`, `window`, `context`,
`answer_texts`); the collator leaves them out of the model's batch.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import metrics as metric_fns
from ..errors import TaskError
from .base import TaskType, missing

if TYPE_CHECKING:
    from ..spec import TaskSpec

N_BEST = 20  # starts and ends considered per window (transformers' run_qa default)
MAX_ANSWER_TOKENS = 30  # the default max_answer_length (run_qa's)
NO_ANSWER = 0  # the position whose start and end mean "no answer here" (the first token, [CLS])
POSTPROCESS_COLUMNS = ("context_offsets", "window", "context", "answer_texts")


def answers_of(value: Any) -> tuple[list[tuple[str, Any]], str | None]:
    """(the answers as (text, start) pairs, a problem) of one row's answers value: SQuAD's list of
    {text, answer_start} objects, or the Hub's {text: [...], answer_start: [...]}."""
    if isinstance(value, dict):
        texts, starts = value.get("text"), value.get("answer_start")
        if not isinstance(texts, list):
            return [], "holds an object without a 'text' list; give answers as [{text, answer_start}, …] or {text: [...], answer_start: [...]}"
        starts = starts if isinstance(starts, list) else [None] * len(texts)
        if len(starts) != len(texts):
            return [], f"has {len(texts)} answer texts but {len(starts)} answer_start offsets; give each answer its offset"
        return list(zip(texts, starts)), None
    if isinstance(value, list):
        pairs = []
        for item in value:
            if not isinstance(item, dict):
                return [], f"holds a {type(item).__name__} among its answers, not an object {{text, answer_start}}"
            pairs.append((item.get("text"), item.get("answer_start")))
        return pairs, None
    if value is None:
        return [], None
    return [], f"holds a {type(value).__name__}, not a list of answers [{{text, answer_start}}, …]"


def _offset(value: Any) -> int | None:
    """A character offset: a non-negative whole number (JSON may write 12.0), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return int(value) if float(value).is_integer() and value >= 0 else None


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


class ExtractiveQA(TaskType):
    name = "extractive_qa"
    required_columns = ("question", "context", "answers")
    label_columns = ("answers",)
    auto_class = "AutoModelForQuestionAnswering"
    pipeline = None  # transformers 5 removed pipeline("question-answering"): the export loads with AutoModelForQuestionAnswering
    has_label_set = False
    metrics = ("f1", "exact_match")
    default_metrics = ("f1", "exact_match")
    options = ("unanswerable", "stride", "max_answer_length")
    output_names = ("start_logits", "end_logits")

    def check_declaration(self, where: str, labels, num_labels: int | None) -> None:
        if labels is not None or num_labels is not None:
            raise TaskError(f"{where}: type extractive_qa takes its answers from the 'answers' column, not 'labels' or 'num_labels'")

    # ---------------------------------------------------------------- raw data
    def first_label_problem(self, spec: TaskSpec, ds) -> tuple[int, str] | None:
        """The first row whose answers cannot train: not a list of answers, an answer without its
        text or offset, an offset where the context does not hold the answer's text, or no answer
        at all without `unanswerable: true`."""
        col, context_col = spec.columns["answers"], spec.columns["context"]
        for i, (value, context) in enumerate(zip(ds[col], ds[context_col])):
            answers, problem = answers_of(value)
            if problem:
                return i, f"column {col!r} (role 'answers') {problem}"
            if not answers and not spec.unanswerable:
                return i, (f"no answer in column {col!r} (role 'answers'); give the row its answer, or declare "
                           "'unanswerable: true' for questions without one (SQuAD 2.0)")
            for k, (text, start) in enumerate(answers, 1):
                if missing(text) or not isinstance(text, str):
                    return i, f"answer {k} in column {col!r} (role 'answers') has no text; give each answer its text"
                start = _offset(start)
                if start is None:
                    return i, (f"answer {k} in column {col!r} (role 'answers') has no answer_start offset; give each answer "
                               "the character offset where it starts in the context")
                found = str(context)[start : start + len(text)]
                if found != text:
                    return i, (f"answer {k} in column {col!r} (role 'answers'), {text[:40]!r}, is not at offset {start} of the "
                               f"context (which holds {found[:40]!r} there); fix its answer_start")
        return None

    def label_values(self, spec: TaskSpec, ds) -> list[Any]:
        return []

    def check_tokenizer(self, spec: TaskSpec, tokenizer) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise TaskError(f"task {spec.name!r}: extractive QA needs a fast (Rust) tokenizer to map answers to tokens")

    # ---------------------------------------------------------------- encoding
    def encode(self, spec: TaskSpec, batch: dict, tokenizer, max_length: int, with_labels: bool) -> dict:
        """One model input per window of each row's context (see the module's docstring)."""
        questions = [str(q).lstrip() for q in batch[spec.columns["question"]]]  # leading spaces waste the window
        contexts = [str(c) for c in batch[spec.columns["context"]]]
        stride = spec.stride if spec.stride is not None else max_length // 4
        try:
            enc = tokenizer(questions, contexts, truncation="only_second", max_length=max_length, stride=stride,
                            return_overflowing_tokens=True, return_offsets_mapping=True)
        except Exception as e:  # noqa: BLE001 - the tokenizers raise several types for a window too small
            raise TaskError(f"task {spec.name!r}: a question leaves no room for its context in {max_length} tokens with "
                            f"stride {stride} ({str(e).splitlines()[0][:120]}); raise max_length (MAX_SEQ_LENGTH) or lower "
                            "'stride'") from None
        rows = enc.pop("overflow_to_sample_mapping")
        offsets = enc.pop("offset_mapping")
        answers = [answers_of(v)[0] for v in batch[spec.columns["answers"]]] if spec.columns["answers"] in batch else None
        out: dict[str, list] = {key: list(values) for key, values in enc.items()}
        out.update({"context_offsets": [], "window": [], "context": [], "answer_texts": []})
        labels = []
        previous = None
        for i, row in enumerate(rows):
            sequence = enc.sequence_ids(i)
            in_context = [s == 1 for s in sequence]
            out["context_offsets"].append([list(o) if c else None for o, c in zip(offsets[i], in_context)])
            out["window"].append(0 if row != previous else out["window"][-1] + 1)
            previous = row
            out["context"].append(contexts[row])
            row_answers = answers[row] if answers is not None else []
            out["answer_texts"].append([text for text, _ in row_answers])
            labels.append(self._positions(offsets[i], in_context, row_answers))
        if with_labels:
            out["labels"] = labels
        return out

    def split_size_note(self, spec: TaskSpec, train, validation) -> str | None:
        """The plan counts windows (what the sampler draws and the batches hold): say how many questions they are."""
        def count(split) -> str:
            return f"{sum(1 for w in split['window'] if w == 0)} questions in {len(split)} windows"

        splits = [f"train {count(train)}"] + ([f"validation {count(validation)}"] if validation is not None else [])
        return f"{spec.name}: its sizes count context windows: " + ", ".join(splits)

    @staticmethod
    def _positions(offsets, in_context: list[bool], answers: list[tuple[str, Any]]) -> list[int]:
        """[first token, last token] of the first answer in this window, or the no-answer position twice."""
        if not answers:
            return [NO_ANSWER, NO_ANSWER]
        text, start = answers[0]
        start, end = int(start), int(start) + len(text)
        tokens = [k for k, c in enumerate(in_context) if c]
        if not tokens or offsets[tokens[0]][0] > start or offsets[tokens[-1]][1] < end:
            return [NO_ANSWER, NO_ANSWER]  # the answer is not (wholly) in this window
        first = next(k for k in tokens if offsets[k][1] > start)
        last = next(k for k in reversed(tokens) if offsets[k][0] < end)
        return [first, last]

    def collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        return _WithoutPostprocessColumns(super().collator(tokenizer, pad_to_multiple_of))

    def placeholder_labels(self, spec: TaskSpec, ds):
        return ds.add_column(spec.columns["answers"], [[] for _ in range(len(ds))])

    def head_inputs(self, inputs: dict) -> dict:
        """`labels` ([first, last] token per window) as the head's start and end positions."""
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is not None:
            inputs["start_positions"], inputs["end_positions"] = labels[:, 0], labels[:, 1]
        return inputs

    def configure_head(self, cfg, spec: TaskSpec) -> None:
        cfg.num_labels = 2  # start and end: what AutoModelForQuestionAnswering's qa_outputs layer reads
        cfg.problem_type = None

    # ---------------------------------------------------------------- outputs
    def answers(self, spec: TaskSpec, predictions, split) -> list[dict[str, Any]]:
        """Per row (not window) of `split`: {answer, score, start, end}, the best span's text, its
        probability and its character offsets in the context (end exclusive); the empty answer
        with start = end = 0 when `unanswerable` and "no answer" is likelier."""
        start_logits, end_logits = (np.asarray(p, dtype=np.float64) for p in predictions)
        longest = spec.max_answer_length or MAX_ANSWER_TOKENS
        rows: list[list[int]] = []
        for i, window in enumerate(split["window"]):
            if window == 0 or not rows:
                rows.append([i])
            else:
                rows[-1].append(i)
        offsets_column, contexts = split["context_offsets"], split["context"]
        out = []
        for windows in rows:
            best, no_answer = None, None
            for i in windows:
                offsets = offsets_column[i]
                inside = [k for k, o in enumerate(offsets) if o is not None]
                allowed = np.full(len(offsets), -np.inf)
                allowed[[NO_ANSWER, *inside]] = 0.0
                p_start = _softmax(start_logits[i][: len(offsets)] + allowed)
                p_end = _softmax(end_logits[i][: len(offsets)] + allowed)
                null = p_start[NO_ANSWER] * p_end[NO_ANSWER]
                no_answer = null if no_answer is None else min(no_answer, null)
                starts = [k for k in np.argsort(-p_start)[:N_BEST] if offsets[k] is not None]
                ends = [k for k in np.argsort(-p_end)[:N_BEST] if offsets[k] is not None]
                for s in starts:
                    for e in ends:
                        if s <= e < s + longest and (best is None or p_start[s] * p_end[e] > best[0]):
                            best = (p_start[s] * p_end[e], offsets[s][0], offsets[e][1], contexts[i])
            if best is None or (spec.unanswerable and no_answer > best[0]):
                out.append({"answer": "", "score": round(float(no_answer or 0.0), 6), "start": 0, "end": 0})
            else:
                score, start, end, context = best
                out.append({"answer": context[start:end], "score": round(float(score), 6), "start": int(start), "end": int(end)})
        return out

    @staticmethod
    def gold_answers(split) -> list[list[str]]:
        """Per row (not window): its answers' texts."""
        return [texts for texts, window in zip(split["answer_texts"], split["window"]) if window == 0]

    def score_split(self, spec: TaskSpec, predictions, label_ids, split, tokenizer) -> dict[str, float]:
        texts = [a["answer"] for a in self.answers(spec, predictions, split)]
        scores = metric_fns.answer_scores(texts, self.gold_answers(split))
        return {name: scores[name] for name in spec.metrics}

    def split_chance(self, spec: TaskSpec, split, tokenizer) -> dict[str, float]:
        """The better of the empty answer to every question and the most frequent answer."""
        golds = self.gold_answers(split)
        guesses = [[""] * len(golds)]
        firsts = [g[0] for g in golds if g]
        if firsts:
            guesses.append([Counter(firsts).most_common(1)[0][0]] * len(golds))
        scores = [metric_fns.answer_scores(guess, golds) for guess in guesses]
        return {name: max(s[name] for s in scores) for name in spec.metrics}

    def split_prediction_rows(self, spec: TaskSpec, predictions, label_ids, split, tokenizer) -> list[dict[str, Any]]:
        """`{"answer", "score", "start", "end"}` per input row (see `answers`)."""
        return self.answers(spec, predictions, split)

    def prediction_rows(self, spec: TaskSpec, logits, label_ids) -> list[dict[str, Any]]:
        raise TypeError(f"task {spec.name!r}: answers are read from the windows' offsets (`split_prediction_rows`)")


class _WithoutPostprocessColumns:
    """The padding collator over the model's inputs only (each window also carries what
    post-processing reads: `POSTPROCESS_COLUMNS`)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        return self.collator([{k: v for k, v in e.items() if k not in POSTPROCESS_COLUMNS} for e in examples])

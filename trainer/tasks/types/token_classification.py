"""Token classification (NER, POS): a list of words per row and one tag per word. The first
sub-token of each word carries the word's tag; the others, and special tokens, are ignored (-100)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import metrics as metric_fns
from ..errors import TaskError
from .base import LabelSetType, label_to_id, logits_of, missing, sort_key

if TYPE_CHECKING:
    from ..spec import TaskSpec

IGNORED = -100  # the label of positions the loss and the metrics skip


def labelled_positions(logits, label_ids) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per sentence, (predicted ids, label ids) at the positions whose label is not -100.

    Rows may be padded with -100 to a common length (the evaluation loop's arrays) or ragged
    (a tokenized split's `labels` column); logits rows are cut to their label row's length.

    Raises:
        ValueError: no `label_ids` (they say which positions are words).
    """
    if label_ids is None:
        raise ValueError("token classification needs label_ids to know which positions are words")
    out = []
    for p_row, l_row in zip(logits, label_ids):
        l_row = np.asarray(l_row).reshape(-1)
        pred = np.asarray(p_row)[: len(l_row)].argmax(-1)
        keep = l_row != IGNORED
        out.append((pred[keep], l_row[keep]))
    return out


class TokenClassification(LabelSetType):
    name = "token_classification"
    required_columns = ("tokens", "label")
    auto_class = "AutoModelForTokenClassification"
    pipeline = "token-classification"
    metrics = ("accuracy", "f1", "matthews_correlation", "entity_f1")
    default_metrics = ("accuracy",)
    # Byte-level BPE tokenizers (RoBERTa…) need a leading space per word for pre-split words.
    tokenizer_kwargs = {"add_prefix_space": True}

    def first_label_problem(self, spec: TaskSpec, ds) -> tuple[int, str] | None:
        col = spec.columns["label"]
        for i, (words, tags) in enumerate(zip(ds[spec.columns["tokens"]], ds[col])):
            if tags is None:
                return i, f"no tags in column {col!r}; give every row a tag per token"
            empty = next((k for k, tag in enumerate(tags) if missing(tag)), None)
            if empty is not None:
                return i, f"tag {empty + 1} in column {col!r} is empty; give every token a tag"
            if len(words) != len(tags):
                return i, f"{len(words)} tokens but {len(tags)} tags in column {col!r}; give every token exactly one tag"
        return None

    def label_values(self, spec: TaskSpec, ds) -> list[Any]:
        return sorted({tag for tags in ds[spec.columns["label"]] for tag in tags}, key=sort_key)

    def check_tokenizer(self, spec: TaskSpec, tokenizer) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise TaskError(f"task {spec.name!r}: token classification needs a fast (Rust) tokenizer to align tags to words")

    def encode(self, spec: TaskSpec, batch: dict, tokenizer, max_length: int, with_labels: bool) -> dict:
        words = [[str(w) for w in seq] for seq in batch[spec.columns["tokens"]]]
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
        if with_labels:
            all_labels = []
            for i, tags in enumerate(batch[spec.columns["label"]]):
                previous, row = None, []
                for word in enc.word_ids(i):
                    row.append(IGNORED if word is None or word == previous else label_to_id(spec, tags[word]))
                    previous = word
                all_labels.append(row)
            enc["labels"] = all_labels
        return dict(enc)

    def collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    def placeholder_labels(self, spec: TaskSpec, ds):
        first = spec.labels[0]
        return ds.map(lambda row: {spec.columns["label"]: [first] * len(row[spec.columns["tokens"]])})

    def decode(self, spec: TaskSpec, logits, label_ids=None):
        """`(predicted tags, reference tags)` per sentence, at the words' positions only.

        Raises:
            ValueError: no `label_ids` (see `labelled_positions`).
        """
        names = spec.labels
        rows = labelled_positions(logits_of(logits), label_ids)
        return [[names[i] for i in p] for p, _ in rows], [[names[i] for i in r] for _, r in rows]

    def score(self, spec: TaskSpec, logits, label_ids) -> dict[str, float]:
        """entity_f1 compares tag sequences; the class metrics compare the tag of every word."""
        rows = labelled_positions(logits_of(logits), label_ids)
        n = self.num_labels(spec)
        out = {}
        for name in spec.metrics:
            if name == "entity_f1":
                pred, ref = self.decode(spec, logits, label_ids)
            else:
                pred = np.concatenate([p for p, _ in rows]) if rows else np.zeros(0, dtype=int)
                ref = np.concatenate([r for _, r in rows]) if rows else np.zeros(0, dtype=int)
            out[name] = metric_fns.compute(name, pred, ref, n)
        return out

    def references(self, label_ids) -> np.ndarray:
        """Every word's tag id; `label_ids` may be ragged (one list per sentence, -100 off the words)."""
        rows = [np.asarray(r).reshape(-1) for r in label_ids]
        ref = np.concatenate(rows) if rows else np.zeros(0, dtype=int)
        return ref[ref != IGNORED]

    def prediction_rows(self, spec: TaskSpec, logits, label_ids) -> list[dict[str, Any]]:
        """`{"tags"}` per input: one tag per word."""
        tags, _ = self.decode(spec, logits, label_ids)
        return [{"tags": t} for t in tags]

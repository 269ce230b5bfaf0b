"""Masked language modelling on unlabeled in-domain text: a `text` column, masked by transformers'
`DataCollatorForLanguageModeling` (15% of the tokens: 80% become the mask token, 10% a random
token, 10% stay). Trained beside the labelled tasks it adapts the shared encoder to the domain's
text while the heads learn their tasks (domain-adaptive pretraining, in the same run).

Training masks afresh at every batch (the global torch generator, which the Trainer saves in
each checkpoint, so a resumed run masks as the uninterrupted one). Evaluation masks each batch
from a seed derived from its tokens, in a forked generator: the same positions at every
evaluation, and the training's random stream untouched. Evaluation keeps the 5 most likely
tokens of each position (`reduce_logits`), never the logits over the vocabulary.
"""

from __future__ import annotations

import zlib
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import TaskError
from .base import IGNORED, TaskType

if TYPE_CHECKING:
    from ..spec import TaskSpec

MLM_PROBABILITY = 0.15  # BERT's and RoBERTa's share of masked tokens
TOP_K = 5  # tokens kept per position: the `predict` output, as pipeline("fill-mask") gives


class _SeededMasking:
    """The training collator, with each batch masked from a seed of its own token ids in a forked
    torch generator: deterministic, and the global random stream is left as it was."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        ids = np.concatenate([np.asarray(e["input_ids"], dtype=np.int64) for e in examples])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(ids.tobytes()))
            return self.collator(examples)


class _MaskPositions:
    """`predict`'s collator: the inputs are not masked again; the positions holding the mask
    token are the ones to fill (their label is the mask token id, every other one -100)."""

    def __init__(self, tokenizer, pad_to_multiple_of: int | None):
        from transformers import DataCollatorWithPadding

        self.mask_id = tokenizer.mask_token_id
        self.pad = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.pad([{k: v for k, v in e.items() if k != "special_tokens_mask"} for e in examples])
        ids = batch["input_ids"]
        batch["labels"] = torch.where(ids == self.mask_id, ids, torch.full_like(ids, IGNORED))
        return batch


class MaskedLM(TaskType):
    name = "masked_lm"
    required_columns = ("text",)
    auto_class = "AutoModelForMaskedLM"
    pipeline = "fill-mask"
    has_label_set = False
    label_columns = ()  # the text is the input and (masked) what is learned
    metrics = ("masked_accuracy",)
    default_metrics = ("masked_accuracy",)
    output_names = ("logits",)
    reports_perplexity = True
    loads_pretrained_head = True  # BERT's cls.predictions.*, RoBERTa's lm_head.*: not in AutoModel's weights

    def check_declaration(self, where: str, labels, num_labels: int | None) -> None:
        if labels is not None or num_labels is not None:
            raise TaskError(f"{where}: type masked_lm learns from unlabeled text and takes no 'labels' or 'num_labels'")

    def first_label_problem(self, spec: TaskSpec, ds) -> tuple[int, str] | None:
        col = spec.columns["text"]
        for i, value in enumerate(ds[col]):
            if not isinstance(value, str) or not value.strip():
                return i, (f"empty text in column {col!r} (role 'text'): a masked-LM row needs text to mask; "
                           "remove the row")
        return None

    def label_values(self, spec: TaskSpec, ds) -> list[Any]:
        return []

    def check_tokenizer(self, spec: TaskSpec, tokenizer) -> None:
        if tokenizer.mask_token_id is None:
            raise TaskError(f"task {spec.name!r}: the tokenizer has no mask token, which masked_lm needs; "
                            "use an encoder's tokenizer (BERT, RoBERTa…) or drop the task")

    def encode(self, spec: TaskSpec, batch: dict, tokenizer, max_length: int, with_labels: bool) -> dict:
        """Token ids only: the collator masks them and makes the labels."""
        texts = [str(t) for t in batch[spec.columns["text"]]]
        return dict(tokenizer(texts, truncation=True, max_length=max_length, return_special_tokens_mask=True))

    def collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        from transformers import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=MLM_PROBABILITY,
                                               pad_to_multiple_of=pad_to_multiple_of)

    def eval_collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        return _SeededMasking(self.collator(tokenizer, pad_to_multiple_of))

    def predict_collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        return _MaskPositions(tokenizer, pad_to_multiple_of)

    def placeholder_labels(self, spec: TaskSpec, ds):
        return ds

    def configure_head(self, cfg, spec: TaskSpec) -> None:
        cfg.problem_type = None

    def reduce_logits(self, logits, labels):
        """The TOP_K most likely token ids of every position, and their probabilities."""
        probabilities = torch.softmax(logits.float(), dim=-1)
        top = probabilities.topk(TOP_K, dim=-1)
        return top.indices, top.values

    @staticmethod
    def _masked(predictions, label_ids) -> tuple[np.ndarray, np.ndarray]:
        """(best token id, label) at every masked position of the split."""
        ids = np.asarray(predictions[0])
        labels = np.asarray(label_ids)
        width = min(ids.shape[1], labels.shape[1])
        best, labels = ids[:, :width, 0], labels[:, :width]
        keep = labels != IGNORED
        return best[keep], labels[keep]

    def score(self, spec: TaskSpec, logits, label_ids) -> dict[str, float]:
        """masked_accuracy: the share of masked tokens whose most likely token is the original."""
        pred, ref = self._masked(logits, label_ids)
        return {"masked_accuracy": float(np.mean(pred == ref)) if len(ref) else 0.0}

    def split_chance(self, spec: TaskSpec, split, tokenizer) -> dict[str, float]:
        """The most frequent token's share of the split's maskable tokens: what guessing that token
        at every masked position scores (masked positions are drawn uniformly among them)."""
        counts: Counter = Counter()
        for ids, special in zip(split["input_ids"], split["special_tokens_mask"]):
            counts.update(i for i, s in zip(ids, special) if not s)
        total = sum(counts.values())
        return {"masked_accuracy": counts.most_common(1)[0][1] / total if total else 0.0}

    def split_prediction_rows(self, spec: TaskSpec, predictions, label_ids, split, tokenizer) -> list[dict[str, Any]]:
        """`{"masks": [[{"score", "token", "token_str"} × 5] per mask token of the input, in order]}`
        per input: the 5 most likely tokens of each mask, as pipeline("fill-mask") names them."""
        ids, probabilities = (np.asarray(p) for p in predictions)
        labels = np.asarray(label_ids)
        rows = []
        for row_ids, row_p, row_labels in zip(ids, probabilities, labels):
            fills = []
            for position in np.flatnonzero(row_labels != IGNORED):
                fills.append([{"score": round(float(p), 6), "token": int(t), "token_str": tokenizer.decode([int(t)]).strip()}
                              for t, p in zip(row_ids[position], row_p[position])])
            rows.append({"masks": fills})
        return rows

    def prediction_rows(self, spec: TaskSpec, logits, label_ids) -> list[dict[str, Any]]:
        raise TypeError(f"task {spec.name!r}: masked-LM predictions are decoded with the tokenizer (`split_prediction_rows`)")

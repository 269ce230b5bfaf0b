"""Causal language modelling: the model reads a prompt (optional) and learns to write the target.

A row becomes ``[BOS] prompt separator target EOS`` (BOS where the tokenizer adds one, the
separator where the task declares one); the loss is on the target and EOS only: the labels are
-100 on the prompt, the separator and the padding (padding is found by the collator from each
example's length, never by the pad id, which may equal EOS). A row longer than the task's
maximum length loses the start of its prompt first (the end of the prompt, next to the target,
is kept), and only when no prompt is left the end of its target. Without a prompt column it is
plain language modelling of `target`.

Evaluation and `predict` generate: the prompt (and separator) is given, the model writes until
EOS or max_new_tokens, and the text is scored against the target with the task's generation
metrics (exact_match, chrf, bleu, rougeL), beside the evaluation loss and perplexity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import metrics as metric_fns
from ..errors import TaskError
from .base import TaskType, missing

if TYPE_CHECKING:
    from ..spec import TaskSpec

IGNORED = -100  # the label of positions the loss skips


class CausalLM(TaskType):
    name = "causal_lm"
    required_columns = ("target",)
    optional_columns = ("prompt",)
    label_columns = ("target",)
    auto_class = "AutoModelForCausalLM"
    pipeline = "text-generation"
    has_label_set = False
    generates = True
    metrics = tuple(sorted(metric_fns.GENERATION_METRICS))
    default_metrics = ("chrf", "exact_match")

    def check_spec(self, spec: TaskSpec, where: str) -> None:
        """Any separator is fine (the base refuses one): it is declared for this type."""

    def check_declaration(self, where: str, labels, num_labels: int | None) -> None:
        if labels is not None or num_labels is not None:
            raise TaskError(f"{where}: type {self.name} generates text and takes no 'labels' or 'num_labels'")

    # ---------------------------------------------------------------- raw data
    def first_label_problem(self, spec: TaskSpec, ds) -> tuple[int, str] | None:
        col = spec.columns["target"]
        for i, value in enumerate(ds[col]):
            if missing(value):
                return i, f"no text in column {col!r} (role 'target'); give every row its target or remove it"
            if not isinstance(value, str):
                return i, f"column {col!r} (role 'target') holds a {type(value).__name__}, not a text; quote it or fix the row"
        return None

    def label_values(self, spec: TaskSpec, ds) -> list[Any]:
        return []  # texts: no label set

    # ---------------------------------------------------------------- encoding
    def _pieces(self, spec: TaskSpec, tokenizer) -> tuple[list[int], list[int], list[int]]:
        """(what starts every row: BOS where the tokenizer adds one, the separator's ids, EOS)."""
        probe = tokenizer("a")["input_ids"]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id] else []
        sep = tokenizer(spec.separator, add_special_tokens=False)["input_ids"] if spec.separator else []
        if tokenizer.eos_token_id is None:
            raise TaskError(f"task {spec.name!r}: the tokenizer has no EOS token, which ends every target; use another TOKENIZER_NAME")
        return bos, sep, [tokenizer.eos_token_id]

    def encode(self, spec: TaskSpec, batch: dict, tokenizer, max_length: int, with_labels: bool) -> dict:
        """Training rows (`with_labels`): the whole sequence, labels on the target and EOS. Else
        generation prompts: ``[BOS] prompt separator``, the prompt cut from the left to fit."""
        bos, sep, eos = self._pieces(spec, tokenizer)
        n = len(next(iter(batch.values())))
        prompt_col = spec.columns.get("prompt")
        prompts = tokenizer([str(p) for p in batch[prompt_col]], add_special_tokens=False)["input_ids"] if prompt_col else [[]] * n
        out: dict[str, list] = {"input_ids": [], "attention_mask": []}
        if not with_labels:
            for prompt in prompts:
                room = max(max_length - len(bos) - len(sep), 0)
                ids = bos + (prompt[len(prompt) - room:] if room else []) + sep
                out["input_ids"].append(ids)
                out["attention_mask"].append([1] * len(ids))
            return out
        targets = tokenizer([str(t) for t in batch[spec.columns["target"]]], add_special_tokens=False)["input_ids"]
        out["labels"] = []
        for prompt, target in zip(prompts, targets):
            target = target[: max(max_length - len(bos) - len(sep) - len(eos), 0)] + eos
            room = max(max_length - len(bos) - len(sep) - len(target), 0)
            prompt = prompt[len(prompt) - room:] if room else []
            ids = bos + prompt + sep + target
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append([IGNORED] * (len(ids) - len(target)) + target)
        return out

    def collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        """Pads on the right for training; labels padded with -100 (by position, not by the pad id)."""
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORED, pad_to_multiple_of=pad_to_multiple_of,
                                      padding="longest")

    def placeholder_labels(self, spec: TaskSpec, ds):
        return ds  # `predict` encodes prompts only (`encode` without labels)

    # ---------------------------------------------------------------- the head
    def configure_head(self, cfg, spec: TaskSpec) -> None:
        cfg.problem_type = None

    # ---------------------------------------------------------------- generation
    def split_texts(self, labelled_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """(the prompt's ids, the target's ids without EOS) of one encoded training row."""
        start = next((i for i, label in enumerate(labels) if label != IGNORED), len(labels))
        return labelled_ids[:start], [t for t in labels[start:] if t != IGNORED][:-1]

    def score_texts(self, spec: TaskSpec, predictions: list[str], references: list[str]) -> dict[str, float]:
        return {name: metric_fns.compute(name, predictions, references) for name in spec.metrics}

    def split_chance(self, spec: TaskSpec, split, tokenizer) -> dict[str, float]:
        """The better of an empty output, the most frequent target and a copy of the prompt."""
        prompts, references = [], []
        for ids, labels in zip(split["input_ids"], split["labels"]):
            prompt, target = self.split_texts(ids, labels)
            prompts.append(tokenizer.decode(prompt, skip_special_tokens=True))
            references.append(tokenizer.decode(target, skip_special_tokens=True))
        return {name: metric_fns.generation_chance(name, references, prompts) for name in spec.metrics}

    def chance(self, spec: TaskSpec, label_ids) -> dict[str, float]:
        raise TypeError(f"task {spec.name!r} generates text: its chance level needs the prompts (`split_chance`)")

    def score(self, spec: TaskSpec, logits, label_ids) -> dict[str, float]:
        raise TypeError(f"task {spec.name!r} generates text: it is scored on generated texts (`score_texts`)")

    def prediction_rows(self, spec: TaskSpec, texts, label_ids=None) -> list[dict[str, Any]]:
        """`{"text"}` per input: the generated text (without the prompt)."""
        return [{"text": t} for t in texts]

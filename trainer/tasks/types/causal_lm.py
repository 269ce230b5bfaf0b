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

from typing import TYPE_CHECKING

from ..errors import TaskError
from .base import IGNORED, GenerationType

if TYPE_CHECKING:
    from ..spec import TaskSpec


class CausalLM(GenerationType):
    name = "causal_lm"
    required_columns = ("target",)
    optional_columns = ("prompt",)
    auto_class = "AutoModelForCausalLM"
    pipeline = "text-generation"
    export_padding_side = "left"  # batches of prompts in `pipeline("text-generation")`
    options = ("separator",)

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

    # ---------------------------------------------------------------- generation
    def split_texts(self, labelled_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """(the prompt's ids, the target's ids without EOS) of one encoded training row."""
        start = next((i for i, label in enumerate(labels) if label != IGNORED), len(labels))
        return labelled_ids[:start], [t for t in labels[start:] if t != IGNORED][:-1]

    def generated_tokens(self, row: list[int], prompt_width: int) -> list[int]:
        return row[prompt_width:]  # a decoder writes after its prompt

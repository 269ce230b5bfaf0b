"""Regenerate the built-in offline decoder demo: data files, a byte-level BPE tokenizer and a tiny GPT-2 config.

    python -m trainer.demo.decoder.generate

Two small synthetic tasks on the same short texts (two to four words, from three categories of
the encoder demo's words), each learnable by a 2-layer GPT-2 trained from scratch in about a
minute on a CPU:

- demo_reverse (JSONL, causal_lm): the prompt's words in reverse order.
  `{"prompt": "cat red bread", "target": "bread red cat"}`
- demo_majority (CSV, classification): the category most of the words belong to.
  `cat,red,dog -> animal` (every text has one category with more words than any other)

Validation texts never occur in training, so exact match measures the rule, not memory.

The tokenizer is GPT-2's kind (byte-level BPE, no prefix space), trained on the training texts
until every word is one token, at the start of a text ("cat") and after a space ("Ġcat"):
- `<|endoftext|>` is bos, eos and unk, as in GPT-2 (the last id of the BPE vocabulary, as 50256 is).
- No pad token, as in GPT-2: the trainer picks one (eos, usually) and says so. A trainer padding
  with eos must mask padding by the attention mask, not by the pad id, or the model never
  learns to stop.
- `<sep>`, an extra special token (the last id), separates prompt and target. It is meant to be
  named by the causal_lm task (its declaration or the type's default), which checks that it is
  one token of the tokenizer. The model sees `ids(prompt) + [<sep>] + ids(target) + [eos]`,
  the loss on the target and eos only. Join ids, not strings: "cat <sep> dog" would put a
  space token before `<sep>` and turn "dog" into "Ġdog". `<sep>` never splits and is dropped
  by `decode(..., skip_special_tokens=True)`.

The output is deterministic (fixed seeds); the files are committed so the demo needs no step.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from ..generate import CATEGORIES

HERE = Path(__file__).resolve().parent
LABELS = ["animal", "color", "food"]
WORDS = {word: category for category in LABELS for word in CATEGORIES[category]}
EOS = "<|endoftext|>"
SEP = "<sep>"
VOCAB_SIZE = 400  # bytes (256) and merges, before EOS and SEP; more than the merges the texts offer
MAX_LENGTH = 128


def text(rng: random.Random) -> tuple[str, str]:
    """Two to four words with one category holding more of them than any other: the text and that category."""
    while True:
        words = [rng.choice(list(WORDS)) for _ in range(rng.randint(2, 4))]
        counts = sorted(((sum(WORDS[w] == c for w in words), c) for c in LABELS), reverse=True)
        if counts[0][0] > counts[1][0]:
            return " ".join(words), counts[0][1]


def reverse(words: str) -> str:
    """The rewrite rule of demo_reverse."""
    return " ".join(reversed(words.split()))


def splits(rng: random.Random, sizes: dict[str, int]) -> dict[str, list[tuple[str, str]]]:
    """Texts (with their majority category) for each split, no text in two splits."""
    seen: set[str] = set()
    out = {}
    for split, n in sizes.items():
        rows = []
        while len(rows) < n:
            words, category = text(rng)
            if words not in seen:
                seen.add(words)
                rows.append((words, category))
        out[split] = rows
    return out


def tokenizer(texts: list[str], folder: Path) -> int:
    """Train the byte-level BPE tokenizer on `texts` and save it as a GPT-2 tokenizer; returns its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    state = json.loads(bpe.to_str())["model"]
    vocab = {**state["vocab"], EOS: len(state["vocab"])}  # last, as GPT-2's 50256
    merges = [tuple(m) for m in state["merges"]]
    gpt2 = GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH, extra_special_tokens=[SEP])
    gpt2.save_pretrained(folder)
    return len(gpt2)


def main(folder: Path = HERE) -> None:
    """Write data/ and model/ under `folder` (the committed ones by default)."""
    rng = random.Random(4321)
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    reverse_rows = splits(rng, {"train": 600, "dev": 100})
    for split, rows in reverse_rows.items():
        with open(data / f"reverse_{split}.jsonl", "w") as f:
            f.writelines(json.dumps({"prompt": words, "target": reverse(words)}) + "\n" for words, _ in rows)
    majority_rows = splits(rng, {"train": 600, "dev": 100})
    for split, rows in majority_rows.items():
        with open(data / f"majority_{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(rows)

    model = folder / "model"
    model.mkdir(exist_ok=True)
    texts = [t for words, _ in reverse_rows["train"] for t in (words, reverse(words))]
    texts += [words for words, _ in majority_rows["train"]]
    size = tokenizer(texts, model)
    from transformers import GPT2Config

    eos = size - 2
    GPT2Config(
        vocab_size=size, n_positions=MAX_LENGTH, n_embd=64, n_layer=2, n_head=2, n_inner=256,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos,
    ).save_pretrained(model)


if __name__ == "__main__":
    main()

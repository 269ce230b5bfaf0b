"""Regenerate the built-in offline demo: data files, vocabulary and a tiny model config.

    python -m trainer.demo.generate

Three small synthetic tasks, one per format, each learnable by a small model trained from
scratch in a minute on a CPU, so `make run-local` shows real learning without any download:

- demo_similarity (TSV, pair regression): how many word categories two sentences share, as 0–5.
- demo_entailment (CSV, pair classification): does the premise hold a thing of the named category?
- demo_choice (JSONL, multiple choice): which of four words belongs to the asked category?

The output is deterministic (fixed seed); the files are committed so the demo needs no step.
The decoder demo (a tiny GPT-2, under decoder/) has its own: `python -m trainer.demo.decoder.generate`.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
CATEGORIES = {
    "animal": ["cat", "dog", "horse", "bird", "fish", "cow", "goat", "duck"],
    "color": ["red", "blue", "green", "yellow", "black", "white", "brown", "pink"],
    "vehicle": ["car", "bus", "train", "bike", "boat", "plane", "truck", "taxi"],
    "tool": ["hammer", "saw", "drill", "wrench", "shovel", "rake", "knife", "axe"],
    "food": ["bread", "apple", "rice", "cheese", "soup", "cake", "egg", "banana"],
    "place": ["park", "house", "school", "beach", "city", "farm", "garden", "forest"],
}
FUNCTION_WORDS = ["the", "a", "an", "is", "near", "there", "which", "one", "of", "these", "?", "."]


def _pair(rng: random.Random, categories: list[str]) -> tuple[str, list[str]]:
    """A sentence naming one word of each of two categories."""
    words = [rng.choice(CATEGORIES[c]) for c in categories]
    return f"the {words[0]} is near the {words[1]}", words


def similarity(rng: random.Random, n: int) -> list[dict]:
    """Score 0, 2.5 or 5: how many of the two word categories the sentences share."""
    rows = []
    for i in range(n):
        first = rng.sample(list(CATEGORIES), 2)
        shared = rng.randint(0, 2)
        rest = [c for c in CATEGORIES if c not in first]
        second = rng.sample(first, shared) + rng.sample(rest, 2 - shared)
        rng.shuffle(second)
        rows.append({"id": i, "sentence1": _pair(rng, first)[0], "sentence2": _pair(rng, second)[0],
                     "score": f"{2.5 * shared:.2f}"})
    return rows


def entailment(rng: random.Random, n: int) -> list[dict]:
    """Entailed when the hypothesis names the category of a word in the premise."""
    rows = []
    for _ in range(n):
        categories = rng.sample(list(CATEGORIES), 2)
        premise, _ = _pair(rng, categories)
        entailed = rng.random() < 0.5
        asked = rng.choice(categories) if entailed else rng.choice([c for c in CATEGORIES if c not in categories])
        article = "an" if asked[0] in "aeiou" else "a"
        rows.append({"premise": premise, "hypothesis": f"there is {article} {asked}",
                     "label": "entailment" if entailed else "not_entailment"})
    return rows


def choice(rng: random.Random, n: int) -> list[dict]:
    """Which of four words belongs to the category named in the question?"""
    rows = []
    letters = ["A", "B", "C", "D"]
    for _ in range(n):
        category = rng.choice(list(CATEGORIES))
        others = rng.sample([c for c in CATEGORIES if c != category], 3)
        options = [rng.choice(CATEGORIES[category])] + [rng.choice(CATEGORIES[c]) for c in others]
        rng.shuffle(options)
        answer = next(k for k, w in enumerate(options) if w in CATEGORIES[category])
        rows.append({"question": f"which one of these is a {category} ?", "choices": options, "answer": letters[answer]})
    return rows


def vocabulary() -> list[str]:
    words = set(FUNCTION_WORDS) | set(CATEGORIES)
    for group in CATEGORIES.values():
        words |= set(group)
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]


def main() -> None:
    rng = random.Random(1234)
    data = HERE / "data"
    data.mkdir(exist_ok=True)
    for split, n in (("train", 1200), ("dev", 300)):
        rows = similarity(rng, n)
        with open(data / f"similarity_{split}.tsv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t", quoting=csv.QUOTE_NONE)
            w.writeheader()
            w.writerows(rows)
        rows = entailment(rng, n)
        with open(data / f"entailment_{split}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        with open(data / f"choice_{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in choice(rng, n))

    model = HERE / "model"
    model.mkdir(exist_ok=True)
    vocab = vocabulary()
    (model / "vocab.txt").write_text("\n".join(vocab) + "\n")
    from transformers import BertConfig, BertTokenizer

    tokenizer = BertTokenizer(str(model / "vocab.txt"), do_lower_case=True,
                              model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    tokenizer.model_max_length = 64
    tokenizer.save_pretrained(model)
    BertConfig(
        vocab_size=len(vocab), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ).save_pretrained(model)


if __name__ == "__main__":
    main()

"""Shared fixtures: tiny models built from configs, a tiny task set of every type, the CLI runner.

Everything runs offline (HF_HUB_OFFLINE=1): a test that tries to download is a bug.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads; several test processes on 2 cores thrash with them.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "trainer" / "demo"
SHARED_GLUE = ROOT.parent / "shared" / "data" / "glue"
TINY_MAX_LENGTH = 128  # the tiny model's positions (and its tokenizer's limit): MAX_SEQ_LENGTH's default fits

from tests.gcs_server import gcs_server  # noqa: E402,F401  (fixture re-export)
from tests.gcs_testbench import gcs_testbench  # noqa: E402,F401  (fixture re-export)
from tests.vertex_server import vertex_server  # noqa: E402,F401  (fixture re-export)


def make_tiny_bert(directory: Path, hidden: int = 32) -> Path:
    """A BERT encoder config (2 layers) with the demo vocabulary; trains in seconds."""
    from transformers import BertConfig

    directory.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.txt", "tokenizer.json"):
        shutil.copy(DEMO / "model" / name, directory / name)
    tokenizer_config = json.loads((DEMO / "model" / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": TINY_MAX_LENGTH}))
    BertConfig(
        vocab_size=len((DEMO / "model" / "vocab.txt").read_text().split()), hidden_size=hidden,
        num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=TINY_MAX_LENGTH,
    ).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


DECODER_WORDS = ("the a saw dog cat bird red blue green car bus boat is near far tool animal color vehicle "
                 "short long one two three").split()


def make_tiny_decoder(directory: Path, arch: str = "gpt2", *, hidden: int = 64, tie: bool | None = None) -> Path:
    """A decoder (GPT-2 or Llama architecture, 2 layers) built from a config, with a byte-level
    BPE tokenizer trained here on a few words: EOS `<|endoftext|>` (also BOS and UNK) and no pad
    token, as GPT-2's. `tie`: tie the language-model head to the input embeddings (default: the
    architecture's default, True for GPT-2 and False for Llama)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2TokenizerFast, LlamaConfig

    directory.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(DECODER_WORDS)] * 4 + list(DECODER_WORDS), vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    eot = "<|endoftext|>"
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=eot, eos_token=eot, unk_token=eot,
                                  model_max_length=TINY_MAX_LENGTH)
    tokenizer.save_pretrained(directory)
    eos = tokenizer.eos_token_id
    if arch == "gpt2":
        config = GPT2Config(n_layer=2, n_head=2, n_embd=hidden, n_positions=TINY_MAX_LENGTH, vocab_size=len(tokenizer),
                            bos_token_id=eos, eos_token_id=eos, **({} if tie is None else {"tie_word_embeddings": tie}))
    elif arch == "llama":
        config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, max_position_embeddings=TINY_MAX_LENGTH, vocab_size=len(tokenizer),
                             bos_token_id=eos, eos_token_id=eos, **({} if tie is None else {"tie_word_embeddings": tie}))
    else:
        raise ValueError(arch)
    config.save_pretrained(directory)
    return directory


def make_tiny_encoder_decoder(directory: Path, arch: str = "t5", *, hidden: int = 32) -> Path:
    """An encoder-decoder (T5 or BART architecture, 2 layers) built from a config, with a byte-level
    BPE tokenizer trained here on a few words that ends every text with `</s>` and pads with
    `<pad>`, as T5's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import BartConfig, PreTrainedTokenizerFast, T5Config

    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "</s>", "<unk>", "<s>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([" ".join(DECODER_WORDS)] * 4 + list(DECODER_WORDS),
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    eos = bpe.token_to_id("</s>")
    bpe.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                        bos_token="<s>", model_max_length=TINY_MAX_LENGTH)
    tokenizer.save_pretrained(directory)
    pad = tokenizer.pad_token_id
    if arch == "t5":
        config = T5Config(vocab_size=len(tokenizer), d_model=hidden, d_kv=hidden // 2, d_ff=2 * hidden, num_layers=2,
                          num_heads=2, pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad)
    elif arch == "bart":
        config = BartConfig(vocab_size=len(tokenizer), d_model=hidden, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * hidden,
                            decoder_ffn_dim=2 * hidden, max_position_embeddings=TINY_MAX_LENGTH, pad_token_id=pad,
                            eos_token_id=eos, bos_token_id=tokenizer.bos_token_id, decoder_start_token_id=eos,
                            forced_eos_token_id=eos)
    else:
        raise ValueError(arch)
    config.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    return make_tiny_encoder_decoder(tmp_path_factory.mktemp("tiny-t5"), "t5")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return make_tiny_decoder(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_decoder(tmp_path_factory.mktemp("tiny-llama"), "llama")


def write_decoder_tasks(directory: Path, *, n_train: int = 200, n_eval: int = 24, seed: int = 0,
                        generation_type: str = "causal_lm") -> Path:
    """The seed system's two tasks on one decoder, on tiny data: `rewrite` (causal_lm: the words of
    the prompt, a noun, a color and maybe a second noun, in reverse order after a `<sep>` token)
    and `color` (3-way classification of the same texts by their color word). `generation_type`
    seq2seq: the rewrite as a `source` -> `target` task, for encoder-decoder backbones."""
    import random

    rng = random.Random(seed)
    nouns = ["saw", "dog", "cat", "bird", "car", "bus", "boat"]
    colors = ["red", "blue", "green"]
    data = directory / "data"
    data.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n in (("train", n_train), ("validation", n_eval)):
        path = data / f"decoder_{split}.jsonl"
        with open(path, "w") as f:
            for _ in range(n):
                words = [rng.choice(colors if i % 2 else nouns) for i in range(rng.randint(2, 3))]
                f.write(json.dumps({"text": " ".join(words), "rewrite": " ".join(reversed(words)), "color": words[1]}) + "\n")
        files[split] = str(path)
    generation = ({"type": "causal_lm", "columns": {"prompt": "text", "target": "rewrite"}, "separator": "<sep>",
                   "special_tokens": ["<sep>"]} if generation_type == "causal_lm" else
                  {"type": "seq2seq", "columns": {"source": "text", "target": "rewrite"}})
    tasks = [
        {"name": "rewrite", **generation, "files": files, "metrics": ["exact_match", "chrf"]},
        {"name": "color", "type": "classification", "files": files, "columns": {"text": "text", "label": "color"},
         "labels": colors},
    ]
    path = directory / "decoder_tasks.json"
    path.write_text(json.dumps({"tasks": tasks}, indent=1))
    return path


@pytest.fixture(scope="session")
def decoder_tasks(tmp_path_factory) -> Path:
    return write_decoder_tasks(tmp_path_factory.mktemp("decoder-tasks"))


def write_tasks_file(directory: Path, *, n_train: int = 96, n_eval: int = 32, token_task: bool = True) -> Path:
    """A tasks file over small slices of the demo data, plus a token-classification task."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "data"
    data.mkdir(exist_ok=True)

    def head(src: Path, dst: Path, n: int) -> str:
        lines = src.read_text().splitlines(keepends=True)
        header = 0 if src.suffix == ".jsonl" else 1
        dst.write_text("".join(lines[: header + n]))
        return str(dst)

    tasks = json.loads((DEMO / "tasks.json").read_text())["tasks"]
    for task in tasks:
        for split, n in (("train", n_train), ("validation", n_eval)):
            src = DEMO / task["files"][split]
            task["files"][split] = head(src, data / f"{task['name']}_{split}{src.suffix}", n)
    if token_task:
        tasks.append(write_token_task(data, n_train, n_eval))
    path = directory / "tasks.json"
    path.write_text(json.dumps({"tasks": tasks}, indent=1))
    return path


def write_token_task(data: Path, n_train: int, n_eval: int) -> dict:
    """Tag every demo word with its category in BIO form (jsonl with token/tag lists)."""
    import random

    from trainer.demo.generate import CATEGORIES

    rng = random.Random(7)
    words = [(w, c) for c, ws in CATEGORIES.items() for w in ws]
    files = {}
    for split, n in (("train", n_train), ("validation", n_eval)):
        path = data / f"demo_tags_{split}.jsonl"
        with open(path, "w") as f:
            for _ in range(n):
                (w1, c1), (w2, c2) = rng.sample(words, 2)
                f.write(json.dumps({"words": ["the", w1, "is", "near", "the", w2],
                                    "tags": ["O", f"B-{c1}", "O", "O", "O", f"B-{c2}"]}) + "\n")
        files[split] = str(path)
    return {"name": "demo_tags", "type": "token_classification", "files": files,
            "columns": {"tokens": "words", "label": "tags"}, "metrics": ["entity_f1", "accuracy"]}


@pytest.fixture(scope="session")
def tiny_tasks(tmp_path_factory) -> Path:
    return write_tasks_file(tmp_path_factory.mktemp("tiny-tasks"))


@pytest.fixture(scope="session")
def small_tasks(tmp_path_factory) -> Path:
    """The tiny tasks with 16 training examples each: 8 steps an epoch at batch 8."""
    return write_tasks_file(tmp_path_factory.mktemp("small-tasks"), n_train=16, n_eval=8)


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m trainer ARGS` in a fresh process, as a user would."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "ENV_FILE": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def tiny_flags(model: Path, tasks_file: Path, out: Path, **extra) -> list[str]:
    """Flags for a fast CLI training run of the tiny task set."""
    flags = {
        "model_name": model, "model_init": "scratch", "tasks_file": tasks_file,
        "tasks": "demo_similarity,demo_entailment,demo_choice,demo_tags", "output_dir": out,
        "max_steps": 12, "train_batch_size": 8, "eval_batch_size": 16, "learning_rate": 1e-3,
        "eval_strategy": "steps", "eval_steps": 6, "save_strategy": "steps", "save_steps": 6,
        "logging_steps": 6, "seed": 3, **extra,
    }
    return [f"--{k}={v}" for k, v in flags.items()]

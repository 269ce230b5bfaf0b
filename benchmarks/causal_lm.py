"""Causal LM: the multitask trainer on a decoder against the plain `Trainer` with `AutoModelForCausalLM`,
and the checkpoint of 2 tasks against 1.

The decoder is a GPT-2 built from a config (the plan's `decoder_*` sizes) around the decoder
demo's byte-level BPE tokenizer (`trainer/demo/decoder/model`); its random weights are saved
once, so that baseline and candidate start from the same ones, and nothing is downloaded. The
tasks come from `Setup.decoder_tasks_file` (default `benchmarks/decoder_tasks.json`: RTE premise
→ hypothesis as causal_lm, RTE entailment as classification): the first is the language-modelling
task, the second another head on the same backbone.

1. Throughput: `MultitaskTrainer` training a `MultitaskModel` with the causal_lm head against
   `transformers.Trainer` training `AutoModelForCausalLM`, side by side on the very same batches
   (`against_trainer`, as the throughput benchmark measures encoders): examples/s and real tokens/s.
2. Checkpoint size: the Trainer's checkpoint after a few steps, every batch padded to the same
   length, of the causal_lm task alone against causal_lm + the second head, and of the plain
   `AutoModelForCausalLM` for reference: the weights file (model.safetensors) and the whole folder
   (with the optimizer state). The language-model head is tied to the input embeddings, so it is
   stored once, as the embeddings (no `lm_head` tensor in any weights file). Sizes need no fresh
   process (the memory benchmark's peak RSS does): the runs train here, one after the other.

With a GPU that supports it, (1) is repeated in bf16.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from trainer.config import DEMO_DIR
from trainer.modeling import WEIGHTS_FILE
from trainer.tasks import read_tasks_file

from .common import (
    ROOT,
    BenchError,
    Setup,
    against_trainer,
    gpu_precisions,
    interleave,
    load_tasks,
    median,
    ratio,
    result,
    train_and_save,
)

logger = logging.getLogger("benchmarks")

NAME = "causal_lm"
GOAL_RATIO = (">=", 0.97)  # multitask over the Trainer, as for encoders (throughput); 1.0 is the limit (same work)
GOAL_SIZE = ("<=", 1.05)  # 2 tasks over 1, as for encoders (memory)
TOKENIZER = DEMO_DIR / "decoder" / "model"
HEAD_DIM = 64  # GPT-2's: width / 64 attention heads
CONFIGS = {"multitask_1_task": ("multitask", 1), "multitask_2_tasks": ("multitask", 2), "trainer_1_task": ("trainer", 1)}


def decoder_setup(setup: Setup, folder: Path) -> tuple[Setup, dict]:
    """The session's setup on the decoder: a GPT-2 of the plan's size written to `folder` (config,
    tokenizer, random weights) and the first two tasks of the decoder tasks file. Returns it and
    what describes the decoder.

    Raises:
        BenchError: the decoder tasks file is missing, or does not declare a causal_lm task first
            and another task after it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, set_seed

    from trainer.commands import load_tokenizer

    path = setup.decoder_tasks_file
    if not path.is_file():
        raise BenchError(f"the decoder tasks file {path} does not exist: pass --decoder-tasks-file")
    specs = read_tasks_file(path)
    names = list(specs)
    if len(names) < 2 or specs[names[0]].task_type.auto_class != "AutoModelForCausalLM":
        raise BenchError(f"{path} declares {', '.join(f'{n} ({s.type})' for n, s in specs.items())}: the causal-LM "
                         "benchmark needs a causal_lm task first and another task after it")
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(folder)
    tokenizer = load_tokenizer(str(folder), list(specs.values()))  # as `Setup.tokenizer` loads it
    plan = setup.plan
    heads = max(1, plan.decoder_width // HEAD_DIM)
    config = GPT2Config(n_layer=plan.decoder_layers, n_embd=plan.decoder_width, n_head=heads,
                        n_positions=plan.decoder_length, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    set_seed(setup.seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    label = (f"GPT-2 from a config: {plan.decoder_layers} layers, width {plan.decoder_width}, {heads} heads, "
             f"{plan.decoder_length} positions, {len(tokenizer)} tokens (the decoder demo's tokenizer)")
    decoder = {"layers": plan.decoder_layers, "width": plan.decoder_width, "heads": heads,
               "positions": plan.decoder_length, "vocab_size": len(tokenizer), "tie_word_embeddings": config.tie_word_embeddings,
               "parameters": model.num_parameters(), "tokenizer": str(TOKENIZER.relative_to(ROOT))}
    return dataclasses.replace(setup, model=str(folder), model_init="pretrained", model_label=label, tasks_file=path,
                               tasks=names[:2], max_length=plan.decoder_length, _tokenizer=tokenizer, _specs=specs), decoder


def checkpoint(setup: Setup, kind: str, n_tasks: int, out: Path) -> dict:
    """`train_and_save`, and the names of the tensors its weights file holds for the language-model head."""
    from safetensors import safe_open

    saved = train_and_save(setup, kind, n_tasks, setup.plan.memory_steps, out)
    [weights] = out.rglob(WEIGHTS_FILE)
    with safe_open(str(weights), "pt") as f:
        keys = list(f.keys())
    return {**saved, "weights_tensors": len(keys), "lm_head_tensors": [k for k in keys if "lm_head" in k]}


def run(setup: Setup) -> dict:
    started = time.perf_counter()
    plan = setup.plan
    work = setup.work_dir / NAME
    dec, decoder = decoder_setup(setup, work / "decoder")
    lm, other = dec.tasks
    steps = plan.warmup_steps + plan.timed_steps
    [task] = load_tasks(dec, [lm], max_length=dec.max_length, train_samples=steps * dec.batch_size)
    steps = min(steps, len(task.train) // dec.batch_size)

    measurements: dict = {"decoder": decoder}
    figures: list[dict] = []
    for precision in ["fp32", *gpu_precisions()]:
        logger.info("causal_lm: throughput, %s", precision)
        m = against_trainer(dec, task, steps, precision=precision, work=work / "throughput")
        measurements[f"one_task_{precision}"] = m
        suffix = "" if precision == "fp32" else f" ({precision}, GPU)"
        for key, label in (("examples_per_s", "examples/s"), ("tokens_per_s", "tokens/s")):
            figures.append(ratio(f"{label}: multitask / Trainer (AutoModelForCausalLM), causal LM{suffix}",
                                 m["fastest"]["multitask"][key], m["fastest"]["trainer"][key],
                                 of=(f"multitask {label}", f"Trainer {label}"), goal=GOAL_RATIO))

    logger.info("causal_lm: checkpoints, 2 tasks against 1")
    runs = {name: (lambda kind=kind, n=n, name=name: checkpoint(dec, kind, n, work / name)) for name, (kind, n) in CONFIGS.items()}
    series = interleave(runs, 1)  # sizes do not vary between rounds
    measurements["checkpoints"] = series
    one, two, plain = series["multitask_1_task"], series["multitask_2_tasks"], series["trainer_1_task"]
    figures += [
        ratio("weights file size: 2 tasks / 1 task", median(two, "weights_bytes"), median(one, "weights_bytes"),
              of=("2-task model.safetensors bytes", "1-task model.safetensors bytes"), goal=GOAL_SIZE, unit="×"),
        ratio("checkpoint size: 2 tasks / 1 task", median(two, "checkpoint_bytes"), median(one, "checkpoint_bytes"),
              of=("2-task checkpoint bytes", "1-task checkpoint bytes"), goal=GOAL_SIZE, unit="×"),
        # for reference: the plain AutoModelForCausalLM's checkpoint
        ratio("weights file size: multitask 1 task / Trainer (AutoModelForCausalLM)", median(one, "weights_bytes"),
              median(plain, "weights_bytes"), of=("multitask model.safetensors bytes", "Trainer model.safetensors bytes"), unit="×"),
        ratio("checkpoint size: multitask 1 task / Trainer (AutoModelForCausalLM)", median(one, "checkpoint_bytes"),
              median(plain, "checkpoint_bytes"), of=("multitask checkpoint bytes", "Trainer checkpoint bytes"), unit="×"),
    ]

    fp32 = measurements["one_task_fp32"]
    per_example = fp32["trainer"][0]["tokens"] / fp32["trainer"][0]["examples"]
    stored = {name: r[0]["lm_head_tensors"] for name, r in series.items() if r[0]["lm_head_tensors"]}
    notes = [f"Decoder: {dec.model_label}; {decoder['parameters']:,} parameters, random weights saved once and loaded "
             "by every run (no download).",
             f"Throughput: task {lm}, {steps} steps of {dec.batch_size} examples per run (on average {per_example:.0f} "
             f"real tokens each, at most {dec.max_length}), the first {plan.warmup_steps} left out of the timing. Baseline "
             f"and candidate train side by side, one step each in turn, on the same batches; {plan.repeats} rounds; each "
             f"step's time is the fastest of its rounds ({fp32['fastest']['trainer']['step_s']:.3g} s per step for the Trainer).",
             f"Checkpoints: {plan.memory_steps} steps at batch {dec.batch_size} x {dec.max_length} tokens (2 tasks: {lm} "
             f"and {other}, round robin, so both heads have optimizer state), then the Trainer's checkpoint; the weights "
             "file is model.safetensors alone, the checkpoint the whole folder (optimizer, scheduler, RNG, tokenizer).",
             "The language-model head is tied to the input embeddings and stored once: no lm_head tensor in any "
             "model.safetensors." if not stored else
             f"lm_head tensors stored beside the tied input embeddings (a second copy): {stored}."]
    if not gpu_precisions():
        notes.append("No GPU on this machine: no bf16 rows.")
    return result(NAME, "Causal LM: multitask against the plain Trainer on a decoder", dec, started, figures=figures,
                  measurements=measurements, settings={"decoder": decoder}, notes=notes)

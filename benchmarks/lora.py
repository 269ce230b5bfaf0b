"""LoRA against full fine-tuning on the benchmark encoder: what a run trains, writes and commits.

The same tasks (`Setup.tasks`, round robin, every batch padded to `setup.max_length`) train the
same number of steps twice from the same pretrained weights: with every weight trainable
(LORA=false) and with one LoRA adapter on the frozen backbone plus the full heads (LORA=shared,
PEFT's default target modules for the architecture, LORA_R=8). Each then saves the Trainer's
checkpoint (weights, optimizer state, scheduler, RNG), and that folder is committed to a local
store with the job's own commit (`trainer.checkpoints.commits.commit_checkpoint`: checksums,
create-only uploads, the manifest last), as a save under SIGTERM commits it.

Rows: trainable parameters, checkpoint bytes, commit seconds and step time (the median of the
timed steps), each LoRA / full; on a GPU, in bf16 where it has it, peak GPU memory too. A checkpoint that is this small commits in a fraction of the
PREEMPTION_GRACE_SECONDS a Spot VM gives, for a backbone of any size: only the adapters, the
heads and their optimizer state are written.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

from trainer.config import load_config

from .common import (
    Setup,
    StepClock,
    bench_config,
    folder_bytes,
    gpu_peak_bytes,
    gpu_precisions,
    multitask_trainer,
    padded_tasks,
    ratio,
    reset_gpu_peak,
    result,
    value,
)

logger = logging.getLogger("benchmarks")

NAME = "lora"
GOAL_CHECKPOINT = ("<=", 0.25)  # LoRA's checkpoint over full fine-tuning's: the backbone and its moments are not written
MODES = ("false", "shared")


def train_and_commit(setup: Setup, lora: str, steps: int, work: Path) -> tuple[dict, list]:
    """Train `steps` steps with LORA=`lora`, save the Trainer's checkpoint, commit it; what it
    measured, and the specs of the tasks it trained."""
    from trainer.checkpoints.commits import commit_checkpoint
    from trainer.checkpoints.storage import LocalStore

    tasks = padded_tasks(setup, max(2, len(setup.tasks)), steps)
    precision = (gpu_precisions() or ["fp32"])[0]  # bf16 where the GPU has it, as PRECISION=auto chooses
    cfg = bench_config(setup, [t.name for t in tasks], work / "run", max_steps=steps, sampling="round_robin",
                       save_strategy="steps", save_steps=steps, save_total_limit=1, lora=lora, precision=precision)
    clock = StepClock()
    reset_gpu_peak()
    trainer = multitask_trainer(setup, tasks, cfg, callbacks=[clock])
    trainer.train()
    peak = gpu_peak_bytes()
    checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{steps}"
    store = LocalStore(work / "store")
    began = time.perf_counter()
    commit_checkpoint(store, checkpoint, "bench", steps, metadata={"benchmark": NAME})
    commit_s = time.perf_counter() - began
    model = trainer.model
    timed = clock.step_seconds()[setup.plan.warmup_steps:] or clock.step_seconds()
    return {
        "lora": lora, "steps": trainer.state.global_step,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "checkpoint_bytes": folder_bytes(checkpoint), "weights_bytes": (checkpoint / "model.safetensors").stat().st_size,
        "commit_s": commit_s, "step_s": statistics.median(timed), "precision": precision, "gpu_peak_bytes": peak,
    }, [t.spec for t in tasks]


# A backbone of the size users move to, built on the meta device (its modules, no weights) to count
# what LoRA and full fine-tuning would write: Llama-3-8B's shape.
AT_SCALE = ("Llama-3-8B", {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                           "max_position_embeddings": 8192, "tie_word_embeddings": False})
CHECKPOINT_BYTES_PER_TRAINABLE = 12  # a float32 weight and AdamW's two float32 moments: model.safetensors + optimizer.pt


def at_scale(setup: Setup, specs, measured: dict[str, dict]) -> dict:
    """Parameters and checkpoint bytes of the benchmark's tasks on an 8B backbone, LoRA and full,
    from a model built on the meta device with the same LoRA settings; the bytes are 12 per
    trainable parameter plus what the measured LoRA checkpoint holds besides its tensors
    (tokenizer, configs, scheduler, RNG states), checked against the measured checkpoints."""
    from transformers import AutoConfig

    from trainer.modeling import LoraSetup, meta_model

    name, shape = AT_SCALE
    config = AutoConfig.for_model(**shape)
    config.pad_token_id = 0
    model = meta_model(config, specs)
    parameters = sum(p.numel() for p in model.parameters())
    cfg = bench_config(setup, [s.name for s in specs], setup.work_dir / NAME / "scale", lora="shared")
    model.enable_lora(LoraSetup.from_config(cfg, config))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    small = measured["shared"]
    extra = small["checkpoint_bytes"] - CHECKPOINT_BYTES_PER_TRAINABLE * small["trainable_parameters"]
    return {"backbone": name, "config": shape, "parameters": parameters, "trainable_parameters": trainable,
            "full_checkpoint_bytes": CHECKPOINT_BYTES_PER_TRAINABLE * parameters + extra,
            "lora_checkpoint_bytes": CHECKPOINT_BYTES_PER_TRAINABLE * trainable + extra,
            "bytes_per_parameter_measured_full": (measured["false"]["checkpoint_bytes"] - extra) / measured["false"]["parameters"]}


def run(setup: Setup) -> dict:
    started = time.perf_counter()
    plan = setup.plan
    steps = plan.warmup_steps + plan.timed_steps
    runs = {}
    for lora in MODES:
        logger.info("lora: LORA=%s, %d steps", lora, steps)
        runs[lora], specs = train_and_commit(setup, lora, steps, setup.work_dir / NAME / lora)
    full, shared = runs["false"], runs["shared"]
    scale = at_scale(setup, specs, runs)
    grace = load_config({}, environ={}, env_file="").preemption_grace_seconds
    figures = [
        ratio("trainable parameters: LoRA / full fine-tuning", shared["trainable_parameters"], full["trainable_parameters"],
              of=("LoRA trainable parameters", "full trainable parameters"), unit="×"),
        ratio("checkpoint bytes: LoRA / full fine-tuning", shared["checkpoint_bytes"], full["checkpoint_bytes"],
              of=("LoRA checkpoint bytes", "full checkpoint bytes"), goal=GOAL_CHECKPOINT, unit="×"),
        ratio("commit seconds: LoRA / full fine-tuning", shared["commit_s"], full["commit_s"],
              of=("LoRA commit s", "full commit s"), unit="×"),
        ratio("step time: LoRA / full fine-tuning", shared["step_s"], full["step_s"],
              of=("LoRA step s", "full step s"), unit="×"),
        value("LoRA checkpoint commit seconds (local store)", shared["commit_s"], unit="s"),
    ]
    figures += [
        ratio(f"checkpoint bytes at {scale['backbone']}'s shape: LoRA / full fine-tuning", scale["lora_checkpoint_bytes"],
              scale["full_checkpoint_bytes"], of=("LoRA checkpoint bytes", "full checkpoint bytes"), goal=GOAL_CHECKPOINT,
              unit="×"),
        value(f"upload rate a LoRA checkpoint at {scale['backbone']}'s shape needs to commit in PREEMPTION_GRACE_SECONDS={grace:g}",
              scale["lora_checkpoint_bytes"] / grace / 1e6, unit=" MB/s"),
        value(f"upload rate a full fine-tuning checkpoint at {scale['backbone']}'s shape needs for the same",
              scale["full_checkpoint_bytes"] / grace / 1e6, unit=" MB/s"),
    ]
    runs["at_scale"] = scale
    if full["gpu_peak_bytes"]:
        figures.append(ratio(f"peak GPU memory: LoRA / full fine-tuning ({full['precision']})", shared["gpu_peak_bytes"],
                             full["gpu_peak_bytes"], of=("LoRA peak bytes", "full peak bytes"), unit="×"))
    notes = [f"Encoder: {setup.model_label}; {full['parameters']:,} parameters; LoRA: PEFT's default target modules, "
             f"r=8, alpha=16; {shared['trainable_parameters']:,} trainable against {full['trainable_parameters']:,}.",
             f"{steps} steps of {setup.batch_size} examples x {setup.max_length} tokens on {', '.join(setup.tasks)} "
             f"(round robin), then the Trainer's checkpoint, committed to a local folder; step time is the median of the "
             f"steps after the first {plan.warmup_steps}.",
             "Commit seconds to GCS scale with the bytes (the upload benchmark measures the commit's throughput).",
             f"At {scale['backbone']}'s shape (built on the meta device, no weights; the same tasks and LoRA settings): "
             f"{scale['trainable_parameters']:,} trainable of {scale['parameters']:,} parameters; checkpoint bytes are "
             f"{CHECKPOINT_BYTES_PER_TRAINABLE} per trainable parameter (a float32 weight and AdamW's two moments; the "
             f"measured full checkpoint above holds {scale['bytes_per_parameter_measured_full']:.2f} per parameter besides those files) plus "
             "the files beside the tensors in the measured LoRA checkpoint.",
             f"Precision {full['precision']}; " + ("peak GPU memory is torch's allocator peak over model building, "
                                                   "training and saving." if full["gpu_peak_bytes"] else
                                                   "no GPU on this machine: no peak GPU memory row.")]
    return result(NAME, "LoRA against full fine-tuning: trainable parameters, checkpoint, commit and step time", setup,
                  started, figures=figures, measurements=runs, notes=notes)

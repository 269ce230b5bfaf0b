"""Train the tiny multitask job on every rank of a torchrun launch and record what each rank did.

Run by tests/training/test_ddp.py as ``torchrun --nproc_per_node=2 tests/ddp_probe.py MODEL TASKS_FILE OUT``.
It builds the job as `trainer.commands.train` does (config, tasks, tokenizer, model, `MultitaskTrainer`)
and records, per rank, into OUT/rank<R>.json:

- ``drawn``: every batch the multitask batch sampler handed the data loader (epoch, global indices);
- ``steps``: every `training_step` (global step, task, batch size, loss), in order, so the i-th
  step trained the i-th drawn batch (no loader workers, no gradient accumulation);
- ``log_history``: the Trainer's log entries (a training log at every step);
- the model's checksum before and after training, and whether this rank may write files
  (`should_save`); the final model is saved to OUT/saved-rank<R>;
- whether the `TrainingArguments` as `build_training_args` makes them put this process in the
  distributed job (``as_built``); where they do not, it trains with ``use_cpu=True`` so the rest
  of the distributed pipeline is still checked (``use_cpu_override``).

Only `checksum` is imported by the test; everything heavy is imported inside `main`.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

MAX_STEPS = 12
TRAIN_BATCH_SIZE = 4
WATCHDOG_S = 150  # seconds; a healthy run takes about 10


def checksum(state_dict) -> str:
    """sha256 over a state dict's names and tensor bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


class RecordingSampler:
    """Delegates to the trainer's batch sampler and logs every batch it yields."""

    def __init__(self, inner, log: list[dict]):
        self.inner, self.log, self.epoch = inner, log, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        for batch in self.inner:
            self.log.append({"epoch": self.epoch, "indices": [int(i) for i in batch]})
            yield batch


def main(model_dir: str, tasks_file: str, out: str) -> NoReturn:
    # A rank stuck in a collective would hang the test until its timeout: dump every thread's
    # stack to stderr (the test shows it) and exit instead.
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    import torch
    import torch.distributed as dist
    from transformers import set_seed

    from trainer import commands
    from trainer.config import load_config
    from trainer.modeling import MultitaskModel, load_encoder
    from trainer.tasks import resolve_tasks
    from trainer.training import MultitaskTrainer, build_training_args

    out_dir = Path(out)
    cfg = load_config(
        {
            "model_name": model_dir, "model_init": "scratch", "tasks_file": tasks_file,
            "tasks": "demo_similarity,demo_entailment,demo_choice,demo_tags", "output_dir": str(out_dir / "run"),
            "run_name": "ddp", "max_steps": MAX_STEPS, "train_batch_size": TRAIN_BATCH_SIZE, "learning_rate": 1e-3,
            "warmup_ratio": 0, "precision": "fp32", "eval_strategy": "no", "save_strategy": "no",
            "load_best_model_at_end": False, "export_at_end": False, "logging_steps": 1, "seed": 3,
        },
        environ={}, env_file="",
    )
    args = build_training_args(cfg, precision="fp32")
    # The arguments as `trainer.commands.train` builds them: do they make this process a DDP rank?
    as_built = {"world_size": args.world_size, "parallel_mode": str(args.parallel_mode)}
    launched = int(os.environ["WORLD_SIZE"])
    overridden = args.world_size != launched
    if overridden:
        # On a machine without CUDA, accelerate only sets up multi-process training when told the
        # job is CPU-only; say so, so the rest of the pipeline is still checked under DDP.
        args = dataclasses.replace(args, use_cpu=True)
    # When did this rank read and tokenize the data? (One rank per node first, then the others.)
    data_times: dict[str, list[float]] = {}

    def timed(name, fn):
        def run(*a, **k):
            started = time.time()
            result = fn(*a, **k)
            data_times[name] = [started, time.time()]
            return result
        return run

    commands.prepare_tasks = timed("read", commands.prepare_tasks)
    commands.tokenize_tasks = timed("tokenize", commands.tokenize_tasks)
    specs, raw, tokenizer = commands.load_data(cfg, resolve_tasks(cfg), args)
    set_seed(cfg.seed)
    tasks = commands.tokenize_data(cfg, specs, raw, tokenizer, args)
    model = MultitaskModel(load_encoder(cfg.model_name, cfg.model_init), specs)
    initial = checksum(model.state_dict())

    drawn: list[dict] = []
    steps: list[dict] = []

    class ProbeTrainer(MultitaskTrainer):
        def make_batch_sampler(self):
            return RecordingSampler(super().make_batch_sampler(), drawn)

        def training_step(self, model, inputs, num_items_in_batch=None):
            task, size = inputs["task"], len(inputs["labels"])
            loss = super().training_step(model, inputs, num_items_in_batch)
            steps.append({"global_step": self.state.global_step, "task": task, "batch_size": size, "loss": float(loss)})
            return loss

    trainer = ProbeTrainer(model=model, args=args, tasks=tasks, cfg=cfg, processing_class=tokenizer)
    trainer.train()
    rank = args.process_index
    trainer.save_model(str(out_dir / f"saved-rank{rank}"))

    record = {
        "rank": rank, "launched_world_size": launched, "as_built": as_built, "use_cpu_override": overridden,
        "world_size": args.world_size, "backend": args.distributed_state.backend,
        "process_group_backends": dist.get_backend_config() if dist.is_initialized() else None,
        "should_save": args.should_save, "tasks": [t.name for t in tasks], "sizes": [len(t.train) for t in tasks],
        "batch_sizes": [t.spec.batch_size or cfg.train_batch_size for t in tasks],
        "global_step": trainer.state.global_step, "steps": steps, "drawn": drawn, "data_times": data_times,
        "log_history": trainer.state.log_history,
        "initial_checksum": initial, "final_checksum": checksum(trainer.model.state_dict()),
        "model_is_wrapped": isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    dist.barrier()
    # Exit here, without tearing anything down: freeing the DDP-wrapped model and its gloo process
    # group as `main` returned (after destroy_process_group) hung now and then, about one run in
    # fifteen on a loaded 2-core machine. Nothing is left to write; both ranks are past the barrier.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(f"usage: {os.path.basename(sys.argv[0])} MODEL_DIR TASKS_FILE OUT_DIR")
    main(*sys.argv[1:])

"""Train the tiny multitask model with PyTorch's FSDP2 on CPU (gloo) on every rank of a torchrun
launch, wrapped as accelerate wraps it for the Trainer, and record what each rank saw.

Run by tests/training/test_fsdp.py as ``torchrun --nproc_per_node=2 tests/fsdp_probe.py MODEL TASKS_FILE OUT``.
accelerate sets FSDP up for GPU jobs only (on CPU the Trainer runs DDP, and FSDP=… is refused), so
this applies accelerate's own FSDP2 wrap policy (`fsdp2_prepare_auto_wrap_policy` on the plugin
that `build_training_args` configures, layers first, then the root, as `fsdp2_prepare_model` does)
with `fully_shard` by hand, and trains on the `MultitaskTrainer`'s loader (one task per step, the
same on every rank). It checks what the Trainer's FSDP path relies on in the model: the backbone's
layer classes found through `MultitaskModel._no_split_modules`, steps whose unused heads get no
gradient, and the full state dict (`get_model_state_dict`, what `Accelerator.get_state_dict` gathers)
in the model's own deduplicated format, which rank 0 saves and `MultitaskModel.from_checkpoint` loads.
Per rank, into OUT/rank<R>.json: the wrapped modules, the steps' tasks, checksums of the full
state dict before and after, and of each head.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

STEPS = 3
WATCHDOG_S = 150


def head_checksums(state_dict, heads) -> dict[str, str]:
    """Per task, the checksum of its head's own weights in a multitask state dict."""
    from tests.ddp_probe import checksum

    return {name: checksum({k: v for k, v in state_dict.items() if k.startswith(f"heads.{name}.")}) for name in heads}


def main(model_dir: str, tasks_file: str, out: str) -> NoReturn:
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    import torch
    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy, get_module_children_bottom_up
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from transformers import set_seed

    from tests.ddp_probe import checksum
    from trainer import commands
    from trainer.config import load_config
    from trainer.modeling import MultitaskModel, load_encoder
    from trainer.tasks import resolve_tasks
    from trainer.training import MultitaskTrainer, build_training_args

    out_dir = Path(out)
    cfg = load_config(
        {"model_name": model_dir, "model_init": "scratch", "tasks_file": tasks_file,
         "tasks": "demo_similarity,demo_entailment,demo_choice", "output_dir": str(out_dir / "run"), "run_name": "fsdp",
         "max_steps": STEPS, "train_batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0, "precision": "fp32",
         "eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False, "export_at_end": False,
         "seed": 3, "fsdp": "full_shard"},
        environ={}, env_file="",
    )
    args = build_training_args(cfg, precision="fp32")
    specs, raw, tokenizer = commands.load_data(cfg, resolve_tasks(cfg), args)
    tasks = commands.tokenize_data(cfg, specs, raw, tokenizer, args)
    set_seed(cfg.seed)
    model = MultitaskModel(load_encoder(cfg.model_name, cfg.model_init), specs)
    initial = checksum(model.state_dict())
    heads_before = head_checksums(model.state_dict(), model.heads)
    # The Trainer (DDP on CPU) only for its multitask loader: the batches FSDP would train.
    loader = MultitaskTrainer(model=model, args=args, tasks=tasks, cfg=cfg, processing_class=tokenizer).get_train_dataloader()

    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = []
    for name, module in get_module_children_bottom_up(model, return_fqns=True)[:-1]:
        if policy(module):
            fully_shard(module, reshard_after_forward=plugin.reshard_after_forward)
            wrapped.append(name)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    steps = []
    for batch in loader:
        if len(steps) == STEPS:
            break
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        steps.append({"task": batch["task"], "loss": float(loss)})

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # every rank: the gathered weights
    rank = dist.get_rank()
    record = {
        "rank": rank, "wrapped": wrapped, "steps": steps, "initial_checksum": initial, "final_checksum": checksum(full),
        "keys": sorted(full), "plain_keys": sorted(MultitaskModel(load_encoder(cfg.model_name, "scratch"), specs).state_dict()),
        "heads_before": heads_before,
        "heads_after": head_checksums(full, model.heads),
    }
    if rank == 0:
        saved = out_dir / "saved"
        saved.mkdir()
        save_file({k: v.contiguous() for k, v in full.items()}, str(saved / "model.safetensors"), metadata={"format": "pt"})
        model.write_description(saved)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/ddp_probe.py: no teardown of the gloo group (it hung now and then on a loaded machine)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(f"usage: {os.path.basename(sys.argv[0])} MODEL_DIR TASKS_FILE OUT_DIR")
    main(*sys.argv[1:])

"""What the end-to-end checkpoint, preemption and run-identity tests share: a tiny job on the
user's default settings (`flags`), run through the real CLI (`train`), and how to compare runs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import run_cli
from trainer.checkpoints import commits as cs
from trainer.checkpoints.storage import open_store

RUN = "ckpt"
TASKS = "demo_similarity,demo_entailment,demo_choice,demo_tags"
STEPS_PER_EPOCH = 8  # 16 examples per task, batch 8: 2 batches x 4 tasks
GRACE = 20.0
CLI_ENV = {"OMP_NUM_THREADS": "1"}


def flags(model: Path, tasks: Path, out: Path, uri: str | None = None, **extra) -> list[str]:
    """A tiny job on the user's defaults: epoch strategies, LOAD_BEST_MODEL_AT_END, SAVE_TOTAL_LIMIT=3."""
    values = {
        "model_name": model, "model_init": "scratch", "tasks_file": tasks, "tasks": TASKS, "output_dir": out,
        "run_name": RUN, "num_train_epochs": 3, "train_batch_size": 8, "eval_batch_size": 8, "learning_rate": 1e-3,
        "logging_steps": 4, "seed": 11, "storage_retry_deadline": 30, "preemption_grace_seconds": GRACE, **extra,
    }
    if uri is not None:
        values["checkpoint_uri"] = uri
    return [f"--{k}={v}" for k, v in values.items()]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def committed_steps(uri: str) -> list[int]:
    return [m.step for m in cs.list_checkpoints(open_store(uri), RUN)]


def train(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("train", *args, env={**CLI_ENV, **(env or {})})

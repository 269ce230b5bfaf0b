"""A 2-node Vertex AI job simulated on this machine: two real `python -m trainer train` processes
with the CLUSTER_SPEC Vertex gives the chief and the worker. Each derives its rank from it and
re-launches itself under torchrun; together they train over gloo, and only rank 0 commits.
Then the same job with the worker killed in mid-training and both nodes restarted on new disks:
the final weights equal the uninterrupted job's (every node's RNG state is committed)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, tiny_flags
from tests.gcs_server import free_port
from trainer.checkpoints import commits as cs
from trainer.checkpoints.storage import open_store

RUN = "multi"


def start_job(tiny_model, tiny_tasks, root: Path, store_dir: Path, *, worker_env: dict | None = None) -> list:
    """Start the chief and the worker of a 2-node job (each its own process group)."""
    port = free_port()
    cluster = {"workerpool0": [f"127.0.0.1:{port}"], "workerpool1": ["127.0.0.1:0"]}
    procs = []
    for node, task in enumerate(({"type": "workerpool0", "index": 0}, {"type": "workerpool1", "index": 0})):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "ENV_FILE": "", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
               "CLUSTER_SPEC": json.dumps({"cluster": cluster, "task": task}), **((worker_env or {}) if node == 1 else {})}
        flags = tiny_flags(tiny_model, tiny_tasks, root / f"node{node}", run_name=RUN, checkpoint_uri=store_dir,
                           max_steps=12, eval_strategy="no", save_strategy="steps", save_steps=3,
                           load_best_model_at_end=False, export_at_end=False)
        procs.append(subprocess.Popen([sys.executable, "-m", "trainer", "train", *flags], env=env, start_new_session=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs: list, timeout: float = 300) -> list[str]:
    logs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            logs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return logs


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tiny_tasks, tmp_path_factory):
    root = tmp_path_factory.mktemp("two-nodes")
    procs = start_job(tiny_model, tiny_tasks, root, root / "bucket")
    logs = finish(procs)
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-4000:]
    return root, logs


def test_two_node_job_from_cluster_spec_trains_and_commits_from_rank_0(uninterrupted):
    root, logs = uninterrupted
    assert "--nnodes 2 --node_rank 0" in logs[0].replace("=", " ") and "--nnodes 2 --node_rank 1" in logs[1].replace("=", " ")
    store = open_store(str(root / "bucket"))
    assert [m.step for m in cs.list_checkpoints(store, RUN)][-1] == 12
    assert cs.read_final(store, RUN) is not None
    # Only the chief (global rank 0) commits; the worker only reads the store.
    commits = [re.findall(r"checkpoint-\d+ committed to", log) for log in logs]
    assert len(commits[0]) >= 2 and commits[1] == []
    assert "Final model committed" in logs[0] and "Final model committed" not in logs[1]
    # Every rank's RNG state is in the committed checkpoint (rank 1's file comes from the other node).
    manifest = cs.list_checkpoints(store, RUN)[-1]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {f.path for f in manifest.files}


def test_a_node_killed_mid_training_and_both_restarted_on_new_disks_finish_like_the_uninterrupted_job(
        uninterrupted, tiny_model, tiny_tasks, tmp_path):
    root, _ = uninterrupted
    store_dir = tmp_path / "bucket"
    procs = start_job(tiny_model, tiny_tasks, tmp_path / "first", store_dir, worker_env={"TRAINER_CRASH_AT": "mid_step:8"})
    worker = procs[1]
    worker.wait(timeout=300)  # the worker's rank dies by SIGKILL at step 8; torchrun on its node gives up
    deadline = time.monotonic() + 30
    while procs[0].poll() is None and time.monotonic() < deadline:  # the chief loses its peer
        time.sleep(0.2)
    logs = finish(procs, timeout=1)  # as the platform does with a job whose worker failed: stop the rest too
    assert worker.returncode != 0 and "TRAINER_CRASH_AT=mid_step:8: killing" in logs[1]
    committed = [m.step for m in cs.list_checkpoints(open_store(str(store_dir)), RUN)]
    assert committed and committed[-1] < 12 and cs.read_final(open_store(str(store_dir)), RUN) is None

    restarted = start_job(tiny_model, tiny_tasks, tmp_path / "second", store_dir)  # new disks: only the store remains
    logs = finish(restarted)
    for proc, log in zip(restarted, logs):
        assert proc.returncode == 0, log[-4000:]
        assert f"(step {committed[-1]})" in log  # each node resumed the last committed checkpoint
    final = load_file(str(store_dir / RUN / "final" / "model.safetensors"))
    expected = load_file(str(root / "bucket" / RUN / "final" / "model.safetensors"))
    different = [k for k in expected if not torch.equal(final[k], expected[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted job's, e.g. {different[:3]}"

"""A 2-node Vertex AI job simulated on this machine: two real `python -m trainer train` processes
with the CLUSTER_SPEC Vertex gives the chief and the worker. Each derives its rank from it and
re-launches itself under torchrun; together they train over gloo, and only rank 0 commits."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from tests.conftest import ROOT, tiny_flags
from tests.gcs_server import free_port
from trainer import checkpoint_store as cs
from trainer.storage import open_store


def test_two_node_job_from_cluster_spec_trains_and_commits_from_rank_0(tiny_model, tiny_tasks, tmp_path):
    port = free_port()
    cluster = {"workerpool0": [f"127.0.0.1:{port}"], "workerpool1": ["127.0.0.1:0"]}
    store_dir = tmp_path / "bucket"  # what both nodes see as CHECKPOINT_URI
    procs = []
    for node, task in enumerate(({"type": "workerpool0", "index": 0}, {"type": "workerpool1", "index": 0})):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "ENV_FILE": "", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
               "CLUSTER_SPEC": json.dumps({"cluster": cluster, "task": task})}
        flags = tiny_flags(tiny_model, tiny_tasks, tmp_path / f"node{node}", run_name="multi", checkpoint_uri=store_dir,
                           max_steps=6, eval_strategy="no", save_strategy="steps", save_steps=3,
                           load_best_model_at_end=False, export_at_end=False)
        procs.append(subprocess.Popen([sys.executable, "-m", "trainer", "train", *flags], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=300)
            logs.append(out)
    finally:
        for proc in procs:
            proc.kill()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-4000:]
    assert "--nnodes 2 --node_rank 0" in logs[0].replace("=", " ") and "--nnodes 2 --node_rank 1" in logs[1].replace("=", " ")

    store = open_store(str(store_dir))
    assert [m.step for m in cs.list_checkpoints(store, "multi")] == [3, 6]
    assert cs.read_final(store, "multi") is not None
    # Only the chief (global rank 0) commits; the worker's disk holds its local checkpoints only.
    commits = [re.findall(r"checkpoint-\d+ committed to", log) for log in logs]
    assert commits == [["checkpoint-3 committed to", "checkpoint-6 committed to"], []]
    assert "Final model committed" in logs[0] and "Final model committed" not in logs[1]
    state = json.loads((tmp_path / "node0" / "multi" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6

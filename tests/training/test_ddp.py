"""Distributed training for real: torchrun, 2 processes, gloo on CPU, the real multitask pipeline.

tests/ddp_probe.py trains the tiny job on each rank and records the batches it drew and the steps
it trained; these tests read both ranks' records. The tiny tasks have 9 training examples each
(odd, so sharding over 2 ranks pads one example by wrap-around) and two tasks have their own
batch size, so one epoch is 2 + 2 + 3 + 2 = 9 steps and 12 steps reach into a second epoch.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from tests.conftest import write_tasks_file
from tests.ddp_probe import MAX_STEPS, TRAIN_BATCH_SIZE, WATCHDOG_S, checksum
from tests.torchrun import run_probe

WORLD = 2
N_TRAIN = 9
TASKS = ["demo_similarity", "demo_entailment", "demo_choice", "demo_tags"]
TASK_BATCH_SIZES = {"demo_choice": 2, "demo_tags": 3}  # the others use TRAIN_BATCH_SIZE


@pytest.fixture(scope="module")
def ddp_run(tiny_model, tmp_path_factory) -> dict:
    """Launch the probe under torchrun once; the ranks' records, by rank, and the output folder."""
    tmp = tmp_path_factory.mktemp("ddp")
    tasks_file = write_tasks_file(tmp / "tasks", n_train=N_TRAIN, n_eval=4)
    declared = json.loads(tasks_file.read_text())
    for task in declared["tasks"]:
        if task["name"] in TASK_BATCH_SIZES:
            task["batch_size"] = TASK_BATCH_SIZES[task["name"]]
    tasks_file.write_text(json.dumps(declared))
    out = tmp / "out"
    out.mkdir()
    _, stderr = run_probe("ddp_probe.py", [str(tiny_model), str(tasks_file), str(out)], tmp, processes=WORLD,
                          timeout=WATCHDOG_S + 30)
    records = {}
    for rank in range(WORLD):
        path = out / f"rank{rank}.json"
        assert path.is_file(), f"rank {rank} wrote no record:\n{stderr[-4000:]}"
        records[rank] = json.loads(path.read_text())
    return {"records": records, "out": out}


def batch_size(task: str) -> int:
    return TASK_BATCH_SIZES.get(task, TRAIN_BATCH_SIZE)


def owner(index: int) -> str:
    """The task owning a global index: the tasks' train sets lie end to end, in TASKS order."""
    return TASKS[index // N_TRAIN]


def trained(record: dict) -> list[dict]:
    """Each training step with the batch it trained (the loader hands batches over in order)."""
    steps, drawn = record["steps"], record["drawn"]
    assert len(drawn) >= len(steps)
    return [{**step, **batch} for step, batch in zip(steps, drawn)]


def test_training_arguments_join_the_torchrun_job_on_cpu(ddp_run):
    # Without use_cpu on a machine with no GPU, every torchrun process was a world of one: each
    # trained on all the data, gradients were never averaged, and every rank saved.
    for record in ddp_run["records"].values():
        assert record["launched_world_size"] == WORLD
        assert record["as_built"] == {"world_size": WORLD, "parallel_mode": "ParallelMode.DISTRIBUTED"}
        assert not record["use_cpu_override"]


def test_both_ranks_ran_distributed_data_parallel_over_gloo(ddp_run):
    for rank, record in ddp_run["records"].items():
        assert record["rank"] == rank
        assert record["world_size"] == WORLD
        assert record["backend"] == "gloo"
        assert "cpu:gloo" in record["process_group_backends"]
        assert record["model_is_wrapped"], "the model was not wrapped in DistributedDataParallel"
        assert record["tasks"] == TASKS
        assert record["sizes"] == [N_TRAIN] * len(TASKS)
        assert record["batch_sizes"] == [batch_size(t) for t in TASKS]


def test_both_ranks_ran_the_same_steps(ddp_run):
    records = ddp_run["records"]
    for record in records.values():
        assert record["global_step"] == MAX_STEPS
        assert [s["global_step"] for s in record["steps"]] == list(range(MAX_STEPS))


def test_every_step_trains_the_same_task_on_both_ranks(ddp_run):
    per_rank = [trained(r) for r in ddp_run["records"].values()]
    for step in zip(*per_rank):
        assert len({s["task"] for s in step}) == 1, f"ranks trained different tasks at step {step[0]['global_step']}"
        assert len({s["epoch"] for s in step}) == 1
        for s in step:
            # The batch the sampler drew is the batch the step trained: same task, same size.
            assert {owner(i) for i in s["indices"]} == {s["task"]}
            assert s["batch_size"] == len(s["indices"]) <= batch_size(s["task"])
        assert len({s["batch_size"] for s in step}) == 1


def test_the_first_epoch_is_one_pass_over_every_task(ddp_run):
    tasks = [s["task"] for s in trained(ddp_run["records"][0]) if s["epoch"] == 0]
    per_pass = {t: math.ceil(math.ceil(N_TRAIN / WORLD) / batch_size(t)) for t in TASKS}
    assert Counter(tasks) == per_pass
    assert sum(1 for s in trained(ddp_run["records"][0]) if s["epoch"] == 1) == MAX_STEPS - sum(per_pass.values())


def test_ranks_train_disjoint_examples_within_a_pass(ddp_run):
    pad = math.ceil(N_TRAIN / WORLD) * WORLD - N_TRAIN  # DistributedSampler-style wrap-around
    passes: dict[tuple[int, str], Counter] = defaultdict(Counter)  # proportional: one pass per task per epoch
    for record in ddp_run["records"].values():
        for s in trained(record):
            passes[s["epoch"], s["task"]].update(s["indices"])
    for (epoch, task), seen in passes.items():
        twice = [i for i, c in seen.items() if c == 2]
        assert max(seen.values()) <= 2 and len(twice) <= pad, f"epoch {epoch}, {task}: ranks share examples {seen}"
        if epoch == 0:  # complete: every example once, the padding twice
            start = TASKS.index(task) * N_TRAIN
            assert sorted(seen) == list(range(start, start + N_TRAIN))
            assert len(twice) == pad
    # Different data, so different losses: identical weights below are not a coincidence of data.
    losses = [[s["loss"] for s in r["steps"]] for r in ddp_run["records"].values()]
    assert losses[0] != losses[1]


def test_each_tasks_loss_is_logged_as_the_mean_over_the_ranks(ddp_run):
    records = ddp_run["records"]
    for record in records.values():
        logged = [e for e in record["log_history"] if "loss" in e]
        assert [e["step"] for e in logged] == list(range(1, MAX_STEPS + 1))  # LOGGING_STEPS=1
        for entry in logged:
            step = [r["steps"][entry["step"] - 1] for r in records.values()]  # the ranks' losses differ
            mean = sum(s["loss"] for s in step) / WORLD
            assert {k for k in entry if k.startswith("loss_")} == {f"loss_{step[0]['task']}"}, entry
            assert entry[f"loss_{step[0]['task']}"] == pytest.approx(mean, rel=1e-5) == entry["loss"]


def test_gradients_are_synchronised(ddp_run):
    records = ddp_run["records"]
    assert records[0]["final_checksum"] == records[1]["final_checksum"], "ranks ended with different weights"
    assert records[0]["final_checksum"] != records[0]["initial_checksum"], "training did not change the weights"


def test_only_rank_zero_writes_the_final_model(ddp_run):
    from safetensors.torch import load_file

    out, records = ddp_run["out"], ddp_run["records"]
    assert records[0]["should_save"] and not records[1]["should_save"]
    assert not (out / "saved-rank1").exists(), "rank 1 wrote model files"
    saved = out / "saved-rank0"
    assert {"model.safetensors", "multitask.json", "config.json"} <= {p.name for p in saved.iterdir()}
    # The file holds the trained, synchronised weights.
    assert checksum(load_file(str(saved / "model.safetensors"))) == records[0]["final_checksum"]
    assert Path(saved / "multitask.json").read_text().count('"name"') == len(TASKS)


def test_one_rank_per_node_reads_and_tokenizes_the_data_before_the_others(ddp_run):
    # All ranks reading the files (or the Hub) and tokenizing at once multiplies the load; the
    # node's main process goes first and the others then read the datasets cache.
    first, second = ddp_run["records"][0]["data_times"], ddp_run["records"][1]["data_times"]
    for stage in ("read", "tokenize"):
        assert second[stage][0] >= first[stage][1], f"rank 1 started to {stage} before rank 0 had finished"

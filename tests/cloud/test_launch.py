"""trainer.cloud.launch: the torchrun command each Vertex node runs."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

from trainer.cloud import launch
from trainer.cloud.launch import LaunchError, Layout

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ARGS = ["train", "--config", "/gcs/bucket/glue.yaml"]


def cluster_spec(task_type: str, index: int, workers: int = 1) -> str:
    """CLUSTER_SPEC as Vertex writes it (extra keys included)."""
    return json.dumps(
        {
            "cluster": {
                "workerpool0": ["cmle-training-workerpool0-ab12-0:2222"],
                "workerpool1": [
                    f"cmle-training-workerpool1-ab12-{i}:2222" for i in range(workers)
                ],
            },
            "environment": "cloud",
            "task": {"type": task_type, "index": index},
            "job": '{"python_module":"","package_uris":[]}',
        }
    )


CHIEF = "cmle-training-workerpool0-ab12-0"


@pytest.mark.parametrize(
    ("task_type", "index", "node_rank"), [("workerpool0", 0, 0), ("workerpool1", 0, 1)]
)
def test_two_node_cluster_spec_gives_each_node_its_torchrun_command(
    task_type, index, node_rank
):
    environ = {"CLUSTER_SPEC": cluster_spec(task_type, index)}
    layout = launch.cluster_layout(environ, nproc_per_node=4)

    assert layout == Layout(
        nnodes=2,
        node_rank=node_rank,
        master_addr=CHIEF,
        master_port=2222,
        nproc_per_node=4,
    )
    assert layout.world_size == 8
    assert launch.launch_argv(environ, 4, ARGS) == [
        *TORCHRUN,
        "--nnodes=2",
        f"--node_rank={node_rank}",
        "--nproc_per_node=4",
        f"--master_addr={CHIEF}",
        "--master_port=2222",
        "-m",
        "trainer",
        *ARGS,
    ]


def test_later_workers_rank_after_the_chief():
    layout = launch.cluster_layout(
        {"CLUSTER_SPEC": cluster_spec("workerpool1", 2, workers=3)}, 1
    )
    assert (layout.nnodes, layout.node_rank) == (4, 3)


def test_master_variables_take_priority_over_cluster_spec():
    environ = {
        "CLUSTER_SPEC": cluster_spec("workerpool0", 0),
        "MASTER_ADDR": "10.0.0.2",
        "MASTER_PORT": "23456",
        "WORLD_SIZE": "3",
        "RANK": "2",
    }
    layout = launch.cluster_layout(environ, nproc_per_node=2)
    assert layout == Layout(3, 2, "10.0.0.2", 23456, 2)
    assert launch.torchrun_argv(layout, ["train"]) == [
        *TORCHRUN,
        "--nnodes=3",
        "--node_rank=2",
        "--nproc_per_node=2",
        "--master_addr=10.0.0.2",
        "--master_port=23456",
        "-m",
        "trainer",
        "train",
    ]


def test_chief_address_without_port_uses_the_default_port():
    spec = json.dumps(
        {"cluster": {"workerpool0": ["chief"]}, "task": {"type": "workerpool0"}}
    )
    layout = launch.cluster_layout({"CLUSTER_SPEC": spec}, 2)
    assert (layout.master_addr, layout.master_port) == (
        "chief",
        launch.DEFAULT_MASTER_PORT,
    )


def test_master_port_defaults_when_unset():
    layout = launch.cluster_layout(
        {"MASTER_ADDR": "10.0.0.2", "WORLD_SIZE": "2", "RANK": "0"}
    )
    assert layout.master_port == launch.DEFAULT_MASTER_PORT


def test_single_node():
    assert launch.cluster_layout({}, 0) == Layout(1, 0, "127.0.0.1", 29500, 1)
    assert launch.launch_argv({}, 0, ARGS) is None  # CPU: run in-process
    assert launch.launch_argv({}, 1, ARGS) is None  # one GPU: run in-process
    assert launch.launch_argv({}, 8, ARGS) == [
        *TORCHRUN,
        "--nnodes=1",
        "--node_rank=0",
        "--nproc_per_node=8",
        "--master_addr=127.0.0.1",
        "--master_port=29500",
        "-m",
        "trainer",
        *ARGS,
    ]
    single = {"CLUSTER_SPEC": cluster_spec("workerpool0", 0, workers=0)}
    assert launch.launch_argv(single, 1, ARGS) is None


def test_processes_started_by_torchrun_do_not_relaunch():
    # torchrun's children see RANK/WORLD_SIZE counting processes: never re-read them as nodes.
    child = {
        "MASTER_ADDR": "10.0.0.2",
        "WORLD_SIZE": "16",
        "RANK": "9",
        "LOCAL_RANK": "1",
    }
    assert launch.under_torchrun(child)
    assert launch.launch_argv(child, 8, ARGS) is None


BAD = {
    "not JSON": ({"CLUSTER_SPEC": "{cluster:"}, "CLUSTER_SPEC is not JSON"),
    "not an object": ({"CLUSTER_SPEC": "[1, 2]"}, "CLUSTER_SPEC must be"),
    "no task": (
        {"CLUSTER_SPEC": json.dumps({"cluster": {"workerpool0": ["a:1"]}})},
        "'task'",
    ),
    "unknown task type": (
        {"CLUSTER_SPEC": cluster_spec("workerpool2", 0)},
        "task.type='workerpool2'",
    ),
    "index out of range": (
        {"CLUSTER_SPEC": cluster_spec("workerpool1", 1)},
        "task.index=1",
    ),
    "negative index": (
        {"CLUSTER_SPEC": cluster_spec("workerpool1", -1)},
        "task.index=-1",
    ),
    "no chief": (
        {
            "CLUSTER_SPEC": json.dumps(
                {"cluster": {"workerpool0": []}, "task": {"type": "workerpool0"}}
            )
        },
        "exactly one",
    ),
    "bad chief port": (
        {
            "CLUSTER_SPEC": json.dumps(
                {
                    "cluster": {"workerpool0": ["host:http"]},
                    "task": {"type": "workerpool0", "index": 0},
                }
            )
        },
        "workerpool0[0]='host:http'",
    ),
    "rank beyond world size": (
        {"MASTER_ADDR": "h", "WORLD_SIZE": "2", "RANK": "2"},
        "RANK='2'",
    ),
    "world size not a number": (
        {"MASTER_ADDR": "h", "WORLD_SIZE": "two", "RANK": "0"},
        "WORLD_SIZE='two'",
    ),
    "master addr missing": ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR unset"),
    "master port out of range": (
        {"MASTER_ADDR": "h", "MASTER_PORT": "70000", "WORLD_SIZE": "2", "RANK": "0"},
        "MASTER_PORT='70000'",
    ),
}


@pytest.mark.parametrize(("environ", "expected"), BAD.values(), ids=BAD.keys())
def test_bad_environments_raise_one_line(environ, expected):
    with pytest.raises(LaunchError) as error:
        launch.cluster_layout(environ, 1)
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_launch_module_imports_only_the_standard_library():
    tree = ast.parse(Path(launch.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):  # anywhere in the module: launch never imports torch
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}

"""Work out the distributed layout inside a Vertex AI container (stdlib only).

Vertex describes the cluster to every node in one of two ways:

- ``CLUSTER_SPEC``: ``{"cluster": {"workerpool0": ["host:port"],
  "workerpool1": [...]}, "task": {"type": "workerpool1", "index": 0}}``;
  the chief is ``workerpool0[0]``, node rank 0 for workerpool0, else
  1 + index;
- ``MASTER_ADDR``/``MASTER_PORT``/``WORLD_SIZE``/``RANK``, which the PyTorch
  prebuilt images set per node (``WORLD_SIZE`` counts nodes there). These take
  priority when present.

Without either, the job is one node. `launch_argv` turns the layout into a
``torchrun`` command line, or None when one process is enough. This module
never imports torch: the caller counts GPUs (``torch.cuda.device_count()``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
CHIEF_POOL = "workerpool0"
WORKER_POOL = "workerpool1"
# Set by torchrun in the processes it starts; seeing one means "already launched".
_TORCHRUN_CHILD_VARS = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")
_NODE_VARS = ("MASTER_ADDR", "WORLD_SIZE", "RANK")


class LaunchError(ValueError):
    """The environment describes an impossible cluster; one line says which variable."""


@dataclass(frozen=True)
class Layout:
    """Where this node sits in the job: ``nnodes`` nodes of ``nproc_per_node`` processes."""

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    nproc_per_node: int

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def _int(name: str, text: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise LaunchError(f"{name}={text!r} is not an integer") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise LaunchError(f"{name}={text!r} must be {bound}")
    return value


def _split_host_port(name: str, address: Any) -> tuple[str, int]:
    text = address if isinstance(address, str) else ""
    if ":" in text:
        host, _, port = text.rpartition(":")
    else:  # no port given: torchrun's default
        host, port = text, str(DEFAULT_MASTER_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LaunchError(f"{name}={address!r} is not a host:port address")
    return host, int(port)


def _from_cluster_spec(text: str) -> tuple[int, int, str, int]:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LaunchError(
            f"CLUSTER_SPEC is not JSON ({exc.msg} at char {exc.pos})"
        ) from None
    if not isinstance(spec, dict):
        raise LaunchError(
            "CLUSTER_SPEC must be a JSON object with 'cluster' and 'task'"
        )
    cluster, task = spec.get("cluster"), spec.get("task")
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise LaunchError(
            "CLUSTER_SPEC must have a 'cluster' object and a 'task' object"
        )
    pools = {}
    for pool in (CHIEF_POOL, WORKER_POOL):
        hosts = cluster.get(pool, [])
        if not isinstance(hosts, list):
            raise LaunchError(
                f"CLUSTER_SPEC cluster.{pool}={hosts!r} is not a list of host:port"
            )
        pools[pool] = hosts
    if len(pools[CHIEF_POOL]) != 1:
        raise LaunchError(
            f"CLUSTER_SPEC cluster.{CHIEF_POOL} has {len(pools[CHIEF_POOL])} hosts; "
            "the chief pool must have exactly one"
        )
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in pools:
        raise LaunchError(
            f"CLUSTER_SPEC task.type={kind!r} is not {CHIEF_POOL} or {WORKER_POOL} "
            "(parameter-server and evaluator pools are not used by this trainer)"
        )
    if (
        not isinstance(index, int)
        or isinstance(index, bool)
        or not 0 <= index < len(pools[kind])
    ):
        raise LaunchError(
            f"CLUSTER_SPEC task.index={index!r} is out of range for {kind} "
            f"with {len(pools[kind])} hosts"
        )
    node_rank = 0 if kind == CHIEF_POOL else 1 + index
    nnodes = len(pools[CHIEF_POOL]) + len(pools[WORKER_POOL])
    addr, port = _split_host_port(
        f"CLUSTER_SPEC cluster.{CHIEF_POOL}[0]", pools[CHIEF_POOL][0]
    )
    return nnodes, node_rank, addr, port


def _from_node_vars(environ: Mapping[str, str]) -> tuple[int, int, str, int]:
    missing = [name for name in _NODE_VARS if not environ.get(name)]
    if missing:
        present = [name for name in _NODE_VARS if name not in missing]
        raise LaunchError(
            f"{', '.join(missing)} unset while {', '.join(present)} set; "
            "set MASTER_ADDR, WORLD_SIZE and RANK together, or none of them"
        )
    nnodes = _int("WORLD_SIZE", environ["WORLD_SIZE"], 1)
    node_rank = _int("RANK", environ["RANK"], 0, nnodes - 1)
    port = _int(
        "MASTER_PORT", environ.get("MASTER_PORT") or str(DEFAULT_MASTER_PORT), 1, 65535
    )
    return nnodes, node_rank, environ["MASTER_ADDR"], port


def cluster_layout(environ: Mapping[str, str], nproc_per_node: int = 1) -> Layout:
    """This node's place in the job, from the variables Vertex sets.

    ``MASTER_ADDR``/``WORLD_SIZE``/``RANK`` (+ ``MASTER_PORT``, default 29500)
    win when any is set; else ``CLUSTER_SPEC``; else a single node.
    ``nproc_per_node`` is the number of visible GPUs (at least 1 is used).

    Raises:
        LaunchError: the variables are unparsable or inconsistent (task type
            unknown, index out of range, rank beyond world size, ...).
    """
    nproc = max(1, int(nproc_per_node))
    if any(environ.get(name) for name in _NODE_VARS):
        nnodes, rank, addr, port = _from_node_vars(environ)
    elif environ.get("CLUSTER_SPEC"):
        nnodes, rank, addr, port = _from_cluster_spec(environ["CLUSTER_SPEC"])
    else:
        nnodes, rank, addr, port = 1, 0, DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT
    return Layout(nnodes, rank, addr, port, nproc)


def torchrun_argv(layout: Layout, module_args: Sequence[str]) -> list[str] | None:
    """The torchrun command running ``python -m trainer *module_args`` on this node.

    torchrun is started as ``sys.executable -m torch.distributed.run`` (what
    the ``torchrun`` script runs) so it uses this interpreter's torch.
    Returns None when the job is one process (one node, one GPU or CPU):
    then the caller just runs in-process.
    """
    if layout.nnodes == 1 and layout.nproc_per_node == 1:
        return None
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={layout.nnodes}",
        f"--node_rank={layout.node_rank}",
        f"--nproc_per_node={layout.nproc_per_node}",
        f"--master_addr={layout.master_addr}",
        f"--master_port={layout.master_port}",
        "-m",
        "trainer",
        *module_args,
    ]


def under_torchrun(environ: Mapping[str, str]) -> bool:
    """True in a process torchrun started (its RANK/WORLD_SIZE count processes, not nodes)."""
    return any(name in environ for name in _TORCHRUN_CHILD_VARS)


def launch_argv(
    environ: Mapping[str, str], nproc_per_node: int, module_args: Sequence[str]
) -> list[str] | None:
    """The command to re-run this job under torchrun, or None to run in-process.

    None inside a process torchrun already started, and for one-process jobs.

    Raises:
        LaunchError: see `cluster_layout`.
    """
    if under_torchrun(environ):
        return None
    return torchrun_argv(cluster_layout(environ, nproc_per_node), module_args)

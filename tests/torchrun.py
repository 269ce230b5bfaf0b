"""Launching a probe script under torchrun on this machine's CPU (gloo), as the DDP and FSDP tests do."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_probe(script: str, args: list[str], tmp: Path, *, processes: int, timeout: float) -> tuple[str, str]:
    """Run `tests/<script>` with `args` under torchrun, `processes` ranks on one node, offline and
    quiet; its own session, so a timeout kills torchrun and every rank, not torchrun alone.
    Returns its stdout and stderr.

    Raises:
        AssertionError: torchrun failed (its output's tail in the message).
    """
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp / "hf-datasets"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
        "TOKENIZERS_PARALLELISM": "false", "ENV_FILE": "", "TQDM_DISABLE": "1",  # keep failure output readable
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(ROOT / "tests" / script), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{stdout[-4000:]}\n{stderr[-8000:]}"
    return stdout, stderr

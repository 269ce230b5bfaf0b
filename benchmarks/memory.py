"""Memory and size: peak RSS and saved checkpoint size of 1 task against 3 tasks.

Each configuration trains in a fresh Python process (`python -m benchmarks.memory SPEC`), so
nothing one leaves behind (allocator caches, imported modules) counts for another; the child
reports its own peak RSS (VmHWM) after saving. Every batch is padded to the same length, so the
activations are the same size whatever task a step trains; the 3-task run trains every head
(round robin) so each has its optimizer state. At the end the Trainer saves a checkpoint.
In full mode a plain `Trainer` single-task run is measured too, for reference.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from .common import ROOT, Setup, interleave, median, ratio, result

logger = logging.getLogger("benchmarks")

NAME = "memory"
GOAL_RSS = ("<=", 1.10)
GOAL_SIZE = ("<=", 1.05)
CONFIGS = {"multitask_1_task": ("multitask", 1), "multitask_3_tasks": ("multitask", 3), "trainer_1_task": ("trainer", 1)}


def measure(setup: Setup, kind: str, n_tasks: int, out: Path) -> dict:
    """Run one configuration in a child process; returns its peak RSS and what it saved."""
    spec = {"model": setup.model, "model_init": setup.model_init, "tasks_file": str(setup.tasks_file), "tasks": setup.tasks,
            "kind": kind, "n_tasks": n_tasks, "steps": setup.plan.memory_steps, "length": setup.max_length,
            "batch_size": setup.batch_size, "threads": setup.threads, "out": str(out), "seed": setup.seed}
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(setup.threads)}
    started = time.perf_counter()
    with open(out / "child.log", "w") as log:
        child = subprocess.Popen([sys.executable, "-m", "benchmarks.memory", json.dumps(spec)], cwd=ROOT, env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"memory probe {kind}/{n_tasks} failed (exit {child.returncode}):\n"
                           + (out / "child.log").read_text()[-3000:])
    report = json.loads((out / "probe.json").read_text())
    # The child's own high-water mark (VmHWM). Not ru_maxrss: Linux carries the parent's RSS at
    # fork into the child's ru_maxrss, so a big parent would hide the child's peak.
    peak = report.pop("vm_hwm_bytes")
    if peak is None:  # no /proc: ru_maxrss (KiB on Linux, bytes on macOS), which may include the parent's
        peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {**report, "peak_rss_bytes": peak, "peak_rss_mib": peak / 2**20, "wall_s": time.perf_counter() - started}


def high_water_mark() -> int | None:
    """Peak resident set size of this process (VmHWM in /proc/self/status), in bytes; None without /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def probe(spec: dict) -> None:
    """The child: train `steps` steps on `n_tasks` tasks, save a checkpoint, report what it wrote."""
    import torch

    from . import __main__ as cli
    from .common import Setup, train_and_save

    torch.set_num_threads(spec["threads"])
    cli.quiet_libraries()
    out = Path(spec["out"])
    setup = Setup(model=spec["model"], tasks_file=Path(spec["tasks_file"]), tasks=spec["tasks"], plan=None, mode="probe",
                  out_dir=out, work_dir=out, threads=spec["threads"], model_init=spec["model_init"],
                  batch_size=spec["batch_size"], max_length=spec["length"], seed=spec["seed"])
    report = train_and_save(setup, spec["kind"], spec["n_tasks"], spec["steps"], out)
    (out / "probe.json").write_text(json.dumps({**report, "vm_hwm_bytes": high_water_mark()}))


def run(setup: Setup) -> dict:
    started = time.perf_counter()
    work = setup.work_dir / NAME
    counter = iter(range(10**6))
    configs = {k: v for k, v in CONFIGS.items() if setup.plan.memory_reference or v[0] != "trainer"}
    runs = {name: (lambda kind=kind, n=n, name=name: measure(setup, kind, n, work / f"{name}-{next(counter)}"))
            for name, (kind, n) in configs.items()}
    series = interleave(runs, setup.plan.memory_repeats)
    one, three = series["multitask_1_task"], series["multitask_3_tasks"]
    figures = [
        ratio("peak RSS: 3 tasks / 1 task", median(three, "peak_rss_bytes"), median(one, "peak_rss_bytes"),
              of=("3-task peak RSS bytes", "1-task peak RSS bytes"), goal=GOAL_RSS, unit="×"),
        ratio("checkpoint size: 3 tasks / 1 task", median(three, "checkpoint_bytes"), median(one, "checkpoint_bytes"),
              of=("3-task checkpoint bytes", "1-task checkpoint bytes"), goal=GOAL_SIZE, unit="×"),
        ratio("weights file size: 3 tasks / 1 task", median(three, "weights_bytes"), median(one, "weights_bytes"),
              of=("3-task model.safetensors bytes", "1-task model.safetensors bytes"), goal=GOAL_SIZE, unit="×"),
    ]
    if "trainer_1_task" in series:  # for reference: the plain Trainer on one task
        plain = series["trainer_1_task"]
        figures += [
            ratio("peak RSS: multitask 1 task / Trainer 1 task", median(one, "peak_rss_bytes"), median(plain, "peak_rss_bytes"),
                  of=("multitask peak RSS bytes", "Trainer peak RSS bytes"), unit="×"),
            ratio("checkpoint size: multitask 1 task / Trainer 1 task", median(one, "checkpoint_bytes"),
                  median(plain, "checkpoint_bytes"), of=("multitask checkpoint bytes", "Trainer checkpoint bytes"), unit="×"),
        ]
    notes = [f"Each run: a fresh process, {setup.plan.memory_steps} steps at batch {setup.batch_size} x {setup.max_length} "
             f"tokens, then the Trainer's checkpoint (weights, optimizer, scheduler, RNG); {setup.plan.memory_repeats} "
             "alternating round(s), medians.",
             "The checkpoint size is the whole checkpoint folder; the weights file is model.safetensors alone."]
    if len(set(setup.tasks)) < 3:
        notes.append(f"Fewer than 3 tasks declared: the 3-task run repeats them as separate tasks ({', '.join(three[0]['tasks'])}).")
    return result(NAME, "Memory and checkpoint size, 1 task against 3", setup, started, figures=figures,
                  measurements=series, notes=notes)


if __name__ == "__main__":
    probe(json.loads(sys.argv[1]))

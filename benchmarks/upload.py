"""Checkpoint uploads: training speed with a commit in flight, and commit throughput to GCS.

Both against a real GCS API server (fake-gcs-server, as the tests run it) holding a real
Trainer checkpoint of the benchmark model (weights, optimizer, scheduler, RNG state):

1. Step time: training steps of `MultitaskTrainer` with no upload, against the same steps while
   `trainer.checkpoints.callback.BackgroundCommitter` commits that checkpoint again and again (each
   commit a hard-link snapshot, as `CheckpointSync` makes them, pruned to the newest one), so a
   commit is in flight for the whole timed window. Every batch is padded to the same length.
2. Throughput: `trainer.checkpoints.commits.commit_checkpoint` (crc32c, create-only, parallel
   uploads, manifest) of the checkpoint folder against a plain `blob.upload_from_filename` loop
   over the same files, with a plain `google-cloud-storage` client.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from .common import (
    ROOT,
    BatchLog,
    BenchError,
    Setup,
    StepClock,
    bench_config,
    fastest,
    fixed_length_collator,
    folder_bytes,
    interleave,
    load_tasks,
    multitask_trainer,
    ratio,
    result,
    variant,
    window,
)

logger = logging.getLogger("benchmarks")

NAME = "upload"
BUCKET = "bench-bucket"
GOAL_SLOWDOWN = ("<=", 1.05)  # step time with an upload in flight / without
GOAL_THROUGHPUT = (">=", 0.80)  # commit throughput / plain upload throughput


class TimedStore:
    """A `Store` proxy recording when each upload started and ended (to prove uploads overlapped the steps)."""

    def __init__(self, store):
        self._store = store
        self.intervals: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._store, name)

    def upload_file(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._store.upload_file(*args, **kwargs)
        finally:
            with self._lock:
                self.intervals.append((start, time.perf_counter()))


def covered(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Fraction of [start, end] during which at least one interval was open."""
    total, cursor = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, cursor), min(b, end)
        if b > a:
            total += b - a
            cursor = b
    return total / (end - start) if end > start else 0.0


class KeepCommitting(TrainerCallback):
    """From step `start` on, keeps a commit of `folder` in flight: at each step end, if the committer
    is idle, submits a fresh hard-link snapshot of it (as `CheckpointSync.on_save` does)."""

    def __init__(self, committer, folder: Path, staging: Path, start: int):
        self.committer, self.folder, self.staging, self.start = committer, folder, staging, start
        self.submitted = 0

    def on_step_end(self, args, state, control, **kwargs):
        from trainer.checkpoints.callback import _Job, snapshot

        if state.global_step >= self.start and self.committer.wait(timeout=0):
            self.submitted += 1
            step = 1000 + self.submitted
            self.committer.submit(_Job(step, snapshot(self.folder, self.staging / f"s{step}"), {"benchmark": True}))


@contextlib.contextmanager
def training_core_apart(server_pid: int):
    """Give training a core of its own, and the upload the rest, as on a GPU machine.

    There, a step runs on the GPU driven by one thread, the upload threads run on spare cores and
    the object store is another machine. Here: this (main) thread is pinned to the first CPU with
    one torch thread; threads started through `free_thread` and the emulator (which stands in for
    GCS) run on the other CPUs. What is left is what the upload costs the training process itself
    (the GIL, memory bandwidth, page cache). Yields a description, or None with fewer than two
    CPUs (nothing is pinned then).
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_setaffinity") else []
    if len(cpus) < 2:
        yield None
        return
    threads = torch.get_num_threads()
    os.sched_setaffinity(server_pid, set(cpus[1:]))
    os.sched_setaffinity(0, {cpus[0]})  # Linux: the calling thread only
    torch.set_num_threads(1)
    try:
        yield {"training_cpus": cpus[:1], "upload_cpus": cpus[1:], "server_cpus": cpus[1:], "torch_threads": 1}
    finally:
        os.sched_setaffinity(0, set(cpus))
        torch.set_num_threads(threads)


def free_thread(make, cpus: list[int] | None):
    """`make()` called on a new thread allowed on `cpus` (None: as this one), so the threads it starts are too."""
    box = {}

    def target():
        if cpus:
            os.sched_setaffinity(0, set(cpus))
        box["value"] = make()

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    return box["value"]


def make_checkpoint(setup: Setup, task, work: Path) -> Path:
    """A real Trainer checkpoint of the benchmark model (one step, then save)."""
    cfg = bench_config(setup, [task.name], work, max_steps=1, save_strategy="steps", save_steps=1)
    trainer = multitask_trainer(setup, [task], cfg)
    trainer.train()
    return Path(trainer.args.output_dir) / "checkpoint-1"  # the Trainer's own folder


def step_times(setup: Setup, task, checkpoint: Path, work: Path, upload_cpus: list[int] | None = None) -> dict:
    from trainer.checkpoints.callback import BackgroundCommitter
    from trainer.checkpoints.storage import open_store

    skip = setup.plan.warmup_steps
    steps = skip + setup.plan.timed_steps
    cfg = bench_config(setup, [task.name], work / "train", max_steps=steps)
    counter = iter(range(10**6))

    def run_plain() -> dict:
        log, clock = BatchLog(task.collator), StepClock()
        multitask_trainer(setup, [variant(task, collator=log)], cfg, callbacks=[clock]).train()
        return window(clock, log.records, skip)

    def run_uploading() -> dict:
        run = f"run{next(counter)}"
        store = TimedStore(open_store(f"gs://{BUCKET}/steps", retry_deadline=60))
        committer = free_thread(lambda: BackgroundCommitter(store, run, keep=1), upload_cpus)
        keep = KeepCommitting(committer, checkpoint, work / "staging", start=skip)
        log, clock = BatchLog(task.collator), StepClock()
        multitask_trainer(setup, [variant(task, collator=log)], cfg, callbacks=[clock, keep]).train()
        committer.wait()
        committer.close()
        store.delete_prefix(f"{run}/")
        if committer.failed:
            raise BenchError(f"background commits failed: {committer.failed[0][1]}")
        out = window(clock, log.records, skip)
        out["commits_started"] = keep.submitted
        out["commits_done"] = len(committer.committed)
        out["upload_coverage"] = covered(store.intervals, clock.ends[skip - 1] if skip else clock.began, clock.ends[-1])
        return out

    def run_elsewhere() -> dict:
        """The same uploads from another process: what the machine's contention alone costs."""
        run = f"run{next(counter)}"
        ready = work / f"{run}.ready"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        child = subprocess.Popen([sys.executable, "-m", "benchmarks.upload", str(checkpoint), run, str(ready)], cwd=ROOT,
                                 env=env, stdin=subprocess.DEVNULL)
        try:
            if upload_cpus:
                os.sched_setaffinity(child.pid, set(upload_cpus))
            deadline = time.monotonic() + 120
            while not ready.exists():
                if child.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"the uploader process did not start (exit {child.returncode})")
                time.sleep(0.05)
            log, clock = BatchLog(task.collator), StepClock()
            multitask_trainer(setup, [variant(task, collator=log)], cfg, callbacks=[clock]).train()
            if child.poll() is not None:
                raise BenchError(f"the uploader process stopped during the run (exit {child.returncode})")
        finally:
            child.terminate()
            child.wait()
        open_store(f"gs://{BUCKET}/elsewhere").delete_prefix(f"{run}/")
        return window(clock, log.records, skip)

    return interleave({"no_upload": run_plain, "upload_in_flight": run_uploading, "upload_in_another_process": run_elsewhere},
                      setup.plan.repeats)


def uploader(checkpoint: str, run: str, ready: str) -> None:
    """The other process of `run_elsewhere`: commit `checkpoint` over and over until terminated."""
    from trainer.checkpoints.callback import background_upload_workers
    from trainer.checkpoints.commits import commit_checkpoint
    from trainer.checkpoints.storage import open_store

    store = open_store(f"gs://{BUCKET}/elsewhere", retry_deadline=60)
    Path(ready).touch()
    for step in range(1, 10**6):
        # As many upload streams as the trainer's committer would use on this process's CPUs.
        commit_checkpoint(store, checkpoint, run, step, metadata={"benchmark": True},
                          max_workers=background_upload_workers())
        store.delete_prefix(f"{run}/checkpoint-{step}/")


def throughput(setup: Setup, checkpoint: Path, server) -> dict:
    from trainer.checkpoints.commits import commit_checkpoint
    from trainer.checkpoints.storage import open_store

    files = sorted(p for p in checkpoint.rglob("*") if p.is_file())
    size = folder_bytes(checkpoint)
    client = server.client()
    bucket = client.bucket(BUCKET)
    counter = iter(range(10**6))

    def clear(prefix: str) -> None:
        for blob in client.list_blobs(BUCKET, prefix=prefix):
            blob.delete()

    def run_plain() -> dict:
        prefix = f"plain/{next(counter)}/"
        start = time.perf_counter()
        for path in files:
            bucket.blob(prefix + path.relative_to(checkpoint).as_posix()).upload_from_filename(str(path))
        seconds = time.perf_counter() - start
        clear(prefix)
        return {"seconds": seconds, "bytes": size, "files": len(files), "mb_per_s": size / seconds / 1e6}

    def run_commit() -> dict:
        store = open_store(f"gs://{BUCKET}/commit", retry_deadline=60)
        run = f"run{next(counter)}"
        start = time.perf_counter()
        manifest = commit_checkpoint(store, checkpoint, run, 1, metadata={"benchmark": True})
        seconds = time.perf_counter() - start
        store.delete_prefix(f"{run}/")
        return {"seconds": seconds, "bytes": size, "files": len(manifest.files), "mb_per_s": size / seconds / 1e6}

    return interleave({"plain_upload": run_plain, "commit_checkpoint": run_commit}, setup.plan.upload_repeats)


def run(setup: Setup) -> dict:
    from tests.gcs_server import fake_gcs_server

    started = time.perf_counter()
    work = setup.work_dir / NAME
    length = setup.plan.fixed_length
    steps = setup.plan.warmup_steps + setup.plan.timed_steps
    [task] = load_tasks(setup, [setup.tasks[0]], max_length=length, train_samples=steps * setup.batch_size)
    task = variant(task, collator=fixed_length_collator(task.spec, setup.tokenizer(), length))
    checkpoint = make_checkpoint(setup, task, work / "checkpoint")
    size = folder_bytes(checkpoint)
    saved_env = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")}
    with fake_gcs_server() as server:
        os.environ["STORAGE_EMULATOR_HOST"] = server.url
        os.environ["GOOGLE_CLOUD_PROJECT"] = "test"
        try:
            server.reset_bucket(BUCKET)
            logger.info("upload: step times with and without a commit of %.0f MB in flight", size / 1e6)
            with training_core_apart(server._process.pid) as pinning:
                steps_series = step_times(setup, task, checkpoint, work, pinning and pinning["upload_cpus"])
            logger.info("upload: commit_checkpoint against plain uploads")
            upload_series = throughput(setup, checkpoint, server)
        finally:
            for key, old in saved_env.items():
                if old is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = old
    best_steps = {name: fastest(rounds) for name, rounds in steps_series.items()}
    best_upload = {name: max(r["mb_per_s"] for r in rounds) for name, rounds in upload_series.items()}
    figures = [
        ratio("step time: upload in flight / no upload", best_steps["upload_in_flight"]["step_s"],
              best_steps["no_upload"]["step_s"], of=("s/step with upload", "s/step without"), goal=GOAL_SLOWDOWN, unit="×"),
        ratio("step time: upload in flight here / the same uploads from another process",
              best_steps["upload_in_flight"]["step_s"], best_steps["upload_in_another_process"]["step_s"],
              of=("s/step, upload in this process", "s/step, upload in another process"), unit="×"),
        ratio("upload throughput: commit_checkpoint / plain upload_from_filename", best_upload["commit_checkpoint"],
              best_upload["plain_upload"], of=("commit MB/s", "plain MB/s"), goal=GOAL_THROUGHPUT, unit="×"),
    ]
    coverage = min(r["upload_coverage"] for r in steps_series["upload_in_flight"])
    pinned = (f"training pinned to CPU {pinning['training_cpus']} with 1 torch thread (as the thread driving a GPU); "
              f"the upload threads and the emulator (standing in for GCS, another machine) on CPUs {pinning['upload_cpus']}"
              if pinning else "one CPU: training, upload threads and the emulator share it")
    notes = [f"Step timing: {pinned}.",
             f"Checkpoint: {size / 1e6:.1f} MB in {sum(1 for p in checkpoint.rglob('*') if p.is_file())} files "
             f"(a real Trainer checkpoint of the model); emulator: fake-gcs-server, memory back end, on this machine.",
             f"Steps: batch {setup.batch_size} x {length} tokens, {setup.plan.timed_steps} timed steps after "
             f"{setup.plan.warmup_steps} warm-up; an upload was in flight for at least {coverage:.0%} of every timed "
             f"window; {setup.plan.repeats} alternating rounds, each step's time the fastest of its rounds.",
             f"Uploads: {setup.plan.upload_repeats} alternating round(s), the fastest of each kind.",
             "Upload in another process: the same commits, made by a separate process on the upload CPUs; the "
             "step time then shows what the machine's shared resources cost (caches and memory bandwidth; on a "
             "2-vCPU VM sometimes two hyperthreads of one core), and its ratio to the in-process upload what "
             "the trainer's own upload thread costs.",
             "The upload throughput runs unpinned: the emulator's CPU time counts on both sides."]
    return result(NAME, "Checkpoint uploads: step slowdown and commit throughput", setup, started, figures=figures,
                  measurements={"checkpoint_bytes": size, "steps": steps_series, "throughput": upload_series,
                                "fastest": {"steps": best_steps, "upload_mb_per_s": best_upload}},
                  settings={"bucket": BUCKET, "sequence_length": length, "pinning": pinning}, notes=notes)


if __name__ == "__main__":
    uploader(*sys.argv[1:4])

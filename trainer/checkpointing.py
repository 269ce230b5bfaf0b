"""Committed checkpoints: background upload on every save, resume on every start, preemption.

The Trainer writes `checkpoint-<step>/` locally as usual (weights, optimizer, scheduler, scaler,
RNG, trainer_state.json, and our sampler_state.json). `CheckpointSync` (a `TrainerCallback`)
snapshots that folder with hard links and commits it to the checkpoint store in a background
thread, so training goes on: at most one commit is in flight, and a save arriving meanwhile
replaces any save still waiting (the newest state is the one worth having). The commit protocol
(`checkpoint_store`) writes the manifest last; only a manifest makes a checkpoint count.

On start, `resume_checkpoint` finds the newest committed checkpoint of the run that verifies,
downloads it if it is remote, and hands its folder to `Trainer.train(resume_from_checkpoint=…)`,
which restores every state; the batch sampler depends only on (seed, epoch), so the Trainer's
skip of the epoch's first batches continues it exactly where it stopped.

`PreemptionHandler` turns SIGTERM into "save at the next step boundary and stop"; the job then
waits for the commit (within the grace time) and exits 0, and the platform's restart resumes.

This module never sees a GCS type: it talks to `trainer.storage.Store` only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from . import checkpoint_store
from .checkpoint_store import ResumeError
from .storage import StorageError, Store

logger = logging.getLogger(__name__)

SAMPLER_STATE = "sampler_state.json"
STAGING = ".staging"


# ------------------------------------------------------------------------------ failpoints
def crash_point(name: str, step: int | None = None) -> None:
    """Fault injection for the crash tests: `TRAINER_CRASH_AT=<name>:<step>` kills the process
    with SIGKILL when it reaches that point (the step is ignored where none is given).

    Points: mid_step (after backward, before the optimizer step), before_upload (checkpoint
    saved locally, commit not started), mid_upload (some files uploaded), before_manifest
    (every file uploaded, no manifest), after_manifest (committed, not yet pruned).
    """
    wanted = os.environ.get("TRAINER_CRASH_AT")
    if not wanted:
        return
    point, _, at = wanted.partition(":")
    if point == name and (not at or step is None or int(at) == step):
        logger.warning("TRAINER_CRASH_AT=%s: killing the process", wanted)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


class _CrashingStore:
    """Store proxy that reaches the upload failpoints (used only when TRAINER_CRASH_AT is set)."""

    def __init__(self, store: Store, step: int):
        self._store, self._step, self._uploads = store, step, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def upload_file(self, *args, **kwargs):
        info = self._store.upload_file(*args, **kwargs)
        self._uploads += 1
        if self._uploads == 2:
            crash_point("mid_upload", self._step)
        return info

    def write_bytes(self, key: str, *args, **kwargs):
        if key.endswith(checkpoint_store.MANIFEST_NAME):
            crash_point("before_manifest", self._step)
        return self._store.write_bytes(key, *args, **kwargs)


# ------------------------------------------------------------------------------ background commits
@dataclass
class _Job:
    step: int
    folder: Path
    metadata: dict[str, Any]


def background_upload_workers() -> int:
    """Parallel uploads for a commit made while training runs: half the CPUs this process may use,
    1 to `checkpoint_store.DEFAULT_WORKERS`. Training keeps the other half. Measured with
    `make bench` (upload) on 2 CPUs: one upload stream slows training steps less than four and
    uploads faster, since four streams only contend for the one CPU they get."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(checkpoint_store.DEFAULT_WORKERS, cpus // 2))


class BackgroundCommitter:
    """One worker thread committing snapshots; a newer pending save replaces an older one.

    `workers`: parallel uploads per commit (default `background_upload_workers()`, counted when
    the committer is made).
    """

    def __init__(self, store: Store, run: str, *, keep: int | None, best_step=lambda: None, workers: int | None = None):
        self.store, self.run, self.keep, self.best_step = store, run, keep, best_step
        self.workers = workers or background_upload_workers()
        self._lock = threading.Condition()
        self._pending: _Job | None = None
        self._busy = False
        self._closed = False
        self.committed: list[int] = []
        self.failed: list[tuple[int, str]] = []
        self._thread = threading.Thread(target=self._work, name="checkpoint-commit", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        with self._lock:
            if self._pending is not None:
                logger.info("checkpoint-%d was still waiting to upload: replaced by checkpoint-%d",
                            self._pending.step, job.step)
                shutil.rmtree(self._pending.folder, ignore_errors=True)
            self._pending = job
            self._lock.notify_all()

    def _work(self) -> None:
        while True:
            with self._lock:
                while self._pending is None and not self._closed:
                    self._lock.wait()
                if self._pending is None:
                    return
                job, self._pending, self._busy = self._pending, None, True
            try:
                self._commit(job)
            finally:
                with self._lock:
                    self._busy = False
                    self._lock.notify_all()

    def _commit(self, job: _Job) -> None:
        store = _CrashingStore(self.store, job.step) if os.environ.get("TRAINER_CRASH_AT") else self.store
        started = time.monotonic()
        try:
            checkpoint_store.commit_checkpoint(store, job.folder, self.run, job.step, metadata=job.metadata,
                                               max_workers=self.workers)
            crash_point("after_manifest", job.step)
            self.committed.append(job.step)
            logger.info("checkpoint-%d committed to %s in %.1fs", job.step, self.store.uri(self.run), time.monotonic() - started)
            if self.keep:
                best = self.best_step()
                checkpoint_store.prune_checkpoints(self.store, self.run, keep=self.keep,
                                                   protect_steps={best} if best is not None else ())
        except (StorageError, OSError, ValueError) as e:
            # Training goes on; the library already retried transient errors. The next save
            # commits a newer state, and the job reports the failure when it finishes.
            self.failed.append((job.step, str(e)))
            logger.error("checkpoint-%d was not committed: %s", job.step, e)
        finally:
            shutil.rmtree(job.folder, ignore_errors=True)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending or in flight; False if `timeout` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pending is not None or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()


def snapshot(folder: Path, staging_root: Path) -> Path:
    """Hard-link copy of `folder` (a plain copy across file systems), immune to the Trainer's rotation."""
    target = staging_root / folder.name
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(folder, target, copy_function=link)
    return target


class CheckpointSync(TrainerCallback):
    """Commits every checkpoint the Trainer saves to the store (main process only)."""

    def __init__(self, store: Store, run: str, *, metadata: dict[str, Any], sampler_state, keep: int | None):
        self.store, self.run, self.metadata = store, run, metadata
        self.sampler_state = sampler_state  # () -> dict, the data order's identity
        self.keep = keep
        self.committer: BackgroundCommitter | None = None
        self._best_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.committer is None:
            self.committer = BackgroundCommitter(self.store, self.run, keep=self.keep, best_step=lambda: self._best_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if os.environ.get("TRAINER_CRASH_AT", "").startswith("mid_step") and self.committer is not None:
            self.committer.wait()  # so the crash test knows which checkpoints were committed
        crash_point("mid_step", state.global_step + 1)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not state.is_world_process_zero or not folder.is_dir():
            return
        (folder / SAMPLER_STATE).write_text(json.dumps({**self.sampler_state(), "global_step": state.global_step}))
        if state.best_model_checkpoint:
            self._best_step = int(Path(state.best_model_checkpoint).name.split("-")[-1])
        crash_point("before_upload", state.global_step)
        last_eval = next((h for h in reversed(state.log_history) if any(k.startswith("eval_") for k in h)), {})
        metadata = {**self.metadata, "epoch": state.epoch, "metrics": last_eval,
                    "best_checkpoint": state.best_model_checkpoint and Path(state.best_model_checkpoint).name}
        staged = snapshot(folder, Path(args.output_dir) / STAGING)
        self.committer.submit(_Job(state.global_step, staged, metadata))

    def finish(self, timeout: float | None = None) -> bool:
        """Wait for the last commit; True when every save was committed in time."""
        if self.committer is None:
            return True
        done = self.committer.wait(timeout)
        self.committer.close()
        return done and not self.committer.failed


# ------------------------------------------------------------------------------ resume
def sampler_identity(sizes: list[int], batch_sizes: list[int], cfg) -> dict[str, Any]:
    """What the batch order depends on; a resume with other values would repeat or skip batches."""
    return {"task_sizes": sizes, "batch_sizes": batch_sizes, "seed": cfg.seed, "sampling": cfg.sampling,
            "sampling_temperature": cfg.sampling_temperature, "sampling_cap": cfg.sampling_cap,
            "task_weights": cfg.task_weights, "group_by_length": cfg.group_by_length}


def check_sampler(folder: Path, expected: dict[str, Any]) -> None:
    """Raises ResumeError if the checkpoint's data order differs from this job's."""
    path = folder / SAMPLER_STATE
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    diffs = [k for k, v in expected.items() if saved.get(k) != v]
    if diffs:
        raise ResumeError(
            f"checkpoint {folder.name} was trained with other {', '.join(diffs)} "
            f"({', '.join(f'{k}={saved.get(k)}' for k in diffs)}); resuming would repeat or skip batches: "
            "use RESUME=never or a new RUN_NAME"
        )


def resume_checkpoint(store: Store, run: str, resume: str, local_root: Path) -> Path | None:
    """The local folder to resume from, or None to start fresh.

    `resume`: "never"; "auto" (newest committed checkpoint of `run` that verifies, falling back
    over corrupt ones); or the URI/path of one checkpoint folder.

    Raises:
        StorageError: the store cannot be read (a network failure must not silently restart).
        ResumeError: RESUME names a checkpoint that is not committed or does not verify.
    """
    from .storage import open_store

    if resume == "never":
        return None
    if resume == "auto":
        manifest = checkpoint_store.latest_valid_checkpoint(store, run)
        source = store
        if manifest is None:
            logger.info("no committed checkpoint of run %s in %s: starting from the beginning", run, store.uri())
            return None
    else:
        parent, _, name = resume.rstrip("/").rpartition("/")
        run_parent, _, run_name = parent.rpartition("/")
        if not name.startswith("checkpoint-") or not name[len("checkpoint-"):].isdigit():
            raise ResumeError(f"RESUME={resume!r} is not a checkpoint folder: expect …/<run>/checkpoint-<step>")
        source = open_store(run_parent or ".", setting="RESUME")
        step = int(name.split("-")[-1])
        manifest = next((m for m in checkpoint_store.list_checkpoints(source, run_name) if m.step == step), None)
        if manifest is None:
            raise ResumeError(f"RESUME={resume!r} has no {checkpoint_store.MANIFEST_NAME}: it was never committed")
        try:
            checkpoint_store.verify_checkpoint(source, manifest)
        except StorageError as e:
            raise ResumeError(f"RESUME={resume!r} does not verify: {e}") from None
    local = local_root / f"checkpoint-{manifest.step}"
    if not _same_place(source, manifest, local):
        checkpoint_store.download_checkpoint(source, manifest, local)
    logger.info("resuming from %s (step %d)", source.uri(manifest.prefix), manifest.step)
    return local


def _same_place(store: Store, manifest, local: Path) -> bool:
    """True when the store is a local folder and the checkpoint already lives at `local`."""
    uri = store.uri(manifest.prefix)
    path = Path(uri[len("file://"):]) if uri.startswith("file://") else Path(uri)
    try:
        return path.resolve() == local.resolve()
    except OSError:
        return False


# ------------------------------------------------------------------------------ preemption
class PreemptionHandler(TrainerCallback):
    """On SIGTERM: save at the next step boundary and stop training (all ranks agree)."""

    def __init__(self):
        self.requested_at: float | None = None
        self.stopped = False
        self._previous = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum, frame) -> None:
        if self.requested_at is None:
            self.requested_at = time.monotonic()
            logger.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping")

    def _agreed(self) -> bool:
        requested = self.requested_at is not None
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            flag = torch.tensor([1.0 if requested else 0.0])
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())
            if requested and self.requested_at is None:
                self.requested_at = time.monotonic()
        return requested

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed():
            control.should_save = True
            control.should_training_stop = True
            self.stopped = True

    def seconds_left(self, grace: float) -> float:
        if self.requested_at is None:
            return grace
        return max(0.0, grace - (time.monotonic() - self.requested_at))

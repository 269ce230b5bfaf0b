"""Committed checkpoints: background commits on every save, exact resume on every start, preemption.

Two places hold checkpoints, and only one of them counts:

- The Trainer works in ``OUTPUT_DIR/<run>/.trainer/`` (`WORKDIR`): it writes ``checkpoint-<step>/``
  there and rotates them. That folder is scratch, emptied at every start; the Trainer never
  writes into a committed folder.
- The checkpoint store (CHECKPOINT_URI; by default OUTPUT_DIR itself, so committed checkpoints
  appear as ``OUTPUT_DIR/<run>/checkpoint-<step>/``) holds what a restart resumes. `CheckpointSync`
  snapshots each save with hard links and commits it in a background thread, so training goes
  on: at most one commit is in flight, and a save arriving meanwhile replaces any save still
  waiting. The commit protocol (`commits`) writes the manifest last; only a manifest
  makes a checkpoint count. Before each manifest and each prune the writer checks its lease
  (`trainer.checkpoints.lease`): a run has one writer.

`plan_resume` finds the newest committed checkpoint of the run that verifies, refuses it when the
run's identity (the settings and data that shape the weights, `run_identity`) differs, downloads
it and the best checkpoint into WORKDIR, and hands it to ``Trainer.train(resume_from_checkpoint=…)``,
which restores every state. The batch sampler depends only on (seed, epoch), so the Trainer's skip
of the epoch's first batches continues it exactly where it stopped.

Whatever the evaluation and save strategies, the callbacks keep these rules:

- a step is evaluated at most once and saved at most once (`CheckpointSync._once`);
- SIGTERM (`PreemptionHandler`): the current step ends, its evaluation runs if one is due (it
  decides the best checkpoint, so skipping it would change the result), the step is saved and
  committed, and the job exits 0 within PREEMPTION_GRACE_SECONDS; a second SIGTERM changes
  nothing. A stop in mid-epoch does not run the epoch-end evaluation early.

This module never sees a GCS type: it talks to `trainer.checkpoints.storage.Store` only.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
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

from ..config import FIELDS, WORKDIR, Config, format_value
from . import commits
from .commits import Manifest, ResumeError
from .lease import LeaseLost
from .storage import CorruptObjectError, StorageError, Store, UnsafeObjectName

logger = logging.getLogger(__name__)

STAGING = ".staging"  # inside WORKDIR: snapshots waiting for their commit
IDENTITY_FILE = "run_identity.json"
TRAINER_STATE = "trainer_state.json"


def work_dir(run_dir: Path) -> Path:
    return Path(run_dir) / WORKDIR


# ------------------------------------------------------------------------------ background commits
@dataclass
class _Job:
    step: int
    folder: Path
    metadata: dict[str, Any]


def background_upload_workers() -> int:
    """Parallel uploads for a commit made while training runs: half the CPUs this process may use,
    1 to `commits.DEFAULT_WORKERS`. Training keeps the other half. Measured with
    `make bench` (upload) on 2 CPUs: one upload stream slows training steps less than four and
    uploads faster, since four streams only contend for the one CPU they get."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(commits.DEFAULT_WORKERS, cpus // 2))


class BackgroundCommitter:
    """One worker thread committing snapshots; a newer pending save replaces an older one.

    `workers`: parallel uploads per commit (default `background_upload_workers()`, counted when
    the committer is made). `guard`: called before every manifest write and every prune; it
    raises `LeaseLost` when this job may no longer write the run, which stops all commits.
    """

    def __init__(self, store: Store, run: str, *, keep: int | None, best_step=lambda: None, workers: int | None = None,
                 guard=None):
        self.store, self.run, self.keep, self.best_step = store, run, keep, best_step
        self.workers = workers or background_upload_workers()
        self.guard = guard
        self._lock = threading.Condition()
        self._pending: _Job | None = None
        self._busy = False
        self._closed = False
        self.committed: list[int] = []
        self.failed: list[tuple[int, str]] = []
        self.fenced: Exception | None = None  # why no commit may be tried any more (LeaseLost, a full disk)
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
        store = self.store
        started = time.monotonic()
        try:
            if self.fenced is not None:
                raise self.fenced
            commits.commit_checkpoint(store, job.folder, self.run, job.step, metadata=job.metadata,
                                               max_workers=self.workers, before_manifest=self.guard)
            self.committed.append(job.step)
            logger.info("checkpoint-%d committed to %s in %.1fs", job.step, self.store.uri(self.run), time.monotonic() - started)
            if self.keep:
                if self.guard is not None:
                    self.guard()
                best = self.best_step()
                commits.prune_checkpoints(self.store, self.run, keep=self.keep,
                                                   protect_steps={best} if best is not None else ())
        except LeaseLost as e:
            self.fenced = e
            self.failed.append((job.step, str(e)))
            logger.error("checkpoint-%d was not committed: %s", job.step, e)
        except OSError as e:
            self.failed.append((job.step, str(e)))
            logger.error("checkpoint-%d was not committed: %s", job.step, e)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # a full local store: no later commit can succeed
                self.fenced = e
        except (StorageError, ValueError) as e:
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


def evaluated_at(state, step: int) -> dict[str, float] | None:
    """The evaluation logged at `step` (the Trainer's log history), or None."""
    for entry in reversed(state.log_history):
        if entry.get("step") == step and "eval_runtime" in entry:
            return entry
    return None


def _gather_rng_files(args, folder: Path) -> None:
    """Give rank 0's checkpoint folder every rank's RNG state file.

    Each process writes ``rng_state_<rank>.pth`` into its own node's copy of the folder; only
    rank 0's folder is committed, so on several nodes the others' files would be lost and their
    resume would not be exact. Every rank sends its file to rank 0 (a collective: all ranks
    reach `on_save`)."""
    import torch.distributed as dist

    if args.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return
    name = f"rng_state_{args.process_index}.pth"
    data = (folder / name).read_bytes() if (folder / name).is_file() else None
    gathered: list[Any] | None = [None] * dist.get_world_size() if args.process_index == 0 else None
    dist.gather_object((name, data), gathered, dst=0)
    for item in gathered or []:
        if item and item[1] is not None and not (folder / item[0]).is_file():
            (folder / item[0]).write_bytes(item[1])


class CheckpointSync(TrainerCallback):
    """Commits every checkpoint the Trainer saves to the store (main process), and keeps each
    step to one evaluation and one save.

    Add it after every callback that sets ``should_save``/``should_evaluate`` (the Trainer's own
    flow, `PreemptionHandler`): its guard runs last.
    """

    def __init__(self, store: Store, run: str, *, metadata: dict[str, Any], identity: dict[str, Any], keep: int | None,
                 guard=None, writer: str | None = None):
        self.store, self.run, self.metadata, self.identity = store, run, metadata, identity
        self.keep, self.guard, self.writer = keep, guard, writer
        self.committer: BackgroundCommitter | None = None
        self._best_step: int | None = None
        self._saved: set[int] = set()

    @property
    def fenced(self) -> Exception | None:
        return self.committer.fenced if self.committer is not None else None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:
            self._saved.add(state.global_step)  # the resumed checkpoint
        self._best_step = state.best_global_step or None
        if state.is_world_process_zero and self.committer is None:
            self.committer = BackgroundCommitter(self.store, self.run, keep=self.keep, best_step=lambda: self._best_step,
                                                 guard=self.guard)

    def _once(self, state, control) -> None:
        if control.should_save and state.global_step in self._saved:
            control.should_save = False
        if control.should_evaluate and evaluated_at(state, state.global_step) is not None:
            control.should_evaluate = False
        if self.fenced is not None:
            control.should_training_stop = True

    def on_step_end(self, args, state, control, **kwargs):
        self._once(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._once(state, control)

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        self._saved.add(step)
        folder = Path(args.output_dir) / f"checkpoint-{step}"
        _gather_rng_files(args, folder)
        if not state.is_world_process_zero or not folder.is_dir():
            return
        (folder / IDENTITY_FILE).write_text(json.dumps(self.identity, indent=1))
        self._best_step = state.best_global_step or None
        metadata = {**self.metadata, "epoch": state.epoch, "identity": self.identity, "writer": self.writer,
                    "metrics": evaluated_at(state, step) or {},  # this step's evaluation only
                    "best_step": state.best_global_step or None, "best_metric": state.best_metric}
        staged = snapshot(folder, Path(args.output_dir) / STAGING)
        self.committer.submit(_Job(step, staged, metadata))

    def finish(self, timeout: float | None = None) -> bool:
        """Wait for the last commit (again: it returns at once); True when every save was committed in time."""
        if self.committer is None:
            return True
        done = self.committer.wait(timeout)
        self.committer.close()
        return done and not self.committer.failed


# ------------------------------------------------------------------------------ run identity
# The settings that shape the trained weights, the optimizer state or the data order: a checkpoint
# trained with other values belongs to another run. Everything else (MAX_STEPS, NUM_TRAIN_EPOCHS,
# EARLY_STOPPING_PATIENCE and _THRESHOLD, the evaluation, saving, logging and storage settings,
# EVAL_BATCH_SIZE, MAX_EVAL_SAMPLES…) may change between a run and its resume.
IDENTITY_SETTINGS = (
    "model_name", "model_init", "tokenizer_name", "max_seq_length", "special_tokens", "tasks", "max_train_samples", "sampling",
    "sampling_temperature", "sampling_cap", "task_weights", "group_by_length", "learning_rate", "train_batch_size",
    "gradient_accumulation_steps", "warmup_ratio", "weight_decay", "lr_scheduler", "max_grad_norm", "seed", "lora",
    "fsdp",  # FSDP checkpoints hold the Trainer's FSDP model and optimizer files: DDP cannot resume them, nor FSDP DDP's
)
# The LoRA settings beside LORA, recorded when LORA is on (LORA_EXPORT may change: it shapes no weight).
LORA_IDENTITY_SETTINGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


def data_fingerprint(lengths, labels) -> str:
    """A short hash of a task's tokenized training data (example lengths and labels): the data
    order depends on the lengths, the training on both."""
    import numpy as np

    digest = hashlib.sha256(np.asarray(lengths, dtype=np.int64).tobytes())
    digest.update(json.dumps(list(labels), default=float).encode())
    return digest.hexdigest()[:16]


def run_identity(cfg: Config, *, precision: str, world_size: int, drop_last: bool, tasks: list[dict[str, Any]],
                 base_fingerprint: str | None = None, model_dtype: str = "float32",
                 frozen_head_weights: list[str] | None = None) -> dict[str, Any]:
    """What a checkpoint must share with this job to be resumed by it.

    `tasks`: per task, in TASKS order: name, declaration (hash of its declaration without data
    paths and metrics), examples, batch_size, data (`data_fingerprint`). `base_fingerprint`: with
    LoRA, the hash of MODEL_NAME's weights files: a LoRA checkpoint holds no base weights, so
    resuming on other ones would train adapters made for another model. `model_dtype`: the dtype
    the weights train in (MODEL_DTYPE as resolved: `auto` is the checkpoint's own), which shapes
    every update as PRECISION does. `frozen_head_weights`: with LoRA, the head weights taken from
    MODEL_NAME that stay frozen (`MultitaskModel.frozen_head_weights`; none before they were).
    """
    names = IDENTITY_SETTINGS + (LORA_IDENTITY_SETTINGS if cfg.lora != "false" else ())
    settings = {name.upper(): format_value(getattr(cfg, name)) for name in names}
    settings["PRECISION"] = precision
    settings["MODEL_DTYPE"] = model_dtype
    identity = {"settings": settings, "world_size": world_size, "drop_last": drop_last, "tasks": tasks}
    if base_fingerprint is not None:
        identity["base_fingerprint"] = base_fingerprint
    if frozen_head_weights:
        identity["frozen_head_weights"] = sorted(frozen_head_weights)
    return identity


def _default(key: str) -> str:
    """The default of the setting named `key` (upper case), as `run_identity` records values."""
    f = FIELDS.get(key.lower())
    if f is None:
        return ""
    return format_value(f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's identity and this job's, in words ([] when resumable)."""
    diffs = []
    old, new = saved.get("settings", {}), current["settings"]
    for key in sorted(set(old) | set(new)):
        if key not in old and new.get(key) in ("", _default(key)):
            continue  # a setting newer than the checkpoint, left empty or at its default: the run's behaviour before it
        if old.get(key) != new.get(key):  # a setting newer than the checkpoint: the run had its default
            diffs.append(f"{key}={old.get(key, _default(key))} (now {new.get(key, '')})")
    if saved.get("base_fingerprint") != current.get("base_fingerprint"):
        diffs.append(f"the base model's weights (fingerprint {saved.get('base_fingerprint') or 'none: not LoRA'}, "
                     f"now {current.get('base_fingerprint') or 'none: not LoRA'})")
    old_frozen, new_frozen = saved.get("frozen_head_weights", []), current.get("frozen_head_weights", [])
    if old_frozen != new_frozen:
        diffs.append(f"the head weights frozen under LoRA ({', '.join(old_frozen) or 'none: they trained'}, "
                     f"now {', '.join(new_frozen) or 'none'})")
    if saved.get("world_size") != current["world_size"]:
        diffs.append(f"{saved.get('world_size')} training processes (now {current['world_size']})")
    if saved.get("drop_last") != current["drop_last"]:
        diffs.append(f"drop_last={saved.get('drop_last')} (now {current['drop_last']})")
    old_tasks = {t["name"]: t for t in saved.get("tasks", [])}
    for task in current["tasks"]:
        before = old_tasks.get(task["name"])
        if before is None:
            continue  # TASKS itself differs, reported above
        if before.get("declaration") != task["declaration"]:
            diffs.append(f"the declaration of task {task['name']!r}")
        if before.get("batch_size") != task["batch_size"]:
            diffs.append(f"the batch size of task {task['name']!r}: {before.get('batch_size')} (now {task['batch_size']})")
        if (before.get("examples"), before.get("data")) != (task["examples"], task["data"]):
            diffs.append(f"the training data of task {task['name']!r}: {before.get('examples')} examples "
                         f"(now {task['examples']}){'' if before.get('examples') != task['examples'] else ', other content'}")
    return diffs


def check_identity(manifest: Manifest, source: Store, identity: dict[str, Any]) -> None:
    """Raises ResumeError naming the differences when `manifest`'s run is not this job's."""
    name = manifest.prefix.rsplit("/", 1)[-1]
    saved = manifest.metadata.get("identity")
    if not isinstance(saved, dict):
        raise ResumeError(
            f"{source.uri(manifest.prefix)} was written by an older version of this trainer that did not record the "
            "run's settings, so it cannot be checked: set another RUN_NAME to start a new run")
    diffs = identity_differences(saved, identity)
    if diffs:
        raise ResumeError(
            f"{name} of run {manifest.run} in {source.uri()} was trained with other settings: {'; '.join(diffs)}. "
            "Resuming would continue another run's optimizer, schedule and data order: set another RUN_NAME "
            "(MAX_STEPS, NUM_TRAIN_EPOCHS, early stopping and the evaluation, saving and logging settings may change on resume)")


# ------------------------------------------------------------------------------ resume
@dataclass
class ResumePlan:
    """What a starting job does: resume `checkpoint` (a folder in WORKDIR), start fresh (None),
    or nothing when the run is `finished` (its final model is committed at or past the planned
    steps, or where early stopping ended it: see `ended_early`)."""

    checkpoint: Path | None = None
    finished: Manifest | None = None


def ended_early(final: Manifest, patience: int | None) -> bool:
    """Whether early stopping ended the run of the final model `final` with a patience that this
    job's EARLY_STOPPING_PATIENCE has not raised (a larger patience, or none, trains on)."""
    counted = final.metadata.get("evaluations_without_improvement")
    return bool(final.metadata.get("stopped_early")) and patience is not None and counted is not None and counted >= patience


def plan_resume(store: Store, run: str, resume: str, work: Path, *, identity: dict[str, Any], planned_steps: int,
                early_stopping_patience: int | None = None) -> ResumePlan:
    """Decide how this job starts, and download what it resumes into `work` (emptied first).

    `resume`: "never" (start over; refused if the run already has committed checkpoints, which
    a restart would otherwise overwrite), "auto" (the newest committed checkpoint of `run` that
    verifies, falling back over corrupt ones) or the URI/path of one checkpoint folder. A run
    whose final model is committed is finished at its planned steps, or earlier where early
    stopping ended it (`ended_early`).

    Raises:
        StorageError: the store cannot be read (a network failure must not silently restart).
        ResumeError: the checkpoint belongs to a run with other settings or data, RESUME names a
            checkpoint that is not committed or does not verify, or RESUME=never would overwrite.
    """
    from .storage import open_store

    shutil.rmtree(work, ignore_errors=True)  # scratch: nothing in it was ever the record
    work.mkdir(parents=True, exist_ok=True)
    source = store
    if resume == "never":
        committed, final = commits.list_checkpoints(store, run), commits.read_final(store, run)
        if committed or final:
            what = ", ".join([*(f"checkpoint-{m.step}" for m in committed), *(["final"] if final else [])])
            raise ResumeError(
                f"RESUME=never, but run {run} already has committed {what} in {store.uri()}: starting over would overwrite "
                f"them. Set another RUN_NAME, or delete {store.uri(run)} first")
        return ResumePlan()
    if resume == "auto":
        manifest = commits.latest_valid_checkpoint(store, run)
        final = commits.read_final(store, run)
        if final is not None:
            try:
                commits.verify_checkpoint(store, final)
            except (CorruptObjectError, UnsafeObjectName) as e:
                logger.warning("ignoring the final model %s: %s", store.uri(final.prefix), e)
                final = None
        reference = manifest if manifest is not None else final
        if reference is not None:
            check_identity(reference, store, identity)
        if final is not None and (final.step >= planned_steps or ended_early(final, early_stopping_patience)) and (
                manifest is None or manifest.step <= final.step):
            return ResumePlan(finished=final)
        if manifest is None:
            logger.info("no committed checkpoint of run %s in %s: starting from the beginning", run, store.uri())
            return ResumePlan()
    else:
        parent, _, name = resume.rstrip("/").rpartition("/")
        run_parent, _, run_name = parent.rpartition("/")
        if not name.startswith("checkpoint-") or not name[len("checkpoint-"):].isdigit():
            raise ResumeError(f"RESUME={resume!r} is not a checkpoint folder: expect …/<run>/checkpoint-<step>")
        source = open_store(run_parent or ".", setting="RESUME")
        step = int(name.split("-")[-1])
        manifest = next((m for m in commits.list_checkpoints(source, run_name) if m.step == step), None)
        if manifest is None:
            raise ResumeError(f"RESUME={resume!r} has no {commits.MANIFEST_NAME}: it was never committed")
        try:
            commits.verify_checkpoint(source, manifest)
        except StorageError as e:
            raise ResumeError(f"RESUME={resume!r} does not verify: {e}") from None
        check_identity(manifest, source, identity)
    local = _download_work_copy(source, manifest, work)
    _restore_best(source, manifest, local, work)
    logger.info("resuming from %s (step %d)", source.uri(manifest.prefix), manifest.step)
    return ResumePlan(checkpoint=local)


def _download_work_copy(source: Store, manifest: Manifest, work: Path) -> Path:
    return commits.download_checkpoint(source, manifest, work / f"checkpoint-{manifest.step}", write_manifest=False)


def _restore_best(source: Store, manifest: Manifest, local: Path, work: Path) -> None:
    """Make the resumed Trainer state's best checkpoint exist in `work`, where the Trainer looks.

    The Trainer forgets a best checkpoint whose folder is missing: it would then prune it,
    and LOAD_BEST_MODEL_AT_END would return the last model instead of the best."""
    path = local / TRAINER_STATE
    state = json.loads(path.read_text())
    best = state.get("best_global_step")
    if not best:
        state["best_model_checkpoint"] = None
    elif best == manifest.step:
        state["best_model_checkpoint"] = str(local)
    else:
        run = manifest.run
        found = next((m for m in commits.list_checkpoints(source, run) if m.step == best), None)
        if found is None:
            logger.warning("the best checkpoint (step %d) of %s is not committed any more: LOAD_BEST_MODEL_AT_END "
                           "will choose among the checkpoints saved from now on", best, source.uri(run))
            state["best_model_checkpoint"] = None
        else:
            state["best_model_checkpoint"] = str(_download_work_copy(source, found, work))
            logger.info("downloaded the best checkpoint so far, step %d", best)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    tmp.replace(path)


# ------------------------------------------------------------------------------ preemption
def _ends_epoch(state) -> bool:
    """True at a step after which the Trainer runs its epoch-end flow: the epoch's last step
    (`state.epoch` is then a whole number: epoch + steps/steps) or the run's last step."""
    return float(state.epoch or 0).is_integer() or state.global_step >= state.max_steps


class PreemptionHandler(TrainerCallback):
    """On SIGTERM: finish the step (and an evaluation that is due or running), save, stop.

    Add it after the Trainer's own flow and before `CheckpointSync`. All ranks agree (a SIGTERM
    on one rank stops all). The signal handler stays installed until `uninstall`, which the job
    calls only after its last commit: a second SIGTERM in the grace period changes nothing.
    """

    def __init__(self):
        self.requested_at: float | None = None
        self.stopped = False
        self._previous = None
        self._installed = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _on_sigterm(self, signum, frame) -> None:
        if self.requested_at is None:
            self.requested_at = time.monotonic()
            logger.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping")
        else:
            logger.warning("SIGTERM again: already stopping (%.1fs since the first)", time.monotonic() - self.requested_at)

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (a collective on several ranks)."""
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
        if self.stopped or not self.agreed():
            return
        self.stopped = True
        control.should_training_stop = True
        if not _ends_epoch(state):
            control.should_save = True  # else the epoch-end flow saves, after its evaluation (on_epoch_end)

    def on_epoch_end(self, args, state, control, **kwargs):
        if not self.stopped:
            return
        if _ends_epoch(state):
            control.should_save = True
        else:  # stopped in mid-epoch: the step is saved; the epoch's evaluation belongs to its end
            control.should_evaluate = False
            control.should_save = False

    def on_evaluate(self, args, state, control, **kwargs):
        # A SIGTERM during an evaluation: save this step right after it, then stop.
        if state.global_step > 0 and not self.stopped and self.agreed():
            self.stopped = True
            control.should_training_stop = True
            control.should_save = True

    def seconds_left(self, grace: float) -> float:
        if self.requested_at is None:
            return grace
        return max(0.0, grace - (time.monotonic() - self.requested_at))

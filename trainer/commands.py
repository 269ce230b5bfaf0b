"""The job's commands: train, evaluate, predict, export. Each reads top to bottom, like run_glue:
config → logging → seed → tasks and data → tokenizer → model → Trainer → run → outputs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from . import fault_injection
from .checkpoints.commits import CheckpointError
from .checkpoints.storage import StorageError
from .cloud.aip import export_to_model_dir, platform_callbacks
from .config import Config
from .data import (
    TEXT_SUFFIXES,
    ReaderOptions,
    TaskData,
    add_path_columns,
    input_columns,
    load_file,
    load_task,
    make_collator,
    missing_input,
    record_place,
    source_line,
    tokenize,
)
from .modeling import (
    MULTITASK_FILE,
    LoraSetup,
    MultitaskModel,
    base_fingerprint,
    base_tokens,
    check_backbone,
    check_lora,
    check_lora_tokens,
    check_max_length,
    check_memory_settings,
    encoder_config,
    fit_backbone,
    load_encoder,
    prepare_tokenizer,
)
from .tasks import TaskError, TaskSpec, resolve_tasks
from .training import (
    MACRO_METRIC,
    MultitaskTrainer,
    NonFiniteLoss,
    add_early_stopping,
    build_training_args,
    check_fsdp,
    check_task_mixing,
    resolve_precision,
    sampling_plan,
    stopped_early,
    trackers,
)

logger = logging.getLogger("trainer")
LEARNED_MARGIN = 0.05  # a metric this far above its chance level counts as learned


def setup_logging() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    transformers.logging.set_verbosity_warning()


def load_tokenizer(name: str, specs: list[TaskSpec], special_tokens: list[str] = ()):
    """The tokenizer as the tasks need it: their types' loading options (pre-split words:
    add_prefix_space), SPECIAL_TOKENS and the tasks' own special tokens added, a pad token."""
    from transformers import AutoTokenizer

    kwargs = {}
    for spec in specs:
        kwargs.update(spec.task_type.tokenizer_kwargs)
    tokens = [*special_tokens, *(t for spec in specs for t in spec.special_tokens)]
    return prepare_tokenizer(AutoTokenizer.from_pretrained(name, **kwargs), tokens)


def prepare_tasks(cfg: Config, specs: list[TaskSpec], *, need_train: bool) -> tuple[list[TaskSpec], list[dict]]:
    """Load and check every task's raw data (before any model is built)."""
    resolved, raw = [], []
    for spec in specs:
        spec, splits = load_task(spec, need_train=need_train, max_train=cfg.max_train_samples, max_eval=cfg.max_eval_samples)
        resolved.append(spec)
        raw.append(splits)
    return resolved, raw


def tokenize_tasks(cfg: Config, specs: list[TaskSpec], raw: list[dict], tokenizer) -> list[TaskData]:
    tasks = []
    for spec, splits in zip(specs, raw):
        max_length = spec.max_length or cfg.max_seq_length
        tokenized = {name: tokenize(spec, ds, tokenizer, max_length) for name, ds in splits.items()}
        tasks.append(TaskData(spec, tokenized.get("train"), tokenized.get("validation"), make_collator(spec, tokenizer),
                              make_collator(spec, tokenizer, stage="eval")))
    return tasks


def load_data(cfg: Config, specs: list[TaskSpec], args) -> tuple[list[TaskSpec], list[dict], Any]:
    """Load and check every task's training data, then the tokenizer, and check the settings the
    data and the model decide (task mixing, maximum length): everything that can refuse the job
    before it writes anything. The node's main process reads first: the others then read the
    datasets cache instead of every rank reading the files (or the Hub) at once."""
    config = encoder_config(cfg.model_name)
    check_backbone(specs, config, cfg.model_name)  # before reading any data: a config is all it needs
    check_lora(cfg, specs, config)
    with args.main_process_first(local=True, desc="loading the data"):
        specs, raw = prepare_tasks(cfg, specs, need_train=True)
    check_task_mixing(cfg, specs, [len(splits["train"]) for splits in raw])
    tokenizer = load_tokenizer(cfg.tokenizer_name or cfg.model_name, specs, cfg.special_tokens)
    check_max_length(cfg, specs, tokenizer, config)
    check_lora_tokens(cfg, specs, config, tokenizer)
    return specs, raw, tokenizer


def tokenize_data(cfg: Config, specs: list[TaskSpec], raw: list[dict], tokenizer, args) -> list[TaskData]:
    """The tokenized tasks, the node's main process first (the others then read the cache)."""
    with args.main_process_first(local=True, desc="tokenizing the data"):
        return tokenize_tasks(cfg, specs, raw, tokenizer)


def chance_report(tasks: list[TaskData], metrics: dict[str, float], tokenizer, prefix: str = "eval") -> dict[str, Any]:
    """Compare each task's metrics with what a constant guess scores; log a table and a summary.

    A metric is learned when its value is at least its chance level plus LEARNED_MARGIN; the table
    shows that threshold ("needs") and the summary applies the same rule, in the same words.
    Returns {task: {metric: {value, chance, needs, learned}}}.
    """
    rule = f"chance + {LEARNED_MARGIN:g}"
    report: dict[str, Any] = {}
    lines = [f"Evaluation against chance (a constant guess): a metric is learned when value >= {rule}",
             f"{'task':<24} {'metric':<22} {'value':>8} {'chance':>8} {'needs':>8}  learned"]
    for task in tasks:
        if task.validation is None:
            continue
        chance = task.spec.task_type.split_chance(task.spec, task.validation, tokenizer)
        rows = {}
        for name, level in chance.items():
            value = metrics.get(f"{prefix}_{task.name}_{name}")
            if value is None:
                continue
            needs = level + LEARNED_MARGIN
            rows[name] = {"value": value, "chance": level, "needs": needs, "learned": value >= needs}
            lines.append(f"{task.name:<24} {name:<22} {value:>8.4f} {level:>8.4f} {needs:>8.4f}  "
                         f"{'yes' if value >= needs else 'NO'}")
        report[task.name] = rows
    logger.info("\n".join(lines))
    short = [f"{task} {name} {row['value']:.4f}, needs {row['needs']:.4f}"
             for task, rows in report.items() for name, row in rows.items() if not row["learned"]]
    if not report:
        logger.info("No task has a validation split: nothing to compare with chance.")
    elif short:
        logger.info("Not every task learned: %d metric%s below %s (%s); train longer or check the data.",
                    len(short), "" if len(short) == 1 else "s", rule, "; ".join(short))
    else:
        logger.info("All tasks learned: every metric >= %s.", rule)
    return report


# ------------------------------------------------------------------------------ train
def open_checkpoint_store(cfg: Config, *, check: bool = True):
    """The checkpoint store, checked for access now: a bad bucket fails before any training.

    Raises:
        StorageError: the bucket or folder cannot be used (names it and the fix).
    """
    from .checkpoints.storage import open_store

    store = open_store(cfg.store_uri, retry_deadline=cfg.storage_retry_deadline,
                       setting="CHECKPOINT_URI" if cfg.checkpoint_uri else "OUTPUT_DIR")
    if check:
        store.check_access()
    return store


def check_output_dir(cfg: Config) -> None:
    """Raises ConfigError unless OUTPUT_DIR can be written (or created), before anything is loaded."""
    from .config import ConfigError

    path = Path(cfg.output_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        where = "is not a writable folder" if existing == path else f"cannot be created in {existing} (not writable)"
        raise ConfigError(f"OUTPUT_DIR={cfg.output_dir!r} {where}: fix its permissions or set OUTPUT_DIR to a writable folder")


def train(cfg: Config) -> dict[str, Any]:
    """Train all tasks together, evaluate, save the final model, export each task, write metrics.json.

    Every save is committed to the checkpoint store in the background; on start the newest
    committed checkpoint of the run is resumed; SIGTERM saves, commits and stops (exit 0).

    Raises:
        ConfigError, TaskError, StorageError, ResumeError: bad settings, data, bucket or checkpoint,
            before any training; LeaseHeld when another job trains the run.
        NonFiniteLoss: a training loss was NaN or infinite (the committed checkpoints are kept).
        CheckpointError: a checkpoint could not be committed (the job should be retried).
    """
    from .checkpoints.callback import PreemptionHandler

    setup_logging()
    precision = resolve_precision(cfg.precision)
    report_to = trackers.setup(cfg)  # a tracker's missing package stops the job before anything is loaded
    specs = resolve_tasks(cfg)
    check_fsdp(cfg, specs)  # one process, or no GPU: nothing to shard, before anything is loaded
    logger.info("Run %s: %s on %s (config %s)", cfg.resolved_run_name, cfg.model_name, ", ".join(cfg.tasks), cfg.hash())
    check_output_dir(cfg)
    store = open_checkpoint_store(cfg)
    preemption = PreemptionHandler()
    preemption.install()  # until the last commit: a SIGTERM in the grace period changes nothing
    try:
        return _train(cfg, precision, specs, store, preemption, report_to)
    finally:
        preemption.uninstall()


def _train(cfg: Config, precision: str, specs: list[TaskSpec], store, preemption, report_to: list[str]) -> dict[str, Any]:
    from transformers import set_seed

    from .checkpoints.callback import CheckpointSync, work_dir
    from .checkpoints.lease import LocalRunLock, RunLease

    run = cfg.resolved_run_name
    args = build_training_args(cfg, precision=precision, report_to=report_to)
    # MODEL_DTYPE and ACTIVATION_CHECKPOINTING against the backbone's config: before any data is read.
    dtype = check_memory_settings(cfg, encoder_config(cfg.model_name), precision)
    specs, raw, tokenizer = load_data(cfg, specs, args)  # bad data stops the job before it writes anything
    lock = lease = sync = None
    if args.process_index == 0:  # the job's one writer: refuse now if another job writes the run
        lock = LocalRunLock(cfg.run_dir)
        lock.acquire()
    try:
        if lock is not None:
            lease = RunLease(store, run, seconds=cfg.run_lease_seconds)
            lease.acquire()
        try:
            tasks = tokenize_data(cfg, specs, raw, tokenizer, args)
            set_seed(cfg.seed)
            model = MultitaskModel(fit_backbone(load_encoder(cfg.model_name, cfg.model_init, dtype), tokenizer), specs,
                                   pretrained=cfg.model_name if cfg.model_init == "pretrained" else None)
            lora = _lora_setup(cfg)
            if lora is not None:
                model.enable_lora(lora)  # after the heads: they are bound to the backbone PEFT adapts in place
            trainer = MultitaskTrainer(model=model, args=args, tasks=tasks, cfg=cfg, processing_class=tokenizer)
            identity = _identity(cfg, precision, trainer, lora)
            plan = _shared_resume_plan(cfg, store, trainer, identity)
            if plan.finished is not None:
                return _already_finished(cfg, store, plan.finished, trainer)
            if args.process_index == 0:  # one table per job, not one per rank
                logger.info(sampling_plan(trainer.tasks, trainer.make_batch_sampler(), args.gradient_accumulation_steps))

            sync = CheckpointSync(fault_injection.wraps_store(store), run, metadata=_run_metadata(cfg), identity=identity, keep=cfg.save_total_limit,
                                  guard=lease.check if lease else None, writer=lease.owner.id if lease else None)
            early_stopping = add_early_stopping(trainer, cfg, plan.checkpoint)
            for callback in [*fault_injection.callbacks(lambda: sync.committer and sync.committer.wait()),
                             *platform_callbacks(cfg.run_dir, MACRO_METRIC), preemption, sync]:
                trainer.add_callback(callback)  # `sync` last: it sees every other callback's decision
            if preemption.agreed():
                logger.warning("Preempted before training started: nothing to save; exiting 0 so the job restarts.")
                return {"run": run, "preempted": True, "step": 0}
            with trackers.job_run(report_to, run, main=args.process_index == 0):
                try:
                    train_result = trainer.train(resume_from_checkpoint=str(plan.checkpoint) if plan.checkpoint else None)
                except NonFiniteLoss as e:
                    sync.finish()
                    kept = sync.committer.committed[-1] if sync.committer and sync.committer.committed else None
                    raise NonFiniteLoss(f"{e}. Training stopped; " + (
                        f"the last committed checkpoint (step {kept}) is kept" if kept is not None else
                        "no checkpoint was committed before it")) from None
                if sync.fenced is not None:
                    sync.finish(timeout=0)
                    raise sync.fenced
                if preemption.stopped:
                    done = sync.finish(timeout=preemption.seconds_left(cfg.preemption_grace_seconds))
                    logger.warning("Preempted at step %d: %s; exiting 0 so the platform restarts the job, which resumes.",
                                   trainer.state.global_step,
                                   "checkpoint committed" if done else "the last commit did not finish in time")
                    return {"run": run, "preempted": True, "step": trainer.state.global_step}
                return _finish(cfg, store, sync, trainer, tasks, tokenizer, train_result, work_dir(cfg.run_dir),
                               _ending(early_stopping))
        finally:
            if sync is not None:  # whatever stopped the job: let a commit in flight finish first
                sync.finish(timeout=cfg.preemption_grace_seconds)
            if lease is not None:
                lease.release()
    finally:
        if lock is not None:
            lock.release()


def _lora_setup(cfg: Config) -> LoraSetup | None:
    """LORA's adapters for this job (None for LORA=false), naming the base they are trained on."""
    if cfg.lora == "false":
        return None
    setup = LoraSetup.from_config(cfg, encoder_config(cfg.model_name), fingerprint=base_fingerprint(cfg.model_name),
                                  base_tokens=base_tokens(cfg.tokenizer_name or cfg.model_name))
    logger.info("LoRA (LORA=%s): r=%d, alpha=%d, dropout=%g, target modules %s, on %s (weights fingerprint %s)", setup.mode,
                setup.r, setup.alpha, setup.dropout, ",".join(setup.target_modules) or "PEFT's defaults", setup.base_model,
                setup.base_fingerprint)
    return setup


def _identity(cfg: Config, precision: str, trainer, lora: LoraSetup | None = None) -> dict[str, Any]:
    import hashlib

    from .checkpoints.callback import data_fingerprint, run_identity

    sampler = trainer.make_batch_sampler()
    tasks = []
    for task, batch_size, lengths in zip(trainer.tasks, sampler.batch_sizes, trainer.train_lengths()):
        # Where the data lives and how it is scored (metrics, threshold) do not shape the weights.
        # (`to_dict` leaves keys added later out at their defaults, a loss_weight of 1 among them, so
        # older checkpoints stay resumable.)
        declaration = {k: v for k, v in task.spec.to_dict().items()
                       if k not in ("files", "hub", "hub_config", "splits", "metrics", "threshold")}
        tasks.append({"name": task.name, "examples": len(task.train), "batch_size": batch_size,
                      "declaration": hashlib.sha256(json.dumps(declaration, sort_keys=True).encode()).hexdigest()[:16],
                      "data": data_fingerprint(lengths, task.train[_learned_column(task.train)])})
    return run_identity(cfg, precision=precision, world_size=trainer.args.world_size,
                        drop_last=trainer.args.dataloader_drop_last, tasks=tasks,
                        base_fingerprint=lora.base_fingerprint if lora is not None else None,
                        model_dtype=str(trainer.model.encoder.dtype).removeprefix("torch."),
                        frozen_head_weights=trainer.model.frozen_head_weights())


def _learned_column(train) -> str:
    """The tokenized column holding what a task learns: `labels`, or the token ids where the
    collator makes the labels (masked_lm)."""
    return "labels" if "labels" in train.column_names else "input_ids"


def _shared_resume_plan(cfg: Config, store, trainer, identity: dict[str, Any]):
    """The resume plan, made by one process per node (which downloads what it resumes into the
    node's scratch folder) and read by the node's other processes."""
    from .checkpoints.callback import ResumePlan, plan_resume, work_dir
    from .checkpoints.commits import Manifest

    work = work_dir(cfg.run_dir)
    marker = work / ".resume-plan.json"  # written after `plan_resume` empties the folder
    args = trainer.args
    with args.main_process_first(local=True, desc="finding the checkpoint to resume"):
        if args.local_process_index == 0:
            marker.unlink(missing_ok=True)
            plan = plan_resume(store, cfg.resolved_run_name, cfg.resume, work, identity=identity,
                               planned_steps=trainer.planned_steps(), early_stopping_patience=cfg.early_stopping_patience)
            marker.write_text(json.dumps({"checkpoint": str(plan.checkpoint or ""),
                                          "finished": plan.finished.to_json() if plan.finished else None}))
            return plan
        if not marker.is_file():
            raise CheckpointError("the node's main process could not prepare the resume: see its error")
        shared = json.loads(marker.read_text())
    finished = Manifest.from_json(shared["finished"]) if shared["finished"] else None
    if finished is not None:
        finished = dataclasses.replace(finished, folder="final")
    return ResumePlan(checkpoint=Path(shared["checkpoint"]) if shared["checkpoint"] else None, finished=finished)


def _already_finished(cfg: Config, store, final, trainer) -> dict[str, Any]:
    """A rerun (or a restart after the final commit) of a finished run: nothing to train or rewrite."""
    from .checkpoints.commits import download_checkpoint, verify_local

    run = cfg.resolved_run_name
    if final.metadata.get("stopped_early"):
        logger.info("Run %s already finished at step %d: it stopped early (eval_%s did not improve for %d evaluations), "
                    "its final model is committed at %s. Nothing to do (raise EARLY_STOPPING_PATIENCE or empty it to "
                    "train further, or set another RUN_NAME for a new run).", run, final.step, MACRO_METRIC,
                    final.metadata.get("evaluations_without_improvement"), store.uri(final.prefix))
    else:
        logger.info("Run %s already finished at step %d: its final model is committed at %s. Nothing to do "
                    "(raise MAX_STEPS or NUM_TRAIN_EPOCHS to train further, or set another RUN_NAME for a new run).",
                    run, final.step, store.uri(final.prefix))
    if trainer.args.should_save:
        local = cfg.run_dir / "final"
        try:
            verify_local(local)
        except StorageError:  # missing on this disk (a new machine) or damaged: the committed copy
            download_checkpoint(store, final, local)
            logger.info("Downloaded the final model to %s", local)
        if (local / "metrics.json").is_file():
            shutil.copyfile(local / "metrics.json", cfg.run_dir / "metrics.json")
        export_to_model_dir(local / "export")
    return {"run": run, "finished": True, "step": final.step}


def _ending(early_stopping) -> dict[str, Any]:
    """How training ended, for metrics.json and the final manifest (`checkpoints.callback.plan_resume` reads it)."""
    if not stopped_early(early_stopping):
        return {"stopped_early": False}
    return {"stopped_early": True, "evaluations_without_improvement": early_stopping.early_stopping_patience_counter}


def _finish(cfg: Config, store, sync, trainer, tasks: list[TaskData], tokenizer, train_result, work: Path,
            ending: dict[str, Any]) -> dict[str, Any]:
    """Save the final (or best) model, evaluate, export, commit it as `<run>/final`, and put the
    committed copy at OUTPUT_DIR/<run>/final. It is built in the scratch folder, so a crash at
    any point leaves the committed final model, if any, as it was. `ending`: how training ended
    (`_ending`), recorded in metrics.json and the final manifest."""
    from .checkpoints import commits

    run = cfg.resolved_run_name
    if not sync.finish():  # the last checkpoint first: a crash from here on resumes at the end of training
        failed = ", ".join(f"checkpoint-{s}" for s, _ in (sync.committer.failed if sync.committer else []))
        raise CheckpointError(f"checkpoints were not committed to {store.uri()}: {failed}; see the log above")
    building = work / "final"
    shutil.rmtree(building, ignore_errors=True)
    trainer.save_model(str(building))  # the final (or best, with LOAD_BEST_MODEL_AT_END) model
    model = trainer.accelerator.unwrap_model(trainer.model)
    bad = _non_finite_parameters(model)
    if bad:
        raise NonFiniteLoss(f"the final weights are not finite ({bad[0]} and {len(bad) - 1} more): nothing was committed "
                            "as the final model; lower LEARNING_RATE or use PRECISION=fp32")

    step = trainer.state.global_step
    if ending["stopped_early"]:
        logger.info("Early stopping: eval_%s did not improve for %d evaluations: training ended at step %d (best: step %s)",
                    MACRO_METRIC, ending["evaluations_without_improvement"], step, trainer.state.best_global_step)
    results: dict[str, Any] = {"run": run, "config_hash": cfg.hash(), "step": step, **ending, "train": train_result.metrics}
    if any(t.validation is not None for t in tasks):
        eval_metrics = trainer.evaluate()
        results["eval"] = eval_metrics
        results["chance"] = chance_report(tasks, eval_metrics, tokenizer)
    if not trainer.args.should_save:
        return results
    final_dir = cfg.run_dir / "final"
    if cfg.export_at_end:
        if trainer.is_fsdp_enabled:  # each rank holds a shard: export from the full weights rank 0 saved
            model = MultitaskModel.from_checkpoint(building)
        for i, task in enumerate(tasks):
            model.export(task.name, building / "export" / task.name, tokenizer, lora_export=cfg.lora_export)
            if i == 0:
                fault_injection.crash_point("mid_export", trainer.state.global_step)
        results["exported"] = {t.name: str(final_dir / "export" / t.name) for t in tasks}
        logger.info("Exported %d task models", len(tasks))
    write_metrics(building / "metrics.json", results)

    manifest = commits.commit_final(
        fault_injection.wraps_store(store, step, final=True), building, run, step,
        metadata={**_run_metadata(cfg), "step": step, **ending, "identity": sync.identity, "writer": sync.writer},
        before_manifest=sync.guard)
    logger.info("Final model committed to %s", store.uri(f"{run}/final"))
    if _local_path(store, f"{run}/final") == final_dir.absolute():
        shutil.rmtree(building, ignore_errors=True)  # the store is this folder: the commit put it in place
    else:
        commits.install_local(building, final_dir, manifest)
    write_metrics(cfg.run_dir / "metrics.json", results)
    export_to_model_dir(final_dir / "export")
    shutil.rmtree(work, ignore_errors=True)  # scratch: the run is committed
    return results


def _non_finite_parameters(model) -> list[str]:
    """The names of the parameters holding a NaN or an infinity, the same on every rank: under
    FSDP each rank checks its own shards (`to_local`) and the ranks agree on whether any is bad."""
    import torch

    bad = [name for name, p in model.named_parameters()
           if not bool((p.to_local() if hasattr(p, "to_local") else p).isfinite().all())]
    if hasattr(next(model.parameters()), "to_local") and torch.distributed.is_initialized():
        flag = torch.tensor([float(bool(bad))], device=next(model.parameters()).device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and not bad:
            bad = ["a shard on another rank"]
    return bad


def _local_path(store, key: str) -> Path | None:
    """Where `key` of a local store lives on this disk (None for a remote store)."""
    from .checkpoints.storage import LocalStore

    return (store.root / key).absolute() if isinstance(store, LocalStore) else None


def _run_metadata(cfg: Config) -> dict[str, Any]:
    import torch
    import transformers

    from . import __version__

    return {"config_hash": cfg.hash(), "model_name": cfg.model_name, "tasks": cfg.tasks,
            "versions": {"trainer": __version__, "transformers": transformers.__version__, "torch": torch.__version__}}


def write_metrics(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=float))
    tmp.replace(path)
    logger.info("Metrics written to %s", path)


# ------------------------------------------------------------------------------ saved models
def _committed_folders(run_dir: Path) -> list[Path]:
    """The run's local folders that carry a manifest: final, then checkpoints newest first (not yet verified)."""
    from .checkpoints.commits import MANIFEST_NAME

    def step(p: Path) -> int:
        tail = p.name.split("-")[-1]
        return int(tail) if tail.isdigit() else -1

    steps = sorted((p for p in run_dir.glob("checkpoint-*") if (p / MANIFEST_NAME).is_file()), key=step, reverse=True)
    return [p for p in (run_dir / "final", *steps) if (p / MANIFEST_NAME).is_file()]


def _runs_there(runs: list) -> str:
    if not runs:
        return "there is none"
    names = [r.name + ("" if r.committed else " (nothing committed)") for r in runs[:6]]
    return "runs there: " + ", ".join(names) + (f" and {len(runs) - 6} more" if len(runs) > 6 else "")


def find_run(cfg: Config, store, where: str, setting: str, elsewhere: str = "") -> str:
    """The run a command reads from `store` (OUTPUT_DIR's runs, or CHECKPOINT_URI's for `pull`):
    RUN_NAME when set; else the default name (from MODEL_NAME and TASKS) when the store has a run
    of that name; else the run committed last, which the log names with the others there. So
    `train --tasks=a,b` then `evaluate` finds that run without the flags. `setting` is where the
    runs are looked for, named in the fix; `elsewhere`, another way to the run, ends the fix.

    Raises:
        TaskError: RUN_NAME names no run there, or RUN_NAME is not set and nothing there is
            committed; the line lists the runs there and the fix.
        StorageError: the store cannot be listed.
    """
    from .checkpoints.commits import list_runs

    def has_run(name: str) -> bool:  # one run's objects, not the whole store's
        return bool(store.list(f"{name}/", checksums=False))

    if cfg.run_name:
        if has_run(cfg.run_name):
            return cfg.run_name
        raise TaskError(f"RUN_NAME={cfg.run_name!r}: no such run in {where} ({_runs_there(list_runs(store))}); "
                        f"set RUN_NAME to one of them (unset: the run committed last), or {setting} to where the run is"
                        f"{elsewhere}")
    default = cfg.resolved_run_name
    if has_run(default):
        return default
    runs = list_runs(store)
    committed = [r for r in runs if r.committed is not None]
    if not committed:
        raise TaskError(f"no committed run in {where} ({_runs_there(runs)}): train one first "
                        f"(`multitask-trainer train`), or set {setting} to where your runs are{elsewhere}")
    chosen, others = committed[0], committed[1:]
    when = chosen.committed.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    also = (f"; also there: {', '.join(r.name for r in others[:6])}{' and more' if len(others) > 6 else ''} "
            "(set RUN_NAME to use another)") if others else ""
    logger.info("RUN_NAME is not set and %s has no run %s (the name from MODEL_NAME and TASKS): using run %s, "
                "committed last (%s)%s", where, default, chosen.name, when, also)
    return chosen.name


def find_checkpoint(cfg: Config, checkpoint: str | None, run_dir: Path | None = None) -> Path:
    """The committed model folder to use: `checkpoint`, else the final model of the run in
    `run_dir` (default: RUN_NAME's folder), else its newest committed checkpoint. Only a folder
    whose MANIFEST.json lists every file with its size and checksum counts: a folder a crash or
    a full disk left half-written is refused.

    Raises:
        TaskError: the folder is not a committed model, or nothing committed is found (with the
            committed folders there are, and how to pull one).
    """
    from .checkpoints.commits import verify_local

    run_dir = cfg.run_dir if run_dir is None else run_dir

    def alternatives(exclude: Path | None = None) -> str:
        found = [str(p) for p in _committed_folders(run_dir) if exclude is None or p.resolve() != exclude.resolve()]
        listed = f"committed here: {', '.join(found[:4])}" if found else f"nothing committed in {run_dir}"
        return f"{listed}; or `python -m trainer pull` one from CHECKPOINT_URI"

    if checkpoint:
        path = Path(checkpoint)
        try:
            verify_local(path)
        except StorageError as e:
            raise TaskError(f"--checkpoint={checkpoint!r} is not a committed model ({e}); {alternatives(path)}") from None
        if not (path / MULTITASK_FILE).is_file():
            raise TaskError(f"--checkpoint={checkpoint!r} is not a multitask model folder ({MULTITASK_FILE} missing); "
                            f"{alternatives(path)}")
        return path
    problems = []
    for path in _committed_folders(run_dir):
        try:
            verify_local(path)
        except StorageError as e:
            problems.append(str(e))
            continue
        if (path / MULTITASK_FILE).is_file():
            return path
    if problems:
        raise TaskError(f"no intact committed model in {run_dir}: {problems[0]}; "
                        "`python -m trainer pull` one from CHECKPOINT_URI")
    leftovers = [p.name for p in (run_dir / "final", *run_dir.glob("checkpoint-*")) if p.is_dir()]
    hint = f" ({', '.join(leftovers)} never committed)" if leftovers else ""
    raise TaskError(f"no committed model in {run_dir}{hint}: train first, pass --checkpoint=PATH, or "
                    "`python -m trainer pull` one from CHECKPOINT_URI")


def _trainer_for(cfg: Config, model: MultitaskModel, tasks: list[TaskData], tokenizer, where: Path) -> MultitaskTrainer:
    """A Trainer for evaluation/prediction only; it works in the model's folder (creates nothing new)."""
    args = build_training_args(cfg, precision=resolve_precision(cfg.precision), shard=False)
    args.output_dir = str(where)
    return MultitaskTrainer(model=model, args=args, tasks=tasks, cfg=cfg, processing_class=tokenizer, train_dataset=None)


def _as_trained(cfg: Config, folder: Path) -> Config:
    """`cfg` with the run's own MAX_SEQ_LENGTH (from the folder's manifest) when no source set one,
    so that inputs are truncated as in training: the demo's model, for one, takes 64 tokens, fewer
    than the default 128."""
    from .checkpoints.commits import read_local_manifest

    if cfg.is_set("max_seq_length"):
        return cfg
    identity = read_local_manifest(folder).metadata.get("identity")
    saved = str(identity.get("settings", {}).get("MAX_SEQ_LENGTH", "")) if isinstance(identity, dict) else ""
    if not saved.isdigit() or int(saved) == cfg.max_seq_length:
        return cfg
    logger.info("MAX_SEQ_LENGTH=%s, as the run was trained (set MAX_SEQ_LENGTH for another)", saved)
    return dataclasses.replace(cfg, max_seq_length=int(saved))


def _load_saved(cfg: Config, checkpoint: str | None):
    """The committed model folder a command reads (`checkpoint`, else the run's: see `find_run`
    and `find_checkpoint`), its model and tokenizer, and `cfg` as the run was trained (`_as_trained`).

    Raises:
        TaskError: no such run or no committed model in it (see `find_run`, `find_checkpoint`).
    """
    from transformers import AutoTokenizer

    from .checkpoints.storage import LocalStore

    run_dir = None
    if not checkpoint:
        run = find_run(cfg, LocalStore(cfg.output_dir, setting="OUTPUT_DIR"), cfg.output_dir, "OUTPUT_DIR",
                       elsewhere=", pass --checkpoint=PATH, or `python -m trainer pull` one from CHECKPOINT_URI")
        run_dir = Path(cfg.output_dir) / run
    path = find_checkpoint(cfg, checkpoint, run_dir)
    model = MultitaskModel.from_checkpoint(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return path, model, tokenizer, _as_trained(cfg, path)


def evaluate(cfg: Config, checkpoint: str | None = None) -> dict[str, Any]:
    """Evaluate a saved multitask model on every task's validation split, read from the files
    or Hub datasets its task declarations (saved with it) name.

    Raises:
        TaskError: no committed model to read (see `_load_saved`), or its validation data is
            missing or bad.
        ConfigError: MAX_SEQ_LENGTH is longer than the model takes.
    """
    setup_logging()
    path, model, tokenizer, cfg = _load_saved(cfg, checkpoint)
    specs = list(model.specs.values())
    check_max_length(cfg, specs, tokenizer, model.config, model_name=str(path))
    specs, raw = prepare_tasks(cfg, specs, need_train=False)
    tasks = tokenize_tasks(cfg, specs, raw, tokenizer)
    metrics = _trainer_for(cfg, model, tasks, tokenizer, path).evaluate()
    chance_report(tasks, metrics, tokenizer)
    logger.info("%s: %s = %.6f", path, MACRO_METRIC, metrics.get(f"eval_{MACRO_METRIC}", float("nan")))
    return metrics


def export(cfg: Config, checkpoint: str | None = None, output: str | None = None, task: str | None = None) -> dict[str, str]:
    """Export tasks of a saved multitask model as standalone Hugging Face models.

    Raises:
        TaskError: no committed model to read (see `_load_saved`), or --task is not in it.
    """
    setup_logging()
    path, model, tokenizer, _ = _load_saved(cfg, checkpoint)
    names = [task] if task else list(model.specs)
    unknown = [n for n in names if n not in model.specs]
    if unknown:
        raise TaskError(f"--task={unknown[0]!r} is not in this model; it has {', '.join(model.specs)}")
    # Not inside the committed folder: files added there would not be in its manifest, and a
    # prune of a committed checkpoint deletes its whole folder.
    out_dir = Path(output) if output else path.parent / f"{path.name}-export"
    # LORA_EXPORT as trained, unless set for this export.
    lora_export = cfg.lora_export if cfg.is_set("lora_export") else None
    done = {n: str(model.export(n, out_dir / n, tokenizer, lora_export=lora_export)) for n in names}
    for name, where in done.items():
        logger.info("Exported %s to %s", name, where)
    return done


def _read_inputs(path: Path, spec: TaskSpec):
    """The inputs file as a dataset, checked as `train` checks a task's data files. It is read
    with its suffix's defaults (a header line in a .csv or .tsv, UTF-8, commas or tabs) and, where
    that gives no task's input columns and the task declares other reader options (`header:
    false` with `column_names`, a delimiter, an encoding…), as the task's own files are read: a
    file in the training files' layout (CoLA's headerless TSV) and one written for `predict`
    (a header line naming the columns) both work.

    Raises:
        TaskError: the file is missing, of another type, not UTF-8, malformed or empty (see
            `data.load_file`); it lacks an input column of the task (or a dotted one does not lead
            to a value: see `data.add_path_columns`), or a row has no value in one.
    """
    where = f"--input={str(path)!r}"
    if not path.is_file():
        raise TaskError(f"{where} " + ("is a folder; give a .jsonl, .json, .csv or .tsv file" if path.is_dir() else "does not exist"))
    if path.suffix.lower() not in TEXT_SUFFIXES:
        raise TaskError(f"{where}: use a .jsonl, .json, .csv or .tsv file")
    needed = input_columns(spec)
    as_trained = (f"name the input columns as in the task's data ({', '.join(c for _, c in needed)}) or by their roles "
                  f"({', '.join(r for r, _ in needed)})")
    empty = "it has no rows; give it one input per row (after a header line in a .csv or .tsv)"

    def read(reader: ReaderOptions):
        ds = load_file(path, "test", where=where, empty=empty, reader=reader)
        # A column named by its role stands for the declared one: SQuAD's context is declared as
        # `paragraphs.context` (`records`), and a file of questions to answer holds a plain `context`.
        for role, col in needed:
            if col not in ds.column_names and col.split(".")[0] not in ds.column_names and role in ds.column_names:
                ds = ds.rename_column(role, col)
        return ds

    def has_inputs(ds) -> bool:
        return all(col in ds.column_names or col.split(".")[0] in ds.column_names for _, col in needed)

    reader, as_task = ReaderOptions.for_file(path), ReaderOptions.for_file(path, spec)
    try:
        ds, problem = read(reader), None
    except TaskError as e:
        ds, problem = None, e
    if (ds is None or not has_inputs(ds)) and as_task != reader:
        try:
            in_layout = read(as_task)
        except TaskError:
            in_layout = None
        if in_layout is not None and has_inputs(in_layout):
            ds, reader = in_layout, as_task
    if ds is None:
        raise problem

    def at(row: int) -> str:
        line = source_line(path, row, reader)
        place = None if line else record_place(path, row, reader)
        return f"{where}, " + (f"line {line}" if line else f"row {row + 1}" + (f" ({place})" if place else ""))

    # Inputs in the task's own format reach its dotted columns (CommonsenseQA's question.stem) too.
    ds = add_path_columns(ds, needed, where=where, row_at=at, fix=as_trained)
    for role, col in needed:
        if col not in ds.column_names:
            raise TaskError(f"{where}: no column {col!r} (role {role!r}) for task {spec.name!r}; it has "
                            f"{', '.join(ds.column_names)}; {as_trained}")
    missing = missing_input(spec, ds)
    if missing is not None:
        row, col, role = missing
        raise TaskError(f"{at(row)}: no value in column {col!r} (role {role!r}); fill it in or remove the row")
    return ds


def _with_placeholder_labels(spec: TaskSpec, ds):
    """Inputs have no labels: add placeholder ones so batching is the same as in training."""
    labels = [spec.columns[role] for role in spec.task_type.label_columns if spec.columns.get(role) in ds.column_names]
    if labels:
        ds = ds.remove_columns(labels)
    return spec.task_type.placeholder_labels(spec, ds)


def predict(cfg: Config, task: str, input: str, output: str | None = None, checkpoint: str | None = None) -> Path:
    """Predict `task` on a jsonl/json/csv/tsv of inputs; writes one JSON line per input, atomically.

    Raises:
        TaskError: a bad --input (see `_read_inputs`), --output or --task, or no committed model to
            read (see `_load_saved`), before predicting.
        ConfigError: MAX_SEQ_LENGTH is longer than the model takes.
    """
    from .data import check_columns

    setup_logging()
    out_path = _output_path(Path(input), output, task)
    path, model, tokenizer, cfg = _load_saved(cfg, checkpoint)
    if task not in model.specs:
        raise TaskError(f"--task={task!r} is not in this model; it has {', '.join(model.specs)}")
    spec = model.specs[task]
    check_max_length(cfg, [spec], tokenizer, model.config, model_name=str(path))
    ds = _with_placeholder_labels(spec, _read_inputs(Path(input), spec))
    generates = spec.task_type.generates  # inputs are prompts: no labels to place, none to encode
    if not generates:
        check_columns(spec, "input", ds)
    tokenized = tokenize(spec, ds, tokenizer, spec.max_length or cfg.max_seq_length, with_labels=not generates)
    data = TaskData(spec, None, tokenized, make_collator(spec, tokenizer, stage="predict"))
    rows = _trainer_for(cfg, model, [data], tokenizer, path).predict_rows(data, tokenized)
    rows = spec.task_type.name_predictions(spec, rows, ds)
    _write_jsonl(out_path, rows)
    logger.info("Wrote %d predictions to %s", len(rows), out_path)
    return out_path


def _output_path(input: Path, output: str | None, task: str) -> Path:
    """Where `predict` writes: --output, else beside the input; checked before any work.

    Raises:
        TaskError: --output is a folder, is the input file, or lies in a path whose folder is a file.
    """
    if not output:
        return input.with_suffix(f".{task}.predictions.jsonl")
    out = Path(output)
    if out.is_dir():
        raise TaskError(f"--output={output!r} is a folder; give a file path, e.g. {out / 'predictions.jsonl'}")
    if out.resolve() == input.resolve() or (out.exists() and input.exists() and out.samefile(input)):
        raise TaskError(f"--output={output!r} is the input file; write the predictions to another file")
    folder = next((p for p in out.parents if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise TaskError(f"--output={output!r}: {folder} is a file, not a folder; choose another path")
    return out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write one JSON line per row atomically: a temporary file in the same folder, then a rename,
    so a crash leaves the previous file (or none), never a half-written one."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------ the bucket
def create_bucket(cfg: Config) -> bool:
    """Create CHECKPOINT_URI's bucket in REGION with uniform access, unless it exists.

    Raises:
        ConfigError: CHECKPOINT_URI is not a gs:// URI.
        StorageError: no permission, or the name is taken.
    """
    from .checkpoints.storage import GcsStore
    from .config import ConfigError

    store = open_checkpoint_store(cfg, check=False)
    if not isinstance(store, GcsStore):
        raise ConfigError(f"CHECKPOINT_URI={cfg.checkpoint_uri!r} is not a gs:// URI: set CHECKPOINT_URI=gs://BUCKET/PREFIX in .env")
    created = store.create_bucket(location=cfg.region, project=cfg.project_id)
    print(f"{'created' if created else 'already exists:'} gs://{store.bucket_name}" + (f" in {cfg.region}" if created else ""))
    return created


def _macro(manifest) -> float | None:
    """The macro average of the evaluation made at the manifest's own step, if any."""
    metrics = manifest.metadata.get("metrics") or {}
    value = metrics.get(f"eval_{MACRO_METRIC}")
    if value is None or (metrics.get("step") is not None and metrics.get("step") != manifest.step):
        return None
    return float(value)


def best_checkpoint(committed: list) -> Any:
    """The committed checkpoint whose own evaluation has the highest macro average (the earliest
    on a tie, as the Trainer keeps its first best), or None."""
    scored = [m for m in committed if _macro(m) is not None]
    return max(scored, key=lambda m: (_macro(m), -m.step)) if scored else None


def pull(cfg: Config, which: str = "latest", task: str | None = None, dest: str | None = None,
         list_only: bool = False) -> Path | None:
    """List a run's committed checkpoints, or download one, verifying every checksum.

    `which`: latest | best (highest macro average of a checkpoint's own evaluation) | final (the
    finished model and its exports) | a step number. With `task`, only that task's exported model
    (from the final model), ready for `from_pretrained`. The files go into `dest` (default
    pulled/RUN/NAME) with a MANIFEST.json listing them, written last; nothing else in `dest` is
    deleted or changed.

    Raises:
        TaskError: no such run in the store (see `find_run`), nothing matches `which`/`task`, or
            `dest` cannot take the files.
        StorageError: CorruptObjectError for a changed object, UnsafeObjectName for a bad name.
    """
    from .checkpoints import commits as cs

    setup_logging()
    store = open_checkpoint_store(cfg, check=False)
    run = find_run(cfg, store, store.uri(), "CHECKPOINT_URI")
    committed = cs.list_checkpoints(store, run)
    final = cs.read_final(store, run)
    if list_only:
        incomplete = cs.list_incomplete(store, run)
        best = best_checkpoint(committed)
        print(f"{store.uri(run)}:")
        print(f"  {'checkpoint':<18} {'step':>8}  {'created (UTC)':<26} {MACRO_METRIC:>10}")
        for m in [*committed, *([final] if final else [])]:
            macro = _macro(m)
            name = m.prefix.rsplit("/", 1)[-1]
            mark = "  best" if best is not None and m is best else ""
            print(f"  {name:<18} {m.step:>8}  {m.created:<26} {'' if macro is None else f'{macro:.4f}':>10}{mark}")
        for step in incomplete:
            print(f"  checkpoint-{step:<7} {step:>8}  (incomplete: no manifest, never resumed)")
        return None
    if task is not None and which == "latest":
        which = "final"
    if which == "final":
        manifest = final
    elif which == "latest":
        manifest = committed[-1] if committed else None
    elif which == "best":
        manifest = best_checkpoint(committed)
    elif which.removeprefix("checkpoint-").isdigit():
        step = int(which.removeprefix("checkpoint-"))
        manifest = next((m for m in committed if m.step == step), None)
    else:
        raise TaskError(f"--which={which!r} is not valid: use latest, best, final or a step number")
    if manifest is None:
        steps = ", ".join(str(m.step) for m in committed) or "none"
        raise TaskError(f"no committed checkpoint '{which}' for run {run} in {store.uri()} (committed steps: {steps}; "
                        f"final: {'yes' if final else 'no'}): run `python -m trainer pull --list`")
    name = manifest.prefix.rsplit("/", 1)[-1]
    target = Path(dest) if dest else Path("pulled") / run / (f"{name}-{task}" if task else name)
    only = None
    if task is not None:
        only = f"export/{task}/"
        if not any(f.path.startswith(only) for f in manifest.files):
            tasks = sorted({f.path.split("/")[1] for f in manifest.files if f.path.startswith("export/")})
            raise TaskError(f"--task={task!r} has no exported model in {store.uri(manifest.prefix)}; "
                            f"exported: {', '.join(tasks) or 'none'}")
    try:
        cs.download_checkpoint(store, manifest, target, only=only, strip=task is not None, merge=True)
    except ValueError as e:
        raise TaskError(f"--dest={str(target)!r}: {e}") from None
    logger.info("Pulled %s (verified) to %s", store.uri(manifest.prefix), target)
    return target

"""The Hugging Face `Trainer`, extended only where several tasks need it.

`MultitaskTrainer` overrides the training data loader (one task per batch, from
`MultitaskBatchSampler`), the training step and log (each task's loss times its `loss_weight`;
each task's own loss beside the mean one) and
the FLOP count (the encoder and the batch's head), evaluation (each task on its own data and
metrics, with a progress bar of its own, plus their macro average) and saving (the checkpoint
describes its tasks). The training loop, optimizer, schedulers, mixed precision, the log's
destinations, checkpoint rotation and resumption are `Trainer`'s own.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import has_length, speed_metrics

from ..config import Config, ConfigError
from ..data import MultitaskCollator, MultitaskDataset, TaskData, example_lengths
from ..tasks import TaskError, TaskSpec
from .sampling import MultitaskBatchSampler

logger = logging.getLogger(__name__)

MACRO_METRIC = "macro_avg"


BF16_COMPUTE_CAPABILITY = (8, 0)  # Ampere: bf16 in hardware; older GPUs emulate it, slower than fp32


def resolve_precision(precision: str) -> str:
    """`auto` → bf16 on a CUDA GPU of compute capability 8.0 or more, fp16 on an older one, else fp32.

    `torch.cuda.is_bf16_supported()` also says yes on GPUs that only emulate bf16 (a T4 is 7.5),
    so the capability decides.

    Raises:
        ConfigError: fp16 requested without a CUDA GPU.
    """
    cuda = torch.cuda.is_available()
    if precision == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if tuple(torch.cuda.get_device_capability()) >= BF16_COMPUTE_CAPABILITY else "fp16"
    if precision == "fp16" and not cuda:
        raise ConfigError("PRECISION='fp16' is not valid: fp16 needs a CUDA GPU; use bf16 or fp32 on this machine")
    return precision


def check_fsdp(cfg: Config, specs: list[TaskSpec], *, environ=None, cuda: bool | None = None) -> None:
    """Refuse FSDP where the Trainer cannot shard, before anything is loaded: on one process (the
    world size is torchrun's WORLD_SIZE, which the Trainer reads too), without CUDA GPUs (accelerate
    sets FSDP up for GPU jobs only: on CPU it ignores the FSDP plugin and would train unsharded), and
    with a task that generates text (generation calls the head's `generate` outside the sharded
    model's forward, on weights FSDP keeps sharded). `cuda`: None asks torch.

    Raises:
        ConfigError: one line naming FSDP, why, and the fix.
    """
    import os

    if cfg.fsdp == "false":
        return
    environ = os.environ if environ is None else environ
    world = environ.get("WORLD_SIZE", "1").strip() or "1"
    if not world.isdigit() or int(world) < 2:
        raise ConfigError(f"FSDP={cfg.fsdp!r} is not valid: this job is one process (WORLD_SIZE={world}), with nothing to "
                          "shard over; run it on several GPUs (on a node with several, `python -m trainer train` starts "
                          "torchrun itself; on Vertex AI set ACCELERATOR_COUNT or REPLICA_COUNT > 1), or set FSDP=false")
    if not (torch.cuda.is_available() if cuda is None else cuda):
        raise ConfigError(f"FSDP={cfg.fsdp!r} is not valid: FSDP needs CUDA GPUs (accelerate shards only GPU jobs; on CPU "
                          "it ignores FSDP and would train every weight on every process); set FSDP=false on CPU")
    for spec in specs:
        if spec.task_type.generates:
            raise ConfigError(f"FSDP={cfg.fsdp!r} is not valid with task {spec.name!r} (type {spec.type}): generation runs "
                              "the head outside the sharded model's forward, on sharded weights; set FSDP=false or drop the task")


def check_task_mixing(cfg: Config, specs: list[TaskSpec], train_sizes: list[int]) -> None:
    """Check, from the train splits' sizes alone, that SAMPLING gives every task steps.

    Builds the batch sampler `MultitaskTrainer` will build (on one process), which checks
    itself; called before any model is built so that the message can name the task.

    Raises:
        ConfigError: a tiny SAMPLING_TEMPERATURE or task weight leaves a task without a step.
    """
    MultitaskBatchSampler(
        sizes=train_sizes,
        batch_sizes=[s.batch_size or cfg.train_batch_size for s in specs],
        strategy=cfg.sampling,
        temperature=cfg.sampling_temperature,
        cap=cfg.sampling_cap,
        weights=[cfg.task_weights.get(s.name, 1.0) for s in specs],
        names=[s.name for s in specs],
    )


def sampling_plan(tasks: list[TaskData], sampler: MultitaskBatchSampler, gradient_accumulation_steps: int) -> str:
    """The table `train` logs before training: the strategy and its settings, the epoch, and per
    task its type, split sizes, batch size, batches of an epoch, their share and the passes over the
    task's data they make; from `sampler.describe()`, so it is what the sampler yields."""
    plan = sampler.describe()
    settings = plan["settings"]
    if plan["strategy"] == "temperature":
        knobs = f" (SAMPLING_TEMPERATURE={settings['temperature']:g}, SAMPLING_CAP={'none' if settings['cap'] is None else settings['cap']})"
    elif plan["strategy"] == "weights":
        knobs = " (TASK_WEIGHTS=" + ",".join(f"{t.name}={w:g}" for t, w in zip(tasks, settings["weights"])) + ")"
    else:
        knobs = ""
    steps = plan["steps"]
    optimizer_steps = steps // gradient_accumulation_steps + int(steps % gradient_accumulation_steps > 0)  # as the Trainer counts
    processes = sampler.num_replicas
    lines = [f"Sampling plan: SAMPLING={plan['strategy']}{knobs}; an epoch is {steps} batches on each of {processes} "
             f"process{'es' if processes > 1 else ''}, {optimizer_steps} optimizer steps",
             f"{'task':<24} {'type':<20} {'train':>7} {'validation':>10} {'batch':>5} {'batches/epoch':>13} "
             f"{'share':>6} {'passes/epoch':>12}"]
    for task, row in zip(tasks, plan["tasks"]):
        validation = len(task.validation) if task.validation is not None else "-"
        lines.append(f"{task.name:<24} {task.spec.type:<20} {row['examples']:>7} {validation:>10} {row['batch_size']:>5} "
                     f"{row['steps']:>13} {100 * row['share']:>5.1f}% {row['passes']:>12.2f}")
    notes = [task.spec.task_type.split_size_note(task.spec, task.train, task.validation) for task in tasks]
    return "\n".join(lines + [note for note in notes if note])


def build_training_args(cfg: Config, *, precision: str, report_to: list[str] | None = None,
                        shard: bool = True) -> TrainingArguments:
    """`TrainingArguments` from the config; one place maps our settings to the Trainer's.

    `report_to`: the Trainer integrations to log to (`trackers.setup`); none when not given.
    `shard`: False leaves FSDP off whatever FSDP says (evaluating or predicting with a saved
    model, which loads whole on every process).

    The Trainer works in the run's scratch folder (`Config.work_dir`) and keeps one
    checkpoint there (and the best): the committed checkpoints, SAVE_TOTAL_LIMIT of them and the
    best, live in the checkpoint store (`checkpoints.callback.CheckpointSync` prunes it).
    """
    fsdp = shard and cfg.fsdp != "false"
    return TrainingArguments(
        output_dir=str(cfg.work_dir),
        run_name=cfg.resolved_run_name,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.train_batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler,
        max_grad_norm=cfg.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        eval_strategy=cfg.eval_strategy,
        eval_steps=cfg.eval_steps,
        save_strategy=cfg.save_strategy,
        save_steps=cfg.save_steps,
        save_total_limit=1,
        load_best_model_at_end=cfg.load_best_model_at_end,
        metric_for_best_model=MACRO_METRIC,
        greater_is_better=True,
        dataloader_num_workers=cfg.dataloader_num_workers,
        report_to=list(report_to or []),
        remove_unused_columns=False,  # batches carry `task`; the collators keep only model inputs
        label_names=["labels"],
        ddp_find_unused_parameters=True,  # each step uses one head; the others get no gradient
        # `MultitaskModel.activation_checkpointing_enable` checkpoints the shared backbone
        # (non-reentrant: it works with the unused-parameter search above). Under FSDP, FSDP's own
        # instead (`fsdp_config`): the Trainer refuses both, and its own gathers each layer twice.
        activation_checkpointing=cfg.activation_checkpointing and not fsdp,
        fsdp=fsdp or None,
        fsdp_config=fsdp_config(cfg) if fsdp else None,
        # Without a GPU, torchrun processes only join one job (gloo) when asked to run on the CPU.
        use_cpu=not torch.cuda.is_available(),
    )


def fsdp_config(cfg: Config) -> dict:
    """The Trainer's `fsdp_config` for FSDP=full_shard|shard_grad_op (`check_fsdp` says where it runs).

    FSDP2 (`fully_shard`): every parameter is its own sharded tensor, so a step that runs one
    task's head and leaves the others without gradients reduces just the gradients it has (FSDP1
    needed `use_orig_params` for that); all ranks train the same task at each step, so they agree
    on which. Each of the backbone's transformer layers is its own FSDP unit: accelerate's
    transformer-based wrap takes the classes of the model's `_no_split_modules`, which
    `MultitaskModel` takes from the backbone (BertLayer, LlamaDecoderLayer…). The rest (embeddings
    and heads) is the root unit. Saves gather the full state dict on rank 0, so checkpoints and
    exports keep their format.
    """
    return {
        "version": 2,
        "reshard_after_forward": cfg.fsdp == "full_shard",
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "state_dict_type": "FULL_STATE_DICT",
        "cpu_offload": cfg.fsdp_offload,
        "activation_checkpointing": cfg.activation_checkpointing,
    }


class TaskProgressCallback(ProgressCallback):
    """The `Trainer`'s progress bars, with one evaluation bar per task: named by its loader's
    `description` (`Evaluation <task>`) and counting to that task's number of batches.

    The `Trainer`'s own callback makes one bar for the first loader of an evaluation, with that
    loader's length, and closes it only when the whole evaluation ends: every later task's batches
    ran past its total, which tqdm then shows as a bare count (`113it`).
    """

    def __init__(self, max_str_len: int = 100):
        super().__init__(max_str_len)
        self._bar_loader = None

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not state.is_world_process_zero or not has_length(eval_dataloader):
            return
        if self.prediction_bar is not None and self._bar_loader is not eval_dataloader:
            self._close_bar()
        if self.prediction_bar is None:
            self._bar_loader = eval_dataloader
            self.prediction_bar = tqdm(total=len(eval_dataloader), desc=getattr(eval_dataloader, "description", None),
                                       leave=self.training_bar is None, dynamic_ncols=True)
        self.prediction_bar.update(1)
        if self.prediction_bar.n >= self.prediction_bar.total:
            self._close_bar()  # the task is done; `predict` never reaches `on_predict`, which closes it

    def _close_bar(self) -> None:
        self.prediction_bar.close()
        self.prediction_bar, self._bar_loader = None, None
def add_early_stopping(trainer: Trainer, cfg: Config, resumed: Path | None) -> EarlyStoppingCallback | None:
    """Add the Trainer's own `EarlyStoppingCallback` when EARLY_STOPPING_PATIENCE is set (else
    nothing), counting on from the evaluations without improvement that the resumed checkpoint
    recorded, and return it.

    The Trainer saves that count in `trainer_state.json` (`stateful_callbacks`) but restores
    callbacks only with `restore_callback_states_from_checkpoint`, which would also bring back the
    checkpoint's patience and threshold: here the count is restored and the settings are this
    job's, so EARLY_STOPPING_PATIENCE may change on resume. When the count already reaches the
    patience, early stopping ended the training at that checkpoint (the job was stopped before it
    committed the final model): the Trainer then trains no further step (its max_steps becomes
    that step) and goes straight to its end, which loads the best model.
    """
    if cfg.early_stopping_patience is None:
        return None
    callback = EarlyStoppingCallback(cfg.early_stopping_patience, cfg.early_stopping_threshold)
    if resumed is not None:
        state = json.loads((resumed / "trainer_state.json").read_text())
        saved = (state.get("stateful_callbacks") or {}).get(type(callback).__name__) or {}
        callback.early_stopping_patience_counter = int(saved.get("attributes", {}).get("early_stopping_patience_counter", 0))
        if stopped_early(callback):
            trainer.args.max_steps = int(state["global_step"])
    trainer.add_callback(callback)
    return callback


def stopped_early(callback: EarlyStoppingCallback | None) -> bool:
    """Whether early stopping ended the training: its count of evaluations without improvement reached the patience."""
    return callback is not None and callback.early_stopping_patience_counter >= callback.early_stopping_patience


class EpochAwareLoader(DataLoader):
    """A DataLoader whose `set_epoch` reaches the multitask batch sampler.

    It is not passed through `accelerator.prepare`: accelerate would re-shard our batches across
    ranks (each rank a different batch, so a different task); the sampler shards by rank itself.
    """

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


class NonFiniteLoss(TaskError):
    """A training step's loss is NaN or infinite: stepping the optimizer would make every weight NaN.
    (A `TaskError`: its cause is nearly always the data or the learning rate; exit code 2.)"""


class MultitaskTrainer(Trainer):
    """`Trainer` for a `MultitaskModel` over several `TaskData`."""

    def __init__(self, *args, tasks: list[TaskData], cfg: Config, **kwargs):
        self.tasks = tasks
        self.cfg = cfg
        train_sets = [t.train for t in tasks if t.train is not None]
        kwargs.setdefault("train_dataset", MultitaskDataset(train_sets) if len(train_sets) == len(tasks) else None)
        # Trainer only checks that evaluation has data; `evaluate` below reads `self.tasks`.
        kwargs.setdefault("eval_dataset", {t.name: t.validation for t in tasks if t.validation is not None} or None)
        super().__init__(*args, **kwargs)
        # Heads compute their own mean loss; never let Trainer rescale by a token count.
        self.model_accepts_loss_kwargs = False
        # Each task's training loss since the last log: sums of the steps' losses, on the device
        # (adding to them syncs nothing), and on the host the optimizer steps they stand for (the
        # same on every rank: all ranks train the same task at each step). Reduced in `log`.
        self._task_index = {t.name: i for i, t in enumerate(tasks)}
        self._task_loss_sums: torch.Tensor | None = None
        self._task_loss_steps = [0.0] * len(tasks)
        self._loss_weight = 1.0  # the running training step's task's loss_weight (`compute_loss`)
        callbacks = self.callback_handler.callbacks
        for i, callback in enumerate(callbacks):
            if type(callback) is ProgressCallback:  # in its place: the order of callbacks is kept
                callbacks[i] = TaskProgressCallback()

    # ---------------------------------------------------------------- training data
    def make_batch_sampler(self) -> MultitaskBatchSampler:
        cfg, args = self.cfg, self.args
        return MultitaskBatchSampler(
            sizes=[len(t.train) for t in self.tasks],
            batch_sizes=[t.spec.batch_size or cfg.train_batch_size for t in self.tasks],
            strategy=cfg.sampling,
            temperature=cfg.sampling_temperature,
            cap=cfg.sampling_cap,
            weights=[cfg.task_weights.get(t.name, 1.0) for t in self.tasks],
            seed=args.data_seed if args.data_seed is not None else args.seed,
            num_replicas=args.world_size,
            rank=args.process_index,
            lengths=self.train_lengths() if cfg.group_by_length else None,
            group_by_length=cfg.group_by_length,
            drop_last=args.dataloader_drop_last,
            limit=self._epoch_batch_limit,
        )

    def train_lengths(self) -> list:
        """Token count of every training example, per task (read once: a pass over the data)."""
        if getattr(self, "_train_lengths", None) is None:
            self._train_lengths = [example_lengths(t.train) for t in self.tasks]
        return self._train_lengths

    def _epoch_batch_limit(self, epoch: int, batches: int) -> int | None:
        """Batches of `epoch` (of `batches` per epoch) up to the run's last step; None: all of them.

        The Trainer checks for its last step only after running a step, so a resume from a
        checkpoint of the last step in mid-epoch would train one step too many; a data loader
        that ends there leaves it nothing to train."""
        max_steps, accumulation = self.state.max_steps, self.args.gradient_accumulation_steps
        if not max_steps:
            return None
        per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)  # as the Trainer counts
        left = max_steps - epoch * per_epoch
        return None if left >= per_epoch else max(0, left * accumulation)

    def planned_steps(self) -> int:
        """Optimizer steps this run trains in all (from MAX_STEPS, or the epochs and the data)."""
        return int(self.set_initial_training_values(self.args, self.get_train_dataloader())[-1])

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step on the batch's task's loss times its `loss_weight` (what the optimizer
        minimises and `loss` logs), refusing a non-finite loss before the optimizer steps on it, and
        adding the task's own, unweighted loss to its `loss_<task>` (see `log`).

        Raises:
            NonFiniteLoss: on every rank when any rank's loss is NaN or infinite.
        """
        task = inputs.get("task")
        weight = self.tasks[self._task_index[task]].spec.loss_weight
        self._loss_weight = weight  # read by `compute_loss`: evaluation's losses stay unweighted
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._loss_weight = 1.0
        bad = ~torch.isfinite(loss.detach())
        if self.args.world_size > 1 and torch.distributed.is_initialized():
            flag = bad.float().reshape(1)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            bad = flag[0] > 0
        if bool(bad):
            raise NonFiniteLoss(
                f"task {task!r} gave a non-finite training loss ({float(loss):g}) at step {self.state.global_step + 1}: "
                "check its labels and inputs, lower LEARNING_RATE or MAX_GRAD_NORM, or use PRECISION=fp32")
        self._add_task_loss(task, loss / weight)  # each task's own loss: tasks of any weight compare
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The head's loss, times the task's `loss_weight` inside a training step only."""
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self._loss_weight == 1.0:
            return result
        if return_outputs:
            loss, outputs = result
            return loss * self._loss_weight, outputs
        return result * self._loss_weight

    def _add_task_loss(self, task: str, loss: torch.Tensor) -> None:
        # The Trainer logs sum(returned losses) / optimizer steps, and a returned loss is its batch's
        # mean loss divided by the batches of its optimizer step; each task's loss is then
        # sum(its returned losses) / sum(1 / batches of their steps): its batches' mean loss, and
        # the tasks' losses weighted by their steps (and loss_weights) average to the Trainer's.
        if self._task_loss_sums is None:
            self._task_loss_sums = torch.zeros(len(self.tasks), dtype=torch.float32, device=loss.device)
        i = self._task_index[task]
        self._task_loss_sums[i] += loss.detach()
        batches = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        self._task_loss_steps[i] += 1 / batches

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, with `loss_<task>` after a training log's `loss`: each task's mean
        training loss since the previous log, averaged over ranks like `loss`, for every task that
        trained in between. Every log consumer (console, TensorBoard and the other trackers, the
        log history) gets them in the same entry.

        A training log reduces the sums over ranks: the Trainer logs `loss` on every rank.
        """
        if "loss" in logs:
            task_losses, merged = self._task_losses(), {}
            for key, value in logs.items():
                merged[key] = value
                if key == "loss":
                    merged.update(task_losses)
            logs = merged
        elif "train_loss" in logs:  # the end of training: batches after the last log count in no later run
            self._reset_task_losses()
        super().log(logs, start_time)

    def _task_losses(self) -> dict[str, float]:
        if self._task_loss_sums is None:
            return {}
        sums = self._task_loss_sums
        if self.args.world_size > 1 and torch.distributed.is_initialized():
            sums = sums.clone()
            torch.distributed.all_reduce(sums)
            sums /= self.args.world_size
        values = sums.tolist()  # the one copy to the host, at logging time
        losses = {f"loss_{t.name}": values[i] / steps for i, (t, steps) in enumerate(zip(self.tasks, self._task_loss_steps))
                  if steps > 0}
        self._reset_task_losses()
        return losses

    def _reset_task_losses(self) -> None:
        if self._task_loss_sums is not None:
            self._task_loss_sums.zero_()
        self._task_loss_steps = [0.0] * len(self.tasks)

    def floating_point_ops(self, inputs) -> int:
        """The model's own count (`MultitaskModel.floating_point_ops`): the encoder and the batch's
        head, not every head (the `Trainer` asks a model for `num_parameters`, which ours has not)."""
        return self.accelerator.unwrap_model(self.model).floating_point_ops(inputs)

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("training needs a train split for every task")
        return EpochAwareLoader(
            self.train_dataset,
            batch_sampler=self.make_batch_sampler(),
            collate_fn=MultitaskCollator([t.name for t in self.tasks], [t.collator for t in self.tasks]),
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
        )

    # ---------------------------------------------------------------- evaluation
    def task_dataloader(self, task: TaskData, dataset, description: str | None = None) -> DataLoader:
        """Sequential loader over one task's data, sharded across ranks by accelerate; `description`
        names its progress bar (`TaskProgressCallback`)."""
        collate = MultitaskCollator([task.name], [task.eval_collator or task.collator])
        loader = DataLoader(
            _Tagged(dataset),
            batch_size=self.args.eval_batch_size,
            collate_fn=collate,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
        )
        loader = self.accelerator.prepare(loader)
        loader.description = description
        return loader

    def predict_task(self, task: TaskData, dataset, *, metric_key_prefix: str = "test"):
        """Run `task`'s head over `dataset`; returns transformers' `EvalLoopOutput`."""
        description = f"Prediction {task.name}"
        return self.task_loop(task, dataset, description, prediction_loss_only=False,
                              metric_key_prefix=f"{metric_key_prefix}_{task.name}")

    def task_loop(self, task: TaskData, dataset, description: str, **kwargs):
        """The Trainer's `evaluation_loop` over one task's data, keeping of each batch's outputs
        what the task's type scores (`reduce_logits`: a masked-LM head's logits span the vocabulary)."""
        self.preprocess_logits_for_metrics = task.spec.task_type.reduce_logits
        try:
            return self.evaluation_loop(self.task_dataloader(task, dataset, description), description=description, **kwargs)
        finally:
            self.preprocess_logits_for_metrics = None

    def generate_task(self, task: TaskData, dataset) -> tuple[list[str], list[str] | None]:
        """The texts `task`'s head generates for every row of `dataset`, in order, and the rows'
        targets when it holds training rows (labels), else None.

        Each prompt (a decoder's: the row's ids before its labels start; an encoder-decoder's: its
        source) is padded on the type's `prompt_padding` side, and the head
        generates up to MAX_NEW_TOKENS with NUM_BEAMS beams (sampling only with DO_SAMPLE) until
        EOS. Under DDP each rank generates every world_size-th row and the texts are gathered.
        A progress bar, `Generation <task>`, counts the main process's batches.
        """
        from accelerate.utils import gather_object

        task_type, tokenizer, cfg = task.spec.task_type, self.processing_class, self.cfg
        ids_column = dataset["input_ids"]
        labels_column = dataset["labels"] if "labels" in dataset.column_names else None
        prompts, references = [], []
        for i, ids in enumerate(ids_column):
            if labels_column is None:
                prompts.append(list(ids))
                continue
            prompt, target = task_type.split_texts(list(ids), list(labels_column[i]))
            prompts.append(prompt)
            references.append(tokenizer.decode(target, skip_special_tokens=True))
        model = self.accelerator.unwrap_model(self.model)
        model.activate(task.name)  # the task's LoRA adapter: `generate` calls the head, not the model's forward
        head = model.heads[task.name]
        was_training = model.training
        model.eval()  # the whole model: the shared backbone is bound to the head, not its submodule
        pad, eos, device = tokenizer.pad_token_id, tokenizer.eos_token_id, self.args.device
        mine = list(range(self.args.process_index, len(prompts), self.args.world_size))
        texts: dict[int, str] = {}
        batch = self.args.eval_batch_size
        show = self.is_world_process_zero() and not self.args.disable_tqdm
        bar = tqdm(total=-(-len(mine) // batch), desc=f"Generation {task.name}", leave=False, dynamic_ncols=True, disable=not show)
        with torch.no_grad():
            for start in range(0, len(mine), batch):
                rows = mine[start : start + batch]
                width = max(len(prompts[i]) for i in rows)
                left = task_type.prompt_padding == "left"
                ids_rows, mask_rows = [], []
                for i in rows:
                    fill = width - len(prompts[i])
                    ids_rows.append([pad] * fill + prompts[i] if left else prompts[i] + [pad] * fill)
                    mask_rows.append([0] * fill + [1] * len(prompts[i]) if left else [1] * len(prompts[i]) + [0] * fill)
                input_ids = torch.tensor(ids_rows, device=device)
                mask = torch.tensor(mask_rows, device=device)
                generated = head.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
                                          num_beams=cfg.num_beams, do_sample=cfg.do_sample, pad_token_id=pad,
                                          eos_token_id=eos)
                for i, row in zip(rows, generated.tolist()):
                    row = task_type.generated_tokens(row, width)
                    row = row[: row.index(eos)] if eos in row else row
                    texts[i] = tokenizer.decode(row, skip_special_tokens=True)
                bar.update(1)
        bar.close()
        model.train(was_training)
        if self.args.world_size > 1:
            texts = {i: t for part in gather_object([texts]) for i, t in part.items()}
        return [texts[i] for i in range(len(prompts))], (references if labels_column is not None else None)

    def predict_rows(self, task: TaskData, dataset) -> list[dict]:
        """What `predict` writes for every row of `dataset` (encoded inputs): the type's
        `prediction_rows` of the head's outputs, or of the generated texts for a generation task."""
        spec = task.spec
        if spec.task_type.generates:
            texts, _ = self.generate_task(task, dataset)
            return spec.task_type.prediction_rows(spec, texts)
        out = self.predict_task(task, dataset)
        return spec.task_type.split_prediction_rows(spec, out.predictions, out.label_ids, dataset, self.processing_class)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Evaluate every task with a validation split; logs `<prefix>_<task>_<metric>` for every metric
        and `<prefix>_macro_avg`, the mean over the tasks of each one's primary (first listed) metric,
        which picks the best checkpoint."""
        self._memory_tracker.start()
        start = time.time()
        results: dict[str, float] = {}
        scores, n_samples = [], 0
        for task in self.tasks:
            if task.validation is None:
                continue
            description = f"Evaluation {task.name}"
            generates = task.spec.task_type.generates
            task_type = task.spec.task_type
            output = self.task_loop(
                task, task.validation, description,
                prediction_loss_only=generates,  # a generation task's logits (tokens x vocabulary) are never kept
                ignore_keys=ignore_keys,
                metric_key_prefix=f"{metric_key_prefix}_{task.name}",
            )
            n_samples += output.num_samples
            results.update(output.metrics)
            loss = output.metrics.get(f"{metric_key_prefix}_{task.name}_loss")
            if task_type.reports_perplexity and loss is not None:
                results[f"{metric_key_prefix}_{task.name}_perplexity"] = math.exp(min(loss, 50.0))  # e^50: no signal anyway
            if generates:
                texts, references = self.generate_task(task, task.validation)
                task_scores = task_type.score_texts(task.spec, texts, references)
            else:
                task_scores = task_type.score_split(task.spec, output.predictions, output.label_ids, task.validation,
                                                    self.processing_class)
            for name, value in task_scores.items():
                results[f"{metric_key_prefix}_{task.name}_{name}"] = value
            # One number per task: a task listing two metrics (STS-B's pearson and spearmanr) would
            # otherwise weigh its own second opinion as much as another task.
            scores.append(task_scores[task.spec.primary_metric])
        if scores:
            results[f"{metric_key_prefix}_{MACRO_METRIC}"] = float(np.mean(scores))
        results.update(speed_metrics(metric_key_prefix, start, num_samples=n_samples))
        self.log(results)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, results)
        self._memory_tracker.stop_and_update_metrics(results)
        return results

    # ---------------------------------------------------------------- saving
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        folder = Path(output_dir or self.args.output_dir)
        if self.args.should_save:
            check_free_space(folder, self._bytes_to_save(weights_only=True))
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            self.accelerator.unwrap_model(self.model).write_description(folder)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint save, refused with one clear error before it writes when the
        disk cannot hold the checkpoint (a full disk otherwise ends in torch's
        'unexpected pos' RuntimeError, with a half-written folder)."""
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        need = self._bytes_to_save(weights_only=False)
        if self.args.should_save:
            check_free_space(folder, need)
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as e:
            if not self.args.should_save or _free_bytes(folder) >= need:
                raise
            shutil.rmtree(folder, ignore_errors=True)  # scratch, never committed: do not leave it half-written
            raise DiskFull(folder, need, _free_bytes(folder)) from e
        if self.args.should_save and folder.is_dir():
            self._checkpoint_bytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())

    def _bytes_to_save(self, *, weights_only: bool) -> int:
        """About what a save writes: the last checkpoint's size, else the weights the model saves
        (with LoRA, the trainable ones only) plus two AdamW moments per trainable parameter; under
        FSDP a checkpoint holds the weights twice (model.safetensors and the Trainer's FSDP file)."""
        if not weights_only and getattr(self, "_checkpoint_bytes", None):
            return self._checkpoint_bytes
        model = self.accelerator.unwrap_model(self.model)
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        moments = 0 if weights_only else sum(2 * p.numel() * 4 for p in model.parameters() if p.requires_grad)
        copies = 2 if self.is_fsdp_enabled and not weights_only else 1
        return copies * weights + moments + (64 << 10)


class DiskFull(OSError):
    """The disk of the Trainer's folder cannot hold what is about to be saved (errno ENOSPC)."""

    def __init__(self, folder: Path, need: int, free: int):
        super().__init__(errno.ENOSPC, f"no space left for {folder.name} on the disk of {folder.parent}: it needs about "
                                       f"{need / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free", str(folder))


def _free_bytes(path: Path) -> int:
    existing = next(p for p in (path, *path.parents) if p.exists())
    return shutil.disk_usage(existing).free


def check_free_space(folder: Path, need: int) -> None:
    """Raises DiskFull when the disk that will hold `folder` has less than `need` bytes free."""
    free = _free_bytes(folder)
    if free < need:
        raise DiskFull(folder, need, free)


class _Tagged(torch.utils.data.Dataset):
    """One task's dataset as (task index 0, example) items for `MultitaskCollator`."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return 0, self.dataset[i]


# -------------------------------------------------------------------- predictions and metrics
def decode(spec: TaskSpec, logits, label_ids=None):
    """Predictions from logits, as the task's type makes them: class ids, scores, or (for tokens)
    `(predicted tags, reference tags)` per sentence.

    Raises:
        ValueError: token classification without `label_ids`.
    """
    return spec.task_type.decode(spec, logits, label_ids)


def score_task(spec: TaskSpec, logits, label_ids) -> dict[str, float]:
    """The task's metrics on one split (the type's `score`).

    Raises:
        ValueError: see `decode`.
    """
    return spec.task_type.score(spec, logits, label_ids)


def chance_scores(spec: TaskSpec, label_ids) -> dict[str, float]:
    """What a constant guess scores on this split, per metric (the type's `chance`). `label_ids`
    may be ragged for token classification (one list per sentence), as a tokenized split's
    `labels` column is."""
    return spec.task_type.chance(spec, label_ids)

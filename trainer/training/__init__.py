"""Training: the `Trainer` subclass for multitask batches (`trainer`), the batch sampler that mixes
the tasks (`sampling`), and the experiment trackers it logs to (`trackers`)."""

from .trainer import (
    MACRO_METRIC,
    DiskFull,
    MultitaskTrainer,
    NonFiniteLoss,
    TaskProgressCallback,
    add_early_stopping,
    build_training_args,
    chance_scores,
    check_fsdp,
    check_task_mixing,
    decode,
    fsdp_config,
    resolve_precision,
    sampling_plan,
    score_task,
    stopped_early,
)

__all__ = ["MACRO_METRIC", "DiskFull", "MultitaskTrainer", "NonFiniteLoss", "TaskProgressCallback", "add_early_stopping",
           "build_training_args", "chance_scores", "check_fsdp", "check_task_mixing", "decode", "fsdp_config",
           "resolve_precision", "sampling_plan", "score_task", "stopped_early"]

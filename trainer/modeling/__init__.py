"""The model: one shared backbone with a head per task (`multitask`), and its standalone
per-task exports."""

from .multitask import (
    MULTITASK_FILE,
    WEIGHTS_FILE,
    MultitaskModel,
    check_max_length,
    encoder_config,
    head_config,
    load_encoder,
    max_input_length,
)

__all__ = ["MULTITASK_FILE", "WEIGHTS_FILE", "MultitaskModel", "check_max_length", "encoder_config", "head_config",
           "load_encoder", "max_input_length"]

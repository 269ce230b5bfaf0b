"""The model: one shared backbone with a head per task (`multitask`), and its standalone
per-task exports."""

from .lora import LoraSetup, base_fingerprint, base_tokens
from .multitask import (
    MULTITASK_FILE,
    WEIGHTS_FILE,
    MultitaskModel,
    bind_backbone,
    check_activation_checkpointing,
    check_backbone,
    check_lora,
    check_lora_tokens,
    check_max_length,
    check_memory_settings,
    encoder_config,
    fit_backbone,
    head_config,
    load_encoder,
    materialise_head,
    max_input_length,
    meta_model,
    prepare_tokenizer,
)

__all__ = ["MULTITASK_FILE", "WEIGHTS_FILE", "LoraSetup", "MultitaskModel", "base_fingerprint", "base_tokens", "bind_backbone", "check_backbone",
           "check_lora", "check_lora_tokens", "check_max_length",
           "fit_backbone", "prepare_tokenizer", "encoder_config", "head_config",
           "load_encoder", "max_input_length",
           "check_activation_checkpointing", "check_memory_settings", "materialise_head", "meta_model"]

"""Multitask fine-tuning of one Hugging Face encoder: tasks as data, one Trainer, per-task export."""

__version__ = "0.1.0"

"""The multitask model: one shared encoder, one head per task, exportable per task.

Each head is the task type's own ``AutoModelFor…`` model of the encoder's architecture, so its
layers (pooler, dropout, classifier) are exactly those that architecture uses and any encoder
``AutoModel`` can load works, found through `base_model_prefix` rather than a list of model
families. The head's encoder slot (``roberta``, ``bert``, ``deberta``…) is bound to the shared
encoder without being registered as its submodule, so the encoder's parameters appear once in
`parameters()` and `state_dict()`: checkpoints hold it once and safetensors can save them.

Export rebuilds each task as a standalone ``AutoModelFor…`` with the encoder's and the head's
weights: it loads in `transformers` with no code from this project.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..config import Config, ConfigError
from ..tasks import TaskError, TaskSpec

logger = logging.getLogger(__name__)

MULTITASK_FILE = "multitask.json"
WEIGHTS_FILE = "model.safetensors"


def head_config(encoder_config, spec: TaskSpec):
    """The encoder's config with the task's labels and problem type (the task type's `head_config`)."""
    return spec.task_type.head_config(encoder_config, spec)


class MultitaskModel(nn.Module):
    """Shared encoder + `heads[task]`. `forward(task=..., **inputs)` runs that task's head and loss."""

    def __init__(self, encoder, specs: list[TaskSpec]):
        super().__init__()
        self.encoder = encoder
        self.specs = {s.name: s for s in specs}
        self.heads = nn.ModuleDict({s.name: self._make_head(s) for s in specs})
        self._ran_parameters: dict[str, int] = {}  # per task, for `floating_point_ops` (every step)

    @property
    def config(self):
        return self.encoder.config

    @property
    def main_input_name(self) -> str:
        return self.encoder.main_input_name

    def _make_head(self, spec: TaskSpec) -> nn.Module:
        try:
            head = spec.task_type.head_class().from_config(head_config(self.encoder.config, spec))
        except ValueError as e:
            raise ValueError(f"task {spec.name!r}: {type(self.encoder.config).__name__} has no "
                             f"{spec.task_type.auto_class}; use another encoder or drop the task") from e
        prefix = head.base_model_prefix
        own_encoder = getattr(head, prefix, None)
        if not isinstance(own_encoder, type(self.encoder)):
            raise ValueError(
                f"task {spec.name!r}: {type(head).__name__} expects a {type(own_encoder).__name__} encoder but "
                f"AutoModel gave {type(self.encoder).__name__}; this architecture has no {spec.task_type.auto_class}"
            )
        # Drop the head's own (randomly initialised) encoder and bind the shared one without
        # registering it, so its parameters are owned by `self.encoder` alone.
        delattr(head, prefix)
        object.__setattr__(head, prefix, self.encoder)
        return head.to(dtype=next(self.encoder.parameters()).dtype)

    def forward(self, task: str, **inputs):
        """Run `task`'s head: its usual `ModelOutput` with the loss (given labels) and the logits only.

        Hidden states and attentions are dropped so that evaluation's predictions are always the
        logits array (the Trainer would otherwise gather a tuple of every output).

        Raises:
            KeyError: unknown task.
        """
        if task not in self.heads:
            raise KeyError(f"unknown task {task!r}; this model has {', '.join(self.heads)}")
        out = self.heads[task](**inputs, return_dict=True)
        return type(out)(loss=out.loss, logits=out.logits)

    def floating_point_ops(self, inputs: dict) -> int:
        """Floating-point operations of a forward and backward pass over one batch, counted as the
        `Trainer` counts them for a single model: 6 × input tokens × non-embedding parameters, of
        the parts that ran: the shared encoder and the batch's task head (the other heads did not).

        Returns 0 for a batch without the main input (`input_ids`), as the `Trainer` does.

        Raises:
            KeyError: the batch has no `task`, or one this model lacks.
        """
        ids = inputs.get(self.main_input_name)
        if ids is None:
            return 0
        task = inputs["task"]
        if task not in self._ran_parameters:
            self._ran_parameters[task] = (self.encoder.num_parameters(exclude_embeddings=True)
                                          + self.heads[task].num_parameters(exclude_embeddings=True))
        return 6 * ids.numel() * self._ran_parameters[task]

    # ---------------------------------------------------------------- saving and loading
    def describe(self) -> dict:
        return {"format": 1, "tasks": [s.to_dict() for s in self.specs.values()]}

    def save(self, directory: str | Path) -> None:
        """Write weights (safetensors), the encoder config and the task declarations to `directory`."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        self.write_description(directory)

    def write_description(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.encoder.config.save_pretrained(directory)
        (directory / MULTITASK_FILE).write_text(json.dumps(self.describe(), indent=2))

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> MultitaskModel:
        """Rebuild a model saved by `save` (or a Trainer checkpoint of it) without any download.

        Raises:
            FileNotFoundError: the directory lacks the weights or the task description.
        """
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel

        directory = Path(directory)
        for name in (WEIGHTS_FILE, MULTITASK_FILE, "config.json"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory} is not a multitask checkpoint: {name} is missing")
        described = json.loads((directory / MULTITASK_FILE).read_text())
        specs = []
        for d in described["tasks"]:
            d["labels"] = tuple(d["labels"]) if d.get("labels") is not None else None
            d["metrics"] = tuple(d["metrics"])
            specs.append(TaskSpec(**d))
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(directory))
        model = cls(encoder, specs)
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
        return model

    def export(self, task: str, directory: str | Path, tokenizer=None) -> Path:
        """Save `task` as a standalone Hugging Face model (config with labels, weights, tokenizer).

        Raises:
            KeyError: unknown task.
            RuntimeError: the standalone model lacks weights the multitask model should provide.
        """
        spec = self.specs[task]
        head = self.heads[task]
        standalone = spec.task_type.head_class().from_config(copy.deepcopy(head.config))
        prefix = standalone.base_model_prefix
        weights = {f"{prefix}.{k}": v for k, v in self.encoder.state_dict().items()}
        weights.update(head.state_dict())
        missing, unexpected = standalone.load_state_dict(weights, strict=False)
        if missing:
            raise RuntimeError(f"export of {task!r}: weights missing for {', '.join(missing[:5])}")
        # `unexpected` are encoder parts this head type does not use (e.g. BERT's pooler for tokens).
        if unexpected:
            logger.debug("export of %s: not used by %s: %s", task, type(standalone).__name__, unexpected)
        standalone.config.architectures = [type(standalone).__name__]
        directory = Path(directory)
        standalone.save_pretrained(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        return directory


TOKENIZER_NO_LIMIT = 1_000_000  # transformers sets model_max_length to ~1e30 when a tokenizer declares none


def encoder_config(model_name: str):
    """The encoder's config (its folder's config.json, or the Hub's), without any weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_name)


def max_input_length(tokenizer, model_config) -> tuple[int, str] | None:
    """(the most tokens the model takes, which limit that is), or None if neither says."""
    limits = []
    positions = getattr(model_config, "max_position_embeddings", None)
    # Encoders with relative positions only (DeBERTa-v2/v3: position_biased_input=False) have no
    # absolute position table, so their max_position_embeddings does not bound the length.
    if isinstance(positions, int) and positions > 0 and getattr(model_config, "position_biased_input", True):
        limits.append((positions, "its max_position_embeddings"))
    tokens = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokens, int) and 0 < tokens < TOKENIZER_NO_LIMIT:
        limits.append((tokens, "its tokenizer's model_max_length"))
    return min(limits) if limits else None


def check_max_length(cfg: Config, specs: list[TaskSpec], tokenizer, model_config, *, model_name: str | None = None) -> None:
    """Check that every task's truncation length fits the model, before any data is tokenized.

    Longer inputs would index past the position embeddings in the first batch that holds one.
    `model_name`: what the messages call the model (default MODEL_NAME; a saved model's folder).

    Raises:
        ConfigError: MAX_SEQ_LENGTH (used by a task without its own max_length) is too long.
        TaskError: a task's max_length is too long.
    """
    limit = max_input_length(tokenizer, model_config)
    if limit is None:
        return
    most, which = limit
    model_name = model_name or cfg.model_name
    for spec in specs:
        if spec.max_length is not None and spec.max_length > most:
            raise TaskError(f"task {spec.name!r}: max_length={spec.max_length} is more than {model_name} takes "
                            f"({most} tokens, {which}); set max_length to {most} or less in the tasks file")
    if any(s.max_length is None for s in specs) and cfg.max_seq_length > most:
        raise ConfigError(f"MAX_SEQ_LENGTH={cfg.max_seq_length} is not valid: {model_name} takes at most {most} "
                          f"tokens ({which}); set MAX_SEQ_LENGTH={most} or less")


def load_encoder(model_name: str, init: str, dtype: torch.dtype | None = None):
    """The shared encoder: pretrained weights, or built from the model's config (`scratch`)."""
    from transformers import AutoModel

    if init == "scratch":
        return AutoModel.from_config(encoder_config(model_name))
    return AutoModel.from_pretrained(model_name, **({"dtype": dtype} if dtype is not None else {}))

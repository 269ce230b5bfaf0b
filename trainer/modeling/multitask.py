"""The multitask model: one shared encoder, one head per task, exportable per task.

Each head is the task type's own ``AutoModelFor…`` model of the encoder's architecture, so its
layers (pooler, dropout, classifier) are exactly those that architecture uses and any encoder
``AutoModel`` can load works, found through `base_model_prefix` rather than a list of model
families. The head's encoder slot (``roberta``, ``bert``, ``deberta``…) is bound to the shared
encoder without being registered as its submodule, so the encoder's parameters appear once in
`parameters()` and `state_dict()`: checkpoints hold it once and safetensors can save them.

Export rebuilds each task as a standalone ``AutoModelFor…`` with the encoder's and the head's
weights: it loads in `transformers` with no code from this project.

With LoRA (`enable_lora`, `lora`), PEFT's adapters sit in the encoder's modules; the model saves
only what trains, rebuilds the frozen base from MODEL_NAME when loaded, and exports each task with
its adapter merged into a copy of the base weights, or as a PEFT adapter.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..config import Config, ConfigError
from ..tasks import TaskError, TaskSpec
from . import lora as lora_lib

logger = logging.getLogger(__name__)

MULTITASK_FILE = "multitask.json"
WEIGHTS_FILE = "model.safetensors"


def head_config(encoder_config, spec: TaskSpec):
    """The encoder's config with the task's labels and problem type (the task type's `head_config`)."""
    return spec.task_type.head_config(encoder_config, spec)


class MultitaskModel(nn.Module):
    """Shared encoder + `heads[task]`. `forward(task=..., **inputs)` runs that task's head and loss."""

    def __init__(self, encoder, specs: list[TaskSpec], *, pretrained: str | None = None):
        """`pretrained`: the model the backbone was loaded from, whose language-model head weights
        (Llama's untied `lm_head`, BERT's masked-LM transform) such heads start from (see
        `load_pretrained_head`)."""
        super().__init__()
        self.encoder = encoder
        self.specs = {s.name: s for s in specs}
        # {task: names in its head of the weights loaded from `pretrained`} (`load_pretrained_head`)
        self.pretrained_head_weights: dict[str, list[str]] = {}
        self.heads = nn.ModuleDict({s.name: self._make_head(s, pretrained) for s in specs})
        self._ran_parameters: dict[str, int] = {}  # per task, for `floating_point_ops` (every step)
        self.lora: lora_lib.LoraAdapters | None = None  # `enable_lora`
        self._trainable_keys: frozenset[str] | None = None  # with LoRA: the state_dict keys saved

    @property
    def config(self):
        return self.encoder.config

    @property
    def main_input_name(self) -> str:
        return self.encoder.main_input_name

    @property
    def _no_split_modules(self):
        """The backbone's transformer layer classes, which FSDP's transformer-based wrap (FSDP=…)
        makes its units of, as it does for a transformers model of its own."""
        return getattr(self.encoder, "_no_split_modules", None)

    def _make_head(self, spec: TaskSpec, pretrained: str | None = None) -> nn.Module:
        """The task's head model bound to the shared encoder. It is built on the meta device, so
        its own copy of the backbone never takes memory (at 8B parameters, one per task would):
        only the head's own layers are then allocated, beside the encoder, and initialised as
        transformers initialises them (`materialise_head`).

        Raises:
            TaskError: the encoder's architecture has no head of the task's type.
        """
        weight = next(self.encoder.parameters())
        try:
            with torch.device("meta"):
                head = spec.task_type.head_class().from_config(head_config(self.encoder.config, spec), dtype=weight.dtype)
        except ValueError as e:
            raise TaskError(f"task {spec.name!r}: {type(self.encoder.config).__name__} has no "
                            f"{spec.task_type.auto_class}; use another backbone or drop the task") from e
        bind_backbone(head, self.encoder, spec)
        materialise_head(head, self.encoder, weight.device)
        if pretrained is not None:
            self.pretrained_head_weights[spec.name] = load_pretrained_head(head, self.encoder, pretrained, spec)
        return head.to(dtype=weight.dtype)

    def enable_lora(self, setup: lora_lib.LoraSetup) -> None:
        """Put LoRA adapters on the encoder (`lora.LoraAdapters`): its own weights freeze, the
        adapters, the added tokens' rows and the heads train; from now on `state_dict` holds only
        those. Call it once, after the heads are bound (they tie to the encoder's modules).

        Raises:
            ValueError: PEFT cannot adapt the encoder with these settings (`check_lora` says why first).
            RuntimeError: LoRA is already enabled.
        """
        if self.lora is not None:
            raise RuntimeError("LoRA is already enabled on this model")
        self.lora = lora_lib.LoraAdapters(self.encoder, dict(self.heads.items()), setup)
        for name in self.frozen_head_weights():
            self.get_parameter(name).requires_grad_(False)
        tied = self._tied_keys()
        self._trainable_keys = frozenset(key for key, p in self.named_parameters(remove_duplicate=False)
                                         if p.requires_grad and key not in tied)

    def frozen_head_weights(self) -> list[str]:
        """With LoRA, the head weights that stay frozen (their `named_parameters` names): those loaded
        from MODEL_NAME (`pretrained_head_weights`: an untied `lm_head`, BERT's masked-LM transform),
        frozen as the backbone is and as PEFT leaves them, so that neither the optimizer nor the
        checkpoint holds them (525 M parameters at Llama-3-8B's shape). An untied output layer
        trains in full when tokens were added to the vocabulary: its new rows have no pretrained values."""
        if self.lora is None:
            return []
        frozen = []
        for task, names in self.pretrained_head_weights.items():
            head = self.heads[task]
            output = head.get_output_embeddings() if hasattr(head, "get_output_embeddings") else None
            grown = {id(p) for p in output.parameters()} if output is not None and self.lora.added_tokens else set()
            frozen += [f"heads.{task}.{name}" for name in names if id(head.get_parameter(name)) not in grown]
        return frozen

    def activate(self, task: str) -> None:
        """Make `task`'s LoRA adapter the active one before its head runs outside `forward`
        (generation calls the head's `generate`); nothing without LoRA or with LORA=shared."""
        if self.lora is not None:
            self.lora.activate(task)

    def _tied_keys(self) -> dict[str, str]:
        """{key: the first key of the same tensor} of every weight that is another's tensor: a
        language-model head tied to the shared input embeddings, or the backbone's own ties (T5's
        `shared`, `encoder.embed_tokens` and `decoder.embed_tokens` are one matrix)."""
        return tied_keys(super().state_dict(keep_vars=True))

    def state_dict(self, *args, **kwargs):
        """The weights, each tensor once (see `_tied_keys`): under the first of its keys only. With
        LoRA, only the weights that train (adapters, added tokens' rows, heads): the frozen base
        is MODEL_NAME's, which `from_checkpoint` loads again."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for key in self._tied_keys():
            state.pop(prefix + key, None)
        if self._trainable_keys is not None:
            for key in [k for k in state if k[len(prefix):] not in self._trainable_keys]:
                del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load weights saved by `state_dict`: a tied weight comes under the first key of its tensor.
        With LoRA, the saved weights are the trainable ones: strict means exactly those, and the
        frozen base weights (not in a checkpoint) count as neither missing nor unexpected."""
        state = dict(state_dict)
        tied = self._tied_keys()
        for key, source in tied.items():
            if key not in state and source in state:
                state[key] = state[source]
        if self._trainable_keys is None:
            result = super().load_state_dict(state, strict=strict, assign=assign)
            if assign:
                retie(self, tied)
            return result
        from torch.nn.modules.module import _IncompatibleKeys

        missing = sorted(self._trainable_keys - set(state_dict))
        unexpected = sorted(set(state_dict) - self._trainable_keys)
        if strict and (missing or unexpected):
            raise RuntimeError(f"the LoRA checkpoint does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        super().load_state_dict({k: v for k, v in state.items() if k not in unexpected}, strict=False, assign=assign)
        return _IncompatibleKeys(missing, unexpected)

    def forward(self, task: str, **inputs):
        """Run `task`'s head: its usual `ModelOutput` with the loss (given labels) and the logits only.

        Hidden states and attentions are dropped so that evaluation's predictions are always the
        type's `output_names` (the logits; a QA head's start and end logits): the Trainer would
        otherwise gather a tuple of every output.

        Raises:
            KeyError: unknown task.
        """
        if task not in self.heads:
            raise KeyError(f"unknown task {task!r}; this model has {', '.join(self.heads)}")
        task_type = self.specs[task].task_type
        self.activate(task)
        out = self.heads[task](**task_type.head_inputs(inputs), return_dict=True)
        return type(out)(loss=out.loss, **{name: getattr(out, name) for name in task_type.output_names})

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

    # ---------------------------------------------------------------- activation checkpointing
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False) -> None:
        """What the `Trainer` calls for `TrainingArguments.activation_checkpointing`
        (ACTIVATION_CHECKPOINTING): the shared backbone's layers, which every head runs, recompute
        their activations in the backward pass. The heads' own layers are a few small ones; T5's
        and BART's heads run the backbone's own stacks, so they are checkpointed too.

        Non-reentrant by default (`use_reentrant=False`): the reentrant kind needs an input that
        requires grad and breaks DDP's unused-parameter search, which the unused heads of a step need.

        Raises:
            ConfigError: the backbone's architecture does not support it.
        """
        check_activation_checkpointing(type(self.encoder), self.encoder.config.model_type)
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        self.encoder.activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers, offload=offload)

    def activation_checkpointing_disable(self) -> None:
        self.encoder.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.encoder.is_activation_checkpointing

    # ---------------------------------------------------------------- saving and loading
    def describe(self) -> dict:
        described = {"format": 1, "tasks": [s.to_dict() for s in self.specs.values()]}
        if self.lora is not None:
            described["lora"] = self.lora.setup.to_dict()
        return described

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

        A LoRA checkpoint holds the adapters and heads only: its base is loaded from the
        MODEL_NAME it names (offline when that is a local folder or in the Hub cache).

        Raises:
            FileNotFoundError: the directory lacks the weights or the task description.
            TaskError: a LoRA checkpoint's base model has other weights than it was trained on.
        """
        from safetensors.torch import load_file
        from transformers import AutoConfig

        directory = Path(directory)
        for name in (WEIGHTS_FILE, MULTITASK_FILE, "config.json"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory} is not a multitask checkpoint: {name} is missing")
        described = json.loads((directory / MULTITASK_FILE).read_text())
        specs = [TaskSpec.from_dict(d) for d in described["tasks"]]
        saved_config = AutoConfig.from_pretrained(directory)
        setup = lora_lib.LoraSetup.from_dict(described["lora"]) if described.get("lora") else None
        if setup is None:
            # Built on the meta device, its tensors then become the file's (`assign`), as
            # transformers' from_pretrained loads: the model is in memory once, not a random
            # backbone beside the loaded weights.
            model = meta_model(saved_config, specs)
            # Each tensor copied once out of the file's memory map: a view into it is not aligned
            # as torch's own allocations are, and would compute through other kernels (outputs
            # differing from the saved model's in the last bit).
            state = {key: tensor.clone() for key, tensor in load_file(str(directory / WEIGHTS_FILE)).items()}
            model.load_state_dict(state, strict=True, assign=True)
            materialise_buffers(model, [model.encoder, *model.heads.values()], f"the checkpoint {directory}")
            return model
        lora_lib.check_base(setup, str(directory))
        # The head weights training took from the base stayed frozen (`frozen_head_weights`): from there again.
        model = cls(lora_lib.rebuild_base(setup, saved_config, lambda name: load_encoder(name, "pretrained")), specs,
                    pretrained=setup.base_model)
        model.enable_lora(setup)
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
        return model

    def export(self, task: str, directory: str | Path, tokenizer=None, *, lora_export: str | None = None) -> Path:
        """Save `task` as a standalone Hugging Face model (config with labels, weights, tokenizer).

        With LoRA, `lora_export` (default: LORA_EXPORT as trained) `merged` saves that model with
        the task's adapter merged into a copy of the base weights (plain transformers loads it);
        `adapter` saves the task's PEFT adapter with its head as `modules_to_save`
        (`PeftModel.from_pretrained` on the task's model of MODEL_NAME), its config and tokenizer.

        Raises:
            KeyError: unknown task.
            RuntimeError: the standalone model lacks weights the multitask model should provide.
            TaskError: LORA_EXPORT=adapter for a head that PEFT cannot save (see `lora.head_modules`).
        """
        spec = self.specs[task]
        head = self.heads[task]
        encoder = self.encoder
        adapter = self.lora is not None and (lora_export or self.lora.setup.export) == "adapter"
        if self.lora is not None:  # plain copies: the adapter merged in, or the base alone beside a PEFT adapter
            encoder, head = self.lora.unmerged(task, head) if adapter else self.lora.merged(task, head)
        # The standalone model's parameters are the live (or copied) tensors themselves (`assign`),
        # not a second backbone allocated, initialised and overwritten.
        with torch.device("meta"):
            standalone = spec.task_type.head_class().from_config(copy.deepcopy(head.config))
        prefix = _backbone_prefix(standalone, type(encoder))
        weights = {f"{prefix}{k}": v for k, v in encoder.state_dict().items()}
        weights.update(head.state_dict())
        tied = tied_keys(standalone.state_dict(keep_vars=True))
        missing, unexpected = standalone.load_state_dict(weights, strict=False, assign=True)
        retie(standalone, tied)
        missing = [key for key in missing if key not in tied]
        if missing:
            raise RuntimeError(f"export of {task!r}: weights missing for {', '.join(missing[:5])}")
        materialise_buffers(standalone, [standalone], f"the export of {task!r}", device=next(iter(weights.values())).device)
        # `unexpected` are encoder parts this head type does not use (e.g. BERT's pooler for tokens).
        if unexpected:
            logger.debug("export of %s: not used by %s: %s", task, type(standalone).__name__, unexpected)
        standalone.config.architectures = [type(standalone).__name__]
        directory = Path(directory)
        if adapter:
            frozen = {name.removeprefix(f"heads.{task}.") for name in self.frozen_head_weights() if name.startswith(f"heads.{task}.")}
            self.lora.save_adapter(task, standalone, prefix, directory, frozen=frozen)
            # The config users build the base with: the task's labels, and MODEL_NAME's vocabulary,
            # which they resize to the tokenizer's when tokens were added (the adapter holds their rows).
            standalone.config.vocab_size = self.lora.setup.base_vocab_size
            standalone.config.save_pretrained(directory)
        else:
            standalone.save_pretrained(directory)
        if tokenizer is not None:
            # A generating decoder's batches are padded on the left (training pads on the right).
            # save_pretrained writes init_kwargs, not the attribute: set both, then put them back.
            side, saved = tokenizer.padding_side, tokenizer.init_kwargs.get("padding_side")
            wanted = spec.task_type.export_padding_side or side
            tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = wanted
            try:
                tokenizer.save_pretrained(directory)
            finally:
                tokenizer.padding_side = side
                if saved is None:
                    tokenizer.init_kwargs.pop("padding_side", None)
                else:
                    tokenizer.init_kwargs["padding_side"] = saved
        return directory


def tied_keys(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """{key: the first key of the same tensor} for the keys of a `state_dict(keep_vars=True)`
    whose tensor another key holds (weights tied to each other)."""
    first: dict[int, str] = {}
    tied = {}
    for key, tensor in state.items():
        if id(tensor) in first:
            tied[key] = first[id(tensor)]
        else:
            first[id(tensor)] = key
    return tied


def retie(module: nn.Module, tied: dict[str, str]) -> None:
    """Make each tied key (`tied_keys`, taken before loading) hold its source's tensor again:
    `load_state_dict(assign=True)` puts a new Parameter under every key, which would untie
    weights that share a matrix (the optimizer would then step the matrix once per key)."""
    def slot(key: str) -> tuple[dict, str]:
        path, _, name = key.rpartition(".")
        owner = module.get_submodule(path)
        return (owner._parameters if name in owner._parameters else owner._buffers), name

    for key, source in tied.items():
        tensors, name = slot(key)
        source_tensors, source_name = slot(source)
        tensors[name] = source_tensors[source_name]


def materialise_buffers(module: nn.Module, roots: list[nn.Module], what: str, device: torch.device | str = "cpu") -> None:
    """Give a module built on the meta device and then loaded with `assign=True` the buffers no
    file holds (non-persistent: position ids, rotary frequencies), allocated on `device` and
    computed by transformers' own `initialize_weights` of each of `roots`, with every loaded
    tensor marked initialised so that none of them is touched (as `from_pretrained` does).

    Raises:
        RuntimeError: a weight got no tensor from the file (still on the meta device).
    """
    made = set()
    for owner in module.modules():
        for name in owner._non_persistent_buffers_set:
            buffer = owner._buffers.get(name)
            if buffer is not None and buffer.is_meta:
                owner._buffers[name] = torch.empty_like(buffer, device=device)
                made.add(id(owner._buffers[name]))
    empty = [name for name, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if empty:
        raise RuntimeError(f"{what} gives no weights for {', '.join(empty[:5])}")
    if made:
        loaded = [t for t in (*module.parameters(), *module.buffers()) if id(t) not in made]
        with initialised(loaded):
            for root in roots:
                root.initialize_weights()


@contextlib.contextmanager
def initialised(tensors: list[torch.Tensor]):
    """Mark `tensors` initialised for transformers' `initialize_weights` (its flag on loaded and
    tied weights) while the block runs, so that it initialises only the others."""
    marked = [t for t in tensors if not getattr(t, "_is_hf_initialized", False)]
    for tensor in marked:
        tensor._is_hf_initialized = True
    try:
        yield
    finally:
        for tensor in marked:
            del tensor._is_hf_initialized


def bind_backbone(head: nn.Module, backbone: nn.Module, spec: TaskSpec) -> None:
    """Replace the head model's own (randomly initialised) backbone by the shared one, without
    registering it, so that its parameters are owned by the multitask model's `encoder` alone;
    then tie a language-model head to the shared input embeddings when the config ties them.

    The backbone is found generically: the head's `base_model_prefix` attribute (``bert``,
    ``transformer``, ``model``…) when it is a module of the backbone's class, else the backbone's
    own parts held directly by the head (T5ForConditionalGeneration holds T5Model's ``shared``,
    ``encoder`` and ``decoder``).

    Raises:
        TaskError: the head holds no backbone of this class (the architecture cannot serve the type).
    """
    prefix = head.base_model_prefix
    own = getattr(head, prefix, None)
    if isinstance(own, type(backbone)):
        delattr(head, prefix)
        object.__setattr__(head, prefix, backbone)
    else:
        parts = dict(backbone.named_children())
        if not parts or not all(isinstance(getattr(head, name, None), type(part)) for name, part in parts.items()):
            raise TaskError(
                f"task {spec.name!r}: {type(head).__name__} expects a {type(own).__name__} backbone but AutoModel gave "
                f"{type(backbone).__name__}; this architecture has no {spec.task_type.auto_class} on its shared backbone")
        for name, part in parts.items():
            delattr(head, name)
            object.__setattr__(head, name, part)
    output = head.get_output_embeddings() if hasattr(head, "get_output_embeddings") else None
    if output is not None and getattr(head.config, "tie_word_embeddings", False):
        output.weight = backbone.get_input_embeddings().weight


def materialise_head(head: nn.Module, backbone: nn.Module, device: torch.device) -> None:
    """Allocate, on `device`, the tensors of a head built on the meta device and bound to
    `backbone` (`bind_backbone`), and initialise them as `from_config` would: the head's own
    `initialize_weights`, with the backbone's tensors marked initialised (as transformers marks
    loaded and tied weights) so that neither the walk over the head's modules nor a head-level
    `_init_weights` reaching the backbone (T5's `shared`) touches them.

    A tensor shared inside the head (a decoder bias tied to its prediction bias) stays one tensor.
    On a backbone on the meta device itself (a model of modules only, to check settings against
    an architecture) the head stays on the meta device too.
    """
    if device == torch.device("meta"):
        return
    backbone_tensors = {id(t) for t in (*backbone.parameters(), *backbone.buffers())}
    made: dict[int, torch.Tensor] = {}
    for module in head.modules():  # the bound backbone is not registered: these are the head's own
        for tensors in (module._parameters, module._buffers):
            for name, tensor in tensors.items():
                if tensor is None or id(tensor) in backbone_tensors or not tensor.is_meta:
                    continue  # absent, or the shared backbone's (a tied output layer)
                if id(tensor) not in made:
                    empty = torch.empty_like(tensor, device=device)
                    made[id(tensor)] = (nn.Parameter(empty, requires_grad=tensor.requires_grad)
                                        if isinstance(tensor, nn.Parameter) else empty)
                tensors[name] = made[id(tensor)]
    with initialised([*backbone.parameters(), *backbone.buffers()]):
        head.initialize_weights()


def load_pretrained_head(head: nn.Module, backbone: nn.Module, pretrained: str, spec: TaskSpec) -> list[str]:
    """Start a language-model head from the pretrained model's own weights, for the types that
    keep them (`loads_pretrained_head`): `AutoModel` loads the backbone only, so Llama's or
    Mistral's untied `lm_head`, or BERT's and RoBERTa's masked-LM transform (`cls.predictions.*`,
    `lm_head.*`), would otherwise start random. Only the head's own tensors (not the bound
    backbone's, nor an output layer tied to it) are read from the checkpoint's safetensors (the
    shards holding them), not a second copy of the model; rows of tokens added since
    (SPECIAL_TOKENS) start at the mean of the others, as the resized input embeddings do. A
    tensor the checkpoint lacks keeps its initialisation (logged). Returns the names (in the
    head) of the parameters it loaded.

    Raises:
        TaskError: a saved tensor's shape does not fit the head (MODEL_NAME and TOKENIZER_NAME
            that do not belong together).
    """
    if not spec.task_type.loads_pretrained_head:
        return []
    shared = {id(p) for p in backbone.parameters()}
    own = {name: p for name, p in head.named_parameters(remove_duplicate=True) if id(p) not in shared}
    if not own:
        return []
    saved = _pretrained_tensors(pretrained, list(own))
    absent = [name for name in own if name not in saved]
    if absent:
        logger.warning("task %s: %s holds no %s: %s from random weights", spec.name, pretrained, ", ".join(absent[:3])
                       + (" …" if len(absent) > 3 else ""), "they start" if len(absent) > 1 else "it starts")
    with torch.no_grad():
        for name, tensor in saved.items():
            weight = own[name]
            if tensor.shape == weight.shape:
                weight.copy_(tensor.to(weight.dtype))
            elif tensor.shape[1:] == weight.shape[1:] and tensor.shape[0] < weight.shape[0]:  # vocabulary rows
                weight[: tensor.shape[0]] = tensor.to(weight.dtype)
                weight[tensor.shape[0]:] = tensor.to(weight.dtype).mean(0)
            else:
                raise TaskError(f"task {spec.name!r}: {pretrained}'s {name} has shape {tuple(tensor.shape)}, the head "
                                f"{tuple(weight.shape)}; check MODEL_NAME and TOKENIZER_NAME belong together")
    return list(saved)


def _pretrained_tensors(model_name: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """The tensors of `keys` that a model's safetensors weights (local folder or Hub cache) hold."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    def find(filename: str):
        return cached_file(model_name, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)

    index = find("model.safetensors.index.json")
    if index:
        weight_map = json.loads(Path(index).read_text()).get("weight_map", {})
        shards: dict[str, list[str]] = {}
        for key in keys:
            if key in weight_map:
                shards.setdefault(weight_map[key], []).append(key)
    else:
        shards = {"model.safetensors": keys}
    out = {}
    for shard, wanted in shards.items():
        path = find(shard)
        if not path:
            continue
        with safe_open(path, "pt") as f:
            present = set(f.keys())
            out.update({key: f.get_tensor(key) for key in wanted if key in present})
    return out


def check_backbone(specs: list[TaskSpec], config, model_name: str) -> None:
    """Refuse, before any data is tokenized, a task whose type the backbone cannot serve.

    Raises:
        TaskError: one line naming the task, the backbone and the types it serves.
    """
    from ..tasks import TASK_TYPES

    for spec in specs:
        if not spec.task_type.serves(config):
            served = [name for name, t in TASK_TYPES.items() if t.serves(config)]
            raise TaskError(f"task {spec.name!r}: {model_name} ({config.model_type}) cannot serve type {spec.type}: "
                            f"transformers has no {spec.task_type.auto_class} for it; it serves {', '.join(served) or 'none'}; "
                            "use another backbone or drop the task")


def check_lora(cfg: Config, specs: list[TaskSpec], config) -> None:
    """Refuse, before any data is read, LoRA settings that PEFT or the export cannot carry out on
    this backbone: it builds the multitask model on the meta device (no weights) and puts the
    adapters on it as training will.

    Raises:
        ConfigError: LORA_TARGET_MODULES names modules the backbone lacks, or is empty for an
            architecture PEFT has no defaults for, or PEFT refuses the modules.
        TaskError: a task's output layer is tied to an adapted module (no merged export could keep
            both), or LORA_EXPORT=adapter for a head that PEFT cannot save (`lora.head_modules`).
    """
    setup = lora_lib.LoraSetup.from_config(cfg, config)
    if setup is None:
        return
    model = meta_model(config, specs)
    problem = lora_lib.target_problem(setup, model.encoder)
    if problem:
        raise ConfigError(problem)
    tied = _tied_output_layers(model)
    try:
        model.enable_lora(setup)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        targets = ",".join(setup.target_modules) or "(PEFT's defaults)"
        raise ConfigError(f"LORA_TARGET_MODULES={targets!r} is not valid for {cfg.model_name}: PEFT cannot adapt them: "
                          f"{lora_lib.one_line(e)}") from None
    problem = lora_lib.tie_problem(setup, model.encoder, dict(model.heads.items()), tied)
    if problem:
        raise TaskError(problem)
    if setup.export == "adapter":
        for spec in specs:
            with torch.device("meta"):
                standalone = spec.task_type.head_class().from_config(copy.deepcopy(model.heads[spec.name].config))
            parts = lora_lib.backbone_parts(_backbone_prefix(standalone, type(model.encoder)), model.encoder)
            mixed = lora_lib.head_modules(standalone, parts)[1]
            if mixed:
                raise TaskError(lora_lib.mixed_head_message(spec.name, mixed))


def check_lora_tokens(cfg: Config, specs: list[TaskSpec], config, tokenizer) -> None:
    """Refuse, before any data is tokenized, tokens added to the vocabulary under LoRA for a task
    whose output layer, tied to the input embeddings, has a bias (BERT's masked-LM decoder): the
    added tokens' rows are PEFT trainable tokens there, whose tied output layer drops the bias.

    Raises:
        TaskError: one line naming the task and the fix.
    """
    if cfg.lora == "false":
        return
    added = len(tokenizer) - min(config.vocab_size, lora_lib.base_tokens(cfg.tokenizer_name or cfg.model_name))
    if added <= 0:
        return
    model = meta_model(config, specs)
    tied = _tied_output_layers(model)
    for name, head in model.heads.items():
        output = head.get_output_embeddings() if name in tied else None
        if output is not None and getattr(output, "bias", None) is not None:
            raise TaskError(f"task {name!r}: with LORA={cfg.lora}, the {added} token(s) added to the vocabulary (SPECIAL_TOKENS, "
                            "the tasks' special_tokens) train as PEFT trainable tokens, which drop the bias of this task's "
                            "output layer (tied to the input embeddings); add no tokens, or set LORA=false")


def meta_model(config, specs: list[TaskSpec]) -> MultitaskModel:
    """The multitask model of `config` and `specs` on the meta device: its modules, no weights."""
    import warnings

    from transformers import AutoModel

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        return MultitaskModel(AutoModel.from_config(config), specs)


def _tied_output_layers(model: MultitaskModel) -> dict[str, int]:
    """{task: id of the backbone weight its output layer is} for the heads whose output layer is
    tied to the input embeddings."""
    embeddings = model.encoder.get_input_embeddings().weight
    out = {}
    for name, head in model.heads.items():
        output = head.get_output_embeddings() if hasattr(head, "get_output_embeddings") else None
        if output is not None and getattr(output, "weight", None) is embeddings:
            out[name] = id(embeddings)
    return out


def _backbone_prefix(standalone: nn.Module, backbone_class: type) -> str:
    """Where the backbone sits in a task's standalone model: under base_model_prefix (``bert.``),
    or as its own parts at the top (T5ForConditionalGeneration: ``""``), as `bind_backbone` found it."""
    prefix = standalone.base_model_prefix
    return f"{prefix}." if isinstance(getattr(standalone, prefix, None), backbone_class) else ""


def prepare_tokenizer(tokenizer, special_tokens: list[str]):
    """Add `special_tokens` (SPECIAL_TOKENS and the tasks' own) to the tokenizer, and give a
    tokenizer without a pad token (GPT-2, Llama…) its EOS token as pad: the attention mask, not
    the token, tells padding apart; one with neither gets a new ``<pad>`` token. Returns the tokenizer."""
    new = [t for t in dict.fromkeys(special_tokens) if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
        logger.info("Added %d special token%s to the tokenizer: %s", len(new), "" if len(new) == 1 else "s", " ".join(new))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            logger.info("The tokenizer has neither a pad nor an EOS token: added <pad> as its pad token")
            return tokenizer
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("The tokenizer has no pad token: padding with its EOS token %r (the attention mask marks padding)",
                    tokenizer.eos_token)
    return tokenizer


def fit_backbone(backbone, tokenizer):
    """The backbone made to fit the tokenizer: its embeddings resized once when tokens were added
    (before any head is bound, so the heads tie to the resized embeddings), and its config given
    the tokenizer's pad token id (decoder classification heads pool at the last token before it)."""
    embeddings = backbone.get_input_embeddings()
    if len(tokenizer) > embeddings.num_embeddings:
        logger.info("Resizing the embeddings from %d to %d tokens", embeddings.num_embeddings, len(tokenizer))
        backbone.resize_token_embeddings(len(tokenizer))
    if getattr(backbone.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        backbone.config.pad_token_id = tokenizer.pad_token_id
    return backbone


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


def check_activation_checkpointing(model_class, model_name: str) -> None:
    """Refuse ACTIVATION_CHECKPOINTING for a backbone class (`AutoModel`'s for the architecture)
    that transformers does not checkpoint (ALBERT…).

    Raises:
        ConfigError: one line naming the backbone.
    """
    if not getattr(model_class, "supports_gradient_checkpointing", False):
        raise ConfigError(f"ACTIVATION_CHECKPOINTING=true is not valid: {model_name} ({model_class.__name__}) does not "
                          "support activation checkpointing in transformers; set ACTIVATION_CHECKPOINTING=false")


def check_memory_settings(cfg: Config, model_config, precision: str) -> torch.dtype:
    """Check MODEL_DTYPE, ACTIVATION_CHECKPOINTING and FSDP against the backbone (its config, before
    any weights or data are read) and the resolved PRECISION; return the dtype the backbone
    loads in (MODEL_DTYPE, `auto` being the dtype the checkpoint's config names, else float32).

    Raises:
        ConfigError: weights of that dtype cannot train at this precision (float16 weights, which
            `validate` refuses when named but `auto` may find; bfloat16 weights when PRECISION=auto
            chose fp16 on this GPU), or the backbone has no activation checkpointing, or (FSDP) no
            transformer layer classes to shard by.
    """
    from transformers import AutoModel

    backbone_class = AutoModel._model_mapping[type(model_config)] if type(model_config) in AutoModel._model_mapping else None
    if cfg.activation_checkpointing and cfg.fsdp == "false" and backbone_class is not None:
        check_activation_checkpointing(backbone_class, cfg.model_name)  # under FSDP, FSDP's own wraps any layer
    if cfg.fsdp != "false" and backbone_class is not None and not getattr(backbone_class, "_no_split_modules", None):
        raise ConfigError(f"FSDP={cfg.fsdp!r} is not valid: {cfg.model_name} ({backbone_class.__name__}) names no transformer "
                          "layer classes (_no_split_modules) for FSDP to shard by; set FSDP=false")
    if cfg.model_dtype == "auto":
        dtype = getattr(model_config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    else:
        dtype = getattr(torch, cfg.model_dtype)
    if dtype == torch.float16:
        raise ConfigError(f"MODEL_DTYPE={cfg.model_dtype} is not valid: {cfg.model_name} is stored in float16, and float16 "
                          "weights cannot be trained; set MODEL_DTYPE=float32 (with PRECISION=fp16 for fp16 mixed precision) or bfloat16")
    if dtype == torch.bfloat16 and precision == "fp16":
        weights = "bfloat16 weights" + (f" ({cfg.model_name}'s own dtype)" if cfg.model_dtype == "auto" else "")
        chosen = "PRECISION=auto, which is fp16 on this GPU" if cfg.precision == "auto" else "PRECISION=fp16"
        raise ConfigError(f"MODEL_DTYPE={cfg.model_dtype} is not valid: {weights} cannot train with {chosen} (fp16 mixed "
                          "precision trains float32 weights); set MODEL_DTYPE=float32")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"MODEL_DTYPE={cfg.model_dtype} is not valid: {cfg.model_name} is stored in {dtype}, which this "
                          "trainer does not train; set MODEL_DTYPE=float32 or bfloat16")
    return dtype


def load_encoder(model_name: str, init: str, dtype: torch.dtype | None = None):
    """The shared encoder: pretrained weights, or built from the model's config (`scratch`), in
    `dtype` (MODEL_DTYPE, see `check_memory_settings`; None: transformers' default, the
    checkpoint's own dtype for pretrained weights)."""
    from transformers import AutoModel

    kwargs = {"dtype": dtype} if dtype is not None else {}
    if init == "scratch":
        return AutoModel.from_config(encoder_config(model_name), **kwargs)
    return AutoModel.from_pretrained(model_name, **kwargs)

"""LoRA through PEFT: low-rank adapters on the shared backbone, whose own weights stay frozen.

LORA=shared puts one adapter on the backbone for every task; LORA=per_task one adapter per task on
the same backbone, the batch's task's adapter active in each forward (`LoraAdapters.activate`).
The adapters are PEFT's LoRA layers, injected in place into the backbone's modules
(`get_peft_model` on the backbone, more adapters with `add_adapter`): the heads call the backbone
they are bound to (`bind_backbone`) and so run through the adapters without knowing of them.
Task heads are not LoRA'd: they train in full, but for the weights they took from MODEL_NAME (an
untied `lm_head`, BERT's masked-LM transform), which stay frozen as the backbone does
(`MultitaskModel.frozen_head_weights`). An output layer tied to the input embeddings (GPT-2's
language-model head, BERT's masked-LM decoder) *is* the frozen embedding matrix: it stays frozen
and tied, as PEFT leaves it.

Tokens added to the vocabulary (SPECIAL_TOKENS, a task's special tokens, a new pad token) have no
pretrained embedding, and the rows `resize_token_embeddings` gave them are random: they are
trained with PEFT's `trainable_token_indices`, which stores their values (not a difference), so
a rebuilt base with other random rows gives the same model. A module tied to the embedding matrix
(an output layer, T5's `embed_tokens`) follows the same rows through PEFT's tied token adapter.

What a checkpoint holds (`MultitaskModel.state_dict`) is what trains: the adapters, the added
tokens' rows, the heads; the base is named by `LoraSetup` (MODEL_NAME and `base_fingerprint`, a
hash of its weights files), rebuilt from MODEL_NAME on load and refused when its weights changed.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from ..config import Config
from ..tasks import TaskError

SHARED_ADAPTER = "default"  # LORA=shared: PEFT's own default name; per_task adapters are named after their tasks


@dataclass(frozen=True)
class LoraSetup:
    """The adapters of a run, as the checkpoint's description records them (`multitask.json`)."""

    mode: str  # shared | per_task
    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]  # empty: PEFT's defaults for the architecture
    export: str  # merged | adapter
    base_model: str  # MODEL_NAME the backbone was loaded from
    base_fingerprint: str  # `base_fingerprint(base_model)` when trained
    base_vocab_size: int  # rows of the base's input embeddings (its config's vocab_size)
    new_tokens_from: int  # the first token id MODEL_NAME's tokenizer lacks: the embedding rows from it train

    @classmethod
    def from_config(cls, cfg: Config, base_config, *, fingerprint: str = "", base_tokens: int | None = None) -> LoraSetup | None:
        """The setup of LORA and its settings (None for LORA=false), for a base of `base_config`
        whose tokenizer has `base_tokens` tokens (default: as many as the embeddings have rows)."""
        if cfg.lora == "false":
            return None
        rows = int(base_config.vocab_size)
        local = Path(cfg.model_name)
        # A local folder is recorded absolute: evaluate and export may run in another directory.
        base = str(local.absolute()) if local.is_dir() else cfg.model_name
        return cls(mode=cfg.lora, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                   target_modules=tuple(cfg.lora_target_modules), export=cfg.lora_export, base_model=base,
                   base_fingerprint=fingerprint, base_vocab_size=rows,
                   new_tokens_from=min(rows, rows if base_tokens is None else base_tokens))

    def to_dict(self) -> dict:
        return {**asdict(self), "target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, data: dict) -> LoraSetup:
        return cls(**{**data, "target_modules": tuple(data.get("target_modules") or ())})

    def new_tokens(self, rows: int) -> list[int]:
        """The ids of the tokens added to MODEL_NAME's tokenizer (SPECIAL_TOKENS, the tasks' special
        tokens, a new pad token) in embeddings of `rows` rows: whether the embeddings grew for them
        (random rows) or they took spare rows of the base (never trained), they train."""
        return list(range(self.new_tokens_from, rows))

    def adapter_name(self, task: str) -> str:
        return SHARED_ADAPTER if self.mode == "shared" else task

    def peft_config(self, trainable_tokens: list[int] | None = None, modules_to_save: list[str] | None = None):
        """PEFT's `LoraConfig` of these settings: PEFT picks the target modules of the architecture
        (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`) when LORA_TARGET_MODULES is empty."""
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules) or None, bias="none",
                          trainable_token_indices=trainable_tokens or None, modules_to_save=modules_to_save or None)


class LoraAdapters:
    """The LoRA adapters of a multitask model: injected into its backbone when made, held beside it
    (not a submodule: the parameters belong to the backbone's modules, where PEFT put them)."""

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module], setup: LoraSetup):
        """Inject one adapter (shared) or one per task (per_task) into `backbone`, freeze its own
        weights and make every adapter trainable (`requires_grad`), so that the Trainer's
        optimizer, built once, holds all of them from the first step.

        Raises:
            ValueError: PEFT cannot adapt the backbone with these settings (see `check_lora`).
        """
        from peft import get_peft_model

        self.setup = setup
        self.names = {task: setup.adapter_name(task) for task in heads}
        adapters = list(dict.fromkeys(self.names.values()))
        self.added_tokens = setup.new_tokens(backbone.get_input_embeddings().num_embeddings)
        embedding_weight = backbone.get_input_embeddings().weight
        tied = _tied_modules(embedding_weight, backbone, heads) if self.added_tokens else []
        config = setup.peft_config(self.added_tokens)
        with quiet_peft():
            self.peft = get_peft_model(backbone, config, adapter_name=adapters[0])
            for name in adapters[1:]:
                self.peft.add_adapter(name, config)
        if tied:
            self._tie_added_tokens(backbone, tied, adapters)
        self._modules = [backbone, *heads.values()]
        self.active: str | None = None
        self.activate(next(iter(heads)))

    def _tie_added_tokens(self, backbone: nn.Module, tied: list[tuple[nn.Module, str, nn.Module]], adapters: list[str]) -> None:
        """Make every module that shares the embedding matrix (an output layer tied to it) read
        the added tokens' trained rows too, through PEFT's tied token adapter: the standalone
        export, which keeps the tie, then computes what the multitask model computes."""
        from peft.utils.other import TrainableTokensWrapper

        embeddings = backbone.get_input_embeddings()  # now PEFT's TrainableTokensWrapper
        for parent, attr, module in tied:
            if isinstance(parent, TrainableTokensWrapper) or isinstance(getattr(parent, attr), TrainableTokensWrapper):
                continue  # PEFT found this tie itself
            wrapper = TrainableTokensWrapper(module, adapters[0], token_indices=self.added_tokens,
                                             tied_adapter=embeddings.token_adapter)
            for name in adapters[1:]:
                wrapper.update(name, token_indices=self.added_tokens, tied_adapter=embeddings.token_adapter)
            setattr(parent, attr, wrapper)

    def activate(self, task: str) -> None:
        """Make `task`'s adapter the active one (LORA=per_task; LORA=shared has one, always active).

        PEFT's `set_adapter` also turns off `requires_grad` of the other adapters: they are turned
        back on, so that every adapter stays in the optimizer; an adapter that did not run gets no
        gradient, so the optimizer leaves it as it was (AdamW skips a parameter without gradient).
        """
        from peft.functional import set_adapter, set_requires_grad

        name = self.names[task]
        if name == self.active:
            return
        adapters = list(dict.fromkeys(self.names.values()))
        for module in self._modules:
            set_adapter(module, name)
            set_requires_grad(module, adapters, requires_grad=True)
        self.active = name

    # ---------------------------------------------------------------- export
    def _copies(self, task: str, head: nn.Module, *, merge: bool) -> tuple[nn.Module, nn.Module]:
        """Plain (PEFT-free) copies of the backbone and of `task`'s head: the task's adapter merged
        into a copy of the base weights (`merge_and_unload`), or the base weights alone (`unload`).
        The live model is left as it is: merging in place and back would not give its weights back
        bit for bit."""
        from peft.utils.other import TrainableTokensWrapper

        peft_model, head = copy.deepcopy((self.peft, head))  # one copy: the head stays bound to the copied backbone
        name = self.names[task]
        backbone = peft_model.merge_and_unload(adapter_names=[name]) if merge else peft_model.unload()
        # A tied output layer's token adapter reads the embedding matrix, which the merge wrote: its base layer is it.
        for module_name, module in list(head.named_modules()):
            if isinstance(module, TrainableTokensWrapper):
                parent, _, attr = module_name.rpartition(".")
                setattr(head.get_submodule(parent), attr, module.token_adapter.base_layer)
        return backbone, head

    def merged(self, task: str, head: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The backbone with `task`'s adapter merged into a copy of its base weights, and a copy of
        the head bound to it: both plain transformers modules."""
        return self._copies(task, head, merge=True)

    def unmerged(self, task: str, head: nn.Module) -> tuple[nn.Module, nn.Module]:
        """Copies of the base backbone (no adapter) and of the head bound to it."""
        return self._copies(task, head, merge=False)

    def save_adapter(self, task: str, standalone: nn.Module, backbone_prefix: str, directory: Path, *,
                     frozen: set[str] = frozenset()) -> None:
        """Save `task`'s adapter for PEFT users: `standalone` is the task's plain model with the base
        weights and the trained head; PEFT wraps it with the same LoRA settings, the head's own
        modules as `modules_to_save`, takes the task's adapter weights, and saves
        `adapter_config.json` and `adapter_model.safetensors`, which
        `PeftModel.from_pretrained(<the task's AutoModelFor… of MODEL_NAME>, directory)` loads. A head
        module whose weights are all `frozen` (loaded from MODEL_NAME and never trained: Llama's
        `lm_head`) is the base model's own there, not saved.

        Raises:
            TaskError: the head's own weights share a module with a weight tied to the backbone
                (`head_modules`).
            RuntimeError: the adapter's weights do not all land in the PEFT model.
        """
        from peft import get_peft_model
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        modules, mixed = head_modules(standalone, backbone_parts(backbone_prefix, self.peft.base_model.model))
        if mixed:
            raise TaskError(mixed_head_message(task, mixed))
        modules = [m for m in modules if not all(f"{m}.{n}" in frozen for n, _ in standalone.get_submodule(m).named_parameters())]
        config = self.setup.peft_config(self.added_tokens, modules)
        config.base_model_name_or_path = self.setup.base_model
        with quiet_peft():
            wrapped = get_peft_model(standalone, config)
        name = self.names[task]
        # PEFT's own adapter state (keys without the adapter's name), moved under the backbone's place in the
        # standalone model; the head's modules_to_save hold the trained head already (copied when wrapped).
        trained = {key.replace("base_model.model.", f"base_model.model.{backbone_prefix}", 1): value
                   for key, value in get_peft_model_state_dict(self.peft, adapter_name=name, save_embedding_layers=False).items()}
        state = get_peft_model_state_dict(wrapped, save_embedding_layers=False)
        strays = [key for key in trained if key not in state]
        if strays:
            raise RuntimeError(f"adapter export of {task!r}: {len(strays)} adapter weights found no place, e.g. {strays[:3]}")
        set_peft_model_state_dict(wrapped, {**state, **trained}, adapter_name="default")
        wrapped.save_pretrained(str(directory), save_embedding_layers=False)


@contextlib.contextmanager
def quiet_peft():
    """PEFT's warnings that ask nothing of the user: it sets `fan_in_fan_out` itself for GPT-2's
    Conv1D layers (and says so), and reads a transformers property that transformers deprecated."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def backbone_parts(prefix: str, backbone: nn.Module) -> set[str]:
    """The names of a task's standalone model's children that are its backbone: the one under
    `prefix` (``bert.``), or the backbone's own parts held at the top (T5's shared, encoder, decoder)."""
    return {prefix.rstrip(".")} if prefix else set(dict(backbone.named_children()))


def head_modules(standalone: nn.Module, parts: set[str]) -> tuple[list[str], list[str]]:
    """The modules of a task's model outside its backbone (`parts`, see `backbone_parts`) that
    hold the head's own weights, as PEFT's `modules_to_save` names them (["score"],
    ["classifier"], Llama's ["lm_head"]; none for GPT-2's language-model head, the tied embedding
    matrix), and the names of the head's weights that share a module with a backbone weight
    (BERT's masked-LM bias beside its tied decoder), which `modules_to_save` cannot save without
    copying the tied matrix."""
    backbone_ids = {id(p) for name, p in standalone.named_parameters(remove_duplicate=False)
                    if name.split(".")[0] in parts}
    found, mixed = [], []

    def visit(prefix: str, module: nn.Module) -> None:
        params = list(module.named_parameters(remove_duplicate=False))
        if not params:
            return
        if all(id(p) not in backbone_ids for _, p in params):
            found.append(prefix)
            return
        mixed.extend(f"{prefix}.{n}" for n, p in module.named_parameters(recurse=False) if id(p) not in backbone_ids)
        for child_name, child in module.named_children():
            visit(f"{prefix}.{child_name}", child)

    for child_name, child in standalone.named_children():
        if child_name not in parts:
            visit(child_name, child)
    return found, mixed


def mixed_head_message(task: str, mixed: list[str]) -> str:
    return (f"task {task!r}: LORA_EXPORT=adapter cannot save its head: its own weights ({', '.join(mixed[:2])}) sit in a "
            "module with the output layer it shares with the input embeddings, which PEFT's modules_to_save would copy "
            "untied; use LORA_EXPORT=merged (a standalone model)")


def _tied_modules(weight: nn.Parameter, backbone: nn.Module, heads: dict[str, nn.Module]) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every module besides the input embeddings whose weight is
    the embedding matrix: a tied output layer in a head, T5's `embed_tokens` in the backbone."""
    embeddings = backbone.get_input_embeddings()
    found = []
    for root in (backbone, *heads.values()):
        for name, module in root.named_modules():
            if module is embeddings or getattr(module, "weight", None) is not weight:
                continue
            parent, _, attr = name.rpartition(".")
            found.append((root.get_submodule(parent), attr, module))
    return found


# ---------------------------------------------------------------------- the base model
def base_tokens(tokenizer_name: str) -> int:
    """How many tokens the base's own tokenizer has, before any is added (`prepare_tokenizer`)."""
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_name))


def base_fingerprint(model_name: str) -> str:
    """A short hash of the base model's weights files (local folder or Hub cache): a file in the
    Hub cache is named by its SHA-256 already, any other file is hashed.

    Raises:
        TaskError: the model has no weights file (LoRA needs the pretrained weights).
    """
    from transformers.utils import cached_file

    def find(filename: str):
        return cached_file(model_name, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)

    files = []
    for single, index in (("model.safetensors", "model.safetensors.index.json"), ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        index_path = find(index)
        if index_path:
            files = sorted(set(json.loads(Path(index_path).read_text()).get("weight_map", {}).values()))
        elif find(single):
            files = [single]
        if files:
            break
    if not files:
        raise TaskError(f"MODEL_NAME={model_name!r} has no weights file (model.safetensors or pytorch_model.bin): "
                        "LoRA trains adapters on pretrained weights; use a model with weights, or LORA=false")
    digest = hashlib.sha256()
    for name in files:
        digest.update(f"{name}:{_file_sha256(Path(find(name)))}\n".encode())
    return digest.hexdigest()[:16]


def _file_sha256(path: Path) -> str:
    blob = path.resolve().name
    if re.fullmatch(r"[0-9a-f]{64}", blob):  # the Hub cache stores a weights file (LFS) under its SHA-256
        return blob
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_base(setup: LoraSetup, where: str) -> None:
    """Refuse a base whose weights are not those the adapters were trained on.

    Raises:
        TaskError: one line naming the model, both fingerprints and the fix.
    """
    now = base_fingerprint(setup.base_model)
    if now != setup.base_fingerprint:
        raise TaskError(f"{where} holds LoRA adapters trained on {setup.base_model} (weights fingerprint "
                        f"{setup.base_fingerprint}), whose weights now have fingerprint {now}: the adapters only fit the "
                        "weights they were trained on; restore that model's weights")


def rebuild_base(setup: LoraSetup, saved_config, load) -> nn.Module:
    """The frozen base backbone of a LoRA checkpoint: MODEL_NAME's weights (`load(model_name)`),
    checked against the fingerprint, with the embeddings resized to the checkpoint's vocabulary
    (the added rows are the adapters' trained token rows) and its pad token id."""
    backbone = load(setup.base_model)
    rows = backbone.get_input_embeddings().num_embeddings
    if saved_config.vocab_size > rows:
        backbone.resize_token_embeddings(saved_config.vocab_size, mean_resizing=False)  # rows overwritten by the adapters
    if getattr(saved_config, "pad_token_id", None) is not None:
        backbone.config.pad_token_id = saved_config.pad_token_id
    return backbone


# ---------------------------------------------------------------------- checks before training
def target_problem(setup: LoraSetup, backbone: nn.Module) -> str | None:
    """What is wrong with LORA_TARGET_MODULES for this backbone (one line with the fix), or None."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = backbone.config.model_type
    names = [name for name, _ in backbone.named_modules() if name]
    adaptable = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, module in backbone.named_modules()
                                   if name and _adaptable(module)))
    some = ", ".join(adaptable[:8]) + (" …" if len(adaptable) > 8 else "")
    if not setup.target_modules:
        if model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
            return (f"LORA_TARGET_MODULES is empty and PEFT has no default target modules for {model_type}: set "
                    f"LORA_TARGET_MODULES to some of its modules: {some}")
        return None
    absent = [t for t in setup.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if absent:
        return (f"LORA_TARGET_MODULES={','.join(setup.target_modules)!r} is not valid: the {model_type} backbone has no "
                f"module {', '.join(absent)} (task heads are trained in full, not adapted); it has e.g. {some}")
    return None


def _adaptable(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, Conv1D))


def tie_problem(setup: LoraSetup, backbone: nn.Module, heads: dict[str, nn.Module], tied_weights: dict[str, int]) -> str | None:
    """The task whose output layer is tied to a backbone module that LORA_TARGET_MODULES adapts
    (its input embeddings), in one line, or None. `tied_weights`: {task: id of the weight its
    output layer shares with the backbone}, taken before the adapters were injected."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = {id(module.get_base_layer().weight): name for name, module in backbone.named_modules()
               if isinstance(module, BaseTunerLayer) and hasattr(module.get_base_layer(), "weight")
               and "lora_A" in dict(module.named_children())}
    for task, weight in tied_weights.items():
        if weight in adapted:
            return (f"task {task!r}: its output layer is the backbone's {adapted[weight]} matrix (tied), which "
                    f"LORA_TARGET_MODULES={','.join(setup.target_modules)!r} adapts: a merged export keeps the tie and "
                    "would change the output layer too; drop that module from LORA_TARGET_MODULES")
    return None


def one_line(error: Exception) -> str:
    """An error's message on one line (PEFT's span several)."""
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


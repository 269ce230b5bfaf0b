"""One typed, validated configuration for every command.

Sources, highest first: CLI flags (python-fire), the process environment, an env file
(python-dotenv; ``ENV_FILE``, default ``.env``), the built-in demo (``--demo``), defaults. An
empty value in any source means "not set": the next source applies.

Every setting is a field of :class:`Config` with its environment name (the field name in
upper case), its type and a one-line help. Validation happens once, in :func:`load_config`,
before any model or data is touched; a bad value raises :class:`ConfigError` whose message
names the setting, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_DIR = PACKAGE_DIR / "demo"

SAMPLING_STRATEGIES = ("proportional", "temperature", "uniform", "round_robin", "weights")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STRATEGIES = ("no", "steps", "epoch")
MODEL_INITS = ("pretrained", "scratch")
MODEL_DTYPES = ("float32", "bfloat16", "auto")  # float16 weights cannot train: see `validate`
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
REPORT_TO = ("tensorboard", "wandb", "mlflow")  # the Trainer's integrations we support (trainer.training.trackers)
RESUME_MODES = ("auto", "never")
LORA_MODES = ("false", "shared", "per_task")  # LoRA adapters through PEFT (trainer.modeling.lora)
LORA_EXPORTS = ("merged", "adapter")
# Fully Sharded Data Parallel through the Trainer's `fsdp`/`fsdp_config` (FSDP2): full_shard frees
# each layer's gathered weights after its forward, shard_grad_op keeps them until the backward.
# hybrid_shard is FSDP1-only in transformers (deprecated there), so it is not offered.
FSDP_MODES = ("false", "full_shard", "shard_grad_op")
WORKDIR = ".trainer"  # the Trainer's scratch folder inside OUTPUT_DIR/<run>/

# Variables that may sit in an env file beside our settings without being ours: credentials,
# library knobs and the Vertex contract. Anything else unknown in an env file is a typo.
FOREIGN_ENV_PREFIXES = (
    "GOOGLE_", "GCLOUD_", "CLOUDSDK_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "CUDA_",
    "NCCL_", "OMP_", "MKL_", "PYTORCH_", "TORCH_", "AIP_", "CLOUD_ML_", "WANDB_", "MLFLOW_", "DOCKER_", "STORAGE_EMULATOR_",
    "PYTHON", "TENSORBOARD_", "MASTER_", "CLUSTER_SPEC", "WORLD_SIZE", "RANK", "LOCAL_RANK",
)


class ConfigError(ValueError):
    """A setting has a bad value. The message is one line: setting, value, what is allowed."""


def _setting(default: Any, help: str, section: str, **extra: Any) -> Any:
    meta = {"help": help, "section": section, **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    """All settings of a job. Environment / env-file names are the field names in upper case."""

    # --- model ---
    model_name: str = _setting("roberta-base", "Hugging Face model id or local directory of the shared encoder", "model")
    model_init: str = _setting("pretrained", "pretrained: load weights; scratch: build from the model's config only", "model")
    tokenizer_name: str | None = _setting(None, "tokenizer id or directory (default: MODEL_NAME)", "model")
    max_seq_length: int = _setting(128, "truncate inputs to this many tokens (per-task max_length overrides)", "model")
    model_dtype: str = _setting(
        "float32", "dtype the backbone's weights (and the heads) load and train in: float32 (PRECISION=bf16|fp16 then "
        "computes in half precision on float32 weights), bfloat16 (half the weight memory), or auto (the checkpoint's own); "
        "float16 weights cannot be trained", "model")
    special_tokens: list[str] = _setting(
        [], "comma-separated tokens to add to the tokenizer as special tokens (e.g. <sep>), besides the tasks' own", "model")
    lora: str = _setting("false", "train LoRA adapters on the frozen backbone instead of all its weights: false|shared (one "
                                  "adapter for all tasks)|per_task (one adapter per task); task heads train in full", "model")
    lora_r: int = _setting(8, "LoRA: rank of each adapter's update matrices", "model")
    lora_alpha: int = _setting(16, "LoRA: scaling numerator; an update is scaled by LORA_ALPHA/LORA_R", "model")
    lora_dropout: float = _setting(0.05, "LoRA: dropout on the adapters' inputs, in [0, 1)", "model")
    lora_target_modules: list[str] = _setting(
        [], "LoRA: comma-separated backbone module names to adapt (empty: PEFT's defaults for the architecture, e.g. "
            "query,value for BERT, c_attn for GPT-2)", "model")
    lora_export: str = _setting("merged", "LoRA: how tasks export: merged (a standalone transformers model, the adapter merged "
                                          "into the base weights)|adapter (the PEFT adapter and head, for PeftModel.from_pretrained)",
                                "model")

    # --- tasks ---
    tasks: list[str] = _setting(
        ["stsb", "rte", "commonsense_qa"], "comma-separated task names: presets or names from TASKS_FILE", "tasks"
    )
    tasks_file: str | None = _setting(None, "YAML/JSON file declaring custom tasks (see README)", "tasks")
    max_train_samples: int | None = _setting(None, "use at most this many training examples per task (debugging)", "tasks")
    max_eval_samples: int | None = _setting(None, "use at most this many evaluation examples per task", "tasks")

    # --- sampling ---
    sampling: str = _setting("proportional", "how task batches are mixed: " + "|".join(SAMPLING_STRATEGIES), "sampling")
    sampling_temperature: float = _setting(2.0, "T for SAMPLING=temperature: p(task) ~ size^(1/T)", "sampling")
    sampling_cap: int | None = _setting(None, "cap task sizes at this many examples before temperature weighting", "sampling")
    task_weights: dict[str, float] = _setting({}, "SAMPLING=weights: task=weight pairs, e.g. stsb=1,rte=2", "sampling")
    group_by_length: bool = _setting(True, "batch examples of similar length together (less padding)", "sampling")

    # --- training ---
    output_dir: str = _setting("outputs", "local folder for checkpoints, exports and metrics.json", "training")
    run_name: str | None = _setting(None, "name of this run (default: model and task names; for evaluate, predict, export and pull, "
                                      "else the run committed last); outputs go to OUTPUT_DIR/RUN_NAME", "training")
    learning_rate: float = _setting(2e-5, "peak learning rate", "training")
    num_train_epochs: float = _setting(3.0, "epochs over the mixed task data (ignored when MAX_STEPS > 0)", "training")
    max_steps: int = _setting(-1, "total optimizer steps; -1 trains NUM_TRAIN_EPOCHS", "training")
    train_batch_size: int = _setting(16, "per-device training batch size (per-task batch_size overrides)", "training")
    eval_batch_size: int = _setting(32, "per-device evaluation batch size", "training")
    gradient_accumulation_steps: int = _setting(1, "micro-batches per optimizer step", "training")
    warmup_ratio: float = _setting(0.06, "fraction of steps spent warming up the learning rate", "training")
    weight_decay: float = _setting(0.01, "AdamW weight decay", "training")
    lr_scheduler: str = _setting("linear", "learning-rate schedule: " + "|".join(LR_SCHEDULERS), "training")
    max_grad_norm: float = _setting(1.0, "gradient clipping norm (0 disables)", "training")
    fsdp: str = _setting(
        "false", "shard the backbone's weights, gradients and optimizer state over the GPUs of a torchrun job (FSDP2, "
        "for a backbone that does not fit on one GPU): false|full_shard (least memory)|shard_grad_op (weights kept "
        "gathered from forward to backward: faster, more memory); needs CUDA GPUs and WORLD_SIZE > 1", "training")
    fsdp_offload: bool = _setting(
        False, "FSDP: keep the sharded weights, gradients and optimizer state in CPU memory between uses (least GPU "
        "memory, slower steps)", "training")
    activation_checkpointing: bool = _setting(
        False, "recompute the backbone's activations in the backward pass instead of keeping them (gradient "
        "checkpointing): less memory, slower steps, the same gradients", "training")
    precision: str = _setting("auto", "auto (bf16 on a GPU of compute capability >= 8.0, fp16 on an older GPU, else fp32)|fp32|bf16|fp16", "training")
    seed: int = _setting(42, "random seed for weights, sampling and data order", "training")
    logging_steps: int = _setting(50, "log training loss every N steps", "training")
    eval_strategy: str = _setting("epoch", "when to evaluate: no|steps|epoch", "training")
    eval_steps: int = _setting(500, "evaluate every N steps when EVAL_STRATEGY=steps", "training")
    save_strategy: str = _setting("epoch", "when to checkpoint: no|steps|epoch", "training")
    save_steps: int = _setting(500, "checkpoint every N steps when SAVE_STRATEGY=steps", "training")
    save_total_limit: int | None = _setting(3, "keep at most N checkpoints (the best is always kept)", "training")
    load_best_model_at_end: bool = _setting(True, "reload the checkpoint with the best macro average (of each task's primary metric) at the end", "training")
    early_stopping_patience: int | None = _setting(
        None, "stop training after this many evaluations without improvement of the macro average (empty: never)", "training")
    early_stopping_threshold: float = _setting(
        0.0, "early stopping: the macro average must rise by more than this to count as an improvement", "training")
    dataloader_num_workers: int = _setting(0, "data-loading worker processes", "training")
    report_to: list[str] = _setting(
        ["none"], "trackers the Trainer logs to besides the console: none, or any of " + ",".join(REPORT_TO), "training")
    export_at_end: bool = _setting(True, "export every task as a standalone Hugging Face model after training", "training")
    max_new_tokens: int = _setting(64, "generation tasks: the most tokens generated per input (evaluation and predict)", "training")
    num_beams: int = _setting(1, "generation tasks: beams of the search (1: greedy)", "training")
    do_sample: bool = _setting(False, "generation tasks: sample instead of searching (default off: the same output every time)", "training")

    # --- checkpoints (storage) ---
    checkpoint_uri: str | None = _setting(None, "gs://bucket/prefix or a folder for committed checkpoints (default: OUTPUT_DIR)", "checkpoints")
    resume: str = _setting("auto", "auto: resume the newest committed checkpoint of this run; never; or a checkpoint URI", "checkpoints")
    preemption_grace_seconds: float = _setting(25.0, "on SIGTERM, seconds to save, commit and exit 0 (Spot VMs get 30)", "checkpoints")
    storage_retry_deadline: float = _setting(300.0, "seconds the storage client keeps retrying a failing request", "checkpoints")
    run_lease_seconds: float = _setting(
        60.0, "one job writes a run: another may take it over once its lease went this long unrefreshed", "checkpoints")

    # --- cloud (Vertex AI custom job; read by `submit` and the Makefile only) ---
    project_id: str | None = _setting(None, "Google Cloud project id", "cloud")
    region: str = _setting("us-central1", "Vertex AI region (also the bucket and Artifact Registry location)", "cloud")
    image_uri: str | None = _setting(None, "container image: REGION-docker.pkg.dev/PROJECT/REPO/IMAGE:TAG", "cloud")
    job_display_name: str | None = _setting(None, "Vertex AI job name (default: RUN_NAME)", "cloud")
    machine_type: str = _setting("n1-standard-8", "Vertex AI machine type", "cloud")
    accelerator_type: str = _setting("NVIDIA_TESLA_T4", "GPU type, or NONE for CPU only", "cloud")
    accelerator_count: int = _setting(1, "GPUs per node", "cloud")
    replica_count: int = _setting(1, "nodes (1 chief + N-1 workers)", "cloud")
    spot: bool = _setting(False, "use Spot VMs (cheaper, can be preempted; the job resumes)", "cloud")
    timeout: str = _setting("24h", "maximum job run time, e.g. 90m, 24h, 3600s", "cloud")
    restart_job_on_worker_restart: bool = _setting(True, "restart all workers when one restarts", "cloud")
    service_account: str | None = _setting(None, "service account the job runs as (default: the Vertex AI default)", "cloud")
    labels: dict[str, str] = _setting({}, "job labels, e.g. team=nlp,owner=me", "cloud")
    base_output_dir: str | None = _setting(None, "gs:// folder Vertex exposes as AIP_* dirs (default: CHECKPOINT_URI/RUN_NAME)", "cloud")
    vertex_api_endpoint: str | None = _setting(None, "Vertex AI API endpoint override (default: REGION-aiplatform.googleapis.com)", "cloud")
    boot_disk_size_gb: int = _setting(100, "boot disk size of each node in GB", "cloud")

    # Not a setting (no annotation, so no dataclass field): the names of the settings that some
    # source (a flag, the environment, the env file, the demo preset) set, a frozenset that
    # `load_config` records on the instance; None for a Config built in code, where every value
    # counts as set. Commands that read a saved run use the run's value of a setting nobody set.
    given = None
    # Not a setting either: the env file `load_config` read (None: none), whose variables of other
    # tools (WANDB_*, MLFLOW_*…) `trackers` passes on to the trackers and to the cloud job.
    env_file = None

    # ------------------------------------------------------------------ derived values
    def is_set(self, name: str) -> bool:
        """Whether a source set the setting `name` (rather than its default applying)."""
        return self.given is None or name in self.given

    @property
    def resolved_run_name(self) -> str:
        """The run's name: RUN_NAME, else ``<model basename>-<task>-<task>…``."""
        if self.run_name:
            return self.run_name
        base = Path(self.model_name.rstrip("/")).name or "model"
        return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{base}-{'-'.join(self.tasks)}")[:120]

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.resolved_run_name

    @property
    def work_dir(self) -> Path:
        """The Trainer's own folder in the run folder: scratch, emptied at every start (see `checkpoints.callback`)."""
        return self.run_dir / WORKDIR

    @property
    def store_uri(self) -> str:
        """Where committed checkpoints go: CHECKPOINT_URI, else OUTPUT_DIR (in place)."""
        return self.checkpoint_uri or self.output_dir

    def section(self, name: str) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["section"] == name}

    def to_env(self, sections: tuple[str, ...] = ("model", "tasks", "sampling", "training", "checkpoints")) -> dict[str, str]:
        """Settings that differ from their defaults, as environment variables (for containers)."""
        env = {}
        for f in dataclasses.fields(self):
            if f.metadata["section"] not in sections:
                continue
            value = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if value != default:
                env[f.name.upper()] = format_value(value)
        return env

    def hash(self) -> str:
        """Short hash of the settings that shape the trained model (not where it is stored)."""
        payload = {k: v for s in ("model", "tasks", "sampling", "training") for k, v in self.section(s).items()}
        # ACTIVATION_CHECKPOINTING and FSDP change what is kept in memory and where, not the gradients.
        for volatile in ("output_dir", "logging_steps", "dataloader_num_workers", "report_to", "activation_checkpointing",
                         "fsdp", "fsdp_offload"):
            payload.pop(volatile, None)
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}
_TYPES = typing.get_type_hints(Config)
BOOL_SETTINGS = frozenset(name for name, tp in _TYPES.items() if tp is bool)  # a flag alone turns them on

# The built-in demos (`--demo`, `--demo=decoder`): tiny models and data shipped in trainer/demo/.
DEMO_SETTINGS = {
    "model_name": str(DEMO_DIR / "model"),
    "model_init": "scratch",
    "tasks": "demo_similarity,demo_entailment,demo_choice",
    "tasks_file": str(DEMO_DIR / "tasks.json"),
    "run_name": "demo",
    "max_seq_length": "64",  # the demo model's position embeddings
    "learning_rate": "5e-4",
    "num_train_epochs": "12",
    "train_batch_size": "32",
    "warmup_ratio": "0.05",
    "logging_steps": "50",
    "seed": "1",
}
DECODER_DEMO_SETTINGS = {
    "model_name": str(DEMO_DIR / "decoder" / "model"),
    "model_init": "scratch",
    "tasks": "demo_reverse,demo_majority",
    "tasks_file": str(DEMO_DIR / "decoder" / "tasks.json"),
    "run_name": "demo-decoder",
    "max_seq_length": "32",
    "max_new_tokens": "8",
    "learning_rate": "2e-3",  # generation needs more than the encoder demo's 5e-4 under warmup and decay
    "num_train_epochs": "15",
    "train_batch_size": "32",
    "warmup_ratio": "0.05",
    "logging_steps": "50",
    "seed": "1",
}
DEMOS = {"encoder": DEMO_SETTINGS, "decoder": DECODER_DEMO_SETTINGS}


def demo_settings(demo: bool | str) -> dict[str, str]:
    """The settings of the demo `--demo` names: True (a bare --demo) is the encoder demo.

    Raises:
        ConfigError: no demo of that name.
    """
    if demo is False or demo is None or (isinstance(demo, str) and demo.strip().lower() in ("", "false", "no", "0")):
        return {}
    name = "encoder" if demo is True or str(demo).strip().lower() in ("true", "yes", "1") else str(demo).strip().lower()
    if name not in DEMOS:
        raise ConfigError(f"--demo={demo!r}: no such demo; use --demo (a tiny encoder on three tasks) or --demo=decoder "
                          "(a tiny GPT-2 with a generation task and a classification task)")
    return DEMOS[name]


# ---------------------------------------------------------------------- parsing values
def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return "" if value is None else str(value)


def parse_bool(raw: Any) -> bool | None:
    """The bool a setting's value says (true/false, yes/no, on/off, 1/0, any case); None if neither."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    return None


def _bad(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{name.upper()}={value!r} is not valid: expected {allowed}")


def _to_float(name: str, raw: Any, value: Any) -> float:
    # Every float setting is finite: inf passes range checks such as "> 0" and then breaks the
    # schedule, the sampler or a timer far from the setting that caused it.
    if isinstance(value, bool):
        raise _bad(name, raw, "a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _bad(name, raw, "a number, e.g. 2e-5") from None
    if not math.isfinite(number):
        raise _bad(name, raw, "a finite number")
    return number


def _parse(name: str, raw: Any) -> Any:
    """Convert a raw value (a string from the env file, the environment or a flag) to the field's type.

    Raises:
        ConfigError: the value does not parse as the type, or is a non-finite float.
    """
    tp = _TYPES[name]
    optional = type(None) in typing.get_args(tp)
    if optional:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if isinstance(raw, str):
        raw = raw.strip()
        if optional and raw.lower() in ("", "none", "null"):
            return None
    elif raw is None:
        if optional:
            return None
        raise _bad(name, raw, f"a value of type {getattr(tp, '__name__', tp)}")
    origin = typing.get_origin(tp)
    if tp is bool:
        value = parse_bool(raw)
        if value is None:
            raise _bad(name, raw, "true or false")
        return value
    if tp is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise _bad(name, raw, "a whole number")
        try:
            return int(raw) if not isinstance(raw, str) else int(raw.replace("_", ""))
        except ValueError:
            raise _bad(name, raw, "a whole number") from None
    if tp is float:
        return _to_float(name, raw, raw)
    if tp is str:
        if isinstance(raw, (list, tuple, dict)):
            raise _bad(name, raw, "a single value")
        return str(raw)
    if origin is list:
        items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
        return [str(i).strip() for i in items if str(i).strip()]
    if origin is dict:
        value_type = typing.get_args(tp)[1]
        if isinstance(raw, dict):
            pairs = list(raw.items())
        else:
            pairs = []
            for item in str(raw).split(","):
                if not item.strip():
                    continue
                if "=" not in item:
                    raise _bad(name, raw, "comma-separated key=value pairs, e.g. a=1,b=2")
                k, v = item.split("=", 1)
                pairs.append((k.strip(), v.strip()))
        out = {}
        for k, v in pairs:
            if value_type is float:
                out[str(k)] = _to_float(name, raw, v)
                continue
            try:
                out[str(k)] = value_type(v)
            except ValueError:
                raise _bad(name, raw, f"key=value pairs with {value_type.__name__} values") from None
        return out
    raise TypeError(f"unsupported setting type {tp} for {name}")  # a programming error, not user input


# ---------------------------------------------------------------------- sources
def not_utf8(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str | None:
    """Where a text file stops being UTF-8 ("byte 0xe9 on line 3"), or None if it is UTF-8.

    Reads the file in chunks (a data file may be large); shared by every reader of user files
    (env file, tasks file, data files, predict inputs) so each can name the line to fix.
    """
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    lines_before = 1
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                # e.start counts from the bytes the decoder still held from the previous chunk.
                pending = len(e.object) - len(chunk)
                line = lines_before + chunk.count(b"\n", 0, max(e.start - pending, 0))
                return f"byte 0x{e.object[e.start]:02x} on line {line}"
            if not chunk:
                return None
            lines_before += chunk.count(b"\n")


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key.lower(), list(FIELDS), n=1, cutoff=0.75)
    return f" (did you mean {close[0].upper()}?)" if close else ""


def _normalize_cli_key(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_").lower()


def read_env_file(path: str | os.PathLike) -> dict[str, str]:
    """Read KEY=value pairs with python-dotenv; unknown keys are errors (typos), foreign ones pass."""
    from dotenv import dotenv_values

    problem = not_utf8(path)
    if problem:
        raise ConfigError(f"env file {path} is not UTF-8 text ({problem}); save it as UTF-8")
    values = dotenv_values(path)
    out = {}
    for key, value in values.items():
        name = key.lower()
        if name in FIELDS:
            out[name] = "" if value is None else value
        elif key.upper().startswith(FOREIGN_ENV_PREFIXES) or key == "ENV_FILE":
            continue
        else:
            raise ConfigError(f"unknown setting {key} in {path}{_suggest(key)}: see .env.example for the settings")
    return out


def load_config(
    cli: dict[str, Any] | None = None,
    *,
    environ: typing.Mapping[str, str] | None = None,
    env_file: str | os.PathLike | None = None,
    demo: bool | str = False,
) -> Config:
    """Build and validate the config from CLI flags, environment, env file, demo preset, defaults.

    Raises:
        ConfigError: a setting is unknown, has the wrong type, or is outside its allowed values.
    """
    environ = os.environ if environ is None else environ
    layers: dict[str, Any] = {}

    def given(name: str, value: Any) -> None:
        # An empty value means "not set" in every source (`KEY=` in a file, an empty variable,
        # `--key=`): the next source down, in the end the default, applies.
        if not (value is None or (isinstance(value, str) and not value.strip())):
            layers[name] = value

    layers.update(demo_settings(demo))
    path = env_file if env_file is not None else environ.get("ENV_FILE", ".env")
    read_file = None
    if path and Path(path).is_file():
        read_file = str(path)
        for name, value in read_env_file(path).items():
            given(name, value)
    elif path and (env_file is not None or "ENV_FILE" in environ):
        raise ConfigError(f"ENV_FILE={str(path)!r} does not exist: create it from .env.example or fix the path")
    for name in FIELDS:
        if name.upper() in environ:
            given(name, environ[name.upper()])
    if "checkpoint_uri" not in layers and environ.get("AIP_CHECKPOINT_DIR"):
        layers["checkpoint_uri"] = environ["AIP_CHECKPOINT_DIR"]  # Vertex AI's contract
    for key, value in (cli or {}).items():
        name = _normalize_cli_key(key)
        if name not in FIELDS:
            raise ConfigError(f"unknown flag --{key}{_suggest(name)}: run `python -m trainer settings` for the list")
        given(name, value)
    cfg = Config(**{name: _parse(name, value) for name, value in layers.items()})
    validate(cfg)
    cfg.given = frozenset(layers)
    cfg.env_file = read_file
    return cfg


# ---------------------------------------------------------------------- validation
def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise _bad(name, value, allowed)


def validate(cfg: Config) -> None:
    """Check every setting against what is allowed. Raises ConfigError naming the first bad one."""
    _check(cfg.model_init in MODEL_INITS, "model_init", cfg.model_init, "|".join(MODEL_INITS))
    _check(bool(cfg.model_name.strip()), "model_name", cfg.model_name, "a Hugging Face model id or a local folder")
    _check(cfg.lora in LORA_MODES, "lora", cfg.lora, "|".join(LORA_MODES))
    if cfg.lora != "false":
        # LoRA keeps the backbone as loaded and saves only what it trains: a scratch backbone
        # would stay random, and no checkpoint could rebuild it from MODEL_NAME.
        _check(cfg.model_init == "pretrained", "model_init", cfg.model_init,
               f"pretrained when LORA={cfg.lora} (LoRA trains adapters on frozen pretrained weights; a scratch backbone "
               "would stay random): set MODEL_INIT=pretrained, or LORA=false")
    _check(cfg.lora_r >= 1, "lora_r", cfg.lora_r, "an integer >= 1, e.g. 8")
    _check(cfg.lora_alpha >= 1, "lora_alpha", cfg.lora_alpha, "an integer >= 1, e.g. 16")
    _check(0 <= cfg.lora_dropout < 1, "lora_dropout", cfg.lora_dropout, "a number in [0, 1)")
    bad_names = [m for m in cfg.lora_target_modules if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", m)]
    _check(not bad_names, "lora_target_modules", format_value(cfg.lora_target_modules),
           f"comma-separated module names such as query,value (not: {','.join(bad_names)})")
    _check(cfg.lora_export in LORA_EXPORTS, "lora_export", cfg.lora_export, "|".join(LORA_EXPORTS))
    _check(cfg.max_seq_length >= 8, "max_seq_length", cfg.max_seq_length, "an integer >= 8")
    # float16 weights cannot be trained: the fp16 loss scaler refuses float16 gradients, and
    # without it small gradients vanish (and AdamW's eps rounds to 0 in float16).
    _check(cfg.model_dtype != "float16", "model_dtype", cfg.model_dtype,
           "float32 or bfloat16 (float16 weights cannot be trained; for fp16 mixed precision keep float32 with PRECISION=fp16)")
    _check(cfg.model_dtype in MODEL_DTYPES, "model_dtype", cfg.model_dtype, "|".join(MODEL_DTYPES))
    _check(not (cfg.model_dtype == "bfloat16" and cfg.precision == "fp16"), "model_dtype", cfg.model_dtype,
           "float32 with PRECISION=fp16 (fp16 mixed precision trains float32 weights), or PRECISION=bf16 with bfloat16 weights")
    _check(cfg.max_new_tokens >= 1, "max_new_tokens", cfg.max_new_tokens, "an integer >= 1")
    _check(cfg.num_beams >= 1, "num_beams", cfg.num_beams, "an integer >= 1")
    _check(len(cfg.tasks) > 0, "tasks", cfg.tasks, "at least one task name, e.g. stsb,rte")
    dupes = sorted({t for t in cfg.tasks if cfg.tasks.count(t) > 1})
    _check(not dupes, "tasks", ",".join(cfg.tasks), f"each task once (repeated: {','.join(dupes)})")
    if cfg.tasks_file is not None:
        _check(Path(cfg.tasks_file).is_file(), "tasks_file", cfg.tasks_file, "an existing .yaml/.yml/.json file")
        _check(
            Path(cfg.tasks_file).suffix.lower() in (".yaml", ".yml", ".json"),
            "tasks_file", cfg.tasks_file, "a file ending in .yaml, .yml or .json",
        )
    for name in ("max_train_samples", "max_eval_samples", "sampling_cap"):
        value = getattr(cfg, name)
        _check(value is None or value >= 1, name, value, "a positive integer or empty")
    _check(cfg.sampling in SAMPLING_STRATEGIES, "sampling", cfg.sampling, "|".join(SAMPLING_STRATEGIES))
    _check(cfg.sampling_temperature > 0, "sampling_temperature", cfg.sampling_temperature, "a number > 0")
    if cfg.sampling == "weights":
        missing = [t for t in cfg.tasks if t not in cfg.task_weights]
        _check(not missing, "task_weights", format_value(cfg.task_weights), f"a weight for every task (missing: {','.join(missing)})")
    extra = [t for t in cfg.task_weights if t not in cfg.tasks]
    _check(not extra, "task_weights", format_value(cfg.task_weights), f"weights only for tasks in TASKS (not: {','.join(extra)})")
    bad_w = [t for t, w in cfg.task_weights.items() if not w > 0]
    _check(not bad_w, "task_weights", format_value(cfg.task_weights), "weights > 0")
    if cfg.run_name is not None:
        _check(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", cfg.run_name)), "run_name", cfg.run_name,
               "letters, digits, '.', '_' or '-' (max 128), starting with a letter or digit")
    _check(not Path(cfg.output_dir).is_file(), "output_dir", cfg.output_dir, "a folder, not an existing file")
    _check(cfg.learning_rate > 0, "learning_rate", cfg.learning_rate, "a number > 0, e.g. 2e-5")
    _check(cfg.num_train_epochs > 0 or cfg.max_steps > 0, "num_train_epochs", cfg.num_train_epochs, "a number > 0 (or MAX_STEPS > 0)")
    _check(cfg.max_steps == -1 or cfg.max_steps > 0, "max_steps", cfg.max_steps, "-1 or a positive integer")
    for name in ("train_batch_size", "eval_batch_size", "gradient_accumulation_steps", "logging_steps", "eval_steps", "save_steps"):
        _check(getattr(cfg, name) >= 1, name, getattr(cfg, name), "an integer >= 1")
    _check(0 <= cfg.warmup_ratio < 1, "warmup_ratio", cfg.warmup_ratio, "a number in [0, 1)")
    _check(cfg.weight_decay >= 0, "weight_decay", cfg.weight_decay, "a number >= 0")
    _check(cfg.max_grad_norm >= 0, "max_grad_norm", cfg.max_grad_norm, "a number >= 0")
    _check(cfg.fsdp in FSDP_MODES, "fsdp", cfg.fsdp, "|".join(FSDP_MODES) + " (hybrid_shard is FSDP1-only in transformers)")
    _check(not cfg.fsdp_offload or cfg.fsdp != "false", "fsdp_offload", True, "false when FSDP=false (there is nothing "
           "sharded to offload): set FSDP=full_shard or shard_grad_op, or FSDP_OFFLOAD=false")
    if cfg.fsdp != "false":
        # LoRA's checkpoints hold the adapters and heads only and rebuild the frozen base from
        # MODEL_NAME; FSDP's full-state-dict saves and loads (checkpoints, resume, best model) go
        # through every weight. And LoRA's point, a small trainable part, is what FSDP does not need.
        _check(cfg.lora == "false", "fsdp", cfg.fsdp, f"false with LORA={cfg.lora} (LoRA checkpoints hold only the "
               "adapters and heads, FSDP saves and loads whole state dicts): set LORA=false or FSDP=false")
    _check(cfg.lr_scheduler in LR_SCHEDULERS, "lr_scheduler", cfg.lr_scheduler, "|".join(LR_SCHEDULERS))
    _check(cfg.precision in PRECISIONS, "precision", cfg.precision, "|".join(PRECISIONS))
    _check(cfg.eval_strategy in STRATEGIES, "eval_strategy", cfg.eval_strategy, "|".join(STRATEGIES))
    _check(cfg.save_strategy in STRATEGIES, "save_strategy", cfg.save_strategy, "|".join(STRATEGIES))
    if cfg.early_stopping_patience is not None:
        _check(cfg.early_stopping_patience >= 1, "early_stopping_patience", cfg.early_stopping_patience, "a positive integer or empty")
        _check(cfg.eval_strategy != "no", "early_stopping_patience", cfg.early_stopping_patience,
               "empty when EVAL_STRATEGY=no (early stopping counts evaluations: set EVAL_STRATEGY=epoch or steps)")
    _check(cfg.early_stopping_threshold >= 0, "early_stopping_threshold", cfg.early_stopping_threshold, "a number >= 0")
    _check(cfg.save_total_limit is None or cfg.save_total_limit >= 1, "save_total_limit", cfg.save_total_limit, "a positive integer or empty")
    _check(cfg.dataloader_num_workers >= 0, "dataloader_num_workers", cfg.dataloader_num_workers, "an integer >= 0")
    if cfg.report_to != ["none"]:
        trackers, given = f"none or trackers from {','.join(REPORT_TO)}, comma-separated", format_value(cfg.report_to)
        unknown = [t for t in cfg.report_to if t not in REPORT_TO]
        _check(bool(cfg.report_to) and "none" not in cfg.report_to, "report_to", given, f"{trackers} (none alone)")
        _check(not unknown, "report_to", given, f"{trackers} (not: {','.join(unknown)})")
        _check(len(set(cfg.report_to)) == len(cfg.report_to), "report_to", given, f"{trackers}, each once")
    if cfg.load_best_model_at_end:
        _check(cfg.eval_strategy != "no", "load_best_model_at_end", True, "false when EVAL_STRATEGY=no")
        _check(cfg.save_strategy == cfg.eval_strategy, "save_strategy", cfg.save_strategy,
               f"the same as EVAL_STRATEGY={cfg.eval_strategy} when LOAD_BEST_MODEL_AT_END=true")
        if cfg.eval_strategy == "steps":
            _check(cfg.save_steps % cfg.eval_steps == 0, "save_steps", cfg.save_steps,
                   f"a multiple of EVAL_STEPS={cfg.eval_steps} when LOAD_BEST_MODEL_AT_END=true")
    if cfg.checkpoint_uri is not None:
        _check(bool(re.match(r"^(gs://[a-z0-9][a-z0-9._-]{1,221}[a-z0-9](/.*)?|file://.+|[^:]+)$", cfg.checkpoint_uri)),
               "checkpoint_uri", cfg.checkpoint_uri, "gs://bucket[/prefix], file:///path or a local folder")
    _check(cfg.resume in RESUME_MODES or "/" in cfg.resume, "resume", cfg.resume, "auto, never, or a checkpoint URI")
    _check(cfg.preemption_grace_seconds > 0, "preemption_grace_seconds", cfg.preemption_grace_seconds, "a number of seconds > 0")
    _check(cfg.storage_retry_deadline > 0, "storage_retry_deadline", cfg.storage_retry_deadline, "a number of seconds > 0")
    _check(cfg.run_lease_seconds >= 4, "run_lease_seconds", cfg.run_lease_seconds, "a number of seconds >= 4")
    for name in ("accelerator_count", "replica_count", "boot_disk_size_gb"):
        _check(getattr(cfg, name) >= 0 if name == "accelerator_count" else getattr(cfg, name) >= 1,
               name, getattr(cfg, name), "a non-negative integer" if name == "accelerator_count" else "an integer >= 1")


def describe_settings() -> str:
    """Human-readable table of every setting: NAME, default, help (for `python -m trainer settings`)."""
    lines, section = [], None
    for f in dataclasses.fields(Config):
        if f.metadata["section"] != section:
            section = f.metadata["section"]
            lines.append(f"\n[{section}]")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"  {f.name.upper():<32} {format_value(default)!s:<22} {f.metadata['help']}")
    return "\n".join(lines).lstrip("\n")

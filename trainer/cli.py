"""Command line: `python -m trainer COMMAND [--SETTING=VALUE ...]` (python-fire).

Every setting of `trainer.config.Config` is also a flag (`--learning_rate=3e-5`,
`--learning-rate 3e-5`, `--spot` alone for a bool); flags beat the environment, which beats the
env file (ENV_FILE, default .env). A flag's value is parsed by the setting's declared type only,
as the env file's is. A bad setting or bad task data stops the command with exit code 2 and one line.
"""

from __future__ import annotations

import errno
import inspect
import re
import sys

import fire

from .checkpoints.commits import CheckpointError, ResumeError
from .checkpoints.storage import StorageError
from .cloud.launch import LaunchError
from .cloud.vertex import CloudApiError, CloudConfigError, CloudJobFailed
from .config import BOOL_SETTINGS, FIELDS, ConfigError, describe_settings, load_config, parse_bool
from .tasks import TaskError

_FLAG = re.compile(r"^--?[A-Za-z]")  # what fire takes for a flag (so "-1" is a value)


class Commands:
    """Multitask fine-tuning of one Hugging Face encoder: train, evaluate, predict, export.

    Settings come from flags, the environment and the env file; `settings` lists them all.
    Add --demo to any command to use the built-in offline demo (tiny encoder, three tasks), or
    --demo=decoder for the decoder demo (tiny GPT-2: a generation task beside a classification task).
    """

    def __init__(self, setting_flags: dict[str, str] | None = None):
        self._setting_flags = dict(setting_flags or {})  # taken out of argv by `split_flags`

    def _flags(self, settings: dict) -> dict:
        # `settings` holds what fire still passed: flags that are no setting (load_config names them).
        return {**self._setting_flags, **settings}

    def train(self, demo: bool | str = False, env_file: str | None = None, **settings):
        """Train all tasks together, evaluate each, save the model, export every task, write metrics.json.

        Every setting is also a flag (`python -m trainer settings` lists them), e.g.
        python -m trainer train --tasks=stsb,rte --learning_rate=3e-5 --max_steps=1000
        """
        from . import commands

        cfg = load_config(self._flags(settings), env_file=env_file, demo=demo)
        _relaunch_under_torchrun_if_needed()
        commands.train(cfg)

    def evaluate(self, checkpoint: str | None = None, demo: bool | str = False, env_file: str | None = None, **settings):
        """Evaluate a saved model (default: the run's final model) on each task's validation split.

        Example: python -m trainer evaluate --checkpoint=outputs/demo/checkpoint-400
        """
        from . import commands

        commands.evaluate(load_config(self._flags(settings), env_file=env_file, demo=demo), checkpoint)

    def predict(self, task: str, input: str, output: str | None = None, checkpoint: str | None = None,
                demo: bool | str = False, env_file: str | None = None, **settings):
        """Predict one task for a .jsonl/.csv/.tsv of inputs (same columns as the task's data).

        Writes one JSON line per input: {"label", "index", "probabilities"} for classification and
        multiple choice, {"score"} for regression, {"tags"} for token classification, {"labels",
        "probabilities"} for multi-label (the labels at or above the task's threshold), {"answer",
        "score", "start", "end"} for extractive QA, {"masks"} (the 5 likeliest tokens of each mask
        token) for masked LM, {"text"} for causal LM and seq2seq.
        Example: python -m trainer predict --task=rte --input=pairs.jsonl --output=preds.jsonl
        """
        from . import commands

        commands.predict(load_config(self._flags(settings), env_file=env_file, demo=demo), task, input, output, checkpoint)

    def export(self, checkpoint: str | None = None, output: str | None = None, task: str | None = None,
               demo: bool | str = False, env_file: str | None = None, **settings):
        """Export each task (or --task) as a standalone Hugging Face model folder.

        The folder loads with AutoModelFor<type>.from_pretrained and transformers.pipeline, with no
        code from this project. Default output: <checkpoint>-export/<task>, beside the checkpoint (never inside a committed folder).
        """
        from . import commands

        commands.export(load_config(self._flags(settings), env_file=env_file, demo=demo), checkpoint, output, task)

    def pull(self, which: str = "latest", task: str | None = None, dest: str | None = None, list: bool = False,
             env_file: str | None = None, **settings):
        """List the run's committed checkpoints (--list), or download one, verifying every checksum.

        --which: latest | best | final | STEP.  --task=NAME: only that task's exported model, ready
        for from_pretrained.  --dest: target folder (default pulled/RUN/NAME).
        Reads CHECKPOINT_URI and RUN_NAME like `train`. Example: python -m trainer pull --task=rte
        """
        from . import commands

        commands.pull(load_config(self._flags(settings), env_file=env_file), which=str(which), task=task, dest=dest, list_only=list)

    def create_bucket(self, env_file: str | None = None, **settings):
        """Create CHECKPOINT_URI's bucket in REGION (uniform bucket-level access) unless it exists."""
        from . import commands

        commands.create_bucket(load_config(self._flags(settings), env_file=env_file))

    def submit(self, dry_run: bool = False, wait: bool = False, env_file: str | None = None, **settings):
        """Submit the job to Vertex AI as a custom job running IMAGE_URI (what `make cloud-train` does).

        The job's settings (those that differ from the defaults), and the env file's variables of
        the trackers REPORT_TO names (WANDB_*, MLFLOW_*), travel as container environment variables; PROJECT_ID, REGION, MACHINE_TYPE, ACCELERATOR_* and the other cloud settings
        shape the CustomJob. --dry-run prints the CustomJob JSON without sending it; --wait
        follows the job's state until it ends.
        """
        import dataclasses

        from .cloud import vertex
        from .training import trackers

        cfg = load_config(self._flags(settings), env_file=env_file)
        tracker_env = trackers.env_file_variables(cfg, trackers.named(cfg))  # WANDB_API_KEY, MLFLOW_TRACKING_URI…
        cfg = dataclasses.replace(cfg, run_name=cfg.resolved_run_name)  # the job and its restarts share one run
        vertex.submit(cfg, {**tracker_env, **cfg.to_env()}, args=["train"], dry_run=dry_run, wait=wait)

    def settings(self, get: str | None = None, demo: bool | str = False, env_file: str | None = None, **settings):
        """List every setting with its default and meaning (env-file name = flag name in upper case).

        --get=NAME prints the value of one setting as this job resolves it (for scripts and make).
        """
        if get is None:
            print(describe_settings())
            return
        from .config import FIELDS, format_value

        name = get.lower()
        if name not in FIELDS:
            raise ConfigError(f"--get={get!r}: no such setting; run `python -m trainer settings` for the list")
        print(format_value(getattr(load_config(self._flags(settings), env_file=env_file, demo=demo), name)))


def _relaunch_under_torchrun_if_needed() -> None:
    """On a node with several GPUs, or in a multi-node Vertex job, re-run this command under
    torchrun (one process per GPU, ranks from CLUSTER_SPEC or MASTER_ADDR/RANK/WORLD_SIZE)."""
    import os

    from .cloud.launch import launch_argv

    gpus = 0
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) != "":
        import torch

        gpus = torch.cuda.device_count()
    argv = launch_argv(os.environ, max(gpus, 1), sys.argv[1:])
    if argv:
        print("launching: " + " ".join(argv), flush=True)
        os.execv(argv[0], argv)


def _command_parameters(argv: list[str]) -> dict[str, inspect.Parameter]:
    """The named parameters of the command `argv` calls (its first word that is not a flag)."""
    command = next((a for a in argv if not _FLAG.match(a)), "")
    method = getattr(Commands, command.replace("-", "_"), None) if not command.startswith("_") else None
    if not inspect.isfunction(method):
        return {}
    return {p.name: p for p in inspect.signature(method).parameters.values()
            if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}


def split_flags(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Take the settings' flags out of `argv` before fire sees them; keep the command's own as typed.

    Fire evaluates a flag's value as a Python literal: `--run_name=1e3` becomes 1000.0, `0x10`
    16, `a,b` a tuple, and `--demo=false` the (truthy) string 'false'. Settings are parsed by
    their declared type (`config.load_config`), so their flags leave argv as {name: text}, in
    every form: `--name=value`, `--name value`, `--name` alone or `--noname` for a bool, dashes or
    underscores. What stays for fire: the command's bool parameters as `--name`/`--noname` (a
    `bool | str` one, like --demo, also `--name='text'`), its text parameters quoted so that fire
    keeps them as typed, anything after `--`, and unknown
    flags (which `load_config` refuses with a suggestion).

    Raises:
        ConfigError: a bool flag whose value is not true/false; a setting flag without a value.
    """
    cut = argv.index("--") if "--" in argv else len(argv)
    args, rest = argv[:cut], argv[cut:]
    params = _command_parameters(args)
    kept: list[str] = []
    settings: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not _FLAG.match(arg):
            kept.append(arg)
            continue
        key, has_value, value = arg.lstrip("-").partition("=")
        name = key.replace("-", "_")
        if not has_value and i < len(args) and not _FLAG.match(args[i]) and (
                name.lower() in FIELDS or name in params):
            value, has_value, i = args[i], True, i + 1  # `--name value`
        if name.lower() in FIELDS:
            if not has_value and name.lower() not in BOOL_SETTINGS:
                raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
            settings[name.lower()] = value if has_value else "true"
        elif not has_value and name.lower().startswith("no") and name.lower()[2:] in BOOL_SETTINGS:
            settings[name.lower()[2:]] = "false"
        elif name in params and isinstance(params[name].default, bool) and not (
                has_value and parse_bool(value) is None and "str" in str(params[name].annotation)):
            on = _flag_bool(key, value) if has_value else True
            kept.append(f"--{name}" if on else f"--no{name}")
        elif name in params and has_value:
            kept.append(f"--{name}={value!r}")  # a Python string literal: fire keeps it as typed
        else:
            kept.append(arg)
    return kept + rest, settings


def _flag_bool(key: str, text: str) -> bool:
    value = parse_bool(text)
    if value is None:
        raise ConfigError(f"--{key}={text!r} is not valid: expected true or false")
    return value


def _end_progress_bars() -> None:
    """Close the progress bars an error interrupted, so that its line starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("--help", "-h") for a in argv) and "--" not in argv:
        # The commands take **settings, which would swallow --help as a setting: ask fire for help.
        argv = [a for a in argv if a not in ("--help", "-h")] + ["--", "--help"]
    try:
        argv, setting_flags = split_flags(argv)
        fire.Fire(Commands(setting_flags), command=argv, name="trainer")
    except (ConfigError, TaskError, StorageError, ResumeError, LaunchError, CloudConfigError) as e:
        _end_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _end_progress_bars()
        where = f" ({e.filename})" if e.filename and e.filename not in e.strerror else ""
        print(f"error: {e.strerror}{where}: free space on that disk or point OUTPUT_DIR at a bigger one; "
              "committed checkpoints are kept and the next start resumes from the newest", file=sys.stderr)
        return 2
    except (CloudApiError, CloudJobFailed, CheckpointError) as e:
        _end_progress_bars()
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

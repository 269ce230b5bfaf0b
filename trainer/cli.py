"""Command line: `python -m trainer COMMAND [--SETTING=VALUE ...]` (python-fire).

Every setting of `trainer.config.Config` is also a flag (`--learning_rate=3e-5` or
`--learning-rate=3e-5`); flags beat the environment, which beats the env file (ENV_FILE,
default .env). A bad setting or bad task data stops the command with exit code 2 and one line.
"""

from __future__ import annotations

import errno
import sys

import fire

from .checkpoint_store import CheckpointError, ResumeError
from .cloud import CloudApiError, CloudConfigError, CloudJobFailed
from .config import ConfigError, describe_settings, load_config
from .launch import LaunchError
from .storage import StorageError
from .tasks import TaskError


class Commands:
    """Multitask fine-tuning of one Hugging Face encoder: train, evaluate, predict, export.

    Settings come from flags, the environment and the env file; `settings` lists them all.
    Add --demo to any command to use the built-in offline demo (tiny model, three tasks).
    """

    def train(self, demo: bool = False, env_file: str | None = None, **settings):
        """Train all tasks together, evaluate each, save the model, export every task, write metrics.json.

        Every setting is also a flag (`python -m trainer settings` lists them), e.g.
        python -m trainer train --tasks=stsb,rte --learning_rate=3e-5 --max_steps=1000
        """
        from . import jobs

        cfg = load_config(settings, env_file=env_file, demo=demo)
        _relaunch_under_torchrun_if_needed()
        jobs.train(cfg)

    def evaluate(self, checkpoint: str | None = None, demo: bool = False, env_file: str | None = None, **settings):
        """Evaluate a saved model (default: the run's final model) on each task's validation split.

        Example: python -m trainer evaluate --checkpoint=outputs/demo/checkpoint-400
        """
        from . import jobs

        jobs.evaluate(load_config(settings, env_file=env_file, demo=demo), checkpoint)

    def predict(self, task: str, input: str, output: str | None = None, checkpoint: str | None = None,
                demo: bool = False, env_file: str | None = None, **settings):
        """Predict one task for a .jsonl/.csv/.tsv of inputs (same columns as the task's data).

        Writes one JSON line per input: {"label", "index", "probabilities"} for classification and
        multiple choice, {"score"} for regression, {"tags"} for token classification.
        Example: python -m trainer predict --task=rte --input=pairs.jsonl --output=preds.jsonl
        """
        from . import jobs

        jobs.predict(load_config(settings, env_file=env_file, demo=demo), task, input, output, checkpoint)

    def export(self, checkpoint: str | None = None, output: str | None = None, task: str | None = None,
               demo: bool = False, env_file: str | None = None, **settings):
        """Export each task (or --task) as a standalone Hugging Face model folder.

        The folder loads with AutoModelFor<type>.from_pretrained and transformers.pipeline, with no
        code from this project. Default output: <checkpoint>-export/<task>, beside the checkpoint (never inside a committed folder).
        """
        from . import jobs

        jobs.export(load_config(settings, env_file=env_file, demo=demo), checkpoint, output, task)

    def pull(self, which: str = "latest", task: str | None = None, dest: str | None = None, list: bool = False,
             env_file: str | None = None, **settings):
        """List the run's committed checkpoints (--list), or download one, verifying every checksum.

        --which: latest | best | final | STEP.  --task=NAME: only that task's exported model, ready
        for from_pretrained.  --dest: target folder (default pulled/RUN/NAME).
        Reads CHECKPOINT_URI and RUN_NAME like `train`. Example: python -m trainer pull --task=rte
        """
        from . import jobs

        jobs.pull(load_config(settings, env_file=env_file), which=str(which), task=task, dest=dest, list_only=list)

    def create_bucket(self, env_file: str | None = None, **settings):
        """Create CHECKPOINT_URI's bucket in REGION (uniform bucket-level access) unless it exists."""
        from . import jobs

        jobs.create_bucket(load_config(settings, env_file=env_file))

    def submit(self, dry_run: bool = False, wait: bool = False, env_file: str | None = None, **settings):
        """Submit the job to Vertex AI as a custom job running IMAGE_URI (what `make cloud-train` does).

        The job's settings (those that differ from the defaults) travel as container environment
        variables; PROJECT_ID, REGION, MACHINE_TYPE, ACCELERATOR_* and the other cloud settings
        shape the CustomJob. --dry-run prints the CustomJob JSON without sending it; --wait
        follows the job's state until it ends.
        """
        import dataclasses

        from . import cloud

        cfg = load_config(settings, env_file=env_file)
        cfg = dataclasses.replace(cfg, run_name=cfg.resolved_run_name)  # the job and its restarts share one run
        cloud.submit(cfg, cfg.to_env(), args=["train"], dry_run=dry_run, wait=wait)

    def settings(self, get: str | None = None, demo: bool = False, env_file: str | None = None, **settings):
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
        print(format_value(getattr(load_config(settings, env_file=env_file, demo=demo), name)))


def _relaunch_under_torchrun_if_needed() -> None:
    """On a node with several GPUs, or in a multi-node Vertex job, re-run this command under
    torchrun (one process per GPU, ranks from CLUSTER_SPEC or MASTER_ADDR/RANK/WORLD_SIZE)."""
    import os

    from .launch import launch_argv

    gpus = 0
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) != "":
        import torch

        gpus = torch.cuda.device_count()
    argv = launch_argv(os.environ, max(gpus, 1), sys.argv[1:])
    if argv:
        print("launching: " + " ".join(argv), flush=True)
        os.execv(argv[0], argv)


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
        fire.Fire(Commands(), command=argv, name="trainer")
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

"""Command line: `python -m trainer COMMAND [--SETTING=VALUE ...]` (python-fire).

Every setting of `trainer.config.Config` is also a flag (`--learning_rate=3e-5` or
`--learning-rate=3e-5`); flags beat the environment, which beats the env file (ENV_FILE,
default .env). A bad setting or bad task data stops the command with exit code 2 and one line.
"""

from __future__ import annotations

import sys

import fire

from .config import ConfigError, describe_settings, load_config
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

        jobs.train(load_config(settings, env_file=env_file, demo=demo))

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
        code from this project. Default output: <checkpoint>/export/<task>.
        """
        from . import jobs

        jobs.export(load_config(settings, env_file=env_file, demo=demo), checkpoint, output, task)

    def settings(self):
        """List every setting with its default and meaning (env-file name = flag name in upper case)."""
        print(describe_settings())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("--help", "-h") for a in argv) and "--" not in argv:
        # The commands take **settings, which would swallow --help as a setting: ask fire for help.
        argv = [a for a in argv if a not in ("--help", "-h")] + ["--", "--help"]
    try:
        fire.Fire(Commands(), command=argv, name="trainer")
    except (ConfigError, TaskError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

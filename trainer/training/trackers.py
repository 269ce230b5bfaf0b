"""Experiment trackers (REPORT_TO): the Trainer's own integrations, their optional packages, and
where their local files go.

The Trainer sends every log (the training loss, each evaluation's ``eval_<task>_<metric>`` and
``eval_macro_avg``) to the integrations named in ``TrainingArguments.report_to``, with
``run_name`` (RUN_NAME) as the tracker run's name. This module only checks, before anything is
loaded, that the named trackers' packages are installed, points their local files into the run
folder unless the environment already says where, and keeps one MLflow run open for the whole job.
Tracker packages are imported only when REPORT_TO names them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, ConfigError, format_value


@dataclass(frozen=True)
class Tracker:
    module: str  # what the Trainer's integration imports
    install: str  # the fix when it is missing
    output_variable: str  # the library's own variable for where its files go
    default_output: Callable[[Path], str]  # under the run folder
    prefix: str  # the library's own variables, which an env file may hold beside the settings


_EXTRAS = "run `make venv-trackers`, or `pip install -c constraints.txt -r requirements-trackers.txt`"

TRACKERS = {
    "tensorboard": Tracker("tensorboard", "run `make venv`, or `pip install -c constraints.txt -r requirements.txt`",
                           "TENSORBOARD_LOGGING_DIR", lambda run_dir: str(run_dir / "tensorboard"), "TENSORBOARD_"),
    # W&B writes <WANDB_DIR>/wandb/<run>/; WANDB_MODE, WANDB_PROJECT, WANDB_API_KEY… come from the environment.
    "wandb": Tracker("wandb", _EXTRAS, "WANDB_DIR", lambda run_dir: str(run_dir), "WANDB_"),
    # A file store: plain files, no database to create (a sqlite store takes seconds to set up and
    # needs SQLAlchemy); `mlflow migrate-filestore` moves it to a database later.
    "mlflow": Tracker("mlflow", _EXTRAS, "MLFLOW_TRACKING_URI", lambda run_dir: (run_dir / "mlruns").absolute().as_uri(),
                      "MLFLOW_"),
}
# MLflow 3 refuses a file store unless this opts in; set only where the job chose the file store itself.
MLFLOW_FILE_STORE_OPT_IN = "MLFLOW_ALLOW_FILE_STORE"


def named(cfg: Config) -> list[str]:
    """The trackers REPORT_TO names."""
    return [name for name in cfg.report_to if name != "none"]


def env_file_variables(cfg: Config, names: list[str]) -> dict[str, str]:
    """The variables of the trackers `names` (WANDB_*, MLFLOW_*, TENSORBOARD_*) that the env file
    `cfg` was read from holds, non-empty ones only: the one .env of a job configures its trackers
    too, for `train` here and in Docker, and for the Vertex AI job (`submit`)."""
    if not cfg.env_file or not names:
        return {}
    from dotenv import dotenv_values

    prefixes = tuple(TRACKERS[name].prefix for name in names)
    return {key: value for key, value in dotenv_values(cfg.env_file).items() if value and key.upper().startswith(prefixes)}


def setup(cfg: Config, environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """The trackers the Trainer reports to (its `report_to`), checked, given the env file's
    variables of theirs (`env_file_variables`) and pointed at the run folder.

    REPORT_TO's trackers, plus TensorBoard when Vertex AI asks for it (AIP_TENSORBOARD_LOG_DIR:
    `cloud.aip.TensorBoardSync` uploads the event files written in the run folder). Each one's output
    variable is set to a folder under the run folder unless `environ` already gives it a value.

    Raises:
        ConfigError: a named tracker's package is not installed (one line: the setting, the
            package, the command that installs it).
    """
    names = named(cfg)
    if environ.get("AIP_TENSORBOARD_LOG_DIR") and "tensorboard" not in names:
        names.append("tensorboard")
    for name in names:
        tracker = TRACKERS[name]
        if importlib.util.find_spec(tracker.module) is None:
            raise ConfigError(f"REPORT_TO={format_value(cfg.report_to)!r} needs the {tracker.module} package, "
                              f"which is not installed: {tracker.install}")
    for key, value in env_file_variables(cfg, names).items():
        if not environ.get(key):  # the process environment wins, as it does for our settings
            environ[key] = value
    for name in names:
        tracker = TRACKERS[name]
        if not environ.get(tracker.output_variable):  # empty means unset, as for our own settings
            environ[tracker.output_variable] = tracker.default_output(cfg.run_dir)
            if name == "mlflow" and not environ.get(MLFLOW_FILE_STORE_OPT_IN):
                environ[MLFLOW_FILE_STORE_OPT_IN] = "true"
    return names


@contextlib.contextmanager
def job_run(report_to: list[str], run_name: str, *, main: bool) -> Iterator[None]:
    """An MLflow run open around training and the final evaluation, ended FAILED if the job raises.

    The Trainer's MLflowCallback ends the run it started at the end of `Trainer.train`, so the
    final model's evaluation that follows would start a second, unnamed run; given an active run,
    the callback logs into it and leaves it open. Only the main process opens one, as only it
    logs. Nothing happens without mlflow in `report_to`.
    """
    if "mlflow" not in report_to or not main:
        yield
        return
    import mlflow

    if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])  # created if missing, as the callback does
    mlflow.start_run(run_name=run_name)  # MLFLOW_RUN_ID, when set, continues that run instead
    try:
        yield
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run()

"""The Vertex AI container contract, as Trainer callbacks and small helpers.

Vertex sets, when the job has a `baseOutputDirectory`:
- AIP_CHECKPOINT_DIR: the default CHECKPOINT_URI (see `config.load_config`);
- AIP_MODEL_DIR: where the exported per-task models are copied at the end;
- AIP_TENSORBOARD_LOG_DIR: where TensorBoard event files are synced (they are written locally,
  since the TensorBoard writer cannot write to gs:// without TensorFlow);
and, for a hyperparameter-tuning trial, CLOUD_ML_TRIAL_ID: each evaluation's macro average is
reported in the file the tuning service reads.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

HYPERTUNE_FILE = "/tmp/hypertune/output.metrics"


def copy_folder(local: Path, uri: str) -> int:
    """Upload every file under `local` to `uri` (a gs:// URI or folder); returns the count."""
    from ..checkpoints.storage import open_store

    store = open_store(uri, setting="AIP_MODEL_DIR")
    count = 0
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        store.upload_file(path, path.relative_to(local).as_posix())
        count += 1
    return count


def export_to_model_dir(export_dir: Path, environ=os.environ) -> str | None:
    """Copy the exported task models to AIP_MODEL_DIR, when Vertex set it."""
    target = environ.get("AIP_MODEL_DIR")
    if not target or not export_dir.is_dir():
        return None
    n = copy_folder(export_dir, target)
    logger.info("Copied %d files of the exported models to AIP_MODEL_DIR=%s", n, target)
    return target


class TensorBoardSync(TrainerCallback):
    """Uploads new or grown TensorBoard event files to AIP_TENSORBOARD_LOG_DIR at each log and at the end."""

    def __init__(self, local_dir: Path, uri: str, every_seconds: float = 60.0):
        self.local_dir, self.uri, self.every = local_dir, uri, every_seconds
        self._sent: dict[str, int] = {}
        self._last = 0.0
        self._store = None

    def sync(self) -> None:
        from ..checkpoints.storage import StorageError, open_store

        if self._store is None:
            self._store = open_store(self.uri, setting="AIP_TENSORBOARD_LOG_DIR")
        for path in sorted(p for p in self.local_dir.rglob("*") if p.is_file()):
            key, size = path.relative_to(self.local_dir).as_posix(), path.stat().st_size
            if self._sent.get(key) == size:
                continue
            try:
                self._store.upload_file(path, key)
                self._sent[key] = size
            except StorageError as e:  # logs are not worth stopping training for
                logger.warning("TensorBoard sync of %s failed: %s", key, e)
        self._last = time.monotonic()

    def on_log(self, args, state, control, **kwargs):
        if state.is_world_process_zero and time.monotonic() - self._last >= self.every:
            self.sync()

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.sync()


class HypertuneReporter(TrainerCallback):
    """Reports each evaluation's metric to Vertex AI hyperparameter tuning (CLOUD_ML_TRIAL_ID set).

    Writes the JSON lines that the `cloudml-hypertune` package writes (the file the tuning
    service reads); done here to avoid a dependency for ten lines.
    """

    def __init__(self, trial: str, metric: str, environ=os.environ):
        self.trial = trial
        self.metric = environ.get("CLOUD_ML_HP_METRIC_TAG") or metric
        self.path = Path(environ.get("CLOUD_ML_HP_METRIC_FILE") or HYPERTUNE_FILE)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not state.is_world_process_zero or not metrics:
            return
        key = self.metric if self.metric in metrics else f"eval_{self.metric}"
        if key not in metrics:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = {"timestamp": time.time(), "trial": self.trial, self.metric: metrics[key],
                "global_step": state.global_step, "checkpoint_path": ""}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


def platform_callbacks(run_dir: Path, metric: str, environ=os.environ) -> list[TrainerCallback]:
    """The callbacks the environment asks for (none outside Vertex AI)."""
    callbacks: list[TrainerCallback] = []
    if environ.get("AIP_TENSORBOARD_LOG_DIR"):
        callbacks.append(TensorBoardSync(run_dir / "tensorboard", environ["AIP_TENSORBOARD_LOG_DIR"]))
    if environ.get("CLOUD_ML_TRIAL_ID"):
        callbacks.append(HypertuneReporter(environ["CLOUD_ML_TRIAL_ID"], metric, environ))
    return callbacks

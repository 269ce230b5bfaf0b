"""Experiment trackers (REPORT_TO), through the Trainer's own integrations and the real libraries,
offline: one CLI run on the defaults reporting to TensorBoard, W&B (offline mode) and MLflow (a
local file store) puts every task's evaluation metrics, the macro average and the training loss
in each tracker's own files, under the run folder, in one run named RUN_NAME; a tracker whose
package is missing stops the job with one line before anything is loaded."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from tests.runs import RUN, STEPS_PER_EPOCH, TASKS, flags, train
from trainer.config import REPORT_TO, ConfigError, load_config
from trainer.training import trackers

EPOCHS = 2
LOGGING_STEPS = 4

def training_log(run_dir: Path) -> dict[str, list[int]]:
    """The steps at which the Trainer logged each training loss (`loss`, and `loss_<task>` for the
    tasks of the interval), from its own log history in the last checkpoint's trainer_state.json."""
    state = json.loads((run_dir / f"checkpoint-{EVALUATED[-1]}" / "trainer_state.json").read_text())
    logged: dict[str, list[int]] = {}
    for entry in state["log_history"]:
        for key in entry:
            if key == "loss" or key.startswith("loss_"):
                logged.setdefault(key, []).append(entry["step"])
    return logged


def evaluation_keys(tasks_file: Path) -> list[str]:
    """What every evaluation logs, from the tasks' declarations: each task's metrics and the macro average."""
    declared = json.loads(tasks_file.read_text())["tasks"]
    return [f"eval_{t['name']}_{m}" for t in declared for m in t["metrics"]] + ["eval_macro_avg"]


def slash_keys(key: str) -> str:
    """The name the Trainer's W&B and TensorBoard callbacks give a logged key (`eval/…`, `train/…`)."""
    return "eval/" + key[len("eval_"):] if key.startswith("eval_") else "train/" + key


# ------------------------------------------------------------------------------ reading each tracker's files
def wandb_records(path: Path):
    """The records of an offline W&B run file (`run-<id>.wandb`): a LevelDB-style log of 32 KiB blocks,
    after a 7-byte header, whose chunks (7-byte header: checksum, length, type) hold protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32 * 1024, 7, b""
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(run_dir: Path) -> tuple[str, list[dict]]:
    """The display name and the history rows of the one offline W&B run under `run_dir`."""
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    name, rows = None, []
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            name = record.run.display_name
        elif kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return name, rows


def mlflow_runs(tracking_uri: str) -> list[tuple[str, dict[str, list[tuple[int, float]]]]]:
    """(run name, {metric: [(step, value)…]}) of every MLflow run in the store, with mlflow's own client
    (MLFLOW_ALLOW_FILE_STORE=true for a file store, as the job sets it)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    out = []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            history = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                       for key in run.data.metrics}
            out.append((run.info.run_name, history))
    return out


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(log_dir.glob("events.out.tfevents.*")):  # the final evaluation opens a second file
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return scalars


# ------------------------------------------------------------------------------ one run, three trackers
@pytest.fixture(scope="module")
def tracked_run(tiny_model, small_tasks, tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked")
    home = tmp_path_factory.mktemp("wandb-home")
    env_file = home / "tracked.env"  # the user's one .env configures the trackers too
    env_file.write_text("WANDB_MODE=offline\n")
    env = {
        "WANDB_MODE": "",
        # W&B keeps settings and caches under the home folder: not a test's to write.
        "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_CACHE_DIR": str(home / "cache"), "WANDB_DATA_DIR": str(home / "data"),
        # Empty means unset: each tracker's files go where the job puts them by default.
        "WANDB_DIR": "", "MLFLOW_TRACKING_URI": "", "TENSORBOARD_LOGGING_DIR": "", "MLFLOW_ALLOW_FILE_STORE": "",
    }
    done = train(*flags(tiny_model, small_tasks, out, num_train_epochs=EPOCHS, logging_steps=LOGGING_STEPS,
                        report_to="tensorboard,wandb,mlflow", env_file=env_file), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / RUN, json.loads((out / RUN / "metrics.json").read_text())


EVALUATED = [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
LOGGED = list(range(LOGGING_STEPS, STEPS_PER_EPOCH * EPOCHS + 1, LOGGING_STEPS))


def test_wandb_offline_run_has_every_tasks_metrics_under_the_run_name(tracked_run, small_tasks):
    run_dir, metrics = tracked_run
    name, rows = wandb_run(run_dir)
    assert name == RUN
    for key in evaluation_keys(small_tasks):
        steps = [row["train/global_step"] for row in rows if slash_keys(key) in row]
        assert steps == [*EVALUATED, EVALUATED[-1]], (key, steps)  # each evaluation, then the final model's
    logged = training_log(run_dir)
    assert logged["loss"] == LOGGED and {f"loss_{t}" for t in TASKS.split(",")} <= set(logged), logged
    for key, steps in logged.items():  # the loss, and each task's
        assert [row["train/global_step"] for row in rows if slash_keys(key) in row] == steps, key
    final = [row for row in rows if "eval/macro_avg" in row][-1]
    assert final["eval/macro_avg"] == pytest.approx(metrics["eval"]["eval_macro_avg"])


def test_mlflow_file_store_has_one_run_with_every_tasks_metrics_and_the_final_evaluation(tracked_run, small_tasks,
                                                                                         monkeypatch):
    run_dir, metrics = tracked_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    runs = mlflow_runs((run_dir / "mlruns").as_uri())
    assert [name for name, _ in runs] == [RUN]  # the final evaluation too, not in a run of its own
    history = runs[0][1]
    for key in evaluation_keys(small_tasks):
        assert [step for step, _ in history.get(key, [])] == [*EVALUATED, EVALUATED[-1]], key
    for key, steps in training_log(run_dir).items():  # the loss, and each task's
        assert [step for step, _ in history.get(key, [])] == steps, key
    assert metrics["eval"]["eval_macro_avg"] in [value for _, value in history["eval_macro_avg"]]


def test_tensorboard_events_have_every_tasks_metrics(tracked_run, small_tasks):
    run_dir, _ = tracked_run
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    for key in evaluation_keys(small_tasks):
        assert sorted(step for step, _ in scalars.get(slash_keys(key), [])) == [*EVALUATED, EVALUATED[-1]], key
    for key, steps in training_log(run_dir).items():  # the loss, and each task's
        assert [step for step, _ in scalars.get(slash_keys(key), [])] == steps, key


# ------------------------------------------------------------------------------ settings and packages
def test_every_report_to_name_is_a_tracker_and_the_extra_pins_what_make_installs():
    import tomllib

    assert set(trackers.TRACKERS) == set(REPORT_TO)
    lines = (ROOT / "requirements-trackers.txt").read_text().splitlines()
    pinned = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    dynamic = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]
    assert dynamic["optional-dependencies"]["trackers"] == {"file": ["requirements-trackers.txt"]}  # `pip install .[trackers]`
    assert pinned and all("==" in pin for pin in pinned)


def test_tracker_output_goes_under_the_run_folder_unless_the_environment_says_where(tmp_path):
    cfg = load_config({"output_dir": str(tmp_path), "run_name": "r", "report_to": "wandb,mlflow"}, environ={})
    environ: dict[str, str] = {}
    assert trackers.setup(cfg, environ) == ["wandb", "mlflow"]
    assert environ == {"WANDB_DIR": str(tmp_path / "r"), "MLFLOW_TRACKING_URI": (tmp_path / "r" / "mlruns").as_uri(),
                       "MLFLOW_ALLOW_FILE_STORE": "true"}
    mine = {"WANDB_DIR": "/elsewhere", "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
    environ = dict(mine)
    trackers.setup(cfg, environ)
    assert environ == mine  # a tracking server needs no file-store opt-in

    # On Vertex AI, AIP_TENSORBOARD_LOG_DIR turns TensorBoard on: its event files are synced from the run folder.
    environ = {"AIP_TENSORBOARD_LOG_DIR": "gs://b/logs"}
    plain = load_config({"output_dir": str(tmp_path), "run_name": "r"}, environ={})
    assert trackers.setup(plain, environ) == ["tensorboard"]
    assert environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "r" / "tensorboard")
    assert trackers.setup(plain, {}) == []


def test_the_env_files_variables_of_the_named_trackers_reach_them_unless_the_environment_sets_them(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(f"OUTPUT_DIR={tmp_path}\nRUN_NAME=r\nREPORT_TO=wandb\nWANDB_MODE=offline\nWANDB_PROJECT=from-file\n"
                        "WANDB_TAGS=\nMLFLOW_EXPERIMENT_NAME=not-named\n")
    cfg = load_config({}, environ={}, env_file=env_file)
    environ = {"WANDB_PROJECT": "from-shell"}
    assert trackers.setup(cfg, environ) == ["wandb"]
    assert environ == {"WANDB_PROJECT": "from-shell", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "r")}


def test_a_missing_tracker_package_is_one_line_naming_the_setting_the_package_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # how Python sees a package that is not installed
    cfg = load_config({"output_dir": str(tmp_path), "report_to": "tensorboard,mlflow"}, environ={})
    with pytest.raises(ConfigError) as err:
        trackers.setup(cfg, {})
    assert str(err.value) == ("REPORT_TO='tensorboard,mlflow' needs the mlflow package, which is not installed: "
                              "run `make venv-trackers`, or `pip install -c constraints.txt -r requirements-trackers.txt`")


def test_cli_without_the_wandb_package_exits_2_with_one_line_before_loading_anything(tmp_path):
    hide = tmp_path / "hide-wandb"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None  # as if wandb were not installed\n")
    out = tmp_path / "out"
    done = run_cli("train", "--report_to=wandb", f"--output_dir={out}", "--model_name=/nonexistent",
                   env={"PYTHONPATH": f"{hide}{os.pathsep}{ROOT}"})
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip() == ("error: REPORT_TO='wandb' needs the wandb package, which is not installed: "
                                   "run `make venv-trackers`, or `pip install -c constraints.txt -r requirements-trackers.txt`")
    assert not out.exists()

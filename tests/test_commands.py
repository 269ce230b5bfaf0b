"""trainer.commands: which run `evaluate`, `predict`, `export` and `pull` read when RUN_NAME is not
given (the default name from MODEL_NAME and TASKS, else the run committed last, named in the log),
and the one line they stop with when there is none. In-process, on runs committed to a local store
(the end-to-end runs of the installed command are in test_install.py, `pull` on a bucket in
checkpoints/test_callback.py)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from trainer.checkpoints import commits as cs
from trainer.checkpoints.storage import LocalStore
from trainer.cli import main
from trainer.commands import find_run
from trainer.config import FIELDS, load_config
from trainer.tasks import TaskError

DEFAULT_RUN = "roberta-base-stsb-rte-commonsense_qa"  # MODEL_NAME and TASKS at their defaults


def commit(root: Path, run: str, step: int, *, final: bool = False) -> None:
    """Commit a checkpoint (or the final model) of `run` into the local store at `root`."""
    local = root.parent / f"{root.name}-{run}-{step}"
    local.mkdir(parents=True, exist_ok=True)
    (local / "model.safetensors").write_bytes(b"weights")
    store = LocalStore(root)
    if final:
        cs.commit_final(store, local, run, step, metadata={})
    else:
        cs.commit_checkpoint(store, local, run, step, metadata={})
    time.sleep(0.01)  # commit times that a coarse clock still tells apart


def settings(out: Path, **values: str):
    return load_config({"output_dir": str(out), **values}, environ={}, env_file="")


def test_without_run_name_the_run_committed_last_is_used_and_logged(tmp_path, caplog):
    out = tmp_path / "outputs"
    commit(out, "first", 1)
    commit(out, "second", 1, final=True)
    commit(out, "first", 2)  # `first` now holds the newest commit
    commit(out, "second", 2)  # and now `second`: its newest commit counts, not its final's
    with caplog.at_level(logging.INFO, logger="trainer"):
        assert find_run(settings(out), LocalStore(out), str(out), "OUTPUT_DIR") == "second"
    [line] = [r.getMessage() for r in caplog.records if "RUN_NAME is not set" in r.getMessage()]
    assert f"{out} has no run {DEFAULT_RUN}" in line and "using run second, committed last" in line
    assert "also there: first (set RUN_NAME to use another)" in line


def test_run_name_and_then_the_default_name_come_before_the_run_committed_last(tmp_path, caplog):
    out = tmp_path / "outputs"
    commit(out, DEFAULT_RUN, 1)
    commit(out, "other", 1)
    with caplog.at_level(logging.INFO, logger="trainer"):
        assert find_run(settings(out), LocalStore(out), str(out), "OUTPUT_DIR") == DEFAULT_RUN
        assert find_run(settings(out, run_name=DEFAULT_RUN), LocalStore(out), str(out), "OUTPUT_DIR") == DEFAULT_RUN
        assert find_run(settings(out, run_name="other"), LocalStore(out), str(out), "OUTPUT_DIR") == "other"
    assert "RUN_NAME is not set" not in caplog.text  # nothing was guessed


def test_without_a_committed_run_the_line_names_the_runs_there_and_the_fix(tmp_path):
    out = tmp_path / "outputs"
    with pytest.raises(TaskError, match=rf"^no committed run in {out} \(there is none\): train one first "
                                        r"\(`multitask-trainer train`\), or set OUTPUT_DIR to where your runs are$"):
        find_run(settings(out), LocalStore(out), str(out), "OUTPUT_DIR")
    (out / "crashed" / "checkpoint-3").mkdir(parents=True)  # a run that stopped before its first commit
    (out / "crashed" / "checkpoint-3" / "model.safetensors").write_bytes(b"half")
    with pytest.raises(TaskError, match=r"\(runs there: crashed \(nothing committed\)\): train one first"):
        find_run(settings(out), LocalStore(out), str(out), "OUTPUT_DIR")
    commit(out, "done", 1)
    with pytest.raises(TaskError, match=r"^RUN_NAME='typo': no such run in .* \(runs there: done, crashed \(nothing committed\)\); "
                                        r"set RUN_NAME to one of them \(unset: the run committed last\), or OUTPUT_DIR to where"):
        find_run(settings(out, run_name="typo"), LocalStore(out), str(out), "OUTPUT_DIR")


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
    """`multitask-trainer ARGS` in-process, in an empty folder, without env file or settings in the environment."""
    monkeypatch.setenv("ENV_FILE", "")
    monkeypatch.chdir(tmp_path)
    for name in FIELDS:
        monkeypatch.delenv(name.upper(), raising=False)

    def run(*args: str) -> tuple[int, str]:
        code = main(list(args))
        return code, capsys.readouterr().err

    return run


@pytest.mark.parametrize("command", [["evaluate"], ["export"], ["predict", "--task=t", "--input=in.jsonl"], ["pull"],
                                     ["pull", "--list"]])
def test_commands_reading_a_run_stop_with_one_line_when_there_is_none(cli, command):
    code, err = cli(*command)
    assert code == 2
    setting = "CHECKPOINT_URI" if command[0] == "pull" else "OUTPUT_DIR"
    where = LocalStore("outputs").uri() if command[0] == "pull" else "outputs"
    elsewhere = "" if command[0] == "pull" else ", pass --checkpoint=PATH, or `python -m trainer pull` one from CHECKPOINT_URI"
    assert err == (f"error: no committed run in {where} (there is none): train one first (`multitask-trainer train`), "
                   f"or set {setting} to where your runs are{elsewhere}\n")
    assert not Path("outputs").exists()  # nothing is created looking for it

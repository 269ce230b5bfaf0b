"""`evaluate`, `predict` and `export` use committed model folders only: a folder whose MANIFEST.json
lists every file with its size and checksum. A `final/` that a crash left without its manifest, a
checkpoint whose optimizer.pt a full disk truncated, a copy someone edited: exit 2 with one line
naming the folder and the committed alternatives. And nothing is written into a committed folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli, tiny_flags
from trainer.checkpoints import commits as cs

RUN = "committed"
CLI_ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def trained(tiny_model, tiny_tasks, tmp_path_factory):
    out = tmp_path_factory.mktemp("committed-run")
    flags = tiny_flags(tiny_model, tiny_tasks, out, run_name=RUN)
    done = run_cli("train", *flags, env=CLI_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / RUN, flags


def command_args(command: str, folder: Path, tmp: Path) -> list[str]:
    if command == "predict":
        inputs = tmp / "pairs.jsonl"
        inputs.write_text(json.dumps({"premise": "the saw is near the dog", "hypothesis": "there is a tool"}) + "\n")
        return ["predict", "--task=demo_entailment", f"--input={inputs}", f"--output={tmp / 'out.jsonl'}", f"--checkpoint={folder}"]
    if command == "export":
        return ["export", f"--checkpoint={folder}", f"--output={tmp / 'exported'}"]
    return ["evaluate", f"--checkpoint={folder}"]


def damaged_copies(run_dir: Path, tmp: Path) -> dict[str, Path]:
    """A final/ without its manifest (a crash before the commit ended) and a checkpoint with a truncated optimizer.pt."""
    unfinished = tmp / "final"
    shutil.copytree(run_dir / "final", unfinished)
    (unfinished / cs.MANIFEST_NAME).unlink()
    truncated = tmp / "checkpoint-12"
    shutil.copytree(run_dir / "checkpoint-12", truncated)
    optimizer = truncated / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    return {"never committed": unfinished, "truncated": truncated}


CASES = [("evaluate", "never committed"), ("evaluate", "truncated"), ("predict", "never committed"), ("export", "truncated")]


@pytest.mark.parametrize(("command", "why"), CASES)
def test_a_folder_no_commit_finished_is_refused_with_the_committed_alternatives(trained, command, why, tmp_path):
    run_dir, flags = trained
    folder = damaged_copies(run_dir, tmp_path)[why]
    done = run_cli(*command_args(command, folder, tmp_path), *flags, env=CLI_ENV)
    assert done.returncode == 2, done.stderr[-3000:]
    line = done.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("error: "), line
    assert str(folder) in line and why in line
    assert f"committed here: {run_dir / 'final'}" in line  # what can be used instead
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "exported").exists()


def test_without_a_committed_model_the_run_folder_is_refused(trained, tmp_path):
    run_dir, flags = trained
    # A run folder holding only what a crash leaves: a final/ without manifest.
    other = tmp_path / "out"
    shutil.copytree(run_dir / "final", other / RUN / "final")
    (other / RUN / "final" / cs.MANIFEST_NAME).unlink()
    done = run_cli("evaluate", *flags, f"--output_dir={other}", env=CLI_ENV)
    assert done.returncode == 2
    assert "no committed model in" in done.stderr and "final never committed" in done.stderr
    assert "python -m trainer pull" in done.stderr


def test_the_default_export_leaves_the_committed_folder_as_committed(trained):
    run_dir, flags = trained
    before = sorted(p.relative_to(run_dir) for p in (run_dir / "checkpoint-12").rglob("*"))
    done = run_cli("export", f"--checkpoint={run_dir / 'checkpoint-12'}", "--task=demo_tags", *flags, env=CLI_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.relative_to(run_dir) for p in (run_dir / "checkpoint-12").rglob("*")) == before
    assert (run_dir / "checkpoint-12-export" / "demo_tags" / "model.safetensors").is_file()
    cs.verify_local(run_dir / "checkpoint-12")

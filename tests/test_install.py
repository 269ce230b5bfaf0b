"""The installed package: `make venv` installs the trainer into the virtualenv with its console
command `multitask-trainer`, which works from any folder, the built-in demo included; a wheel (a
non-editable install) carries the demo's model, tasks and data files too.

The command run is the one beside this interpreter (the virtualenv's), from a folder outside the
checkout and without PYTHONPATH: what a user types. A missing command fails the test, saying
that `make venv` installs it; it does not skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT
from trainer.config import FIELDS

COMMAND = "multitask-trainer"
PAIRS = [
    {"premise": "the saw is near the dog", "hypothesis": "there is a tool"},
    {"premise": "the cat is near the hammer", "hypothesis": "there is a fruit"},
    {"premise": "the apple is near the bus", "hypothesis": "there is a vehicle"},
]


def installed_command() -> Path:
    command = Path(sys.executable).parent / COMMAND
    if not command.is_file():
        pytest.fail(f"{command} is missing: run `make venv` (or `make venv-dev`), which installs the trainer "
                    f"and its `{COMMAND}` command into the virtualenv")
    return command


def users_shell() -> dict[str, str]:
    """The environment of a user's shell: no PYTHONPATH to the checkout, no settings, no env file."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ENV_FILE") and k.lower() not in FIELDS}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_installed(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(installed_command()), *args], cwd=cwd, env=users_shell(),
                          capture_output=True, text=True, timeout=600)


@dataclass
class DemoFolder:
    path: Path  # a folder of the user's, outside the checkout, where the demo was trained
    train_log: str


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> DemoFolder:
    """`multitask-trainer train --demo` (one epoch) in an empty folder outside the checkout."""
    folder = tmp_path_factory.mktemp("my-project")
    assert ROOT not in folder.parents
    done = run_installed("train", "--demo", "--num_train_epochs=1", cwd=folder)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return DemoFolder(folder, done.stdout + done.stderr)


def test_the_installed_command_trains_the_demo_outside_the_checkout(demo_folder):
    run = demo_folder.path / "outputs" / "demo"
    assert (run / "final" / "MANIFEST.json").is_file()
    assert sorted(p.name for p in (run / "final" / "export").iterdir()) == ["demo_choice", "demo_entailment", "demo_similarity"]
    assert json.loads((run / "metrics.json").read_text())["run"] == "demo"


# Neither --demo nor TASKS, TASKS_FILE or RUN_NAME again: the run is the one committed last in
# OUTPUT_DIR, its tasks and MAX_SEQ_LENGTH (64, the demo model's, not the default 128) its own.
FOUND = "has no run roberta-base-stsb-rte-commonsense_qa (the name from MODEL_NAME and TASKS): using run demo, committed last"


def test_the_installed_command_predicts_with_the_run_it_trained_without_repeating_its_settings(demo_folder):
    (demo_folder.path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    done = run_installed("predict", "--task=demo_entailment", "--input=pairs.jsonl", cwd=demo_folder.path)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert f"RUN_NAME is not set and outputs {FOUND}" in log
    rows = [json.loads(line) for line in (demo_folder.path / "pairs.demo_entailment.predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(PAIRS)
    for row in rows:
        assert row["label"] in ("entailment", "not_entailment") and row["index"] in (0, 1)
        assert sum(row["probabilities"]) == pytest.approx(1, abs=1e-5)


def test_the_installed_command_evaluates_the_run_it_trained_without_repeating_its_settings(demo_folder):
    done = run_installed("evaluate", cwd=demo_folder.path)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert f"RUN_NAME is not set and outputs {FOUND}" in log
    final = Path("outputs") / "demo" / "final"
    [macro] = re.findall(rf"^.* INFO trainer: {re.escape(str(final))}: macro_avg = (\S+)$", done.stdout, re.M)
    at_train_end = json.loads((demo_folder.path / final / "metrics.json").read_text())["eval"]["eval_macro_avg"]
    assert float(macro) == pytest.approx(at_train_end, abs=1e-6)  # the same data, truncation and weights


# ---------------------------------------------------------------------- a non-editable install
def test_a_wheel_holds_the_package_with_the_demo_files_and_the_command(tmp_path):
    """What `pip install .` (not editable) installs: built offline from a copy of the sources."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "requirements-cloud.txt", "requirements-trackers.txt"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "trainer", source / "trainer", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "--quiet", "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = [z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")]
        [metadata] = [z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA")]
    shipped = {p.relative_to(source).as_posix() for p in (source / "trainer").rglob("*") if p.is_file()}
    assert {n for n in names if not n.split("/")[0].endswith(".dist-info")} == shipped
    assert {"trainer/demo/tasks.json", "trainer/demo/model/vocab.txt", "trainer/demo/data/entailment_dev.csv",
            "trainer/demo/decoder/tasks.json", "trainer/demo/decoder/model/tokenizer.json",
            "trainer/demo/decoder/data/reverse_dev.jsonl"} <= shipped
    assert entry_points and f"{COMMAND} = trainer.cli:main" in entry_points[0], f"no console script in {wheel.name}: {entry_points}"
    # the extras name the pinned files' packages: `pip install .[trackers]` gets what `make venv-trackers` does
    for extra, requirements in (("cloud", "requirements-cloud.txt"), ("trackers", "requirements-trackers.txt")):
        assert f"Provides-Extra: {extra}" in metadata
        for line in (ROOT / requirements).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                assert f"Requires-Dist: {line.strip()}; extra == \"{extra}\"" in metadata, (extra, line, metadata)

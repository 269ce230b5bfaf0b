"""trainer.cli: flag values reach the settings as typed (parsed by each setting's declared type
only, as the env file's are), command parameters keep working, bool ones parse as bools.

Most tests call `cli.main` in this process (what `python -m trainer` runs); one runs the real
command line.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_MAX_LENGTH, run_cli, tiny_flags
from trainer.cli import main
from trainer.config import FIELDS


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
    """Run `python -m trainer ARGS` in-process with no env file and no settings in the environment:
    returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("ENV_FILE", "")
    monkeypatch.chdir(tmp_path)
    for name in FIELDS:
        monkeypatch.delenv(name.upper(), raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.mark.parametrize(
    ("args", "printed"),
    [
        (["--get=run_name", "--run_name=1e3"], "1e3"),  # fire made it 1000.0
        (["--get=run_name", "--run_name", "0x10"], "0x10"),  # fire made it 16
        (["--get=run_name", "--run-name=007"], "007"),
        (["--get=tokenizer_name", "--tokenizer_name=a,b"], "a,b"),  # fire made it a tuple
        (["--get=tokenizer_name", "--tokenizer_name=[1, 2]"], "[1, 2]"),  # and this a list
        (["--get=tasks", "--tasks=stsb,rte"], "stsb,rte"),
        (["--get=learning_rate", "--learning_rate=3e-5"], "3e-05"),
        (["--get=learning_rate", "--learning-rate", "1e-3"], "0.001"),
        (["--get=max_steps", "--max_steps", "-1"], "-1"),
        (["--get=spot", "--spot"], "true"),  # a bool setting given alone
        (["--get=spot", "--spot=false"], "false"),
        (["--get=spot", "--spot", "no"], "false"),
        (["--get=spot", "--spot=true", "--nospot"], "false"),
        (["--get=labels", "--labels=team=nlp,owner=me"], "team=nlp,owner=me"),
        (["--get=run_name", "--run_name="], ""),  # empty: not set
        (["--get=run_name", "--demo"], "demo"),
        (["--get=run_name", "--demo=true"], "demo"),
        (["--get=run_name", "--demo=false"], ""),  # "false" is not truthy
        (["--get=run_name", "--demo=0"], ""),
        (["--get", "RUN_NAME", "--run_name=x"], "x"),
    ],
)
def test_flag_values_are_parsed_by_the_settings_type_only(cli, args, printed):
    code, out, err = cli("settings", *args)
    assert (code, err) == (0, "")
    assert out == printed + "\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # Whole numbers are whole numbers, as in the env file: fire read these as 1000 and 16.
        (["--get=max_steps", "--max_steps=1e3"], "error: MAX_STEPS='1e3' is not valid: expected a whole number"),
        (["--get=seed", "--seed=0x10"], "error: SEED='0x10' is not valid: expected a whole number"),
        (["--get=learning_rate", "--learning_rate=inf"], "error: LEARNING_RATE='inf' is not valid: expected a finite number"),
        (["--get=spot", "--spot=maybe"], "error: SPOT='maybe' is not valid: expected true or false"),
        (["--get=run_name", "--demo=maybe"], "error: --demo='maybe': no such demo; use --demo (a tiny encoder"),
        (["--get=run_name", "--learnig_rate=1"], "error: unknown flag --learnig_rate (did you mean LEARNING_RATE?)"),
        (["--get=nope"], "error: --get='nope': no such setting"),
        (["--get=run_name", "--learning_rate"], "error: --learning_rate needs a value: --learning_rate=VALUE"),
    ],
)
def test_bad_flags_exit_2_with_one_line(cli, args, message):
    code, out, err = cli("settings", *args)
    assert code == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1, err


def test_command_parameters_keep_their_text(cli, monkeypatch):
    from trainer import commands

    seen = {}
    monkeypatch.setattr(commands, "predict", lambda cfg, task, input, output, checkpoint: seen.update(
        task=task, input=input, output=output, checkpoint=checkpoint, run_name=cfg.run_name))
    code, _, err = cli("predict", "--task=1e3", "--input", "0x10.jsonl", "--output=a,b", "--checkpoint=007", "--run_name=1e3")
    assert (code, err) == (0, "")
    assert seen == {"task": "1e3", "input": "0x10.jsonl", "output": "a,b", "checkpoint": "007", "run_name": "1e3"}


def test_bool_command_parameters_parse_as_bools(cli, monkeypatch):
    from trainer import commands

    calls = []
    monkeypatch.setattr(commands, "pull", lambda cfg, which, task, dest, list_only: calls.append((which, list_only)))
    for args, expected in ((["--list"], ("latest", True)), (["--list=false"], ("latest", False)),
                           (["--list=no", "--which=5"], ("5", False)), (["--which", "best", "--list", "yes"], ("best", True))):
        code, _, err = cli("pull", *args)
        assert (code, err) == (0, ""), args
        assert calls.pop() == expected, args


def test_the_command_line_prints_the_flag_as_typed(tmp_path):
    done = run_cli("settings", "--get=run_name", "--run_name=1e3", cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "1e3\n", "")


def with_a_small_task(tasks_file, folder):
    """The tiny tasks plus 'few': demo_entailment's first 8 training rows."""
    declared = json.loads(tasks_file.read_text())
    entailment = next(t for t in declared["tasks"] if t["name"] == "demo_entailment")
    lines = open(entailment["files"]["train"]).read().splitlines(keepends=True)
    (folder / "few.csv").write_text("".join(lines[:9]))
    few = {**entailment, "name": "few", "files": {"train": str(folder / "few.csv"), "validation": entailment["files"]["validation"]}}
    path = folder / "tasks.json"
    path.write_text(json.dumps({"tasks": [*declared["tasks"], few]}))
    return path


# Bad settings that only the data, the hardware or the model show: `train` must stop with exit 2
# and one line before it trains or writes anything.
@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        ({"precision": "fp16"}, {"CUDA_VISIBLE_DEVICES": ""}, "error: PRECISION='fp16' is not valid: fp16 needs a CUDA GPU"),
        ({"sampling": "temperature", "sampling_temperature": "1e-300", "tasks": "demo_entailment,few"}, {},
         "error: SAMPLING_TEMPERATURE=1e-300 is not valid: task 'few' (8 examples) would get no step"),
        ({"max_seq_length": 2 * TINY_MAX_LENGTH}, {},
         f"error: MAX_SEQ_LENGTH={2 * TINY_MAX_LENGTH} is not valid: "),
    ],
    ids=["fp16-without-gpu", "temperature", "max-seq-length"],
)
def test_train_stops_before_training_on_settings_the_setup_refuses(tiny_model, tiny_tasks, tmp_path, flags, env, message):
    out = tmp_path / "out"
    done = run_cli("train", *tiny_flags(tiny_model, with_a_small_task(tiny_tasks, tmp_path), out, **flags),
                   env={"OMP_NUM_THREADS": "1", **env}, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr[-3000:]
    assert not out.exists()

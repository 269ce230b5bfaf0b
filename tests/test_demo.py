"""The built-in demos train offline and learn. The encoder demo (what `make run-local` runs with no .env) shows
what a user reads: the sampling plan once, each task's loss, a progress bar per evaluated task,
the chance table with its rule."""

from __future__ import annotations

import json
import re

from tests.conftest import run_cli

TASKS = ("demo_similarity", "demo_entailment", "demo_choice")


def test_demo_learns_every_task(tmp_path):
    # One torch thread: the suite's other process has the other core (two threads there took 120 s in CI, one 45 s alone).
    result = run_cli("train", "--demo", f"--output_dir={tmp_path}", env={"OMP_NUM_THREADS": "1"}, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "All tasks learned: every metric >= chance + 0.05." in log
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    for task, rows in metrics["chance"].items():
        for name, row in rows.items():
            assert row["value"] >= row["chance"] + 0.05, (task, name, row)
    assert metrics["eval"]["eval_demo_choice_accuracy"] > 0.5  # chance is 0.25
    for task in TASKS:
        assert (tmp_path / "demo" / "final" / "export" / task / "config.json").is_file()

    # 1200 training and 300 validation examples per task, batches of 32: 38 of an epoch each.
    assert log.count("Sampling plan: ") == 1
    assert "Sampling plan: SAMPLING=proportional; an epoch is 114 batches on each of 1 process, 114 optimizer steps" in log
    for task in TASKS:
        assert re.search(rf"\n{task} +\w+ +1200 +300 +32 +38 +33\.3% +1\.00\n", log), task
    losses = [line for line in log.splitlines() if "{'loss': " in line]
    assert losses and all(f"'loss_{task}': " in line for line in losses for task in TASKS)  # LOGGING_STEPS=50: every task trains
    bars = log.replace("\r", "\n")
    for task in TASKS:
        assert re.search(rf"Evaluation {task}: 100%\|[^|\n]*\| 10/10 ", bars), task  # 300 examples, EVAL_BATCH_SIZE=32
    assert not re.search(r"\b\d+it \[", bars)
    assert metrics["train"]["total_flos"] > 0


def test_the_decoder_demo_learns_its_generation_and_classification_tasks(tmp_path):
    """`--demo=decoder`: a tiny GPT-2 from a shipped config and tokenizer, a generation task (the
    prompt's words reversed after <sep>) beside a classification of the same texts; offline."""
    result = run_cli("train", "--demo=decoder", f"--output_dir={tmp_path}", env={"OMP_NUM_THREADS": "2"}, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "All tasks learned: every metric >= chance + 0.05." in log
    assert "The tokenizer has no pad token: padding with its EOS token" in log
    metrics = json.loads((tmp_path / "demo-decoder" / "metrics.json").read_text())
    reverse = metrics["chance"]["demo_reverse"]["exact_match"]
    assert reverse["value"] > 0.7 and reverse["chance"] < 0.1, reverse
    assert metrics["eval"]["eval_demo_majority_accuracy"] > 0.8  # chance is 0.35
    for task in ("demo_reverse", "demo_majority"):
        assert (tmp_path / "demo-decoder" / "final" / "export" / task / "config.json").is_file()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "cat red bread"}\n')
    predicted = run_cli("predict", "--demo=decoder", "--task=demo_reverse", f"--input={prompts}", f"--output_dir={tmp_path}")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert json.loads((tmp_path / "prompts.demo_reverse.predictions.jsonl").read_text()) == {"text": "bread red cat"}


def test_an_unknown_demo_is_one_line_naming_the_demos(tmp_path):
    result = run_cli("train", "--demo=gpt", f"--output_dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --demo='gpt': no such demo; use --demo (a tiny encoder on three tasks) or "
                                     "--demo=decoder (a tiny GPT-2 with a generation task and a classification task)")

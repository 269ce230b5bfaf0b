"""Real GLUE TSV files (../shared/data/glue) train and evaluate as local-file tasks, via the CLI."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SHARED_GLUE, run_cli

pytestmark = pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason="../shared/data/glue is not beside the project")


def test_glue_rte_and_stsb_train_and_evaluate_from_tsv(tiny_model, tmp_path):
    tasks = tmp_path / "glue.yaml"
    tasks.write_text(f"""
tasks:
  - name: rte
    preset: rte
    files: {{train: {SHARED_GLUE}/RTE/train.tsv, validation: {SHARED_GLUE}/RTE/dev.tsv}}
  - name: stsb
    preset: stsb
    files: {{train: {SHARED_GLUE}/STS-B/train.tsv, validation: {SHARED_GLUE}/STS-B/dev.tsv}}
    columns: {{label: score}}
""")
    out = tmp_path / "out"
    common = [f"--model_name={tiny_model}", f"--tasks_file={tasks}", "--tasks=rte,stsb", f"--output_dir={out}",
              "--run_name=glue", "--max_eval_samples=256", "--eval_batch_size=64"]
    result = run_cli("train", *common, "--model_init=scratch", "--max_steps=4", "--train_batch_size=8",
                     "--eval_strategy=no", "--save_strategy=no", "--load_best_model_at_end=false", "--max_seq_length=64")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "glue" / "metrics.json").read_text())["eval"]
    for key in ("eval_rte_accuracy", "eval_stsb_pearson", "eval_stsb_spearmanr", "eval_macro_avg"):
        assert key in metrics
    assert 0 <= metrics["eval_rte_accuracy"] <= 1

    evaluated = run_cli("evaluate", *common, "--max_seq_length=64")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"macro_avg = {metrics['eval_macro_avg']:.6f}" in evaluated.stdout + evaluated.stderr

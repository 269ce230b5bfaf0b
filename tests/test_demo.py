"""The built-in demo (what `make run-local` runs with no .env) trains offline and learns."""

from __future__ import annotations

import json

from tests.conftest import run_cli


def test_demo_learns_every_task(tmp_path):
    result = run_cli("train", "--demo", f"--output_dir={tmp_path}", env={"OMP_NUM_THREADS": "2"}, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "All tasks learned: every metric >= chance + 0.05." in log
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    for task, rows in metrics["chance"].items():
        for name, row in rows.items():
            assert row["value"] >= row["chance"] + 0.05, (task, name, row)
    assert metrics["eval"]["eval_demo_choice_accuracy"] > 0.5  # chance is 0.25
    for task in ("demo_similarity", "demo_entailment", "demo_choice"):
        assert (tmp_path / "demo" / "final" / "export" / task / "config.json").is_file()

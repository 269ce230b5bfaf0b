"""Preemption end to end, with the real CLI: SIGTERM at a step (and again in the grace period)
under every combination of EVAL_STRATEGY and SAVE_STRATEGY (LOAD_BEST_MODEL_AT_END where allowed):
exit 0 within PREEMPTION_GRACE_SECONDS, the stop step committed once, and a restart that ends
with the uninterrupted run's weights bit for bit; and a SIGTERM sent from outside."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import ROOT
from tests.runs import CLI_ENV, GRACE, RUN, STEPS_PER_EPOCH, assert_same_weights, committed_steps, flags, train, weights
from trainer.checkpoints import commits as cs
from trainer.checkpoints.storage import open_store

COMBOS = [(e, s) for e in ("epoch", "steps", "no") for s in ("epoch", "steps", "no")]
TOTAL_STEPS = 3 * STEPS_PER_EPOCH


def _stop_steps() -> dict[tuple[str, str], int]:
    """A stop step per combination: in turn a random step inside an epoch, a random epoch end, the last step."""
    rng = random.Random(20261201)
    inside = [s for s in range(1, TOTAL_STEPS) if s % STEPS_PER_EPOCH]
    kinds = [lambda: rng.choice(inside), lambda: rng.choice([STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]), lambda: TOTAL_STEPS]
    return {combo: kinds[i % 3]() for i, combo in enumerate(COMBOS)}


STOP_AT = _stop_steps()


def combo_flags(combo: tuple[str, str], model, tasks, out) -> list[str]:
    eval_strategy, save_strategy = combo
    best = eval_strategy != "no" and eval_strategy == save_strategy  # where LOAD_BEST_MODEL_AT_END is allowed
    return flags(model, tasks, out, eval_strategy=eval_strategy, save_strategy=save_strategy, eval_steps=5, save_steps=5,
                 load_best_model_at_end=best, save_total_limit=2)


@pytest.fixture(scope="module")
def sigterm_runs(tiny_model, small_tasks, tmp_path_factory) -> dict:
    """For every strategy combination: an uninterrupted run; a run that gets SIGTERM when its stop
    step ends and a second SIGTERM 1 s later (uploads slowed, so the second one lands while the job
    waits for its last commit); and its restart. Two combinations at a time (2 cores)."""

    def one(combo):
        base = tmp_path_factory.mktemp(f"sigterm-{combo[0]}-{combo[1]}")
        uninterrupted = train(*combo_flags(combo, tiny_model, small_tasks, base / "uninterrupted"))
        stopped_flags = combo_flags(combo, tiny_model, small_tasks, base / "stopped")
        stopped = train(*stopped_flags, env={"TRAINER_SIGTERM_AT": f"{STOP_AT[combo]}:1", "TRAINER_SLOW_UPLOADS": "0.15"})
        ended = time.time()
        committed = committed_steps(str(base / "stopped"))
        final_before_restart = (base / "stopped" / RUN / "final").exists()
        restarted = train(*stopped_flags)
        return {"uninterrupted": uninterrupted, "stopped": stopped, "ended": ended, "committed": committed,
                "final_before_restart": final_before_restart, "restarted": restarted, "base": base}

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(COMBOS, pool.map(one, COMBOS)))


@pytest.mark.parametrize("combo", COMBOS, ids=[f"eval_{e}-save_{s}-stop_at_{STOP_AT[(e, s)]}" for e, s in COMBOS])
def test_sigterm_then_restart_gives_the_uninterrupted_weights(sigterm_runs, combo):
    run = sigterm_runs[combo]
    for name in ("uninterrupted", "stopped", "restarted"):
        assert run[name].returncode == 0, f"{name}: {run[name].stderr[-3000:]}"
    log = run["stopped"].stdout + run["stopped"].stderr
    sent = [float(t) for t in re.findall(r"sending (?:a second )?SIGTERM.*?\(t=([\d.]+)\)", log)]
    assert len(sent) == 2, log[-3000:]  # both signals arrived while the job still ran
    assert "SIGTERM again: already stopping" in log
    assert run["ended"] - sent[0] < GRACE, "did not exit within PREEMPTION_GRACE_SECONDS"
    assert f"Preempted at step {STOP_AT[combo]}: checkpoint committed" in log
    assert run["committed"][-1] == STOP_AT[combo]  # committed exactly where it stopped
    assert log.count(f"checkpoint-{STOP_AT[combo]} committed") == 1  # and once: no second save of that step
    assert not run["final_before_restart"]  # a preempted run claims no final model
    restarted = run["restarted"].stdout + run["restarted"].stderr
    assert f"(step {STOP_AT[combo]})" in restarted
    assert_same_weights(weights(run["base"] / "stopped" / RUN), weights(run["base"] / "uninterrupted" / RUN))
    uninterrupted_evals = (run["uninterrupted"].stdout + run["uninterrupted"].stderr).count("'eval_macro_avg'")
    assert log.count("'eval_macro_avg'") + restarted.count("'eval_macro_avg'") == uninterrupted_evals  # none twice, none skipped


def test_sigterm_from_outside_while_training_commits_and_exits_0(gcs_server, tiny_model, small_tasks, tmp_path):
    """A real SIGTERM from another process (as the platform sends it), at whatever moment it lands."""
    uri = "gs://test-bucket/sigterm"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ENV_FILE": "", **CLI_ENV}
    cmd = [sys.executable, "-m", "trainer", "train", *flags(tiny_model, small_tasks, tmp_path / "vm", uri, num_train_epochs=5000)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        lines = []
        for line in proc.stdout:  # wait until training steps are running
            lines.append(line)
            if "'loss'" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    log = "".join(lines) + out
    assert proc.returncode == 0, log[-3000:]
    assert "Preempted at step" in log and "checkpoint committed" in log
    stopped_at = int(re.search(r"Preempted at step (\d+)", log).group(1))
    assert committed_steps(uri)[-1] == stopped_at
    assert cs.read_final(open_store(uri), RUN) is None  # stopped early: no final model claimed

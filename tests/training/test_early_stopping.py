"""Early stopping (EARLY_STOPPING_PATIENCE) end to end, with the real CLI, on the defaults (epoch
strategies, LOAD_BEST_MODEL_AT_END, SAVE_TOTAL_LIMIT=3): the run stops before its planned epochs
once the macro average has not improved for PATIENCE evaluations, with the best checkpoint's
weights as its final model and a final manifest that says so; a rerun trains nothing; a SIGTERM
before the stop and a kill -9 after it end at the uninterrupted run's step with its weights; a
larger patience on resume continues the stopped run."""

from __future__ import annotations

import json
import re
import signal

import pytest
from safetensors.torch import load_file

from tests.runs import RUN, STEPS_PER_EPOCH, assert_same_weights, committed_steps, flags, train, weights
from trainer.checkpoints import commits as cs

EPOCHS, PATIENCE = 6, 2
# At this rate and seed the macro average peaks at epoch 2 and falls at epochs 3 and 4 (checked below).
SETTINGS = {"num_train_epochs": EPOCHS, "learning_rate": 1e-2, "seed": 5, "early_stopping_patience": PATIENCE}
BEST_STEP = 2 * STEPS_PER_EPOCH
STOP_STEP = BEST_STEP + PATIENCE * STEPS_PER_EPOCH  # two evaluations without improvement
PLANNED_STEPS = EPOCHS * STEPS_PER_EPOCH


def macro_averages(log: str) -> list[float]:
    """`eval_macro_avg` of every evaluation during training that the log shows (4 decimals), in order."""
    return [float(v) for v in re.findall(r"'eval_macro_avg': '([\d.]+)'", log)]


@pytest.fixture(scope="module")
def stopped(tiny_model, small_tasks, tmp_path_factory):
    """The uninterrupted early-stopped run in the default local store, and how to make its flags."""
    out = tmp_path_factory.mktemp("early-stopped")
    done = train(*flags(tiny_model, small_tasks, out, **SETTINGS))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done, lambda **changes: flags(tiny_model, small_tasks, out, **{**SETTINGS, **changes})


def test_the_run_stops_early_with_the_best_checkpoints_weights(stopped):
    out, done, _ = stopped
    macro = macro_averages(done.stdout)
    evaluations = STOP_STEP // STEPS_PER_EPOCH
    assert len(macro) == evaluations, macro  # each epoch up to the stop
    assert max(range(evaluations), key=lambda i: macro[i]) == BEST_STEP // STEPS_PER_EPOCH - 1, macro

    final = cs.verify_local(out / RUN / "final")
    assert final.step == STOP_STEP < PLANNED_STEPS
    assert final.metadata["stopped_early"] is True
    assert final.metadata["evaluations_without_improvement"] == PATIENCE
    metrics = json.loads((out / RUN / "metrics.json").read_text())
    assert metrics["stopped_early"] is True and metrics["step"] == STOP_STEP
    assert round(metrics["eval"]["eval_macro_avg"], 4) == macro[BEST_STEP // STEPS_PER_EPOCH - 1]  # the best model's
    assert committed_steps(str(out)) == [BEST_STEP, STOP_STEP - STEPS_PER_EPOCH, STOP_STEP]
    best = load_file(str(out / RUN / f"checkpoint-{BEST_STEP}" / "model.safetensors"))
    assert_same_weights(weights(out / RUN), best)


def test_a_rerun_of_the_stopped_run_trains_nothing(stopped):
    out, _, make_flags = stopped
    final = out / RUN / "final"
    before = {p: p.stat().st_mtime_ns for p in final.rglob("*")}
    again = train(*make_flags())
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"already finished at step {STOP_STEP}: it stopped early" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in final.rglob("*")} == before


def test_sigterm_before_the_stop_and_kill_9_after_it_end_like_the_uninterrupted_run(stopped, tiny_model, small_tasks,
                                                                                   tmp_path):
    _, uninterrupted, _ = stopped
    args = flags(tiny_model, small_tasks, tmp_path / "out", **SETTINGS)
    # Mid-epoch, one evaluation without improvement counted: the restart must count on from it.
    sigterm_at = STOP_STEP - STEPS_PER_EPOCH // 2
    preempted = train(*args, env={"TRAINER_SIGTERM_AT": str(sigterm_at)})
    assert preempted.returncode == 0, preempted.stderr[-3000:]
    assert f"Preempted at step {sigterm_at}: checkpoint committed" in preempted.stdout + preempted.stderr
    # The restart stops early at the same step; killed while it exports, after checkpoint-STOP_STEP is committed.
    crashed = train(*args, env={"TRAINER_CRASH_AT": f"mid_export:{STOP_STEP}"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert committed_steps(str(tmp_path / "out"))[-1] == STOP_STEP
    # The next start resumes there and trains no further step: early stopping had ended the training.
    restarted = train(*args)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    log = restarted.stdout + restarted.stderr
    assert f"(step {STOP_STEP})" in log and "'loss'" not in log
    assert cs.verify_local(tmp_path / "out" / RUN / "final").step == STOP_STEP
    assert_same_weights(weights(tmp_path / "out" / RUN), weights(stopped[0] / RUN))
    # Every evaluation once, with the uninterrupted run's values.
    evaluations = macro_averages(preempted.stdout) + macro_averages(crashed.stdout) + macro_averages(restarted.stdout)
    assert evaluations == macro_averages(uninterrupted.stdout)


def test_a_larger_patience_on_resume_continues_the_stopped_run(stopped):
    out, _, make_flags = stopped
    longer = train(*make_flags(early_stopping_patience=PATIENCE + 1))  # not part of the run's identity
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert f"(step {STOP_STEP})" in longer.stdout + longer.stderr
    final = cs.verify_local(out / RUN / "final")
    assert final.step == STOP_STEP + STEPS_PER_EPOCH and final.metadata["stopped_early"] is True
    best = load_file(str(out / RUN / f"checkpoint-{BEST_STEP}" / "model.safetensors"))
    assert_same_weights(weights(out / RUN), best)

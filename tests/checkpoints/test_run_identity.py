"""Runs and their identity, end to end: a finished run rerun changes nothing and its final model
still verifies; a longer run resumes a finished one; another learning rate or other training data
under the same RUN_NAME is refused with one line, and RESUME=never will not overwrite a run."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli, write_tasks_file
from tests.runs import RUN, flags, train
from trainer.checkpoints import commits as cs


@pytest.fixture(scope="module")
def finished_run(tiny_model, small_tasks, tmp_path_factory):
    """A run trained to its end in the default local store (OUTPUT_DIR), and how to make its flags."""
    out = tmp_path_factory.mktemp("finished")
    done = train(*flags(tiny_model, small_tasks, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, lambda **changes: flags(tiny_model, small_tasks, out, **changes)


def test_rerunning_a_finished_run_changes_nothing_and_its_final_still_verifies(finished_run):
    out, make_flags = finished_run
    args = make_flags()
    final = out / RUN / "final"
    before = {p: p.stat().st_mtime_ns for p in final.rglob("*")}
    again = train(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished at step 24" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in final.rglob("*")} == before
    cs.verify_local(final)
    listed = run_cli("pull", "--list", *args)
    assert "final" in listed.stdout
    pulled = run_cli("pull", "--which=final", f"--dest={out / 'pulled-final'}", *args)
    assert pulled.returncode == 0, pulled.stderr[-2000:]


def test_another_learning_rate_under_the_same_run_name_is_refused(finished_run):
    out, make_flags = finished_run
    other = train(*make_flags(learning_rate=0.01))
    assert other.returncode == 2
    line = other.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("error: ")
    assert "LEARNING_RATE=0.001 (now 0.01)" in line and "set another RUN_NAME" in line
    never = train(*make_flags(resume="never"))
    assert never.returncode == 2 and "RESUME=never" in never.stderr and "would overwrite" in never.stderr
    cs.verify_local(out / RUN / "final")


def test_weights_in_another_dtype_under_the_same_run_name_are_refused(finished_run):
    # MODEL_DTYPE shapes every update as PRECISION does: bfloat16 weights resumed from a float32
    # run's checkpoint would go on as another run.
    out, make_flags = finished_run
    other = train(*make_flags(model_dtype="bfloat16", num_train_epochs=4))
    assert other.returncode == 2, other.stderr[-2000:]
    line = other.stderr.strip()
    assert line.count("\n") == 0 and "MODEL_DTYPE=float32 (now bfloat16)" in line and "set another RUN_NAME" in line
    assert cs.verify_local(out / RUN / "final").step == 24


def test_a_longer_run_resumes_a_finished_one(finished_run):
    out, make_flags = finished_run
    longer = train(*make_flags(num_train_epochs=4))
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "(step 24)" in longer.stdout + longer.stderr
    assert cs.verify_local(out / RUN / "final").step == 32


def test_changed_training_data_under_the_same_run_name_is_refused(tiny_model, tmp_path):
    tasks = write_tasks_file(tmp_path / "tasks", n_train=16, n_eval=8)
    args = flags(tiny_model, tasks, tmp_path / "out", num_train_epochs=1)
    assert train(*args).returncode == 0
    data = tmp_path / "tasks" / "data" / "demo_entailment_train.csv"
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[:-1]))  # one example fewer
    again = train(*args, "--num_train_epochs=2")
    assert again.returncode == 2
    assert "the training data of task 'demo_entailment': 16 examples (now 15)" in again.stderr


def test_the_lora_settings_and_the_base_weights_are_part_of_a_lora_runs_identity():
    from trainer.checkpoints.callback import identity_differences, run_identity
    from trainer.config import load_config

    def identity(fingerprint=None, **settings):
        cfg = load_config({"model_init": "pretrained", **settings}, environ={}, env_file="")
        return run_identity(cfg, precision="fp32", world_size=1, drop_last=False, tasks=[], base_fingerprint=fingerprint)

    plain = identity()
    # a checkpoint from before LoRA existed: no LORA in its settings, and LORA=false is what it did
    before = {**plain, "settings": {k: v for k, v in plain["settings"].items() if not k.startswith("LORA")}}
    assert identity_differences(before, plain) == []
    # nor MODEL_DTYPE, from before it was recorded: float32 weights are what such runs trained
    undated = {**plain, "settings": {k: v for k, v in plain["settings"].items() if k != "MODEL_DTYPE"}}
    assert identity_differences(undated, plain) == []
    bf16 = run_identity(load_config({"model_init": "pretrained"}, environ={}, env_file=""), precision="fp32", world_size=1,
                        drop_last=False, tasks=[], model_dtype="bfloat16")
    assert identity_differences(undated, bf16) == ["MODEL_DTYPE=float32 (now bfloat16)"]
    lora = identity("0123456789abcdef", lora="shared")
    assert identity_differences(lora, identity("0123456789abcdef", lora="shared", lora_export="adapter")) == []
    assert identity_differences(lora, identity("fedcba9876543210", lora="shared")) == [
        "the base model's weights (fingerprint 0123456789abcdef, now fedcba9876543210)"]
    assert identity_differences(lora, identity("0123456789abcdef", lora="shared", lora_r=4)) == ["LORA_R=8 (now 4)"]
    assert "LORA=shared (now false)" in identity_differences(lora, plain)
    # A LoRA run from before the head weights taken from MODEL_NAME stayed frozen trained them: another run now.
    cfg = load_config({"model_init": "pretrained", "lora": "shared"}, environ={}, env_file="")
    frozen = run_identity(cfg, precision="fp32", world_size=1, drop_last=False, tasks=[], base_fingerprint="0123456789abcdef",
                          frozen_head_weights=["heads.lm.lm_head.weight"])
    assert identity_differences(lora, frozen) == [
        "the head weights frozen under LoRA (none: they trained, now heads.lm.lm_head.weight)"]
    assert identity_differences(frozen, frozen) == []

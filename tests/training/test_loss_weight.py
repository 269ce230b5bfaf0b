"""A task's `loss_weight`: declared and checked in the tasks file, kept in the saved spec, and
multiplying that task's training loss in `MultitaskTrainer.training_step` (what the optimizer
minimises and `loss` logs), while `loss_<task>` and the evaluation losses stay the head's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.training.test_trainer import build_trainer
from trainer.tasks import TaskError, TaskSpec, build_spec

WEIGHTED = "demo_entailment"


def declare(**extra) -> TaskSpec:
    return build_spec({"name": "t", "type": "classification", "files": {"train": "/data/t.csv"}, **extra})


# ------------------------------------------------------------------------------ the declaration
def test_loss_weight_defaults_to_1_and_round_trips_through_the_saved_spec():
    assert declare().loss_weight == 1.0 and declare(loss_weight=None).loss_weight == 1.0
    weighted = declare(loss_weight=2)
    assert weighted.loss_weight == 2.0 and isinstance(weighted.loss_weight, float)
    assert TaskSpec.from_dict(json.loads(json.dumps(weighted.to_dict()))) == weighted
    multi = build_spec({"name": "m", "type": "multi_label", "files": {"train": "/data/m.csv"}, "threshold": 0.3,
                        "loss_weight": 0.5})
    assert TaskSpec.from_dict(json.loads(json.dumps(multi.to_dict()))) == multi
    # A multitask.json saved before these fields existed loads with their defaults.
    old = {k: v for k, v in weighted.to_dict().items() if k not in ("loss_weight", "threshold")}
    assert TaskSpec.from_dict(old).loss_weight == 1.0 and TaskSpec.from_dict(old).threshold is None


@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, float("nan"), float("inf"), "2", True, [2]])
def test_a_loss_weight_that_is_not_a_positive_finite_number_is_refused(value):
    with pytest.raises(TaskError) as raised:
        declare(loss_weight=value)
    assert str(raised.value) == ("task 't': 'loss_weight' must be a positive finite number (it multiplies the task's "
                                 f"training loss), e.g. 2.0; got {value!r}")


# ------------------------------------------------------------------------------ in the training step
def with_loss_weights(tasks_file: Path, directory: Path, **weights: float) -> Path:
    declared = json.loads(tasks_file.read_text())
    for task in declared["tasks"]:
        if task["name"] in weights:
            task["loss_weight"] = weights[task["name"]]
    path = directory / "weighted_tasks.json"
    path.write_text(json.dumps(declared))
    return path


@pytest.fixture
def weighted_trainer(tiny_model, small_tasks, tmp_path):
    return build_trainer(tiny_model, with_loss_weights(small_tasks, tmp_path, **{WEIGHTED: 2.0}), tmp_path / "out")


def first_batch(trainer, task: str) -> dict:
    return next(batch for batch in trainer.get_train_dataloader() if batch["task"] == task)


def test_a_loss_weight_of_2_makes_the_steps_loss_and_gradients_exactly_twice_the_heads(weighted_trainer):
    trainer, model = weighted_trainer, weighted_trainer.model
    trainer.current_gradient_accumulation_steps = 1  # what the training loop sets before its steps

    def run(step, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks in both passes
        loss = step(batch)
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def heads_own(batch):
        model.train()
        loss = model(**batch).loss
        loss.backward()
        return loss

    for task, weight in ((WEIGHTED, 2.0), ("demo_similarity", 1.0)):
        batch = first_batch(trainer, task)
        own, own_grads = run(heads_own, batch)
        stepped, step_grads = run(lambda b: trainer.training_step(model, dict(b)), batch)
        assert torch.equal(stepped, weight * own), (task, stepped, own)
        assert own_grads.keys() == step_grads.keys() and own_grads
        assert all(torch.equal(step_grads[n], weight * g) for n, g in own_grads.items()), task


def test_the_logged_loss_is_weighted_and_each_tasks_loss_is_its_own(tiny_model, small_tasks, tmp_path):
    trainer = build_trainer(tiny_model, with_loss_weights(small_tasks, tmp_path, **{WEIGHTED: 2.0}), tmp_path / "out",
                            logging_steps=1)
    trainer.train()

    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 8  # one task per step: each entry has that task's loss only
    seen = set()
    for entry in logged:
        [(key, own)] = [(k, v) for k, v in entry.items() if k.startswith("loss_")]
        weight = 2.0 if key == f"loss_{WEIGHTED}" else 1.0
        assert entry["loss"] == pytest.approx(weight * own, rel=1e-6), entry
        seen.add(key)
    assert f"loss_{WEIGHTED}" in seen and len(seen) == 4


def test_evaluation_losses_are_the_heads_own(weighted_trainer):
    trainer, model = weighted_trainer, weighted_trainer.model
    batch = first_batch(trainer, WEIGHTED)
    model.eval()
    with torch.no_grad():
        own = model(**batch).loss
    loss, _, _ = trainer.prediction_step(model, dict(batch), prediction_loss_only=True)
    assert torch.equal(loss, own)


def test_a_loss_weight_is_part_of_the_run_identity_and_a_weight_of_1_keeps_older_checkpoints_resumable(
        tiny_model, small_tasks, tmp_path):
    import dataclasses
    import hashlib

    from trainer.commands import _identity

    trainer = build_trainer(tiny_model, small_tasks, tmp_path / "out")

    def declarations() -> dict[str, str]:
        return {t["name"]: t["declaration"] for t in _identity(trainer.cfg, "fp32", trainer)["tasks"]}

    before = declarations()
    task = trainer.tasks[trainer._task_index[WEIGHTED]]
    # What a trainer from before loss_weight and threshold existed hashed: the same declaration without them.
    older = {k: v for k, v in task.spec.to_dict().items()
             if k not in ("files", "hub", "hub_config", "splits", "metrics", "threshold", "loss_weight")}
    assert before[WEIGHTED] == hashlib.sha256(json.dumps(older, sort_keys=True).encode()).hexdigest()[:16]
    task.spec = dataclasses.replace(task.spec, loss_weight=2.0)
    after = declarations()
    assert after[WEIGHTED] != before[WEIGHTED]  # another weighting trains other weights: another run
    assert {k: v for k, v in after.items() if k != WEIGHTED} == {k: v for k, v in before.items() if k != WEIGHTED}

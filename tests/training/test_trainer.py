"""trainer.training's module functions: decoding logits, scoring a task, chance levels (every task
type, token labels of sentences of different lengths), and the precision choice.

Token-classification inputs come in the two shapes the code meets: the evaluation loop's arrays,
padded with -100 to the longest sentence, and a tokenized split's ragged `labels` column.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from trainer.tasks import build_spec
from trainer.training import chance_scores, decode, score_task


def declare(task_type: str, labels: list[str] | None = None, metrics: list[str] | None = None):
    raw = {"name": "t", "type": task_type, "files": {"train": "t.jsonl"}}
    if metrics:
        raw["metrics"] = metrics
    spec = build_spec(raw)
    return spec.with_labels(labels) if labels is not None else spec


def one_hot(ids, n: int) -> np.ndarray:
    """Logits whose argmax is `ids` (any shape)."""
    ids = np.asarray(ids)
    return np.eye(n, dtype=np.float32)[np.where(ids < 0, 0, ids)] * 5.0


# ------------------------------------------------------------------------------ classification
CLASSES = ["a", "b", "c"]


def test_classification_decode_score_and_chance():
    spec = declare("classification", CLASSES, ["accuracy", "f1", "matthews_correlation"])
    refs = np.array([0, 1, 1, 0])
    logits = one_hot([0, 1, 2, 0], 3)

    assert decode(spec, logits).tolist() == [0, 1, 2, 0]
    scores = score_task(spec, logits, refs)
    assert scores["accuracy"] == 0.75
    # Three labels: macro F1 over a, b, c although c is never a reference: (1 + 2/3 + 0) / 3.
    assert scores["f1"] == pytest.approx((1 + 2 / 3) / 3)
    assert set(scores) == {"accuracy", "f1", "matthews_correlation"}
    chance = chance_scores(spec, refs)
    # Majority class a (first of the tied a, b): accuracy 1/2; F1(a) = 2/3, then / 3 labels.
    assert chance == pytest.approx({"accuracy": 0.5, "f1": (2 / 3) / 3, "matthews_correlation": 0.0})


def test_binary_classification_f1_is_the_f1_of_the_second_label():
    spec = declare("classification", ["no", "yes"], ["f1"])
    # Every reference is "no": binary F1 of "yes" is 0, whatever else the model gets right.
    assert score_task(spec, one_hot([0, 0, 1], 2), np.array([0, 0, 0]))["f1"] == 0.0


def test_decode_takes_the_logits_from_a_tuple_of_outputs():
    spec = declare("classification", CLASSES)
    logits = one_hot([2, 1], 3)
    hidden = np.zeros((2, 7, 4), dtype=np.float32)
    assert decode(spec, (logits, hidden)).tolist() == [2, 1]


# ------------------------------------------------------------------------------ regression
def test_regression_decode_score_and_chance():
    spec = declare("regression")
    logits = np.array([[0.5], [1.5], [2.0], [4.0]], dtype=np.float32)
    refs = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)

    assert decode(spec, logits).tolist() == [0.5, 1.5, 2.0, 4.0]
    scores = score_task(spec, logits, refs)
    assert scores["spearmanr"] == pytest.approx(1.0)
    assert 0.9 < scores["pearson"] < 1.0
    assert chance_scores(spec, refs) == {"pearson": 0.0, "spearmanr": 0.0}


# ------------------------------------------------------------------------------ multiple choice
def test_multiple_choice_decode_score_and_chance():
    spec = declare("multiple_choice", ["0", "1", "2", "3"], ["accuracy", "f1"])
    logits = one_hot([3, 0, 0, 2, 1], 4)
    refs = np.array([3, 0, 1, 2, 2])

    assert decode(spec, logits).tolist() == [3, 0, 0, 2, 1]
    scores = score_task(spec, logits, refs)
    assert scores["accuracy"] == 0.6
    # F1 per choice: 0 -> P 1/2 R 1 = 2/3; 1 -> 0; 2 -> P 1 R 1/2 = 2/3; 3 -> 1; macro over 4.
    assert scores["f1"] == pytest.approx((2 / 3 + 0 + 2 / 3 + 1) / 4)
    # Majority choice 2 (2 of 5): accuracy 2/5; F1(2) = 2 * (2/5) / (1 + 2/5) = 4/7, / 4 choices.
    assert chance_scores(spec, refs) == pytest.approx({"accuracy": 0.4, "f1": (4 / 7) / 4})


# ------------------------------------------------------------------------------ token classification
TAGS = ["O", "B-x", "I-x"]
# Three sentences of 4, 2 and 3 labelled positions (first sub-tokens), in padded rows of 6:
# -100 marks [CLS], [SEP], later sub-tokens and padding.
PADDED_REFS = np.array([
    [-100, 1, 2, 0, -100, 1],
    [-100, 0, 1, -100, -100, -100],
    [-100, 1, 0, 0, -100, -100],
])
# What the model predicts at every position (the values at -100 positions must not matter).
PREDICTED = np.array([
    [2, 1, 2, 0, 1, 0],
    [0, 0, 0, 2, 2, 2],
    [1, 1, 0, 1, 0, 0],
])


def ragged(rows: np.ndarray, lengths: list[int]) -> list[list[int]]:
    """The rows as a tokenized split holds them: each only as long as its own sentence."""
    return [row[:n].tolist() for row, n in zip(rows, lengths)]


LENGTHS = [6, 3, 4]  # each row's length before padding (the last labelled position + 1, or more)


def test_token_classification_decode_drops_ignored_positions_per_sentence():
    spec = declare("token_classification", TAGS, ["entity_f1", "accuracy"])
    pred, ref = decode(spec, one_hot(PREDICTED, 3), PADDED_REFS)
    assert ref == [["B-x", "I-x", "O", "B-x"], ["O", "B-x"], ["B-x", "O", "O"]]
    assert pred == [["B-x", "I-x", "O", "O"], ["O", "O"], ["B-x", "O", "B-x"]]
    # Ragged label rows (and logits cut to the same lengths) decode the same.
    logits = [one_hot(row, 3) for row in ragged(PREDICTED, LENGTHS)]
    assert decode(spec, logits, ragged(PADDED_REFS, LENGTHS)) == (pred, ref)


def test_token_classification_needs_the_labels_to_decode():
    spec = declare("token_classification", TAGS)
    with pytest.raises(ValueError, match="label_ids"):
        decode(spec, one_hot(PREDICTED, 3))


def test_token_classification_scores_over_labelled_positions_only():
    spec = declare("token_classification", TAGS, ["entity_f1", "accuracy", "f1"])
    scores = score_task(spec, one_hot(PREDICTED, 3), PADDED_REFS)
    # 9 labelled positions, 6 predicted right.
    assert scores["accuracy"] == pytest.approx(6 / 9)
    # Entities: reference x(0-2), x(3), x(1), x(0) = 4; predicted x(0-2), x(0), x(2) = 3; correct 2.
    # precision 2/3, recall 1/2 -> F1 4/7
    assert scores["entity_f1"] == pytest.approx(4 / 7)
    # Per tag: O tp 3 fp 2 fn 1 -> 2/3; B-x tp 2 fp 1 fn 2 -> 4/7; I-x tp 1 -> 1; macro over 3 tags.
    assert scores["f1"] == pytest.approx((2 / 3 + 4 / 7 + 1) / 3)


@pytest.mark.parametrize("shape", ["padded", "ragged"])
def test_token_classification_chance_on_sentences_of_different_lengths(shape):
    spec = declare("token_classification", TAGS, ["entity_f1", "accuracy", "f1"])
    labels = PADDED_REFS if shape == "padded" else ragged(PADDED_REFS, LENGTHS)
    chance = chance_scores(spec, labels)
    # Labelled positions: B-x x4, O x4, I-x x1; majority B-x (of the tied two, the first seen).
    # accuracy 4/9; F1(B-x) = 2 * (4/9) / (1 + 4/9) = 8/13, over 3 tags.
    assert chance == pytest.approx({"entity_f1": 0.0, "accuracy": 4 / 9, "f1": (8 / 13) / 3})


def test_chance_report_of_a_tokenized_split_with_sentences_of_different_lengths():
    import datasets

    from trainer.commands import chance_report
    from trainer.data import TaskData

    spec = declare("token_classification", TAGS, ["accuracy"])
    validation = datasets.Dataset.from_dict({"labels": ragged(PADDED_REFS, LENGTHS)})
    report = chance_report([TaskData(spec, None, validation, None)], {"eval_t_accuracy": 0.9}, None)
    assert report == {"t": {"accuracy": {"value": 0.9, "chance": pytest.approx(4 / 9), "needs": pytest.approx(4 / 9 + 0.05),
                                         "learned": True}}}


def chance_task(name: str, labels: list[str], references: list[int], metrics: list[str]):
    import datasets

    from trainer.data import TaskData

    spec = build_spec({"name": name, "type": "classification", "files": {"train": "t.csv"}, "metrics": metrics})
    return TaskData(spec.with_labels(labels), None, datasets.Dataset.from_dict({"labels": references}), None)


def test_chance_report_prints_the_margin_and_its_summary_uses_the_same_rule(caplog):
    import logging

    from trainer.commands import LEARNED_MARGIN, chance_report

    assert LEARNED_MARGIN == 0.05
    # MRPC's case: accuracy 0.70 is above its chance level (0.68, the majority class) but not by
    # the margin, so it is not learned, and the table says what it needed.
    mrpc = chance_task("mrpc", ["no", "yes"], [1] * 68 + [0] * 32, ["accuracy", "f1"])
    rte = chance_task("rte", ["yes", "no"], [0] * 50 + [1] * 50, ["accuracy"])
    caplog.set_level(logging.INFO, logger="trainer")
    report = chance_report([mrpc, rte], {"eval_mrpc_accuracy": 0.70, "eval_mrpc_f1": 0.9, "eval_rte_accuracy": 0.61}, None)

    assert report["mrpc"]["accuracy"] == {"value": 0.70, "chance": pytest.approx(0.68), "needs": pytest.approx(0.73),
                                          "learned": False}
    assert report["mrpc"]["f1"]["learned"] and report["rte"]["accuracy"]["learned"]
    table, summary = [r.getMessage() for r in caplog.records]
    lines = table.splitlines()
    assert lines[0] == "Evaluation against chance (a constant guess): a metric is learned when value >= chance + 0.05"
    assert lines[1].split() == ["task", "metric", "value", "chance", "needs", "learned"]
    assert lines[2].split() == ["mrpc", "accuracy", "0.7000", "0.6800", "0.7300", "NO"]
    assert lines[4].split() == ["rte", "accuracy", "0.6100", "0.5000", "0.5500", "yes"]
    assert summary == ("Not every task learned: 1 metric below chance + 0.05 (mrpc accuracy 0.7000, needs 0.7300); "
                       "train longer or check the data.")

    caplog.clear()
    chance_report([mrpc, rte], {"eval_mrpc_accuracy": 0.74, "eval_mrpc_f1": 0.9, "eval_rte_accuracy": 0.61}, None)
    assert caplog.records[-1].getMessage() == "All tasks learned: every metric >= chance + 0.05."


# ------------------------------------------------------------------------------ precision
@pytest.mark.parametrize(
    ("capability", "expected"),
    [((9, 0), "bf16"), ((8, 0), "bf16"), ((8, 6), "bf16"), ((7, 5), "fp16"), ((7, 0), "fp16"), ((6, 1), "fp16")],
)
def test_auto_precision_takes_bf16_only_from_compute_capability_8(monkeypatch, capability, expected):
    import torch

    from trainer.training import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # A T4 (7.5) answers yes here too, emulating bf16 slowly: the capability must decide.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto") == expected
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"


def test_auto_precision_without_a_gpu_is_fp32_and_fp16_is_a_setting_error(monkeypatch):
    import torch

    from trainer.config import ConfigError
    from trainer.training import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto") == "fp32"
    with pytest.raises(ConfigError, match="^PRECISION='fp16' is not valid: fp16 needs a CUDA GPU"):
        resolve_precision("fp16")


# ------------------------------------------------------------------------------ task mixing
def test_task_mixing_is_checked_from_the_data_sizes_with_the_tasks_names():
    from trainer.config import ConfigError, load_config
    from trainer.training import check_task_mixing

    specs = [build_spec({"name": n, "type": "classification", "files": {"train": "t.csv"}}) for n in ("big", "small")]
    cfg = load_config({"tasks": "big,small", "sampling": "temperature", "sampling_temperature": "1e-300"}, environ={}, env_file="")
    with pytest.raises(ConfigError, match=r"^SAMPLING_TEMPERATURE=1e-300 is not valid: task 'small' \(7 examples\)"):
        check_task_mixing(cfg, specs, [1000, 7])
    check_task_mixing(cfg, specs, [7, 7])  # equal sizes: an even split at any temperature
    weights = load_config({"tasks": "big,small", "sampling": "weights", "task_weights": "big=1,small=1e-6"}, environ={}, env_file="")
    with pytest.raises(ConfigError, match=r"^TASK_WEIGHTS is not valid: task 'small' \(weight 1e-06\)"):
        check_task_mixing(weights, specs, [100, 100])


# ------------------------------------------------------------------------------ a tiny MultitaskTrainer, in process
def build_trainer(model_dir, tasks_file, out, **settings):
    """A `MultitaskTrainer` over the tiny tasks, built as `python -m trainer train` builds it."""
    from transformers import set_seed

    from trainer.commands import load_tokenizer, prepare_tasks, tokenize_tasks
    from trainer.config import load_config
    from trainer.modeling import MultitaskModel, load_encoder
    from trainer.tasks import resolve_tasks
    from trainer.training import MultitaskTrainer, build_training_args
    from trainer.training.trackers import setup

    cli = {"model_name": str(model_dir), "model_init": "scratch", "tasks_file": str(tasks_file),
           "tasks": "demo_similarity,demo_entailment,demo_choice,demo_tags", "output_dir": str(out),
           "run_name": "inproc", "num_train_epochs": 1, "train_batch_size": 8, "eval_batch_size": 3,
           "learning_rate": 1e-3, "precision": "fp32", "seed": 5, **settings}
    cfg = load_config(cli, environ={}, env_file="")
    specs, raw = prepare_tasks(cfg, resolve_tasks(cfg), need_train=True)
    tokenizer = load_tokenizer(cfg.model_name, specs)
    tasks = tokenize_tasks(cfg, specs, raw, tokenizer)
    set_seed(cfg.seed)
    model = MultitaskModel(load_encoder(cfg.model_name, cfg.model_init), specs)
    args = build_training_args(cfg, precision="fp32", report_to=setup(cfg))
    return MultitaskTrainer(model=model, args=args, tasks=tasks, cfg=cfg, processing_class=tokenizer)


def tasks_of_sizes(directory: Path, *, train: tuple[int, ...], validation: tuple[int, ...],
                   batch_sizes: dict[str, int] | None = None) -> Path:
    """The tiny tasks file, each task's splits cut (or repeated) to the sizes given, in task order."""
    from tests.conftest import write_tasks_file

    tasks_file = write_tasks_file(directory, n_train=max(train), n_eval=max(validation))
    declared = json.loads(tasks_file.read_text())
    for task, *sizes in zip(declared["tasks"], train, validation):
        for split, n in zip(("train", "validation"), sizes):
            path = Path(task["files"][split])
            lines = path.read_text().splitlines(keepends=True)
            header = 0 if path.suffix == ".jsonl" else 1
            while len(lines) - header < n:  # a demo file shorter than asked: repeat its rows
                lines += lines[header:]
            path.write_text("".join(lines[: header + n]))
        if batch_sizes and task["name"] in batch_sizes:
            task["batch_size"] = batch_sizes[task["name"]]
    tasks_file.write_text(json.dumps(declared))
    return tasks_file


@pytest.fixture
def small_trainer(tiny_model, small_tasks, tmp_path):
    return build_trainer(tiny_model, small_tasks, tmp_path / "out")


def test_the_macro_average_is_the_mean_of_each_tasks_primary_metric(small_trainer):
    metrics = small_trainer.evaluate()

    primary = [metrics[f"eval_{t.name}_{t.spec.primary_metric}"] for t in small_trainer.tasks]
    assert metrics["eval_macro_avg"] == pytest.approx(np.mean(primary))
    for task in small_trainer.tasks:  # every metric is still logged
        for name in task.spec.metrics:
            assert np.isfinite(metrics[f"eval_{task.name}_{name}"]), (task.name, name)
    # Two tasks have a second metric (spearmanr, accuracy) that differs from their first here, so
    # the mean over every metric of a task would give another macro average.
    of_all = np.mean([np.mean([metrics[f"eval_{t.name}_{m}"] for m in t.spec.metrics]) for t in small_trainer.tasks])
    assert metrics["eval_macro_avg"] != pytest.approx(of_all)


def test_activation_checkpointing_is_the_trainers_own_option_and_trains_the_same(tiny_model, small_tasks, tmp_path):
    # ACTIVATION_CHECKPOINTING sets TrainingArguments.activation_checkpointing: the Trainer itself
    # turns it on in `train`, through MultitaskModel.activation_checkpointing_enable.
    import torch

    runs = {}
    for on in (False, True):
        trainer = build_trainer(tiny_model, small_tasks, tmp_path / str(on), activation_checkpointing=on, max_steps=3,
                                eval_strategy="no", save_strategy="no", load_best_model_at_end=False)
        assert trainer.args.activation_checkpointing is on and not trainer.model.is_activation_checkpointing
        result = trainer.train()
        assert trainer.model.encoder.is_activation_checkpointing is on
        runs[on] = result.training_loss, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    (loss, weights), (plain_loss, plain_weights) = runs[True], runs[False]
    assert loss == pytest.approx(plain_loss, rel=0, abs=1e-6)
    assert all(torch.allclose(weights[k], plain_weights[k], rtol=0, atol=1e-6) for k in plain_weights)


def test_total_flos_counts_every_trained_batch_on_the_encoder_and_its_tasks_head(small_trainer):
    from tests.modeling.test_multitask import non_embedding_parameters

    trainer = small_trainer
    result = trainer.train()

    model = trainer.model
    loader = trainer.get_train_dataloader()
    loader.set_epoch(0)
    expected = sum(6 * batch["input_ids"].numel()
                   * (non_embedding_parameters(model.encoder) + non_embedding_parameters(model.heads[batch["task"]]))
                   for batch in loader)
    assert len(loader) == trainer.state.global_step == 8  # one epoch: every batch above was trained once
    assert result.metrics["total_flos"] == trainer.state.total_flos == expected
    # Plausible: about 6 × tokens × parameters, the encoder's 2 layers of 32 dimensions being most of them.
    tokens = sum(batch["input_ids"].numel() for batch in loader)
    assert 6 * tokens * non_embedding_parameters(model.encoder) <= expected < 6 * tokens * 1.2 * non_embedding_parameters(model.encoder)


def test_evaluation_shows_a_progress_bar_per_task_with_its_name_and_its_total(tiny_model, tmp_path, capsys):
    import re

    # Validation splits of different sizes: 3, 2, 1 and 4 batches of 3.
    tasks_file = tasks_of_sizes(tmp_path / "tasks", train=(8, 8, 8, 8), validation=(8, 5, 2, 11))
    trainer = build_trainer(tiny_model, tasks_file, tmp_path / "out")
    capsys.readouterr()

    trainer.evaluate()
    shown = capsys.readouterr().err
    for task in trainer.tasks:
        batches = math.ceil(len(task.validation) / trainer.args.eval_batch_size)
        assert re.search(rf"Evaluation {task.name}: 100%\|[^|\n\r]*\| {batches}/{batches} ", shown), (task.name, shown)
    assert [math.ceil(len(t.validation) / 3) for t in trainer.tasks] == [3, 2, 1, 4]
    assert not re.search(r"\b\d+it \[", shown), shown  # no bar that lost its total


# ------------------------------------------------------------------------------ each task's training loss
def micro_batch_tasks(trainer, epochs: int) -> list[str]:
    """The task of every batch the run trains, in order: the batch sampler's schedule, epoch by epoch."""
    sampler = trainer.make_batch_sampler()
    names = [t.name for t in trainer.tasks]
    order = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        order += [names[t] for t in sampler.schedule()]
    return order


@pytest.mark.parametrize("accumulation", [1, 2])
def test_each_logging_step_has_the_loss_of_every_task_it_trained_and_they_average_to_the_loss(
        tiny_model, small_tasks, tmp_path, accumulation):
    trainer = build_trainer(tiny_model, small_tasks, tmp_path / "out", num_train_epochs=2, logging_steps=1,
                            gradient_accumulation_steps=accumulation)
    trainer.train()

    batches = micro_batch_tasks(trainer, epochs=2)  # 8 an epoch: 2 of each task
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logged] == list(range(1, len(batches) // accumulation + 1))
    for entry in logged:
        trained = batches[(entry["step"] - 1) * accumulation: entry["step"] * accumulation]
        per_task = {k.removeprefix("loss_"): v for k, v in entry.items() if k.startswith("loss_")}
        assert set(per_task) == set(trained), entry  # a task that did not train in the interval has no loss there
        assert all(np.isfinite(v) for v in per_task.values())
        # The Trainer's loss is the mean over the interval's batches: each task's, weighted by its batches.
        weighted = sum(per_task[t] * trained.count(t) for t in per_task) / len(trained)
        assert weighted == pytest.approx(entry["loss"], rel=1e-5), entry


def test_each_tasks_loss_over_a_longer_logging_interval_is_the_mean_of_its_batches(tiny_model, small_tasks, tmp_path):
    # 8 steps an epoch logged every 4: the first interval's tasks, each with its mean over its batches.
    losses: list[tuple[str, float]] = []
    trainer = build_trainer(tiny_model, small_tasks, tmp_path / "out", logging_steps=4)
    step = trainer.training_step

    def recording(model, inputs, num_items_in_batch=None):
        loss = step(model, inputs, num_items_in_batch)
        losses.append((inputs["task"], float(loss)))
        return loss

    trainer.training_step = recording
    trainer.train()

    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logged] == [4, 8]
    for entry, interval in zip(logged, (losses[:4], losses[4:])):
        tasks = {t for t, _ in interval}
        assert {k for k in entry if k.startswith("loss_")} == {f"loss_{t}" for t in tasks}
        for task in tasks:
            mine = [v for t, v in interval if t == task]
            assert entry[f"loss_{task}"] == pytest.approx(sum(mine) / len(mine), rel=1e-5)
        assert entry["loss"] == pytest.approx(sum(v for _, v in interval) / 4, rel=1e-5)


def test_each_tasks_loss_reaches_tensorboard_beside_the_loss(tiny_model, small_tasks, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # where `train` points it
    trainer = build_trainer(tiny_model, small_tasks, tmp_path / "out", logging_steps=8, report_to="tensorboard")
    trainer.train()

    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", *(f"train/loss_{t.name}" for t in trainer.tasks)} <= tags, sorted(tags)


# ------------------------------------------------------------------------------ the sampling plan
@pytest.mark.parametrize("sampling", ["temperature", "weights"])
def test_the_sampling_plan_table_shows_what_the_loader_yields_per_task(tiny_model, tmp_path, sampling):
    from collections import Counter

    from trainer.training import sampling_plan

    tasks_file = tasks_of_sizes(tmp_path / "tasks", train=(16, 10, 6, 24), validation=(8, 5, 2, 11),
                                batch_sizes={"demo_choice": 4})
    knobs = {"sampling_temperature": 3} if sampling == "temperature" else {"task_weights": "demo_similarity=1,demo_entailment=1,demo_choice=3,demo_tags=0.5"}
    trainer = build_trainer(tiny_model, tasks_file, tmp_path / "out", sampling=sampling, gradient_accumulation_steps=2, **knobs)
    loader = trainer.get_train_dataloader()
    loader.set_epoch(0)
    yielded = Counter(batch["task"] for batch in loader)
    epoch = sum(yielded.values())

    lines = sampling_plan(trainer.tasks, trainer.make_batch_sampler(), trainer.args.gradient_accumulation_steps).splitlines()

    strategy = ("SAMPLING=temperature (SAMPLING_TEMPERATURE=3, SAMPLING_CAP=none)" if sampling == "temperature" else
                "SAMPLING=weights (TASK_WEIGHTS=demo_similarity=1,demo_entailment=1,demo_choice=3,demo_tags=0.5)")
    assert lines[0] == f"Sampling plan: {strategy}; an epoch is {epoch} batches on each of 1 process, " \
                       f"{math.ceil(epoch / 2)} optimizer steps"
    assert lines[1].split() == ["task", "type", "train", "validation", "batch", "batches/epoch", "share", "passes/epoch"]
    assert len(lines) == 2 + len(trainer.tasks)
    for row, task, train, validation in zip(lines[2:], trainer.tasks, (16, 10, 6, 24), (8, 5, 2, 11)):
        batch = 4 if task.name == "demo_choice" else 8
        steps = yielded[task.name]
        assert steps > 0
        assert row.split() == [task.name, task.spec.type, str(train), str(validation), str(batch), str(steps),
                               f"{100 * steps / epoch:.1f}%", f"{steps / math.ceil(train / batch):.2f}"], row

"""Export: train four tasks of four types together with the CLI, then load each exported task with
plain transformers (AutoModelFor…, AutoTokenizer, pipeline) and get the multitask model's predictions.
Also the CLI commands that read a saved model: export, predict, evaluate.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForMultipleChoice,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    pipeline,
)

from tests.conftest import run_cli, tiny_flags
from trainer.data import load_task, make_collator, tokenize
from trainer.model import MULTITASK_FILE, MultitaskModel

RUN = "four-tasks"
# Which transformers class each exported task must load with; written out here, not read from
# trainer.tasks, so the test checks that table too.
AUTO_CLASSES = {
    "demo_similarity": AutoModelForSequenceClassification,  # regression
    "demo_entailment": AutoModelForSequenceClassification,  # classification
    "demo_choice": AutoModelForMultipleChoice,  # multiple choice
    "demo_tags": AutoModelForTokenClassification,  # token classification
}
ARCHITECTURES = {
    "demo_similarity": "BertForSequenceClassification",
    "demo_entailment": "BertForSequenceClassification",
    "demo_choice": "BertForMultipleChoice",
    "demo_tags": "BertForTokenClassification",
}
ATOL = 1e-5
# Subprocesses too: a CLI training run took 23 s with two threads, 5 s with one.
CLI_ENV = {"OMP_NUM_THREADS": "1"}


@dataclass
class TrainedRun:
    model_dir: Path  # the trained (final) multitask model; its exports are in export/<task>
    flags: list[str]
    model: MultitaskModel

    def export_dir(self, task: str) -> Path:
        return self.model_dir / "export" / task


def final_model_dir(run_dir: Path) -> Path:
    """Where `train` leaves the final model: `final/` beside the checkpoints, or the run folder itself."""
    for folder in (run_dir / "final", run_dir):
        if (folder / MULTITASK_FILE).is_file():
            return folder
    pytest.fail(f"train left no final model in {run_dir}: {sorted(p.name for p in run_dir.iterdir())}")


@pytest.fixture(scope="module")
def trained(tiny_model, tiny_tasks, tmp_path_factory) -> TrainedRun:
    """One real CLI training run of all four tiny tasks, shared by the tests of this module."""
    out = tmp_path_factory.mktemp("export-run")
    flags = tiny_flags(tiny_model, tiny_tasks, out, run_name=RUN)
    done = run_cli("train", *flags, cwd=out, env=CLI_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    model_dir = final_model_dir(out / RUN)
    return TrainedRun(model_dir, flags, MultitaskModel.from_checkpoint(model_dir).eval())


def validation_batch(trained: TrainedRun, task: str, tokenizer):
    """The task's raw validation rows and their padded batch, prepared as training prepares them."""
    spec = trained.model.specs[task]
    _, raw = load_task(spec, need_train=False)
    tokenized = tokenize(spec, raw["validation"], tokenizer, max_length=128)
    batch = make_collator(spec, tokenizer)([tokenized[i] for i in range(len(tokenized))])
    return raw["validation"], dict(batch)


def multitask_logits(trained: TrainedRun, task: str, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return trained.model(task=task, **batch).logits


# ------------------------------------------------------------------------ AutoModelFor… per task
@pytest.mark.parametrize("task", list(AUTO_CLASSES))
def test_each_exported_task_loads_with_its_auto_class_and_predicts_like_the_multitask_model(trained, task):
    directory = trained.export_dir(task)
    standalone, info = AUTO_CLASSES[task].from_pretrained(directory, output_loading_info=True)
    standalone.eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    spec = trained.model.specs[task]

    assert type(standalone).__name__ == ARCHITECTURES[task]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    labels = list(spec.labels) if spec.type != "regression" else ["score"]
    assert standalone.config.id2label == dict(enumerate(labels))
    assert standalone.config.label2id == {label: i for i, label in enumerate(labels)}
    assert standalone.config.num_labels == len(labels)
    if spec.type == "regression":
        assert standalone.config.problem_type == "regression"

    _, batch = validation_batch(trained, task, tokenizer)
    with torch.no_grad():
        exported, expected = standalone(**batch), trained.model(task=task, **batch)
    torch.testing.assert_close(exported.logits, expected.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(exported.loss, expected.loss, atol=ATOL, rtol=0)
    # Multiple choice has no transformers pipeline: AutoModelForMultipleChoice above is how it is used.


# ------------------------------------------------------------------------ pipelines
def test_text_classification_pipeline_gives_the_multitask_labels(trained):
    task = "demo_entailment"
    classify = pipeline("text-classification", model=str(trained.export_dir(task)))
    rows, batch = validation_batch(trained, task, classify.tokenizer)
    probs = torch.softmax(multitask_logits(trained, task, batch), dim=-1)

    results = classify([{"text": r["premise"], "text_pair": r["hypothesis"]} for r in rows])
    labels = trained.model.specs[task].labels
    assert [r["label"] for r in results] == [labels[i] for i in probs.argmax(-1).tolist()]
    np.testing.assert_allclose([r["score"] for r in results], probs.max(-1).values.numpy(), atol=ATOL)


def test_text_classification_pipeline_gives_the_multitask_regression_scores(trained):
    task = "demo_similarity"
    score = pipeline("text-classification", model=str(trained.export_dir(task)))
    rows, batch = validation_batch(trained, task, score.tokenizer)
    expected = multitask_logits(trained, task, batch).reshape(-1).numpy()

    results = score([{"text": r["sentence1"], "text_pair": r["sentence2"]} for r in rows], function_to_apply="none")
    assert {r["label"] for r in results} == {"score"}
    np.testing.assert_allclose([r["score"] for r in results], expected, atol=ATOL)


def test_token_classification_pipeline_gives_the_multitask_tags(trained):
    task = "demo_tags"
    tagger = pipeline("token-classification", model=str(trained.export_dir(task)))
    tokenizer = tagger.tokenizer
    rows, batch = validation_batch(trained, task, tokenizer)
    predicted = multitask_logits(trained, task, batch).argmax(-1)
    labels = trained.model.specs[task].labels

    for i, row in enumerate(rows):
        n = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i, :n].tolist()
        special = tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
        expected = [(t, labels[predicted[i, t]]) for t in range(n) if not special[t]]
        # ignore_labels=[] keeps the "O" tags too, so every token is compared.
        found = [(e["index"], e["entity"]) for e in tagger(" ".join(row["words"]), ignore_labels=[])]
        assert found == expected, f"row {i}: {row['words']}"


# ------------------------------------------------------------------------ CLI: export, predict, evaluate
def test_export_command_writes_the_task_with_the_trained_weights(trained, tmp_path):
    target = tmp_path / "exported"
    done = run_cli("export", f"--checkpoint={trained.model_dir}", f"--output={target}", "--task=demo_tags",
                   f"--output_dir={tmp_path}", cwd=tmp_path, env=CLI_ENV)
    assert done.returncode == 0, done.stderr[-3000:]

    assert sorted(p.name for p in target.iterdir()) == ["demo_tags"]
    ours, at_train_end = load_file(target / "demo_tags" / "model.safetensors"), load_file(trained.export_dir("demo_tags") / "model.safetensors")
    assert ours.keys() == at_train_end.keys()
    assert all(torch.equal(ours[k], at_train_end[k]) for k in ours)
    model = AutoModelForTokenClassification.from_pretrained(target / "demo_tags")
    assert model.config.id2label == dict(enumerate(trained.model.specs["demo_tags"].labels))
    AutoTokenizer.from_pretrained(target / "demo_tags")


def test_export_command_rejects_an_unknown_task(trained, tmp_path):
    done = run_cli("export", f"--checkpoint={trained.model_dir}", f"--output={tmp_path / 'x'}", "--task=nope",
                   f"--output_dir={tmp_path}", cwd=tmp_path, env=CLI_ENV)
    assert done.returncode == 2
    assert "--task='nope' is not in this model" in done.stderr and "demo_entailment" in done.stderr
    assert not (tmp_path / "x").exists()


@dataclass
class Predicted:
    folder: Path  # where predict ran (its working directory)
    pairs: list[dict]
    rows: list[dict]


@pytest.fixture(scope="module")
def predicted(trained, tmp_path_factory) -> Predicted:
    """`predict` on demo_entailment's validation pairs (a jsonl without labels), run in an empty folder."""
    folder = tmp_path_factory.mktemp("predict")
    inputs, output = folder / "pairs.jsonl", folder / "predictions.jsonl"
    rows, _ = validation_batch(trained, "demo_entailment", AutoTokenizer.from_pretrained(trained.model_dir))
    pairs = [{"premise": r["premise"], "hypothesis": r["hypothesis"]} for r in rows]
    inputs.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    done = run_cli("predict", "--task=demo_entailment", f"--input={inputs}", f"--output={output}",
                   f"--checkpoint={trained.model_dir}", cwd=folder, env=CLI_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return Predicted(folder, pairs, [json.loads(line) for line in output.read_text().splitlines()])


def test_predict_command_gives_the_exported_pipeline_labels(trained, predicted):
    classify = pipeline("text-classification", model=str(trained.export_dir("demo_entailment")))
    inputs = [{"text": p["premise"], "text_pair": p["hypothesis"]} for p in predicted.pairs]
    results = classify(inputs, top_k=None)  # every label's probability, best first

    assert len(predicted.rows) == len(predicted.pairs)
    assert [row["label"] for row in predicted.rows] == [r[0]["label"] for r in results]
    labels = trained.model.specs["demo_entailment"].labels
    for row, r in zip(predicted.rows, results):
        by_label = {x["label"]: x["score"] for x in r}
        np.testing.assert_allclose(row["probabilities"], [by_label[name] for name in labels], atol=ATOL)


def test_predict_with_a_checkpoint_writes_nothing_but_its_output(predicted):
    assert sorted(p.name for p in predicted.folder.iterdir()) == ["pairs.jsonl", "predictions.jsonl"]


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory) -> tuple[float, float]:
    """(macro average printed by `evaluate` on the final model, the one in metrics.json)."""
    done = run_cli("evaluate", f"--checkpoint={trained.model_dir}", *trained.flags, cwd=tmp_path_factory.mktemp("evaluate"), env=CLI_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.findall(r": macro_avg = (\S+)", done.stdout)
    assert found, done.stdout[-3000:]
    at_train_end = json.loads((trained.model_dir / "metrics.json").read_text())["eval"]["eval_macro_avg"]
    return float(found[-1]), at_train_end


def test_evaluate_command_prints_the_macro_average_of_metrics_json(evaluated):
    printed, at_train_end = evaluated
    assert printed == pytest.approx(at_train_end, abs=5e-5)  # the line shows 4 decimals


def test_evaluate_command_prints_the_macro_average_in_full(evaluated):
    printed, at_train_end = evaluated
    assert printed == pytest.approx(at_train_end, abs=1e-6)

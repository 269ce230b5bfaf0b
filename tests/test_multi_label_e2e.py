"""A multi_label task beside a classification and a regression task, end to end with the real CLI:
labels as comma-separated CSV fields (some rows without any), a threshold and a loss weight.
Training evaluates the three label-set metrics; the task exports as a standalone
`AutoModelForSequenceClassification` that `pipeline("text-classification", top_k=None)` loads
with no code from this project and that gives the multitask model's probabilities; `predict`
writes the labels at the threshold and every label's probability; a kill -9 and a restart give
the uninterrupted run's weights bit for bit."""

from __future__ import annotations

import csv
import json
import random
import signal
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, write_tasks_file
from tests.runs import RUN, assert_same_weights, flags, train, weights

TASK = "demo_topics"
TASKS = f"{TASK},demo_entailment,demo_similarity"
TOPICS = ("animal", "tool", "vehicle")  # the categories that are labels; the demo's other words are none
THRESHOLD = 0.4
STEPS_PER_EPOCH = 6  # 16 examples per task, batch 8: 2 batches x 3 tasks
ATOL = 1e-5


def job(model: Path, tasks_file: Path, out: Path) -> list[str]:
    """The checkpoint tests' tiny job on the user's defaults (`tests.runs.flags`), on these three tasks."""
    return [f for f in flags(model, tasks_file, out) if not f.startswith("--tasks=")] + [f"--tasks={TASKS}"]


def write_topics(data: Path, n_train: int, n_eval: int) -> dict:
    """Rows `the <w1> is near the <w2>` labelled with the categories of TOPICS among their words, as
    CSV fields of comma-separated labels (empty when neither word is in TOPICS)."""
    from trainer.demo.generate import CATEGORIES

    rng = random.Random(5)
    words = [(w, c) for c, ws in CATEGORIES.items() for w in ws]
    files = {}
    for split, n in (("train", n_train), ("validation", n_eval)):
        path = data / f"topics_{split}.csv"
        with open(path, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["sentence", "topics"])
            for _ in range(n):
                (w1, c1), (w2, c2) = rng.sample(words, 2)
                out.writerow([f"the {w1} is near the {w2}", ",".join(sorted({c1, c2} & set(TOPICS)))])
        files[split] = str(path)
    return {"name": TASK, "type": "multi_label", "files": files, "columns": {"text": "sentence", "label": "topics"},
            "threshold": THRESHOLD, "loss_weight": 2.0}


@pytest.fixture(scope="module")
def tasks_file(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("multi-label-tasks")
    path = write_tasks_file(directory, n_train=16, n_eval=8, token_task=False)
    declared = json.loads(path.read_text())
    declared["tasks"].append(write_topics(directory / "data", 16, 8))
    path.write_text(json.dumps(declared))
    return path


@pytest.fixture(scope="module")
def trained(tiny_model, tasks_file, tmp_path_factory):
    """The uninterrupted run (3 epochs of 6 steps), trained once for this module."""
    out = tmp_path_factory.mktemp("multi-label-run")
    done = train(*job(tiny_model, tasks_file, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out / RUN, done


def validation_texts(tasks_file: Path) -> list[str]:
    task = next(t for t in json.loads(tasks_file.read_text())["tasks"] if t["name"] == TASK)
    with open(task["files"]["validation"], newline="") as f:
        return [row["sentence"] for row in csv.DictReader(f)]


def multitask_probabilities(run_dir: Path, texts: list[str]):
    from transformers import AutoTokenizer

    from trainer.modeling import MultitaskModel

    model = MultitaskModel.from_checkpoint(run_dir / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    with torch.no_grad():
        logits = model(task=TASK, **tokenizer(texts, padding=True, return_tensors="pt")).logits
    return model.specs[TASK], torch.sigmoid(logits.double())


def test_training_scores_the_label_sets_and_keeps_the_declaration(trained, tasks_file):
    run_dir, _ = trained
    metrics = json.loads((run_dir / "final" / "metrics.json").read_text())
    for name in ("f1_micro", "f1_macro", "subset_accuracy"):
        assert 0.0 <= metrics["eval"][f"eval_{TASK}_{name}"] <= 1.0, metrics
        assert 0.0 <= metrics["chance"][TASK][name]["chance"] <= 1.0, metrics
    spec, _ = multitask_probabilities(run_dir, validation_texts(tasks_file)[:1])
    assert spec.labels == TOPICS and (spec.threshold, spec.loss_weight) == (THRESHOLD, 2.0)


def test_the_export_gives_the_multitask_probabilities_in_transformers_and_its_pipeline(trained, tasks_file):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    run_dir, _ = trained
    export = run_dir / "final" / "export" / TASK
    texts = validation_texts(tasks_file)
    spec, expected = multitask_probabilities(run_dir, texts)

    standalone, info = AutoModelForSequenceClassification.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    config = standalone.config
    assert config.problem_type == "multi_label_classification"
    assert config.id2label == dict(enumerate(TOPICS)) and config.label2id == {t: i for i, t in enumerate(TOPICS)}
    tokenizer = AutoTokenizer.from_pretrained(export)
    with torch.no_grad():
        theirs = torch.sigmoid(standalone.eval()(**tokenizer(texts, padding=True, return_tensors="pt")).logits)
    torch.testing.assert_close(theirs.double(), expected, atol=ATOL, rtol=0)

    classify = pipeline("text-classification", model=str(export), top_k=None)
    for text, scores, probabilities in zip(texts, classify(texts, batch_size=4), expected.tolist()):
        got = {s["label"]: s["score"] for s in scores}  # every label, sigmoid applied by the pipeline
        assert got.keys() == set(TOPICS), text
        assert [got[t] for t in TOPICS] == pytest.approx(probabilities, abs=ATOL), text


def test_predict_writes_the_labels_at_the_threshold_and_every_probability(trained, tasks_file, tmp_path):
    run_dir, _ = trained
    texts = validation_texts(tasks_file)
    inputs = tmp_path / "inputs.csv"
    inputs.write_text("sentence\n" + "".join(f"{t}\n" for t in texts))
    done = run_cli("predict", f"--task={TASK}", f"--input={inputs}", f"--output_dir={run_dir.parent}", f"--run_name={RUN}",
                   env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    written = [json.loads(line) for line in (tmp_path / f"inputs.{TASK}.predictions.jsonl").read_text().splitlines()]
    _, expected = multitask_probabilities(run_dir, texts)
    assert len(written) == len(texts)
    for row, probabilities in zip(written, expected.tolist()):
        assert list(row) == ["labels", "probabilities"] and list(row["probabilities"]) == list(TOPICS)
        assert [row["probabilities"][t] for t in TOPICS] == pytest.approx(probabilities, abs=ATOL)
        assert row["labels"] == [t for t, p in zip(TOPICS, probabilities) if p >= THRESHOLD]


def test_kill_9_then_restart_gives_the_uninterrupted_weights(trained, tiny_model, tasks_file, tmp_path):
    run_dir, _ = trained
    args = job(tiny_model, tasks_file, tmp_path / "out")
    crashed = train(*args, env={"TRAINER_CRASH_AT": f"mid_step:{STEPS_PER_EPOCH + 3}"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    restarted = train(*args)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert f"(step {STEPS_PER_EPOCH})" in restarted.stdout + restarted.stderr  # resumed from the committed epoch 1
    assert_same_weights(weights(tmp_path / "out" / RUN), weights(run_dir))

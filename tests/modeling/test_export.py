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

from tests.conftest import TINY_MAX_LENGTH, run_cli, tiny_flags
from trainer.data import load_task, make_collator, tokenize
from trainer.modeling import MULTITASK_FILE, MultitaskModel

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


PAIR = {"premise": "the saw is near the dog", "hypothesis": "there is a tool"}


@pytest.fixture
def predict_in_process(trained, monkeypatch, capsys):
    """`python -m trainer predict --task=demo_entailment --checkpoint=<trained> ARGS`, run by
    `cli.main` in this process (the model loads in a second, not a new interpreter's ten):
    returns (exit code, stderr)."""
    import logging

    from trainer.cli import main

    monkeypatch.setenv("ENV_FILE", "")
    root = logging.getLogger()
    handlers = list(root.handlers)

    def run(*args: str) -> tuple[int, str]:
        try:
            code = main(["predict", "--task=demo_entailment", f"--checkpoint={trained.model_dir}", *args])
        finally:
            # The job's logging goes to the stdout of this run (capsys's): detach it with the run.
            for handler in set(root.handlers) - set(handlers):
                root.removeHandler(handler)
        return code, capsys.readouterr().err

    return run


# Inputs `predict` must refuse with exit 2 and one line naming the file, the line and the fix, as
# `train` does for the same files, without writing any output.
@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.jsonl", "", "--input='{input}': it has no rows; give it one input per row"),
        ("header.csv", "premise,hypothesis\n", "--input='{input}': it has no rows; give it one input per row"),
        ("bad.jsonl", json.dumps(PAIR) + "\n" + '{"premise": "a", "hypothesis": \n',
         "--input='{input}': cannot load {input}: line 2 is not valid JSON (Expecting value at column 32)"),
        ("ragged.csv", "premise,hypothesis\na,b\nc,d,e\n",
         "--input='{input}': cannot load {input}: line 3 has 3 fields where the header has 2"),
        ("latin.csv", "premise,hypothesis\ncaf\xe9,b\n".encode("latin-1"),
         "--input='{input}': cannot load {input}: it is not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"),
        ("column.jsonl", json.dumps({"premise": "a"}) + "\n",
         "--input='{input}': no column 'hypothesis' (role 'text_pair') for task 'demo_entailment'; it has premise; "
         "name the input columns as in the task's data (premise, hypothesis)"),
        ("nulls.jsonl", json.dumps(PAIR) + "\n" + json.dumps({"premise": "a", "hypothesis": None}) + "\n",
         "--input='{input}', line 2: no value in column 'hypothesis' (role 'text_pair')"),
        ("list.jsonl", json.dumps(PAIR) + "\n[1, 2]\n",
         "--input='{input}': cannot load {input}: line 2 is a JSON list, not an object; write one object per line"),
        ("notes.txt", "a b\n", "--input='{input}': use a .jsonl, .json, .csv or .tsv file"),
    ],
)
def test_predict_refuses_bad_input_files_with_one_line(predict_in_process, tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    output = tmp_path / "out.jsonl"
    code, err = predict_in_process(f"--input={path}", f"--output={output}")
    assert code == 2, err
    assert err.startswith("error: " + expected.format(input=path)) and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no output, no temporary file


def test_predict_on_the_command_line_says_one_line_for_a_malformed_file(trained, tmp_path):
    # In a fresh process: the loaders' own error log must not add lines to stderr.
    inputs = tmp_path / "ragged.csv"
    inputs.write_text("premise,hypothesis\na,b\nc,d,e\n")
    done = run_cli("predict", "--task=demo_entailment", f"--input={inputs}", f"--checkpoint={trained.model_dir}",
                   cwd=tmp_path, env=CLI_ENV)
    assert done.returncode == 2
    assert done.stderr == (f"error: --input={str(inputs)!r}: cannot load {inputs}: line 3 has 3 fields where the header "
                           "has 2; fix that row (quote a field that holds a comma)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ragged.csv"]


def test_predict_refuses_an_output_that_is_a_folder_or_the_input(predict_in_process, tmp_path, monkeypatch):
    inputs = tmp_path / "pairs.jsonl"
    inputs.write_text(json.dumps(PAIR) + "\n")
    (tmp_path / "folder").mkdir()
    monkeypatch.chdir(tmp_path)
    for output, expected in (
        ("folder", "error: --output='folder' is a folder; give a file path, e.g. folder/predictions.jsonl"),
        (str(inputs), f"error: --output={str(inputs)!r} is the input file; write the predictions to another file"),
        ("./pairs.jsonl", "error: --output='./pairs.jsonl' is the input file; write the predictions to another file"),
    ):
        code, err = predict_in_process("--input=pairs.jsonl", f"--output={output}")
        assert (code, err) == (2, expected + "\n")
    assert inputs.read_text() == json.dumps(PAIR) + "\n"  # the input is never overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "pairs.jsonl"]


def test_predict_refuses_a_max_seq_length_the_model_cannot_take(predict_in_process, tmp_path):
    inputs = tmp_path / "pairs.jsonl"
    inputs.write_text(json.dumps(PAIR) + "\n")
    code, err = predict_in_process(f"--input={inputs}", f"--max_seq_length={2 * TINY_MAX_LENGTH}")
    assert code == 2 and err.startswith(f"error: MAX_SEQ_LENGTH={2 * TINY_MAX_LENGTH} is not valid: ") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]


def test_a_crash_while_writing_predictions_leaves_no_half_written_file(predict_in_process, tmp_path, monkeypatch):
    import types

    from trainer import commands

    inputs, output = tmp_path / "pairs.jsonl", tmp_path / "predictions.jsonl"
    inputs.write_text((json.dumps(PAIR) + "\n") * 5)
    output.write_text("the previous predictions\n")
    rows = []

    def dumps_then_crash(value, *args, **kwargs):  # the disk fills up after three rows
        if len(rows) == 3:
            raise OSError("disk full")
        rows.append(value)
        return json.dumps(value, *args, **kwargs)

    monkeypatch.setattr(commands, "json", types.SimpleNamespace(dumps=dumps_then_crash, loads=json.loads))
    with pytest.raises(OSError, match="disk full"):
        predict_in_process(f"--input={inputs}", f"--output={output}")
    assert output.read_text() == "the previous predictions\n"  # old file intact, nothing half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl", "predictions.jsonl"]

    monkeypatch.setattr(commands, "json", json)
    code, err = predict_in_process(f"--input={inputs}", f"--output={output}")
    assert code == 0, err
    assert [sorted(json.loads(line)) for line in output.read_text().splitlines()] == [["index", "label", "probabilities"]] * 5


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

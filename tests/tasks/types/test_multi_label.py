"""The multi_label type's interface on a few rows: declaration (threshold, metrics), label lists
as JSON lists and as comma-separated CSV fields, the label set, multi-hot encoding, the head,
decoding at the threshold, the three metrics and their chance levels on hand-computed examples,
and bad labels stopping the job with one line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.tasks.types.conftest import make_spec, rows
from trainer.tasks import TaskError
from trainer.tasks.types import TASK_TYPES

TYPE = TASK_TYPES["multi_label"]
DATA = rows(text=["a saw", "a dog", "the cat", "a bus"], label=[["tool"], ["animal", "tool"], ["animal"], []])


def spec(**declaration):
    return make_spec("multi_label", **declaration)


# ------------------------------------------------------------------------------ the declaration
def test_declaration_roles_head_metrics_and_threshold():
    assert TYPE.required_columns == ("text", "label") and TYPE.optional_columns == ("text_pair",)
    assert TYPE.head_class().__name__ == "AutoModelForSequenceClassification" and TYPE.pipeline == "text-classification"
    declared = spec()
    assert declared.metrics == ("f1_micro", "f1_macro", "subset_accuracy") and declared.primary_metric == "f1_micro"
    assert declared.threshold == 0.5 and declared.loss_weight == 1.0
    assert spec(threshold=0.25).threshold == 0.25
    assert make_spec("classification").threshold is None  # other types have no threshold


@pytest.mark.parametrize("value", [0, 1, 0.0, 1.0, -0.1, 1.5, float("nan"), float("inf"), "0.5", True, [0.5]])
def test_a_threshold_outside_0_1_or_not_a_number_is_refused(value):
    with pytest.raises(TaskError, match=r"^task 't': 'threshold' must be a number between 0 and 1 \(both excluded\)"):
        spec(threshold=value)


@pytest.mark.parametrize("other", ["classification", "regression", "token_classification"])
def test_a_threshold_on_another_type_is_refused_with_one_line(other):
    with pytest.raises(TaskError) as raised:
        make_spec(other, threshold=0.5)
    assert str(raised.value) == f"task 't': 'threshold' applies to type(s) multi_label, not to type {other}; remove it"


def test_metrics_of_other_types_are_refused_and_its_own_belong_to_it_only():
    with pytest.raises(TaskError, match="metric\\(s\\) accuracy do not apply to type multi_label; use f1_micro, f1_macro, "
                                        "subset_accuracy"):
        spec(metrics=["accuracy"])
    with pytest.raises(TaskError, match="metric\\(s\\) f1_micro do not apply to type classification"):
        make_spec("classification", metrics=["f1_micro"])
    assert spec(metrics=["subset_accuracy", "f1_macro"]).primary_metric == "subset_accuracy"


# ------------------------------------------------------------------------------ label lists and the label set
@pytest.mark.parametrize(("value", "labels"), [
    (["b", "a"], ["b", "a"]), ([], []), ("b, a", ["b", "a"]), ("", []), ("  ", []), ("a", ["a"]), (3, [3]), ([1, 2], [1, 2])])
def test_a_rows_labels_are_a_json_list_or_a_comma_separated_field(value, labels):
    from trainer.tasks.types.multi_label import row_labels

    assert row_labels(value) == labels


@pytest.mark.parametrize(("value", "problem"), [
    (None, "column 'label': no label list (null); give the row its labels, [] (or an empty CSV/TSV field) when none applies"),
    ("a,,b", "column 'label': label 2 of 'a,,b' is empty; remove the extra comma"),
    ('["a", "b"]', "column 'label': '[\"a\", \"b\"]' is a JSON list in a text; write the labels separated by commas"),
    (["a", None], "column 'label': label 2 of ['a', None] is empty or null; remove it"),
    (["a", " "], "column 'label': label 2 of ['a', ' '] is empty or null"),
])
def test_a_label_list_that_does_not_parse_is_named(value, problem):
    found = TYPE.label_problem(spec(), "label", value)
    assert found is not None and found.startswith(problem), found


def test_the_label_set_is_read_from_the_train_split_sorted_or_declared():
    resolved = TYPE.resolve_labels(spec(), DATA)
    assert resolved.labels == ("animal", "tool") and resolved.num_labels == 2
    numbers = TYPE.resolve_labels(spec(), rows(text=["x", "y"], label=[[10, 2], [1]]))
    assert numbers.labels == ("1", "2", "10")  # numbers in numeric order, as the other types sort them
    csv_like = TYPE.resolve_labels(spec(), rows(text=["x", "y", "z"], label=["tool,animal", "", "plant"]))
    assert csv_like.labels == ("animal", "plant", "tool")
    declared = spec(labels=["tool", "animal", "plant"])
    assert TYPE.resolve_labels(declared, DATA) is declared  # declared order kept, a declared label may be absent
    with pytest.raises(TaskError, match="num_labels=3 but column 'label' has 2 distinct labels \\(animal, tool\\)"):
        TYPE.resolve_labels(spec(num_labels=3), DATA)
    with pytest.raises(TaskError, match="^task 't', split train: no row has a label in column 'label'"):
        TYPE.resolve_labels(spec(), rows(text=["x", "y"], label=[[], []]))


def test_the_label_set_of_a_hub_sequence_of_class_labels_is_its_names():
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.Sequence(datasets.ClassLabel(names=["sad", "happy", "angry"]))})
    hub = datasets.Dataset.from_dict({"text": ["x", "y"], "label": [[1], [0, 1]]}, features=features)
    resolved = TYPE.resolve_labels(spec(), hub)
    assert resolved.labels == ("sad", "happy", "angry")  # the class ids' order, "angry" never seen
    TYPE.check_labels(resolved, "train", hub)


def test_labels_outside_the_set_are_refused_in_any_split_and_an_empty_list_is_fine():
    resolved = TYPE.resolve_labels(spec(), DATA)
    TYPE.check_labels(resolved, "validation", rows(text=["x", "y"], label=[[], ["tool", "animal"]]))
    with pytest.raises(TaskError) as raised:
        TYPE.check_labels(resolved, "validation", rows(text=["x", "y"], label=[["tool"], ["animal", "plant"]]))
    assert str(raised.value) == ("task 't', split validation, row 2: label 'plant' in column 'label' is not in the label "
                                 "set [animal, tool]; fix the row or add it to 'labels'")
    # Declared labels are checked on the raw rows of every split, train included (where the line is known).
    declared = spec(labels=["animal", "tool"])
    assert TYPE.first_label_problem(declared, DATA) is None
    assert TYPE.first_label_problem(declared, rows(text=["x", "y"], label=[[], ["tool", "plant"]])) == (
        1, "label 'plant' in column 'label' is not in the declared labels [animal, tool]; fix the row or add it to 'labels'")


# ------------------------------------------------------------------------------ encoding and the head
def test_labels_encode_as_float_multi_hot_vectors_and_collate(tokenizer):
    resolved = TYPE.resolve_labels(spec(), DATA)
    enc = TYPE.encode(resolved, DATA.to_dict(), tokenizer, 16, with_labels=True)
    assert enc["labels"] == [[0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]
    assert "labels" not in TYPE.encode(resolved, DATA.to_dict(), tokenizer, 16, with_labels=False)
    collated = TYPE.collator(tokenizer)([{k: enc[k][i] for k in enc} for i in range(4)])
    assert collated["labels"].dtype.is_floating_point and collated["labels"].tolist() == enc["labels"]
    # Inputs to predict get an empty label list each: batches are made as in training.
    placeholder = TYPE.placeholder_labels(resolved, rows(text=["x", "y"]))
    assert TYPE.encode(resolved, placeholder.to_dict(), tokenizer, 16, with_labels=True)["labels"] == [[0.0, 0.0]] * 2


def test_the_head_is_a_multi_label_sequence_classifier_whose_loss_is_bce(encoder_config):
    import torch

    resolved = TYPE.resolve_labels(spec(), DATA)
    cfg = TYPE.head_config(encoder_config, resolved)
    assert (cfg.num_labels, cfg.problem_type) == (2, "multi_label_classification")
    assert cfg.id2label == {0: "animal", 1: "tool"} and cfg.label2id == {"animal": 0, "tool": 1}
    head = TYPE.head_class().from_config(cfg).eval()
    ids = torch.tensor([[2, 5, 3], [2, 6, 3]])
    labels = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    out = head(input_ids=ids, labels=labels)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels)
    assert torch.allclose(out.loss, expected)


# ------------------------------------------------------------------------------ outputs
def test_decode_predicts_a_label_at_or_above_the_threshold():
    resolved = TYPE.resolve_labels(spec(), DATA)
    logits = np.array([[0.0, -1e-6], [1.0, -3.0]])  # sigmoid 0.5 exactly, just below; 0.73, 0.05
    assert TYPE.decode(resolved, logits).tolist() == [[1, 0], [1, 0]]
    high = TYPE.resolve_labels(spec(threshold=0.8), DATA)
    assert TYPE.decode(high, logits).tolist() == [[0, 0], [0, 0]]
    low = TYPE.resolve_labels(spec(threshold=0.04), DATA)
    assert TYPE.decode(low, logits).tolist() == [[1, 1], [1, 1]]
    assert TYPE.decode(resolved, (logits, np.zeros((2, 3, 4)))).tolist() == [[1, 0], [1, 0]]  # a tuple of outputs


def test_prediction_rows_hold_the_labels_and_every_labels_probability():
    resolved = TYPE.resolve_labels(spec(threshold=0.6), DATA)
    logits = np.array([[2.0, 0.0], [-2.0, -2.0]])
    p = 1 / (1 + math.exp(-2.0))
    assert TYPE.prediction_rows(resolved, logits, None) == [
        {"labels": ["animal"], "probabilities": {"animal": round(p, 6), "tool": 0.5}},
        {"labels": [], "probabilities": {"animal": round(1 - p, 6), "tool": round(1 - p, 6)}},
    ]


# Four rows, three labels. Predictions against references:
#   row 0: {0} for {0, 2}  row 1: {1, 2} for {1}  row 2: {} for {}  row 3: {0, 1} for {0, 1}
REFS = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 0]])
PREDS = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 0]])


def test_score_decodes_the_logits_at_the_threshold_and_compares_label_sets():
    resolved = TYPE.resolve_labels(spec(labels=["a", "b", "c"]), DATA)
    logits = np.where(PREDS == 1, 3.0, -3.0)
    assert TYPE.score(resolved, logits, REFS.astype(np.float32)) == pytest.approx(
        {"f1_micro": 0.8, "f1_macro": 2 / 3, "subset_accuracy": 0.5})


def test_chance_is_the_best_constant_label_set():
    resolved = TYPE.resolve_labels(spec(labels=["a", "b", "c"]), DATA)
    # Constant guesses on REFS (labels 0 and 1 in half the rows, 2 in a quarter: none in more than half):
    #   {}: micro 0, macro 0, subset 1/4 (row 2)
    #   every label: TP 5, FP 7, FN 0: micro 10/17; per label 2/3, 2/3, 2/5: macro 26/45; subset 0
    #   the most frequent row set, {0, 2} (all rows differ: the first): micro 6/13, macro 16/45, subset 1/4
    chance = TYPE.chance(resolved, REFS.astype(np.float32).tolist())  # as a tokenized split's labels column
    assert chance == pytest.approx({"f1_micro": 10 / 17, "f1_macro": 26 / 45, "subset_accuracy": 0.25})


# ------------------------------------------------------------------------------ bad input, through the data checks
def write(path, text: str):
    path.write_text(text)
    return str(path)


def test_a_label_outside_the_declared_set_names_task_split_line_and_column(tmp_path):
    from trainer.data import load_task
    from trainer.tasks import build_spec

    train = write(tmp_path / "train.csv", 'text,topics\na saw,tool\na dog,"animal,tool"\nthe sky,\nthe rose,"plant,tool"\n')
    declared = build_spec({"name": "topics", "type": "multi_label", "files": {"train": train},
                           "columns": {"label": "topics"}, "labels": ["animal", "tool"]})
    with pytest.raises(TaskError) as raised:
        load_task(declared)
    assert str(raised.value) == (f"task 'topics', split train, line 5 of {train}: label 'plant' in column 'topics' is not in "
                                 "the declared labels [animal, tool]; fix the row or add it to 'labels'")


def test_a_validation_label_outside_the_train_labels_names_its_row(tmp_path):
    from trainer.data import load_task
    from trainer.tasks import build_spec

    lines = [{"text": "a saw", "label": ["tool"]}, {"text": "a dog", "label": ["animal"]}, {"text": "the sky", "label": []}]
    train = write(tmp_path / "train.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    validation = write(tmp_path / "dev.jsonl", "".join(json.dumps(r) + "\n" for r in [*lines[:2], {"text": "x", "label": ["plant"]}]))
    declared = build_spec({"name": "topics", "type": "multi_label", "files": {"train": train, "validation": validation}})
    with pytest.raises(TaskError) as raised:
        load_task(declared)
    assert str(raised.value) == (f"task 'topics', split validation, row 3 of {validation}: label 'plant' in column 'label' "
                                 "is not in the label set [animal, tool]; fix the row or add it to 'labels'")
    lines[2]["label"] = []  # rows that no label applies to are fine in every split
    write(tmp_path / "dev.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    resolved, raw = load_task(declared)
    assert resolved.labels == ("animal", "tool") and len(raw["validation"]) == 3


def test_the_cli_stops_a_bad_label_before_training_with_exit_2_and_one_line(tmp_path, tiny_model, monkeypatch, capsys):
    from trainer.cli import main

    train = write(tmp_path / "train.csv", 'text,label\na saw,tool\na dog,"animal, rock"\n')
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"name": "topics", "type": "multi_label", "files": {"train": train},
                                  "labels": ["animal", "tool"]}]))
    monkeypatch.setenv("ENV_FILE", "")
    monkeypatch.chdir(tmp_path)
    code = main(["train", f"--model_name={tiny_model}", "--model_init=scratch", f"--tasks_file={tasks}", "--tasks=topics",
                 f"--output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and err == (f"error: task 'topics', split train, line 3 of {train}: label 'rock' in column 'label' is not "
                                 "in the declared labels [animal, tool]; fix the row or add it to 'labels'\n")
    assert not (tmp_path / "out").exists()

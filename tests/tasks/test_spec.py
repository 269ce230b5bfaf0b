"""Tasks as data: presets, task files (YAML and JSON), and clear errors for bad declarations."""

from __future__ import annotations

import json

import pytest

from trainer.config import ConfigError, load_config
from trainer.tasks import PRESETS, TASK_TYPES, TaskError, TaskSpec, build_spec, read_tasks_file, resolve_tasks


@pytest.mark.parametrize("name", ["stsb", "rte", "commonsense_qa", "mrpc", "cola", "sst2"])
def test_presets_are_valid_declarations(name):
    spec = build_spec(PRESETS[name], source="presets")
    assert spec.name == name and spec.hub and spec.type in TASK_TYPES
    assert spec.metrics


def test_preset_types():
    types = {n: build_spec(PRESETS[n]).type for n in PRESETS}
    assert types["stsb"] == "regression"
    assert types["rte"] == types["mrpc"] == types["cola"] == types["sst2"] == "classification"
    assert types["commonsense_qa"] == "multiple_choice"


def test_yaml_tasks_file_with_preset_override(tmp_path):
    (tmp_path / "tasks.yaml").write_text(
        """
tasks:
  - name: stsb_local
    preset: stsb
    files: {train: data/train.tsv, validation: data/dev.tsv}
    columns: {label: score}
  - name: ner
    type: token_classification
    files: {train: ner.jsonl}
    columns: {tokens: words, label: tags}
    batch_size: 8
"""
    )
    specs = read_tasks_file(tmp_path / "tasks.yaml")
    stsb = specs["stsb_local"]
    assert stsb.type == "regression" and stsb.hub is None
    assert stsb.columns == {"text": "sentence1", "text_pair": "sentence2", "label": "score"}
    assert stsb.files["train"] == str(tmp_path / "data" / "train.tsv")  # relative to the tasks file
    assert specs["ner"].batch_size == 8 and specs["ner"].metrics == ("accuracy",)


def test_relative_file_paths_are_kept_absolute_whatever_the_working_folder(tmp_path, monkeypatch):
    # A trained model keeps its declarations (multitask.json): `evaluate` reads the validation
    # files from them, maybe in another folder than the one `train` ran in.
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "tasks.json").write_text(json.dumps([
        {"name": "t", "type": "classification", "files": {"train": "data/train.csv", "validation": "../dev.csv"}}]))
    monkeypatch.chdir(tmp_path)
    spec = read_tasks_file("project/tasks.json")["t"]
    assert spec.files == {"train": str(tmp_path / "project" / "data" / "train.csv"), "validation": str(tmp_path / "dev.csv")}


def test_resolve_tasks_keeps_order_and_prefers_the_file(tmp_path):
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps([{"name": "rte", "preset": "rte", "files": {"train": "t.tsv"}}]))
    cfg = load_config({"tasks": "stsb,rte", "tasks_file": str(path)}, environ={})
    specs = resolve_tasks(cfg)
    assert [s.name for s in specs] == ["stsb", "rte"]
    assert specs[1].files is not None and specs[0].hub is not None


def test_unknown_task_name_lists_known_ones():
    cfg = load_config({"tasks": "mnli"}, environ={})
    with pytest.raises(ConfigError, match="unknown task 'mnli'.*commonsense_qa"):
        resolve_tasks(cfg)


BASE = {"name": "t", "type": "classification", "files": {"train": "a.csv"}, "columns": {"text": "s", "label": "y"}}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"type": "ranking"}, "unknown task type 'ranking'"),
        ({"colums": {}}, "unknown key"),
        ({"columns": {"text": "s", "label": "y", "choices": "c"}}, "role"),
        ({"labels": ["a", "b"], "num_labels": 3}, "num_labels=3 but 2 labels"),
        ({"labels": ["a", "a"]}, "distinct"),
        ({"metrics": ["meteor"]}, "unknown metric"),
        ({"metrics": ["bleu"]}, "bleu do not apply to type classification"),
        ({"files": {"validation": "a.csv"}}, "include 'train'"),
        ({"files": {"train": "a.xlsx"}}, "unsupported file type"),
        ({"hub": "x/y"}, "exactly one data source"),
        ({"num_labels": 1}, "regression"),
        ({"batch_size": 0}, "batch_size"),
        ({"preset": "mnli"}, "unknown preset"),
        ({"name": "bad name!"}, "bad or missing name"),
        # Reader options: each applies to some file types only, and takes the values listed.
        ({"header": "no"}, "'header' must be true or false"),
        ({"column_names": ["s", "y"]}, "'column_names' names the columns of a file without a header line: add header: false"),
        ({"header": False, "column_names": ["s", "s"]}, "'column_names' must be a list of distinct column names"),
        ({"header": False, "column_names": ["a", "b"]}, r"columns.text is 's', not one of column_names \(a, b\)"),
        ({"header": False}, "columns.text is 's', but a file without a header line .* has no column names"),
        ({"columns": {"text": 3, "label": "y"}}, "columns.text is 3, a position: positions name the columns of a file without a header"),
        ({"header": False, "column_names": ["s", "y"], "columns": {"text": 2, "label": 1}}, r"columns.text is position 2; positions count from 0 \(0 to 1"),
        ({"delimiter": "||"}, "'delimiter' must be one character"),
        ({"delimiter": "\\t"}, "'delimiter' is a backslash and a t, not a tab"),
        ({"quoting": "some"}, "'quoting' must be one of none, minimal, all, nonnumeric"),
        ({"encoding": "latin-9x"}, "'encoding' 'latin-9x' is not a text encoding Python knows"),
        ({"records": "data..qas"}, "'records' must be a dotted path"),
        ({"files": {"train": "a.jsonl"}, "delimiter": "|"}, "'delimiter' applies to .csv, .tsv files, not to a.jsonl; remove it"),
        ({"files": {"train": "a.csv", "validation": "b.parquet"}, "encoding": "latin-1"}, "'encoding' applies to .csv, .tsv, .jsonl, .json files, not to b.parquet"),
        ({"records": "data.paragraphs.qas"}, "'records' applies to .jsonl, .json files, not to a.csv"),
        ({"files": None, "hub": "x/y", "quoting": "none"}, "'quoting' applies to local 'files', not to a Hub dataset"),
    ],
)
def test_bad_declarations(change, message):
    with pytest.raises(TaskError, match=message) as err:
        build_spec({**BASE, **change}, source="tasks.yaml")
    assert "\n" not in str(err.value)


def test_regression_takes_no_labels():
    with pytest.raises(TaskError, match="takes no 'labels'"):
        build_spec({**BASE, "type": "regression", "labels": ["a"]})


def test_unparseable_tasks_file(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text("tasks: [name: x\n")
    with pytest.raises(TaskError, match="does not parse"):
        read_tasks_file(path)


def test_a_tasks_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_bytes("tasks:\n  - name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(TaskError, match=r"^tasks file .*tasks.yaml is not UTF-8 text \(byte 0xe9 on line 2\); save it as UTF-8$"):
        read_tasks_file(path)


def test_duplicate_task_in_file(tmp_path):
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps([BASE, BASE]))
    with pytest.raises(TaskError, match="declared twice"):
        read_tasks_file(path)


def test_reader_options_round_trip_and_older_saved_specs_still_load():
    spec = build_spec({**BASE, "files": {"train": "a.tsv"}, "header": False, "column_names": ["src", "y", "orig", "s"],
                       "delimiter": "|", "quoting": "minimal", "encoding": "latin-1", "columns": {"text": 3, "label": 1}})
    assert spec.columns == {"text": "s", "label": "y"} and spec.column_names == ("src", "y", "orig", "s")
    saved = json.loads(json.dumps(spec.to_dict()))
    assert TaskSpec.from_dict(saved) == spec
    records = build_spec({**BASE, "files": {"train": "train-v2.0.json"}, "records": "data.paragraphs.qas"})
    assert TaskSpec.from_dict(json.loads(json.dumps(records.to_dict()))) == records
    # Left out at their defaults: a declaration without them is saved (and hashed) as before.
    plain = build_spec(BASE)
    assert not {"header", "column_names", "delimiter", "quoting", "encoding", "records"} & set(plain.to_dict())
    older = {k: v for k, v in plain.to_dict().items() if k != "separator"}  # a multitask.json of an older version
    assert TaskSpec.from_dict(older) == plain and plain.header is True and plain.records is None

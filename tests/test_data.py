"""Data: loading every file format (real GLUE TSV included), checks that name task/split/column,
tokenization per task type and dynamic padding."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from tests.conftest import DEMO, SHARED_GLUE
from trainer.data import (
    MultitaskCollator,
    MultitaskDataset,
    example_lengths,
    load_split,
    load_task,
    make_collator,
    tokenize,
)
from trainer.tasks import PRESETS, TaskError, build_spec, read_tasks_file

needs_glue = pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason="../shared/data/glue is not beside the project")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO / "model")


def glue_spec(preset: str, folder: str, **extra):
    return build_spec({"name": preset, "preset": preset,
                       "files": {"train": str(SHARED_GLUE / folder / "train.tsv"),
                                 "validation": str(SHARED_GLUE / folder / "dev.tsv")}, **extra})


@needs_glue
def test_real_glue_rte_tsv_loads_with_quotes_intact():
    spec, splits = load_task(glue_spec("rte", "RTE"))
    assert len(splits["train"]) == 2490 and len(splits["validation"]) == 277
    assert set(splits["train"].unique("label")) == {"entailment", "not_entailment"}
    assert any('"' in s for s in splits["train"]["sentence1"])  # quote characters survive (no CSV quoting)
    assert spec.labels == ("entailment", "not_entailment")


@needs_glue
def test_real_glue_stsb_tsv_loads_as_regression():
    spec, splits = load_task(glue_spec("stsb", "STS-B", columns={"label": "score"}))
    assert len(splits["train"]) == 5749 and len(splits["validation"]) == 1500
    scores = splits["train"]["score"]
    assert min(scores) >= 0 and max(scores) <= 5


def test_every_demo_format_loads():
    for spec in read_tasks_file(DEMO / "tasks.json").values():
        spec, splits = load_task(spec)
        assert len(splits["train"]) == 1200 and len(splits["validation"]) == 300


def test_parquet_and_jsonl(tmp_path):
    import datasets

    rows = [{"s": f"the cat {i}", "y": "a" if i % 2 else "b"} for i in range(6)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("d.parquet", "d.jsonl"):
        spec = build_spec({"name": "t", "type": "classification", "files": {"train": str(tmp_path / name)},
                           "columns": {"text": "s", "label": "y"}})
        spec, splits = load_task(spec)
        assert spec.labels == ("a", "b") and len(splits["train"]) == 6


# ------------------------------------------------------------------ bad input: task, split and column named
def _csv(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_missing_column_names_task_split_and_column(tmp_path):
    spec = build_spec({"name": "nli", "type": "classification",
                       "files": {"train": _csv(tmp_path, "t.csv", "premise,label\na,x\n")},
                       "columns": {"text": "premise", "text_pair": "hypothesis", "label": "label"}})
    with pytest.raises(TaskError, match=r"task 'nli', split train: column 'hypothesis' \(role 'text_pair'\) not found; the data has premise, label"):
        load_task(spec)


def test_empty_split(tmp_path):
    spec = build_spec({"name": "e", "type": "classification",
                       "files": {"train": _csv(tmp_path, "t.csv", "s,y\na,x\n"), "validation": _csv(tmp_path, "v.csv", "s,y\n")},
                       "columns": {"text": "s", "label": "y"}})
    with pytest.raises(TaskError, match="task 'e', split validation: the split is empty"):
        load_task(spec)


def test_label_outside_label_set(tmp_path):
    spec = build_spec({"name": "c", "type": "classification", "labels": ["pos", "neg"],
                       "files": {"train": _csv(tmp_path, "t.csv", "s,y\na,pos\nb,neutral\n")},
                       "columns": {"text": "s", "label": "y"}})
    with pytest.raises(TaskError, match=r"task 'c', split train: label 'neutral' in column 'y' is not in the label set \[pos, neg\]"):
        load_task(spec)


def test_label_outside_set_in_validation_only(tmp_path):
    spec = build_spec({"name": "c", "type": "classification",
                       "files": {"train": _csv(tmp_path, "t.csv", "s,y\na,pos\nb,neg\n"),
                                 "validation": _csv(tmp_path, "v.csv", "s,y\na,meh\n")},
                       "columns": {"text": "s", "label": "y"}})
    with pytest.raises(TaskError, match="split validation: label 'meh'"):
        load_task(spec)


def test_num_labels_mismatch_with_data(tmp_path):
    spec = build_spec({"name": "c", "type": "classification", "num_labels": 3,
                       "files": {"train": _csv(tmp_path, "t.csv", "s,y\na,pos\nb,neg\n")},
                       "columns": {"text": "s", "label": "y"}})
    with pytest.raises(TaskError, match="num_labels=3 but column 'y' has 2 distinct labels"):
        load_task(spec)


def test_regression_needs_numbers(tmp_path):
    spec = build_spec({"name": "r", "type": "regression",
                       "files": {"train": _csv(tmp_path, "t.csv", "s,y\na,1.5\nb,high\n")},
                       "columns": {"text": "s", "label": "y"}})
    with pytest.raises(TaskError, match=r"task 'r', split train, line 3 of .*t.csv: label 'high' in column 'y' is not a number"):
        load_task(spec)


def _load_error(tmp_path, name: str, text: str, task_type: str = "classification", **declared) -> str:
    path = tmp_path / name
    path.write_text(text)
    columns = {"tokens": "w", "label": "t"} if task_type == "token_classification" else {"text": "s", "label": "y"}
    spec = build_spec({"name": "d", "type": task_type, "files": {"train": str(path)}, "columns": columns, **declared})
    with pytest.raises(TaskError) as err:
        load_task(spec)
    message = str(err.value)
    assert "\n" not in message
    return message.replace(str(tmp_path) + "/", "")


# Data that trained silently but wrong: each must stop before training, naming the file, the line
# (or row) and the fix.
@pytest.mark.parametrize(
    ("name", "text", "task_type", "declared", "expected"),
    [
        ("nan.csv", "s,y\na,1.0\nb,nan\n", "regression", {},
         "task 'd', split train, line 3 of nan.csv: label 'nan' in column 'y' is not a finite number"),
        ("inf.tsv", "s\ty\na\t1\nb\t2\nc\tinf\n", "regression", {},
         "task 'd', split train, line 4 of inf.tsv: label inf in column 'y' is not a finite number"),
        ("ninf.csv", "s,y\na,-inf\nb,2\n", "regression", {},
         "task 'd', split train, line 2 of ninf.csv: label -inf in column 'y' is not a finite number"),
        ("nan.jsonl", '{"s": "a", "y": 1.0}\n\n{"s": "b", "y": NaN}\n', "regression", {},
         "task 'd', split train, line 3 of nan.jsonl: label nan in column 'y' is not a finite number"),
        ("empty.csv", "s,y\na,1.5\nb,\n", "regression", {},
         "task 'd', split train, line 3 of empty.csv: no label in column 'y'"),
        ("null.jsonl", '{"s": "a", "y": 1.5}\n{"s": "b", "y": null}\n', "regression", {},
         "task 'd', split train, line 2 of null.jsonl: no label in column 'y'"),
        ("empty.csv", "s,y\na,pos\nb,neg\nc, \n", "classification", {},
         "task 'd', split train, line 4 of empty.csv: no label in column 'y'"),
        ("empty.csv", "s,y\na,pos\nb,\n", "classification", {"labels": ["pos", "neg"]},
         "task 'd', split train, line 3 of empty.csv: no label in column 'y'"),
        # A TSV row with a missing field: pandas fills it with '' (with inferred labels, a class named '').
        ("short.tsv", "s\ty\na\tpos\nb\tneg\n\nc\n", "classification", {},
         "task 'd', split train, line 5 of short.tsv: no label in column 'y'"),
        ("quoted.csv", 's,y\n"a\nlong",pos\nb,neg\nc,\n', "classification", {},
         "task 'd', split train, line 5 of quoted.csv: no label in column 'y'"),
        ("nulltext.jsonl", '{"s": "a", "y": "pos"}\n{"s": null, "y": "neg"}\n', "classification", {},
         "task 'd', split train, line 2 of nulltext.jsonl: no value in column 's' (role 'text')"),
        ("tag.jsonl", '{"w": ["a", "b"], "t": ["O", "B-x"]}\n{"w": ["a"], "t": [null]}\n', "token_classification", {},
         "task 'd', split train, line 2 of tag.jsonl: tag 1 in column 't' is empty"),
        # One class only: num_labels would be 1 and the loss 0.
        ("one.csv", "s,y\na,pos\nb,pos\n", "classification", {},
         "task 'd', split train: every label in column 'y' is 'pos'; a classifier needs examples of at least two classes"),
        ("one.csv", "s,y\na,pos\nb,pos\n", "classification", {"labels": ["pos", "neg"]},
         "task 'd', split train: every label in column 'y' is 'pos'; a classifier needs examples of at least two classes"),
        ("one.jsonl", '{"w": ["a", "b"], "t": ["O", "O"]}\n', "token_classification", {},
         "task 'd', split train: every label in column 't' is 'O'; a classifier needs examples of at least two classes"),
    ],
)
def test_data_that_would_train_wrong_names_file_line_and_fix(tmp_path, name, text, task_type, declared, expected):
    message = _load_error(tmp_path, name, text, task_type, **declared)
    assert message.startswith(expected), message
    fix = message[len(expected):]
    assert fix.startswith(("; ", ": ")) and len(fix) > 10, f"no fix in: {message}"


def test_missing_file(tmp_path):
    spec = build_spec({"name": "m", "type": "classification", "files": {"train": str(tmp_path / "nope.csv")},
                       "columns": {"text": "s", "label": "y"}})
    with pytest.raises(TaskError, match="task 'm', split train: file .*nope.csv does not exist"):
        load_task(spec)


# Files the loaders cannot read: `datasets` says only "An error occurred while generating the
# dataset"; the line must say what is wrong, where, and the fix.
@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("long.tsv", "s\ty\na\tpos\n\nb\tneg\textra\n",
         "cannot load long.tsv: line 4 has 3 fields where the header has 2; fix that row (a TSV field cannot hold a tab)"),
        ("long.csv", "s,y\na,pos\nb,neg,extra\n",
         "cannot load long.csv: line 3 has 3 fields where the header has 2; fix that row (quote a field that holds a comma)"),
        ("bad.jsonl", '{"s": "a", "y": "pos"}\n{"s": "b", "y": \n{"s": "c", "y": "neg"}\n',
         "cannot load bad.jsonl: line 2 is not valid JSON (Expecting value at column 17); fix it (one JSON object per line)"),
        ("latin.csv", "s,y\na,pos\ncaf\xe9,neg\n".encode("latin-1"),
         "cannot load latin.csv: it is not UTF-8 text (byte 0xe9 on line 3); save it as UTF-8 or declare its encoding (e.g. encoding: latin-1)"),
        ("latin.jsonl", '{"s": "a", "y": "pos"}\n{"s": "caf\xe9", "y": "neg"}\n'.encode("latin-1"),
         "cannot load latin.jsonl: it is not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8 or declare its encoding (e.g. encoding: latin-1)"),
        # pandas would make the first field of a first row longer than the header an index, each field a column off.
        ("index.csv", "s,y\na,b,pos\nc,neg\n",
         "cannot load index.csv: line 2 has 3 fields where the header has 2; fix that row (quote a field that holds a comma)"),
        ("empty.jsonl", "", "the split is empty; give it data or remove the task"),
        ("blank.tsv", "\n\n", "the split is empty; give it data or remove the task"),
    ],
)
def test_unreadable_file_names_the_line_and_the_fix(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    spec = build_spec({"name": "f", "type": "classification", "files": {"train": str(path)},
                       "columns": {"text": "s", "label": "y"}})
    with pytest.raises(TaskError) as err:
        load_task(spec)
    message = str(err.value).replace(str(tmp_path) + "/", "")
    assert message == f"task 'f', split train: {expected}"


def test_hub_dataset_offline_gives_one_line():
    spec = build_spec(PRESETS["rte"])
    with pytest.raises(TaskError) as err:
        load_task(spec)
    assert "task 'rte', split train: cannot load Hub dataset nyu-mll/glue (rte)" in str(err.value)
    assert "\n" not in str(err.value)


def test_multiple_choice_needs_a_fixed_number_of_choices(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"q": "x", "c": ["a", "b"], "y": 0}) + "\n" + json.dumps({"q": "x", "c": ["a", "b", "c"], "y": 0}) + "\n")
    spec = build_spec({"name": "mc", "type": "multiple_choice", "files": {"train": str(path)},
                       "columns": {"question": "q", "choices": "c", "label": "y"}})
    with pytest.raises(TaskError, match="same number of choices"):
        load_task(spec)


def test_token_tags_must_match_tokens(tmp_path):
    path = tmp_path / "ner.jsonl"
    path.write_text(json.dumps({"w": ["a", "b"], "t": ["O"]}) + "\n")
    spec = build_spec({"name": "ner", "type": "token_classification", "files": {"train": str(path)},
                       "columns": {"tokens": "w", "label": "t"}})
    with pytest.raises(TaskError, match="line 1 of .*ner.jsonl: 2 tokens but 1 tags in column 't'"):
        load_task(spec)


# ------------------------------------------------------------------ tokenization and padding
def test_tokenization_per_type_and_dynamic_padding(tiny_tasks, tokenizer):
    specs = read_tasks_file(tiny_tasks)
    for spec in specs.values():
        spec, splits = load_task(spec)
        ds = tokenize(spec, splits["train"], tokenizer, max_length=64)
        assert set(ds.column_names) >= {"input_ids", "attention_mask", "labels"}
        collate = make_collator(spec, tokenizer)
        batch = collate([ds[i] for i in range(4)])
        lengths = example_lengths(ds.select(range(4)))
        assert batch["input_ids"].shape[-1] == max(lengths)  # padded to the batch's longest, not max_length
        if spec.type == "multiple_choice":
            assert batch["input_ids"].shape[:2] == (4, 4)
        if spec.type == "token_classification":
            labels = batch["labels"][0].tolist()
            assert labels[0] == -100  # [CLS]
            assert sorted(set(labels) - {-100}) == sorted(set(labels) - {-100})
        if spec.type == "regression":
            assert batch["labels"].dtype.is_floating_point


def test_token_labels_on_first_subtoken_only(tmp_path, tokenizer):
    path = tmp_path / "ner.jsonl"
    path.write_text(json.dumps({"w": ["the", "unknownword", "cat"], "t": ["O", "B-x", "B-y"]}) + "\n")
    spec = build_spec({"name": "ner", "type": "token_classification", "files": {"train": str(path)},
                       "columns": {"tokens": "w", "label": "t"}})
    spec, splits = load_task(spec)
    row = tokenize(spec, splits["train"], tokenizer, max_length=32)[0]
    kept = [spec.labels[i] for i in row["labels"] if i != -100]
    assert kept == ["O", "B-x", "B-y"]


def test_multitask_collator_tags_the_task_and_refuses_mixed_batches(tiny_tasks, tokenizer):
    specs = list(read_tasks_file(tiny_tasks).values())[:2]
    loaded = [load_task(s) for s in specs]
    sets = [tokenize(s, sp["train"], tokenizer, 64) for s, sp in loaded]
    dataset = MultitaskDataset(sets)
    assert len(dataset) == sum(len(s) for s in sets)
    collate = MultitaskCollator([s.name for s, _ in loaded], [make_collator(s, tokenizer) for s, _ in loaded])
    batch = collate([dataset[len(sets[0])], dataset[len(sets[0]) + 1]])
    assert batch["task"] == loaded[1][0].name
    with pytest.raises(RuntimeError, match="mixes tasks"):
        collate([dataset[0], dataset[len(sets[0])]])


def test_cli_unreadable_data_file_is_one_line(tmp_path, tiny_model):
    from tests.conftest import run_cli

    (tmp_path / "t.tsv").write_text("premise\tlabel\na\tx\nb\ty\tz\n")
    (tmp_path / "tasks.json").write_text(json.dumps([{"name": "nli", "type": "classification", "files": {"train": "t.tsv"},
                                                     "columns": {"text": "premise"}}]))
    result = run_cli("train", f"--model_name={tiny_model}", "--model_init=scratch", f"--tasks_file={tmp_path / 'tasks.json'}",
                     "--tasks=nli", f"--output_dir={tmp_path / 'outputs'}", cwd=tmp_path)
    assert result.returncode == 2
    # Only our line: not the loaders' "Failed to read file" log, nor "An error occurred while generating the dataset".
    assert result.stderr == (f"error: task 'nli', split train: cannot load {tmp_path / 't.tsv'}: line 3 has 3 fields where "
                             "the header has 2; fix that row (a TSV field cannot hold a tab)\n")
    assert not (tmp_path / "outputs").exists()


def test_cli_bad_data_exits_2_before_writing_anything(tmp_path, tiny_model):
    from tests.conftest import run_cli

    (tmp_path / "t.csv").write_text("premise,label\na,x\n")
    (tmp_path / "tasks.json").write_text(json.dumps([{"name": "nli", "type": "classification", "files": {"train": "t.csv"},
                                                     "columns": {"text": "premise", "text_pair": "hypothesis"}}]))
    out = tmp_path / "outputs"
    result = run_cli("train", f"--model_name={tiny_model}", "--model_init=scratch", f"--tasks_file={tmp_path / 'tasks.json'}",
                     "--tasks=nli", f"--output_dir={out}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: task 'nli', split train: column 'hypothesis' (role 'text_pair') not found; "
        "the data has premise, label; set columns.text_pair in the tasks file"
    )
    assert not out.exists()


def test_cli_a_ner_set_with_sentences_of_different_lengths_trains_evaluates_and_exports(tmp_path, tiny_model):
    # As in every real NER set: sentences of 1 to 9 words. Its chance report used to crash after
    # training, before the metrics, the export and the final commit.
    import random

    from tests.conftest import run_cli
    from trainer.checkpoints.commits import verify_local
    from trainer.demo.generate import CATEGORIES

    rng = random.Random(3)
    words = [(w, c) for c, ws in CATEGORIES.items() for w in ws]
    for split, n in (("train", 48), ("dev", 16)):
        with open(tmp_path / f"ner_{split}.jsonl", "w") as f:
            for _ in range(n):
                picked = rng.sample(words, rng.randint(1, 9))
                f.write(json.dumps({"words": [w for w, _ in picked], "tags": [f"B-{c}" for _, c in picked]}) + "\n")
    (tmp_path / "tasks.json").write_text(json.dumps([{
        "name": "ner", "type": "token_classification", "columns": {"tokens": "words", "label": "tags"},
        "files": {"train": "ner_train.jsonl", "validation": "ner_dev.jsonl"}, "metrics": ["entity_f1", "accuracy"]}]))
    out = tmp_path / "outputs"
    result = run_cli("train", f"--model_name={tiny_model}", "--model_init=scratch", f"--tasks_file={tmp_path / 'tasks.json'}",
                     "--tasks=ner", f"--output_dir={out}", "--run_name=ner", "--num_train_epochs=2", "--train_batch_size=8",
                     cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Evaluation against chance" in result.stdout
    metrics = json.loads((out / "ner" / "metrics.json").read_text())
    assert set(metrics["chance"]["ner"]) == {"entity_f1", "accuracy"}
    assert verify_local(out / "ner" / "final").step == 12  # committed, with the exported task
    assert (out / "ner" / "final" / "export" / "ner" / "model.safetensors").is_file()


# ------------------------------------------------------------------ data files as their authors distribute them
# GLUE CoLA: four tab-separated columns (source, label, original label, sentence), no header line.
COLA = [
    ("gj04", "1", "", "Our friends won't buy this analysis, let alone the next one we propose."),
    ("gj04", "1", "", "One more pseudo generalization and I'm giving up."),
    ("gj04", "0", "*", "They drank the pub."),
    ("cj99", "1", "", 'The "quoted" word keeps its quotes.'),
]
COLA_NAMES = ["source", "label", "original_label", "sentence"]


def _cola(tmp_path, rows=COLA, header: list[str] | None = None) -> str:
    path = tmp_path / "cola.tsv"
    path.write_text("".join("\t".join(r) + "\n" for r in ([header] if header else []) + list(rows)))
    return str(path)


def _error(spec) -> str:
    with pytest.raises(TaskError) as err:
        load_task(spec)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_a_headerless_tsv_in_colas_layout_keeps_its_first_row(tmp_path):
    path = _cola(tmp_path)
    named = build_spec({"name": "cola", "type": "classification", "files": {"train": path}, "header": False,
                        "column_names": COLA_NAMES, "columns": {"text": "sentence"}})
    spec, splits = load_task(named)
    assert splits["train"]["sentence"] == [r[3] for r in COLA]  # the first line is a row, not the header; quotes kept
    assert splits["train"]["original_label"] == ["", "", "*", ""]
    assert spec.labels == ("0", "1")

    by_position = build_spec({"name": "cola", "type": "classification", "files": {"train": path}, "header": False,
                              "columns": {"text": 3, "label": 1}})
    assert by_position.columns == {"text": "3", "label": "1"}
    spec, splits = load_task(by_position)
    assert splits["train"].column_names == ["0", "1", "2", "3"] and splits["train"]["3"] == [r[3] for r in COLA]
    assert build_spec({**named.to_dict(), "columns": {"text": 3}}).columns["text"] == "sentence"  # a position in column_names


def test_a_header_line_that_looks_like_data_says_so_with_the_fix(tmp_path):
    path = _cola(tmp_path)
    spec = build_spec({"name": "cola", "type": "classification", "files": {"train": path},
                       "columns": {"text": "sentence", "label": "label"}})
    assert _error(spec) == (
        f"task 'cola', split train: column 'sentence' (role 'text') not found: line 1 of {path} looks like data, not a header "
        "(gj04, 1, , Our friends won't buy t…); if the file has no header line, declare header: false with column_names: "
        "[...] naming its 4 columns (or give the columns by position, 0 to 3)")


def test_header_false_on_a_file_that_starts_with_its_header_is_refused(tmp_path):
    path = _cola(tmp_path, header=COLA_NAMES)
    declared = {"name": "cola", "type": "classification", "files": {"train": path}, "header": False, "column_names": COLA_NAMES,
                "columns": {"text": "sentence"}}
    expected = (f"task 'cola', split train: line 1 of {path} is a header (source, label, original_label, sentence), but the "
                "task declares header: false; remove header: false (and column_names) so that the header names the columns")
    assert _error(build_spec(declared)) == expected
    _cola(tmp_path, header=["src", "label", "orig", "sentence"])  # other names, but every field a declared column
    assert "is a header (src, label, orig, sentence)" in _error(build_spec({**declared, "column_names": ["src", "label", "orig", "sentence"]}))
    ok = build_spec({key: value for key, value in declared.items() if key not in ("header", "column_names")})
    assert len(load_task(ok)[1]["train"]) == len(COLA)


def test_headerless_files_name_the_right_line(tmp_path):
    long_row = [*COLA[:2], ("gj04", "1", "", "a sentence", "an extra field")]
    spec = build_spec({"name": "cola", "type": "classification", "files": {"train": _cola(tmp_path, long_row)},
                       "header": False, "column_names": COLA_NAMES, "columns": {"text": "sentence"}})
    assert _error(spec).endswith("line 3 has 5 fields where column_names has 4; fix that row (a TSV field cannot hold a tab)")
    no_label = [("gj04", "", "", "no label on the first line"), *COLA]
    spec = build_spec({**spec.to_dict(), "files": {"train": _cola(tmp_path, no_label)}})
    assert _error(spec).startswith(f"task 'cola', split train, line 1 of {tmp_path / 'cola.tsv'}: no label in column 'label'")
    spec = build_spec({"name": "c", "type": "classification", "files": {"train": _csv(tmp_path, "t.csv", "a,pos\nb,neg\n\nc,\n")},
                       "header": False, "columns": {"text": 0, "label": 1}})
    assert _error(spec).startswith(f"task 'c', split train, line 4 of {tmp_path / 't.csv'}: no label in column '1'")


def test_delimiter_quoting_and_encoding(tmp_path):
    def loaded(name: str, content: bytes | str, **options):
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        spec = build_spec({"name": "o", "type": "classification", "files": {"train": str(path)},
                           "columns": {"text": "s", "label": "y"}, **options})
        return load_task(spec)[1]["train"]["s"]

    assert loaded("pipe.csv", 's|y\n"a|b"|pos\nc|neg\n', delimiter="|") == ["a|b", "c"]
    assert loaded("raw.csv", 's,y\n"a" b,pos\nc,neg\n', quoting="none") == ['"a" b', "c"]
    assert loaded("quoted.tsv", 's\ty\n"a\tb"\tpos\nc\tneg\n', quoting="minimal") == ["a\tb", "c"]
    assert loaded("semi.tsv", "s;y\ncaf\xe9;pos\nth\xe9;neg\n".encode("latin-1"), delimiter=";", encoding="latin-1") == ["café", "thé"]
    latin = "s\ty\ncaf\xe9\tpos\nth\xe9\tneg\nna\xefve\t\n".encode("latin-1")
    with pytest.raises(TaskError, match=r"^task 'o', split train, line 4 of .*latin.tsv: no label in column 'y'"):
        loaded("latin.tsv", latin, encoding="latin-1")  # the line helpers read latin-1 too
    with pytest.raises(TaskError, match=r"line 3 has 3 fields where the header has 2; fix that row \(quote a field that holds the delimiter '\|'\)$"):
        loaded("ragged.csv", "s|y\na|pos\nb|c|neg\n", delimiter="|")


# The official CommonsenseQA JSON Lines: the question and its choices nested in an object.
def _csqa_line(i: int, answer: str, stem: str | None = None) -> dict:
    words = ["cat", "saw", "red", "bus", "rice"]
    return {"answerKey": answer, "id": f"q{i}", "question": {
        "question_concept": "thing", "choices": [{"label": label, "text": w} for label, w in zip("ABCDE", words)],
        "stem": stem or f"which one of these is thing {i}?"}}


def _jsonl(tmp_path, name: str, rows: list) -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


CSQA_COLUMNS = {"question": "question.stem", "choices": "question.choices", "label": "answerKey"}


def test_commonsense_qa_jsonl_reaches_the_nested_question_and_choices(tmp_path, tokenizer):
    path = _jsonl(tmp_path, "csqa.jsonl", [_csqa_line(0, "B"), _csqa_line(1, "E"), _csqa_line(2, "A")])
    spec, splits = load_task(build_spec({"name": "csqa", "type": "multiple_choice", "files": {"train": path},
                                         "columns": CSQA_COLUMNS}))
    ds = splits["train"]
    assert ds["question.stem"] == [f"which one of these is thing {i}?" for i in range(3)]  # a column named by the path
    assert ds["question.choices"][0][1] == {"label": "B", "text": "saw"}
    assert spec.labels == ("A", "B", "C", "D", "E")  # the first row's choice labels
    assert tokenize(spec, ds, tokenizer, 32)["labels"] == [1, 4, 0]


def test_a_wrong_dotted_path_says_what_is_there(tmp_path):
    path = _jsonl(tmp_path, "csqa.jsonl", [_csqa_line(0, "B"), _csqa_line(1, "A")])

    def error(**columns) -> str:
        return _error(build_spec({"name": "csqa", "type": "multiple_choice", "files": {"train": path},
                                  "columns": {**CSQA_COLUMNS, **columns}}))

    assert error(question="question.text") == (
        "task 'csqa', split train: column 'question.text' (role 'question') not found: 'question' holds an object with fields "
        "choices, question_concept, stem; set columns.question to one of question.choices, question.question_concept, question.stem")
    assert error(question="id.text").startswith(
        "task 'csqa', split train: column 'id.text' (role 'question') not found: 'id' holds a text, not an object with field 'text'")
    assert error(question="query.stem").startswith("task 'csqa', split train: column 'query.stem' (role 'question') not found; "
                                                   "the data has answerKey, id, question")
    assert error(choices="question") == (
        f"task 'csqa', split train, line 1 of {path}: column 'question' holds an object with fields choices, question_concept, "
        "stem, not choices; "
        "set columns.choices to the column (or dotted path) that holds the list of choices")
    _jsonl(tmp_path, "csqa.jsonl", [_csqa_line(0, "B"), {"answerKey": "A", "id": "q1", "question": None}])
    assert error() == (f"task 'csqa', split train, line 2 of {path}: 'question' holds null (or nothing) where column "
                       "'question.stem' (role 'question') needs an object; fill it in or remove the row")


def test_a_label_not_among_the_rows_choice_labels_names_the_line(tmp_path):
    path = _jsonl(tmp_path, "csqa.jsonl", [_csqa_line(0, "B"), _csqa_line(1, "F")])
    message = _error(build_spec({"name": "csqa", "type": "multiple_choice", "files": {"train": path}, "columns": CSQA_COLUMNS}))
    assert message == (f"task 'csqa', split train, line 2 of {path}: label 'F' in column 'answerKey' is not among the row's "
                       "choice labels (A, B, C, D, E); fix the label or the choices")


# The official SQuAD JSON: one document, its questions in data[].paragraphs[].qas[].
SQUAD_V1 = {"version": "1.1", "data": [
    {"title": "Cats", "paragraphs": [
        {"context": "The cat sat on the mat.", "qas": [
            {"id": "c1", "question": "Where did the cat sit?", "answers": [{"text": "on the mat", "answer_start": 12}]},
            {"id": "c2", "question": "What sat?", "answers": [{"text": "The cat", "answer_start": 0}]}]},
        {"context": "Cats sleep a lot.", "qas": [
            {"id": "c3", "question": "What do cats do a lot?", "answers": [{"text": "sleep", "answer_start": 5}]}]}]},
    {"title": "Dogs", "paragraphs": [
        {"context": "The dog barked.", "qas": [
            {"id": "d1", "question": "What did the dog do?", "answers": [{"text": "barked", "answer_start": 8}]}]}]},
]}


def _squad_spec(path: str, records: str = "data.paragraphs.qas"):
    # Loading is the same for every type: a classification declaration reads the rows that
    # extractive question answering would.
    return build_spec({"name": "squad", "type": "classification", "files": {"train": path}, "records": records,
                       "columns": {"text": "question", "text_pair": "paragraphs.context", "label": "id"}})


def test_squad_json_records_give_one_row_per_question(tmp_path):
    path = tmp_path / "train-v1.1.json"
    path.write_text(json.dumps(SQUAD_V1, indent=2))
    ds = load_split(_squad_spec(str(path)), "train")
    assert ds["id"] == ["c1", "c2", "c3", "d1"]
    assert ds["paragraphs.context"] == ["The cat sat on the mat."] * 2 + ["Cats sleep a lot.", "The dog barked."]
    assert ds["data.title"] == ["Cats", "Cats", "Cats", "Dogs"]
    assert ds[0]["answers"] == [{"text": "on the mat", "answer_start": 12}]
    assert "paragraphs.qas" not in ds.column_names and "data.paragraphs" not in ds.column_names

    # SQuAD v2: is_impossible on every question, plausible_answers only on the unanswerable ones.
    v2 = json.loads(json.dumps(SQUAD_V1))
    for article in v2["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                qa["is_impossible"] = False
    v2["data"][1]["paragraphs"][0]["qas"].append({"id": "d2", "question": "What did the cat bark?", "answers": [],
                                                  "is_impossible": True,
                                                  "plausible_answers": [{"text": "barked", "answer_start": 8}]})
    path.write_text(json.dumps(v2))
    ds = load_split(_squad_spec(str(path)), "train")
    assert ds["is_impossible"] == [False] * 4 + [True]
    assert ds["plausible_answers"][0] is None and ds["plausible_answers"][4] == [{"text": "barked", "answer_start": 8}]
    assert ds["answers"][4] == []

    # JSON Lines: each line's lists, from the line's own fields.
    lines = tmp_path / "articles.jsonl"
    lines.write_text("".join(json.dumps(article) + "\n" for article in SQUAD_V1["data"]))
    ds = load_split(_squad_spec(str(lines), "paragraphs.qas"), "train")
    assert ds["id"] == ["c1", "c2", "c3", "d1"] and ds["paragraphs.context"][3] == "The dog barked."

    # Messages name a row by its place in the document (no line is a row's own there).
    from trainer.data import ReaderOptions, record_place

    path.write_text(json.dumps(SQUAD_V1, indent=2))
    reader = ReaderOptions.for_file(path, _squad_spec(str(path)))
    assert [record_place(path, i, reader) for i in (0, 2, 3, 4)] == [
        "data[0].paragraphs[0].qas[0]", "data[0].paragraphs[1].qas[0]", "data[1].paragraphs[0].qas[0]", None]
    reader = ReaderOptions.for_file(lines, _squad_spec(str(lines), "paragraphs.qas"))
    assert record_place(lines, 3, reader) == "line 2, paragraphs[0].qas[0]"


def test_predict_reads_inputs_in_the_training_files_layout_where_the_defaults_find_no_input_column(tmp_path):
    # A SQuAD JSON of questions (`records`) and a '|'-delimited file, read as the task's own files
    # are; a file with neither layout's columns names what it has.
    from trainer.commands import _read_inputs

    path = tmp_path / "dev-v1.1.json"
    path.write_text(json.dumps(SQUAD_V1))
    spec = _squad_spec(str(path))
    ds = _read_inputs(path, spec)
    assert ds["question"][0] == SQUAD_V1["data"][0]["paragraphs"][0]["qas"][0]["question"] and len(ds) == 4

    piped = tmp_path / "pairs.csv"
    piped.write_text("premise|hypothesis\nthe cat sat|a cat sat\n")
    pair = build_spec({"name": "nli", "type": "classification", "files": {"train": str(piped)}, "delimiter": "|",
                       "columns": {"text": "premise", "text_pair": "hypothesis"}})
    assert _read_inputs(piped, pair)["hypothesis"] == ["a cat sat"]
    with pytest.raises(TaskError, match=r"no column 'premise' \(role 'text'\) for task 'nli'"):
        (tmp_path / "other.csv").write_text("sentence\nthe cat sat\n")
        _read_inputs(tmp_path / "other.csv", pair)


@pytest.mark.parametrize(
    ("records", "problem"),
    [
        ("data.paragraph.qas", "'data[0]' has no field 'paragraph'; it has paragraphs, title"),
        ("dat.paragraphs.qas", "the document has no field 'dat'; it has data, version"),
        ("data.title.qas", "'data[0].title' holds a text, not a list of objects"),
        ("data.paragraphs.context", "'data[0].paragraphs[0].context' holds a text, not a list of objects"),
        ("version", "'version' holds a text, not a list of objects"),
    ],
)
def test_a_wrong_records_path_says_what_is_there(tmp_path, records, problem):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(SQUAD_V1))
    assert _error(_squad_spec(str(path), records)) == f"task 'squad', split train: records: {records}: {problem}; fix 'records' for {path}"


def test_records_in_json_lines_name_the_line(tmp_path):
    path = _jsonl(tmp_path, "articles.jsonl", [SQUAD_V1["data"][0], {"title": "Empty", "paragraph": []}])
    assert _error(_squad_spec(path, "paragraphs.qas")) == (
        f"task 'squad', split train: records: paragraphs.qas: line 2: the document has no field 'paragraphs'; it has "
        f"paragraph, title; fix 'records' for {path}")


def test_cli_commonsense_qa_jsonl_beside_a_headerless_tsv_trains_evaluates_and_predicts(tmp_path, tiny_model, capsys):
    # Both files as distributed: CommonsenseQA's nested JSON Lines, CoLA's TSV without a header line.
    import logging
    import random

    from tests.conftest import run_cli, tiny_flags
    from trainer.cli import main
    from trainer.demo.generate import CATEGORIES

    rng = random.Random(5)
    names = list(CATEGORIES)

    def question(i: int) -> dict:
        category, *others = rng.sample(names, 5)
        words = [rng.choice(CATEGORIES[c]) for c in [category, *others]]
        right = rng.randrange(5)
        words[0], words[right] = words[right], words[0]
        return {"answerKey": "ABCDE"[right], "id": f"q{i}", "question": {
            "question_concept": category, "choices": [{"label": label, "text": w} for label, w in zip("ABCDE", words)],
            "stem": f"which one of these is a {category} ?"}}

    def sentence() -> tuple[str, str, str, str]:
        words = ["the", rng.choice(CATEGORIES["animal"]), "is", "near", "the", rng.choice(CATEGORIES["place"])]
        good = rng.random() < 0.5
        return ("gj04", "1" if good else "0", "" if good else "*", " ".join(words if good else rng.sample(words, len(words))))

    for split, n in (("train", 48), ("dev", 16)):
        _jsonl(tmp_path, f"csqa_{split}.jsonl", [question(i) for i in range(n)])
        (tmp_path / f"cola_{split}.tsv").write_text("".join("\t".join(sentence()) + "\n" for _ in range(n)))
    (tmp_path / "tasks.yaml").write_text("""
tasks:
  - name: csqa
    type: multiple_choice
    files: {train: csqa_train.jsonl, validation: csqa_dev.jsonl}
    columns: {question: question.stem, choices: question.choices, label: answerKey}
  - name: cola
    type: classification
    files: {train: cola_train.tsv, validation: cola_dev.tsv}
    header: false
    column_names: [source, label, original_label, sentence]
    columns: {text: sentence}
    metrics: [matthews_correlation, accuracy]
""")
    out = tmp_path / "outputs"
    flags = tiny_flags(tiny_model, tmp_path / "tasks.yaml", out, tasks="csqa,cola", run_name="formats", max_steps=6,
                       eval_steps=6, save_steps=6)
    done = run_cli("train", *flags, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "formats" / "metrics.json").read_text())
    assert {"eval_csqa_accuracy", "eval_cola_matthews_correlation", "eval_cola_accuracy"} <= set(metrics["eval"])
    assert set(metrics["chance"]) == {"csqa", "cola"}

    def predict(task: str, inputs) -> list[dict]:
        predictions = inputs.with_suffix(".predictions.jsonl")
        handlers = list(logging.getLogger().handlers)
        try:
            code = main(["predict", f"--task={task}", f"--input={inputs}", f"--output={predictions}",
                         f"--checkpoint={out / 'formats' / 'final'}"])
        finally:
            for handler in set(logging.getLogger().handlers) - set(handlers):
                logging.getLogger().removeHandler(handler)
        assert code == 0, capsys.readouterr().err
        return [json.loads(line) for line in predictions.read_text().splitlines()]

    # predict reads inputs in the task's own format, without labels.
    inputs = tmp_path / "questions.jsonl"
    asked = [{k: v for k, v in question(i).items() if k != "answerKey"} for i in range(3)]
    for choice, label in zip(asked[2]["question"]["choices"], "12345"):  # a row labelled as some of ARC's are
        choice["label"] = label
    _jsonl(tmp_path, inputs.name, asked)
    rows = predict("csqa", inputs)
    assert len(rows) == 3 and all(r["label"] == "ABCDE"[r["index"]] for r in rows[:2])
    assert rows[2]["label"] == "12345"[rows[2]["index"]]  # the row's own label of its chosen choice
    assert all(len(r["probabilities"]) == 5 for r in rows)
    # A headerless file in the training files' layout (CoLA's dev set), every row of it, and one
    # written for predict with a header line naming the column (CoLA's test set): both are read.
    assert len(predict("cola", tmp_path / "cola_dev.tsv")) == 16
    (tmp_path / "cola_test.tsv").write_text("index\tsentence\n" + "".join(f"{i}\t{sentence()[3]}\n" for i in range(5)))
    assert len(predict("cola", tmp_path / "cola_test.tsv")) == 5

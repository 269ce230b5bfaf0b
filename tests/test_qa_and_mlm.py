"""Extractive QA (SQuAD 2.0 style, with unanswerable questions and contexts longer than a window)
and masked-LM on unlabeled text, trained through the CLI beside a classification and a
regression task on one encoder, on the user's default epoch strategies: evaluation scores them,
each exports as its standalone `AutoModelFor…` that gives the multitask model's outputs, `predict`
writes their rows, a kill -9 and restart ends with the uninterrupted weights, and bad data
stops the run before training with one line naming the task, split, line and column."""

from __future__ import annotations

import json
import math
import random
import re
import signal
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, write_tasks_file
from tests.runs import RUN, assert_same_weights, flags, train, weights
from trainer.demo.generate import CATEGORIES

TASKS = "qa,squad1,domain,demo_entailment,demo_similarity"
QA_MAX_LENGTH = 24  # every context is longer: several windows per question
ANIMALS, PLACES = CATEGORIES["animal"], CATEGORIES["place"]


def qa_rows(rng: random.Random, n: int) -> list[dict]:
    """Three "the <animal> is near the <place> ." sentences; "which place is the <animal> near ?"
    asks one of them (answer: its place), or one of another animal (no answer), one in four."""
    out = []
    for _ in range(n):
        animals = rng.sample(ANIMALS, 4)
        places = [rng.choice(PLACES) for _ in range(3)]
        context = " ".join(f"the {a} is near the {p} ." for a, p in zip(animals, places))
        if rng.random() < 0.25:
            out.append({"question": f"which place is the {animals[3]} near ?", "context": context, "answers": []})
            continue
        k = rng.randrange(3)
        start = context.index(f"the {animals[k]} is near the ") + len(f"the {animals[k]} is near the ")
        out.append({"question": f"which place is the {animals[k]} near ?", "context": context,
                    "answers": [{"text": places[k], "answer_start": start}]})
    return out


def squad_document(rows: list[dict], *, v2: bool) -> dict:
    """`rows` in the official SQuAD layout: one document, data -> paragraphs -> qas (two
    questions per paragraph); SQuAD 2.0 adds is_impossible, and plausible_answers where impossible."""
    data = []
    for k in range(0, len(rows), 2):
        qas = []
        for j, row in enumerate(rows[k : k + 2]):
            qa = {"id": f"q{k + j}", "question": row["question"], "answers": row["answers"]}
            if v2:
                qa["is_impossible"] = not row["answers"]
                if not row["answers"]:
                    qa["plausible_answers"] = [{"text": "the", "answer_start": 0}]
            qas.append(qa)
        contexts = {row["context"] for row in rows[k : k + 2]}
        for context in sorted(contexts):
            data.append({"title": f"article {k}", "paragraphs": [{"context": context,
                                                                  "qas": [q for q, r in zip(qas, rows[k : k + 2])
                                                                          if r["context"] == context]}]})
    return {"version": "v2.0" if v2 else "1.1", "data": data}


def write_tasks(directory: Path, *, n_train: int = 16, n_eval: int = 8) -> Path:
    """The demo's classification and regression tasks, `qa` (SQuAD 2.0 files, a quarter of the
    questions unanswerable), `squad1` (SQuAD v1.1 files, every question answered) and `domain`
    (masked LM on texts like the contexts)."""
    base = write_tasks_file(directory, n_train=n_train, n_eval=n_eval, token_task=False)
    tasks = json.loads(base.read_text())["tasks"]
    rng = random.Random(5)
    data = directory / "data"
    files: dict[str, dict[str, str]] = {"qa": {}, "squad1": {}, "domain": {}}
    for split, n in (("train", n_train), ("validation", n_eval)):
        for name, v2 in (("qa", True), ("squad1", False)):
            rows = qa_rows(rng, n) if v2 else [r for r in qa_rows(rng, 2 * n) if r["answers"]][:n]
            path = data / f"{name}_{split}.json"
            path.write_text(json.dumps(squad_document(rows, v2=v2), indent=1))
            files[name][split] = str(path)
        text = data / f"domain_{split}.jsonl"
        text.write_text("".join(json.dumps({"text": r["context"]}) + "\n" for r in qa_rows(rng, n)))
        files["domain"][split] = str(text)
    squad = {"type": "extractive_qa", "records": "data.paragraphs.qas", "max_length": QA_MAX_LENGTH, "stride": 8,
             "columns": {"question": "question", "context": "paragraphs.context", "answers": "answers"}}
    tasks += [
        {"name": "qa", **squad, "files": files["qa"], "unanswerable": True},
        {"name": "squad1", **squad, "files": files["squad1"]},
        {"name": "domain", "type": "masked_lm", "files": files["domain"]},
    ]
    path = directory / "tasks.json"
    path.write_text(json.dumps({"tasks": tasks}, indent=1))
    return path


def squad_rows(path: str) -> list[dict]:
    """The questions of a SQuAD-layout file as flat rows (question, context, answers)."""
    document = json.loads(Path(path).read_text())
    return [{"question": qa["question"], "context": paragraph["context"], "answers": qa["answers"]}
            for article in document["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]]


def qa_flags(model: Path, tasks_file: Path, out: Path) -> list[str]:
    """The tiny job on the user's defaults (`tests.runs.flags`) over these tasks."""
    return [f"--tasks={TASKS}" if f.startswith("--tasks=") else f for f in flags(model, tasks_file, out)]


@pytest.fixture(scope="module")
def qa_tasks(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("qa-tasks"))


@pytest.fixture(scope="module")
def trained(tiny_model, qa_tasks, tmp_path_factory):
    out = tmp_path_factory.mktemp("qa-run")
    args = qa_flags(tiny_model, qa_tasks, out)
    done = train(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / RUN, args, done


def test_both_types_train_beside_the_others_and_are_scored_against_chance(trained, qa_tasks):
    run_dir, _, done = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    final = metrics["eval"]
    for key in ("eval_qa_f1", "eval_qa_exact_match", "eval_squad1_f1", "eval_squad1_exact_match",
                "eval_domain_masked_accuracy", "eval_demo_entailment_accuracy"):
        assert 0.0 <= final[key] <= 1.0, key
    assert final["eval_domain_perplexity"] == pytest.approx(math.exp(final["eval_domain_loss"]))
    primary = ("qa_f1", "squad1_f1", "domain_masked_accuracy", "demo_entailment_accuracy", "demo_similarity_pearson")
    assert final["eval_macro_avg"] == pytest.approx(sum(final[f"eval_{k}"] for k in primary) / len(primary))
    # QA's chance: the empty answer (right on the unanswerable questions) or the most frequent answer.
    declared = next(t for t in json.loads(qa_tasks.read_text())["tasks"] if t["name"] == "qa")
    rows = squad_rows(declared["files"]["validation"])
    answers = [r["answers"][0]["text"] for r in rows if r["answers"]]
    most = max(answers.count(a) for a in answers)
    chance = max(sum(not r["answers"] for r in rows), most) / len(rows)
    assert metrics["chance"]["qa"]["f1"]["chance"] == pytest.approx(chance)
    assert set(metrics["chance"]["domain"]) == {"masked_accuracy"}
    log = done.stdout + done.stderr
    assert "extractive_qa" in log and "masked_lm" in log  # the sampling plan names the types
    # Its sizes are windows (what the sampler draws): a line under the plan says how many questions they hold.
    train_questions = len(squad_rows(declared["files"]["train"]))
    counted = re.search(r"\nqa: its sizes count context windows: train (\d+) questions in (\d+) windows, "
                        r"validation (\d+) questions in (\d+) windows\n", log)
    assert counted, log[-3000:]
    assert (int(counted[1]), int(counted[3])) == (train_questions, len(rows))
    assert int(counted[2]) > train_questions and int(counted[4]) > len(rows)  # contexts longer than a window
    assert re.search(rf"\nqa +extractive_qa +{counted[2]} +{counted[4]} ", log)


def qa_windows(run_dir: Path, tokenizer, rows: list[dict]):
    """The validation rows as the job encodes them (windows), with the task's declaration."""
    import datasets

    from trainer.modeling import MultitaskModel

    spec = MultitaskModel.from_checkpoint(run_dir / "final").specs["qa"]
    batch = {spec.columns[role]: [r[role] for r in rows] for role in ("question", "context", "answers")}
    encoded = spec.task_type.encode(spec, batch, tokenizer, spec.max_length, with_labels=True)
    return spec, datasets.Dataset.from_dict(encoded)


def test_the_qa_export_is_a_standalone_model_with_the_multitask_models_answers(trained, qa_tasks, tmp_path):
    """transformers 5 has no question-answering pipeline: the export loads with
    AutoModelForQuestionAnswering and gives the multitask head's logits, hence its answers, which
    are what `predict` writes for a file of questions and contexts (columns named by their roles:
    the training files were SQuAD documents)."""
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from trainer.modeling import MultitaskModel

    run_dir, _, _ = trained
    declared = next(t for t in json.loads(qa_tasks.read_text())["tasks"] if t["name"] == "qa")
    rows = squad_rows(declared["files"]["validation"])
    export = run_dir / "final" / "export" / "qa"
    standalone = AutoModelForQuestionAnswering.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    model = MultitaskModel.from_checkpoint(run_dir / "final").eval()
    spec, windows = qa_windows(run_dir, tokenizer, rows)
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(x) for x in windows["input_ids"]], batch_first=True)
    mask = (ids != 0) | (torch.arange(ids.shape[1]) == 0)
    inputs = {"input_ids": ids, "attention_mask": mask.long(),
              "token_type_ids": torch.nn.utils.rnn.pad_sequence([torch.tensor(x) for x in windows["token_type_ids"]],
                                                                batch_first=True)}
    with torch.no_grad():
        alone = standalone(**inputs)
        multi = model(task="qa", **inputs)
    assert torch.allclose(alone.start_logits, multi.start_logits, atol=1e-5)
    assert torch.allclose(alone.end_logits, multi.end_logits, atol=1e-5)
    expected = spec.task_type.answers(spec, (alone.start_logits.numpy(), alone.end_logits.numpy()), windows)

    inputs_file = tmp_path / "questions.jsonl"
    inputs_file.write_text("".join(json.dumps({"question": r["question"], "context": r["context"]}) + "\n" for r in rows))
    done = run_cli("predict", "--task=qa", f"--input={inputs_file}", f"--output_dir={run_dir.parent}", f"--run_name={RUN}")
    assert done.returncode == 0, done.stderr[-3000:]
    written = [json.loads(line) for line in (tmp_path / "questions.qa.predictions.jsonl").read_text().splitlines()]
    assert len(written) == len(rows)
    assert [w["answer"] for w in written] == [e["answer"] for e in expected]
    assert [w["score"] for w in written] == pytest.approx([e["score"] for e in expected], abs=1e-5)
    for w, r in zip(written, rows):
        assert r["context"][w["start"]:w["end"]] == w["answer"]


def test_the_masked_lm_export_fills_masks_in_the_pipeline_as_predict_does(trained, tmp_path):
    from transformers import AutoModelForMaskedLM, pipeline

    run_dir, _, _ = trained
    export = run_dir / "final" / "export" / "domain"
    assert AutoModelForMaskedLM.from_pretrained(export).config.architectures == ["BertForMaskedLM"]
    texts = ["the cat is near the [MASK] .", "the [MASK] is near the farm ."]
    inputs_file = tmp_path / "texts.jsonl"
    inputs_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    done = run_cli("predict", "--task=domain", f"--input={inputs_file}", f"--output_dir={run_dir.parent}", f"--run_name={RUN}")
    assert done.returncode == 0, done.stderr[-3000:]
    written = [json.loads(line) for line in (tmp_path / "texts.domain.predictions.jsonl").read_text().splitlines()]
    fill = pipeline("fill-mask", model=str(export), top_k=5)
    for text, row in zip(texts, written):
        [mask] = row["masks"]
        expected = fill(text)
        assert [m["token"] for m in mask] == [e["token"] for e in expected]
        assert [m["score"] for m in mask] == pytest.approx([e["score"] for e in expected], abs=1e-5)


def test_kill_9_then_restart_gives_the_uninterrupted_weights(trained, tiny_model, qa_tasks, tmp_path):
    """The masking of the training batches and the windows of the QA rows resume exactly."""
    run_dir, _, _ = trained
    args = qa_flags(tiny_model, qa_tasks, tmp_path / "out")
    crashed = train(*args, env={"TRAINER_CRASH_AT": "mid_step:45"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    restarted = train(*args)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "(step 36)" in restarted.stdout + restarted.stderr  # resumed from the committed epoch 2 (18 steps an epoch)
    assert_same_weights(weights(tmp_path / "out" / RUN), weights(run_dir))


def questions(document: dict) -> list[dict]:
    """The qas objects of a SQuAD-layout document, in the order they become rows."""
    return [qa for article in document["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]]


def place(document: dict, row: int) -> str:
    """Where a row of `questions` is in the document, as messages name it."""
    places = [f"data[{a}].paragraphs[{p}].qas[{q}]" for a, article in enumerate(document["data"])
              for p, paragraph in enumerate(article["paragraphs"]) for q, _ in enumerate(paragraph["qas"])]
    return places[row]


def drop_offset(document: dict) -> int:
    row = next(i for i, qa in enumerate(questions(document)) if qa["answers"])
    questions(document)[row]["answers"][0].pop("answer_start")
    return row


def misplace(document: dict) -> int:
    row = next(i for i, qa in enumerate(questions(document)) if qa["answers"])
    questions(document)[row]["answers"][0]["answer_start"] = 0  # every context starts with "the <animal>"
    return row


def empty_text(rows: list[dict]) -> int:
    rows[2]["text"] = ""
    return 2


@pytest.mark.parametrize(("task", "split", "change", "expected"), [
    ("qa", "train", drop_offset,
     "task 'qa', split train, row {row} ({place}) of {path}: answer 1 in column 'answers' (role 'answers') has no "
     "answer_start offset"),
    ("squad1", "validation", misplace,
     "task 'squad1', split validation, row {row} ({place}) of {path}: answer 1 in column 'answers' (role 'answers'), "),
    ("domain", "train", empty_text,
     "task 'domain', split train, line 3 of {path}: empty text in column 'text' (role 'text')"),
])
def test_bad_data_stops_before_training_with_one_line(tiny_model, qa_tasks, tmp_path, task, split, change, expected):
    tasks = json.loads(qa_tasks.read_text())["tasks"]
    declared = next(t for t in tasks if t["name"] == task)
    source = Path(declared["files"][split])
    bad = tmp_path / source.name
    where = ""
    if source.suffix == ".json":
        document = json.loads(source.read_text())
        row = change(document)
        where = place(document, row)
        bad.write_text(json.dumps(document))
    else:
        rows = [json.loads(line) for line in source.read_text().splitlines()]
        row = change(rows)
        bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    declared["files"][split] = str(bad)
    (tmp_path / "tasks.json").write_text(json.dumps({"tasks": tasks}))
    done = train(*qa_flags(tiny_model, tmp_path / "tasks.json", tmp_path / "out"))
    assert done.returncode == 2, done.stderr[-3000:]
    message = expected.format(row=row + 1, path=bad, place=where)
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr
    assert not (tmp_path / "out" / RUN / "checkpoint-1").exists()

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
import signal
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, write_tasks_file
from tests.runs import RUN, assert_same_weights, flags, train, weights
from trainer.demo.generate import CATEGORIES

TASKS = "qa,domain,demo_entailment,demo_similarity"
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


def write_tasks(directory: Path, *, n_train: int = 16, n_eval: int = 8) -> Path:
    base = write_tasks_file(directory, n_train=n_train, n_eval=n_eval, token_task=False)
    tasks = json.loads(base.read_text())["tasks"]
    rng = random.Random(5)
    data = directory / "data"
    files = {}
    for split, n in (("train", n_train), ("validation", n_eval)):
        qa = data / f"qa_{split}.jsonl"
        qa.write_text("".join(json.dumps(r) + "\n" for r in qa_rows(rng, n)))
        text = data / f"domain_{split}.jsonl"
        text.write_text("".join(json.dumps({"text": r["context"]}) + "\n" for r in qa_rows(rng, n)))
        files[split] = (str(qa), str(text))
    tasks += [
        {"name": "qa", "type": "extractive_qa", "files": {s: f[0] for s, f in files.items()}, "unanswerable": True,
         "max_length": QA_MAX_LENGTH, "stride": 8},
        {"name": "domain", "type": "masked_lm", "files": {s: f[1] for s, f in files.items()}},
    ]
    path = directory / "tasks.json"
    path.write_text(json.dumps({"tasks": tasks}, indent=1))
    return path


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
    for key in ("eval_qa_f1", "eval_qa_exact_match", "eval_domain_masked_accuracy", "eval_demo_entailment_accuracy"):
        assert 0.0 <= final[key] <= 1.0, key
    assert final["eval_domain_perplexity"] == pytest.approx(math.exp(final["eval_domain_loss"]))
    assert final["eval_macro_avg"] == pytest.approx((final["eval_qa_f1"] + final["eval_domain_masked_accuracy"]
                                                     + final["eval_demo_entailment_accuracy"]
                                                     + final["eval_demo_similarity_pearson"]) / 4)
    # QA's chance: the empty answer (right on the unanswerable questions) or the most frequent answer.
    declared = next(t for t in json.loads(qa_tasks.read_text())["tasks"] if t["name"] == "qa")
    rows = [json.loads(line) for line in Path(declared["files"]["validation"]).read_text().splitlines()]
    answers = [r["answers"][0]["text"] for r in rows if r["answers"]]
    most = max(answers.count(a) for a in answers)
    chance = max(sum(not r["answers"] for r in rows), most) / len(rows)
    assert metrics["chance"]["qa"]["f1"]["chance"] == pytest.approx(chance)
    assert set(metrics["chance"]["domain"]) == {"masked_accuracy"}
    log = done.stdout + done.stderr
    assert "extractive_qa" in log and "masked_lm" in log  # the sampling plan names the types


def qa_windows(run_dir: Path, tokenizer, rows: list[dict]):
    """The validation rows as the job encodes them (windows), with the task's declaration."""
    import datasets

    from trainer.modeling import MultitaskModel

    spec = MultitaskModel.from_checkpoint(run_dir / "final").specs["qa"]
    encoded = spec.task_type.encode(spec, {k: [r[k] for r in rows] for k in ("question", "context", "answers")},
                                    tokenizer, spec.max_length, with_labels=True)
    return spec, datasets.Dataset.from_dict(encoded)


def test_the_qa_export_is_a_standalone_model_with_the_multitask_models_answers(trained, qa_tasks, tmp_path):
    """transformers 5 has no question-answering pipeline: the export loads with
    AutoModelForQuestionAnswering and gives the multitask head's logits, hence its answers, which
    are what `predict` writes."""
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from trainer.modeling import MultitaskModel

    run_dir, _, _ = trained
    rows = [json.loads(line) for line in Path(json.loads(qa_tasks.read_text())["tasks"][-2]["files"]["validation"])
            .read_text().splitlines()]
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
    crashed = train(*args, env={"TRAINER_CRASH_AT": "mid_step:30"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    restarted = train(*args)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "(step 24)" in restarted.stdout + restarted.stderr  # resumed from the committed epoch 2 (12 steps an epoch)
    assert_same_weights(weights(tmp_path / "out" / RUN), weights(run_dir))


def rewrite(tasks_file: Path, tmp_path: Path, task: str, split: str, change) -> Path:
    tasks = json.loads(tasks_file.read_text())["tasks"]
    declared = next(t for t in tasks if t["name"] == task)
    rows = [json.loads(line) for line in Path(declared["files"][split]).read_text().splitlines()]
    change(rows)
    bad = tmp_path / f"{task}_{split}.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    declared["files"][split] = str(bad)
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"tasks": tasks}))
    return path


def first_answered(rows: list[dict]) -> dict:
    return next(r for r in rows if r["answers"])


@pytest.mark.parametrize(("task", "split", "change", "expected"), [
    ("qa", "train", lambda rows: first_answered(rows)["answers"][0].pop("answer_start"),
     "task 'qa', split train, line {line} of {path}: answer 1 in column 'answers' (role 'answers') has no answer_start offset"),
    ("qa", "validation", lambda rows: first_answered(rows)["answers"][0].update(answer_start=0),
     "task 'qa', split validation, line {line} of {path}: answer 1 in column 'answers' (role 'answers'), "),
    ("domain", "train", lambda rows: rows[2].update(text=""),
     "task 'domain', split train, line 3 of {path}: empty text in column 'text' (role 'text')"),
])
def test_bad_data_stops_before_training_with_one_line(tiny_model, qa_tasks, tmp_path, task, split, change, expected):
    bad = rewrite(qa_tasks, tmp_path, task, split, change)
    declared = next(t for t in json.loads(bad.read_text())["tasks"] if t["name"] == task)
    rows = [json.loads(line) for line in Path(declared["files"][split]).read_text().splitlines()]
    line = 1 + next((i for i, r in enumerate(rows) if r.get("answers") and
                     ("answer_start" not in r["answers"][0] or r["answers"][0]["answer_start"] == 0)), 0)
    done = train(*qa_flags(tiny_model, bad, tmp_path / "out"))
    assert done.returncode == 2, done.stderr[-3000:]
    message = expected.format(line=line, path=declared["files"][split])
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr
    assert not (tmp_path / "out" / RUN / "checkpoint-1").exists()

"""Decoder backbones with a generation task beside a classification head, end to end with the real
CLI: the seed system's two tasks (a causal-LM rewrite after a `<sep>` token, and a 3-way
classification of the same texts) on one GPT-2 and one Llama backbone. Training evaluates with
generation metrics; the checkpoint holds the backbone once with the language-model head tied to
it; both tasks export, reload with `AutoModelForCausalLM` / `AutoModelForSequenceClassification`
and `pipeline`, and give the multitask model's outputs; `predict` writes the generated texts; a
kill -9 and a restart give the uninterrupted run's weights bit for bit; bad input is one line."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from tests.conftest import run_cli
from tests.runs import assert_same_weights, weights

RUN = "gen"
EPOCHS = 12  # 200 examples per task, batch 8: 50 steps an epoch


def flags(model, tasks_file, out, **extra) -> list[str]:
    values = {"model_name": model, "model_init": "scratch", "tasks_file": tasks_file, "tasks": "rewrite,color",
              "output_dir": out, "run_name": RUN, "num_train_epochs": EPOCHS, "train_batch_size": 8, "eval_batch_size": 8,
              "learning_rate": 3e-3, "max_seq_length": 32, "max_new_tokens": 8, "logging_steps": 8, "seed": 4, **extra}
    return [f"--{k}={v}" for k, v in values.items()]


def train(*args, env=None):
    return run_cli("train", *args, env={"OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def runs(tiny_gpt2, tiny_llama, decoder_tasks, tmp_path_factory):
    """The uninterrupted run on each architecture, trained when a test first asks for it."""
    done: dict[str, tuple] = {}

    def run(arch: str):
        if arch not in done:
            model = {"gpt2": tiny_gpt2, "llama": tiny_llama}[arch]
            out = tmp_path_factory.mktemp(f"gen-{arch}")
            result = train(*flags(model, decoder_tasks, out))
            assert result.returncode == 0, result.stderr[-3000:]
            done[arch] = (arch, model, out / RUN, result)
        return done[arch]

    return run


@pytest.fixture(params=["gpt2", "llama"])
def trained(request, runs):
    return runs(request.param)


def validation_prompts(decoder_tasks) -> list[str]:
    rows = [json.loads(line) for line in open(json.loads(decoder_tasks.read_text())["tasks"][0]["files"]["validation"])]
    return [r["text"] for r in rows]


def test_training_evaluates_generation_metrics_beside_the_classifier_and_learns(trained):
    arch, _, run_dir, done = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())["eval"]
    for key in ("eval_rewrite_exact_match", "eval_rewrite_chrf", "eval_rewrite_loss", "eval_rewrite_perplexity",
                "eval_color_accuracy", "eval_macro_avg"):
        assert key in metrics, key
    assert metrics["eval_rewrite_perplexity"] == pytest.approx(torch.tensor(metrics["eval_rewrite_loss"]).exp().item(), rel=1e-4)
    # each task's primary metric: the first listed (exact_match for the rewrite, as declared)
    assert metrics["eval_macro_avg"] == pytest.approx((metrics["eval_rewrite_exact_match"] + metrics["eval_color_accuracy"]) / 2)
    assert metrics["eval_color_accuracy"] > 0.9, metrics  # 3 classes
    chance = json.loads((run_dir / "metrics.json").read_text())["chance"]["rewrite"]["exact_match"]
    assert chance["learned"] and chance["value"] > 0.5, chance  # a copied prompt is right for the palindromes only
    assert "rewrite                  exact_match" in done.stdout and "The tokenizer has no pad token" in done.stdout


def test_the_checkpoint_holds_the_backbone_once_and_the_tied_head_stays_tied(trained):
    from trainer.modeling import MultitaskModel

    arch, _, run_dir, _ = trained
    saved = weights(run_dir)
    assert not [k for k in saved if k.startswith("heads.rewrite.") and ("lm_head" in k) == (arch == "gpt2")]
    model = MultitaskModel.from_checkpoint(run_dir / "final")
    head = model.heads["rewrite"]
    embeddings = model.encoder.get_input_embeddings().weight
    if arch == "gpt2":  # tied: the head's weight is the shared embedding matrix, after training and reload
        assert head.get_output_embeddings().weight is embeddings
    else:  # Llama's default is an untied head: its own weights, stored once with the head
        assert head.get_output_embeddings().weight is not embeddings and "heads.rewrite.lm_head.weight" in saved
    backbone = sum(t.numel() for k, t in saved.items() if k.startswith("encoder."))
    assert backbone == sum(p.numel() for p in model.encoder.parameters())
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in model.parameters())  # each tensor once


def test_both_tasks_export_and_the_pipelines_give_the_multitask_models_outputs(trained, decoder_tasks):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from trainer.modeling import MultitaskModel

    arch, _, run_dir, _ = trained
    model = MultitaskModel.from_checkpoint(run_dir / "final").eval()
    export = run_dir / "final" / "export"
    tokenizer = AutoTokenizer.from_pretrained(export / "rewrite")
    lm = AutoModelForCausalLM.from_pretrained(export / "rewrite").eval()
    if arch == "gpt2":
        assert lm.get_output_embeddings().weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    prompts = validation_prompts(decoder_tasks)[:6]
    generate = pipeline("text-generation", model=str(export / "rewrite"))
    assert tokenizer.padding_side == "left"  # the exported tokenizer pads prompts for generation
    batched = generate([p + "<sep>" for p in prompts], batch_size=3, max_new_tokens=8, do_sample=False, return_full_text=False)
    for prompt in prompts:
        ids = tokenizer(prompt + "<sep>", return_tensors="pt")
        ours = model.heads["rewrite"].generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        theirs = lm.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert torch.equal(ours, theirs)
        text = generate(prompt + "<sep>", max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
        assert text == tokenizer.decode(ours[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert batched[prompts.index(prompt)][0]["generated_text"] == text
    classify = pipeline("text-classification", model=str(export / "color"))
    clf = AutoModelForSequenceClassification.from_pretrained(export / "color").eval()
    assert clf.config.pad_token_id == tokenizer.eos_token_id
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model(task="color", **batch).logits
        theirs = clf(**batch).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    labels = [r["label"] for r in classify(prompts, batch_size=4)]  # batches of several padded inputs
    assert labels == [clf.config.id2label[i] for i in ours.argmax(-1).tolist()]


def test_predict_writes_the_generated_texts(trained, decoder_tasks, tmp_path):
    from transformers import AutoTokenizer

    from trainer.modeling import MultitaskModel

    _, _, run_dir, _ = trained
    prompts = validation_prompts(decoder_tasks)[:5]
    inputs = tmp_path / "prompts.jsonl"
    inputs.write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    written = {}
    for batch in (1, 8):  # one prompt a batch, and all in one batch padded on the left
        done = run_cli("predict", "--task=rewrite", f"--input={inputs}", f"--output_dir={run_dir.parent}", f"--run_name={RUN}",
                       "--max_new_tokens=8", f"--eval_batch_size={batch}")
        assert done.returncode == 0, done.stderr[-3000:]
        written[batch] = [json.loads(line) for line in (tmp_path / "prompts.rewrite.predictions.jsonl").read_text().splitlines()]
    model = MultitaskModel.from_checkpoint(run_dir / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    expected = []
    for prompt in prompts:
        ids = tokenizer(prompt + "<sep>", return_tensors="pt")
        out = model.heads["rewrite"].generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        new = new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
        expected.append({"text": tokenizer.decode(new, skip_special_tokens=True)})
    assert written[1] == expected and written[8] == expected


def test_kill_9_then_restart_gives_the_uninterrupted_weights(runs, decoder_tasks, tmp_path):
    _, model, run_dir, _ = runs("gpt2")  # the resume path does not depend on the architecture
    args = flags(model, decoder_tasks, tmp_path / "out")
    crashed = train(*args, env={"TRAINER_CRASH_AT": "mid_step:75"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    restarted = train(*args)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "(step 50)" in restarted.stdout + restarted.stderr  # resumed from the committed epoch 1
    assert_same_weights(weights(tmp_path / "out" / RUN), weights(run_dir))


@pytest.mark.parametrize(("change", "expected"), [
    (lambda t: t[0]["columns"].update(target="missing"),
     "task 'rewrite', split train: column 'missing' (role 'target') not found"),
    (lambda t: t[1].update(metrics=["chrf"]), "metric(s) chrf do not apply to type classification"),
    (lambda t: t[1].update(type="multiple_choice", columns={"choices": ["text", "rewrite"], "label": "color"}),
     "cannot serve type multiple_choice: transformers has no AutoModelForMultipleChoice for it; it serves"),
])
def test_bad_input_stops_before_training_with_one_line(tiny_gpt2, decoder_tasks, tmp_path, change, expected):
    tasks = json.loads(decoder_tasks.read_text())["tasks"]
    change(tasks)
    bad = tmp_path / "tasks.json"
    bad.write_text(json.dumps({"tasks": tasks}))
    done = train(*flags(tiny_gpt2, bad, tmp_path / "out"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(done.stderr.strip().splitlines()) == 1 and expected in done.stderr, done.stderr
    assert not (tmp_path / "out" / RUN / "checkpoint-1").exists()


def test_under_ddp_each_rank_generates_its_share_and_the_scores_are_the_single_process_ones(tiny_gpt2, tmp_path):
    """torchrun, 2 processes over gloo: the evaluation's generation is sharded (every other row per
    rank, 23 rows so the shares differ) and gathered back in order; `evaluate` of the same final
    model in one process scores the same texts."""
    import os
    import socket
    import subprocess
    import sys

    from tests.conftest import ROOT, write_decoder_tasks
    from trainer import commands
    from trainer.config import load_config

    tasks = write_decoder_tasks(tmp_path / "tasks", n_eval=23)
    out = tmp_path / "out"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "ENV_FILE": "", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "trainer", "train", *flags(tiny_gpt2, tasks, out, num_train_epochs=16)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "batches on each of 2 processes" in done.stdout + done.stderr
    distributed = json.loads((out / RUN / "metrics.json").read_text())["eval"]
    assert distributed["eval_rewrite_chrf"] > 0.1, distributed  # texts were generated and gathered
    alone = commands.evaluate(load_config({"output_dir": str(out), "run_name": RUN, "max_new_tokens": 8, "eval_batch_size": 8},
                                          environ={}, env_file=""))
    for key in ("eval_rewrite_exact_match", "eval_rewrite_chrf", "eval_color_accuracy"):
        assert alone[key] == pytest.approx(distributed[key]), key

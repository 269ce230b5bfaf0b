"""LoRA (LORA=shared, LORA=per_task) end to end with the real CLI, on tiny models with saved random
weights (LoRA needs pretrained ones): an encoder (BERT: regression, classification, token
classification, one shared adapter) and a decoder (GPT-2: a causal-LM rewrite after an added
`<sep>` token and a classification, one adapter per task). Checkpoints hold only the adapters,
the added token's row and the heads; merged exports load with plain transformers (no peft
imported) and `pipeline` and give the multitask model's outputs; adapter exports load with
`PeftModel.from_pretrained` on the base; a kill -9 and a restart give the uninterrupted run's
weights bit for bit, and a restart on other base weights is refused; bad settings stop the job
with one line before training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoTokenizer

from tests.conftest import ROOT, make_tiny_bert, make_tiny_decoder, run_cli, tiny_flags
from tests.runs import assert_same_weights, weights
from trainer.data import load_task, make_collator, tokenize
from trainer.modeling import MultitaskModel

RUN = "lora"
ENCODER_TASKS = "demo_similarity,demo_entailment,demo_tags"
CLI_ENV = {"OMP_NUM_THREADS": "1"}
ATOL = 1e-5


def with_weights(directory: Path, seed: int = 0) -> Path:
    """Save random weights beside a tiny model's config: a "pretrained" base for LoRA."""
    torch.manual_seed(seed)
    AutoModel.from_config(AutoConfig.from_pretrained(directory)).save_pretrained(directory)
    return directory


def train(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("train", *args, env={**CLI_ENV, **(env or {})})


def decoder_flags(model: Path, tasks_file: Path, out: Path, **extra) -> list[str]:
    values = {"model_name": model, "tasks_file": tasks_file, "tasks": "rewrite,color", "output_dir": out, "run_name": RUN,
              "lora": "per_task", "num_train_epochs": 3, "train_batch_size": 8, "eval_batch_size": 8, "learning_rate": 1e-2,
              "max_seq_length": 32, "max_new_tokens": 8, "logging_steps": 10, "seed": 4, **extra}
    return [f"--{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-bases")
    return {"bert": with_weights(make_tiny_bert(root / "bert")), "gpt2": with_weights(make_tiny_decoder(root / "gpt2"))}


@pytest.fixture(scope="module")
def encoder_run(bases, tiny_tasks, tmp_path_factory) -> Path:
    """BERT with one adapter shared by three tasks: the run folder."""
    out = tmp_path_factory.mktemp("lora-encoder")
    done = train(*tiny_flags(bases["bert"], tiny_tasks, out, model_init="pretrained", tasks=ENCODER_TASKS, run_name=RUN,
                             lora="shared", lora_r=4, learning_rate=2e-2, max_steps=96,
                             eval_steps=48, save_steps=48))
    assert done.returncode == 0, done.stderr[-3000:]
    return out / RUN


@pytest.fixture(scope="module")
def decoder_run(bases, decoder_tasks, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """GPT-2 with an adapter per task: the run folder and the run's output."""
    out = tmp_path_factory.mktemp("lora-decoder")
    done = train(*decoder_flags(bases["gpt2"], decoder_tasks, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out / RUN, done


def test_both_runs_learn_and_the_log_names_the_adapters(encoder_run, decoder_run):
    chance = json.loads((encoder_run / "metrics.json").read_text())["chance"]["demo_tags"]["accuracy"]
    assert chance["learned"], chance  # the tags follow the words: the adapter and the head learn them
    run_dir, done = decoder_run
    decoder = json.loads((run_dir / "metrics.json").read_text())["eval"]
    assert decoder["eval_color_accuracy"] > 0.9, decoder  # 3 classes
    first = next(json.loads(line[line.index("{"):].replace("'", '"')) for line in done.stdout.splitlines() if "'loss_rewrite'" in line)
    # a frozen random base with its tied random output layer: the adapter moves the loss, slowly
    assert decoder["eval_rewrite_loss"] < float(first["loss_rewrite"]) - 0.2, (first, decoder)
    assert "LoRA (LORA=per_task): r=8, alpha=16, dropout=0.05, target modules PEFT's defaults" in done.stdout


def test_the_checkpoint_holds_only_the_adapters_and_the_heads(encoder_run, bases):
    for folder in (encoder_run / "final", sorted(encoder_run.glob("checkpoint-*"))[-1]):
        saved = load_file(folder / "model.safetensors")
        assert {k.split(".")[0] for k in saved} == {"encoder", "heads"}
        assert all(".lora_A.default." in k or ".lora_B.default." in k for k in saved if k.startswith("encoder."))
        assert {k.split(".")[1] for k in saved if k.startswith("heads.")} == set(ENCODER_TASKS.split(","))
        tensors = sum(t.numel() * t.element_size() for t in saved.values())
        backbone = (bases["bert"] / "model.safetensors").stat().st_size
        assert (folder / "model.safetensors").stat().st_size < tensors + 8192  # the tensors and a header, nothing else
        assert tensors < backbone / 8, (tensors, backbone)
        multitask = json.loads((folder / "multitask.json").read_text())
        assert multitask["lora"]["base_model"] == str(bases["bert"]) and len(multitask["lora"]["base_fingerprint"]) == 16


def test_per_task_trains_every_adapter_and_the_added_token(decoder_run):
    run_dir, _ = decoder_run
    saved = weights(run_dir)
    for task in ("rewrite", "color"):
        updates = [t for k, t in saved.items() if f".lora_B.{task}." in k]
        assert len(updates) == 2 and all(t.abs().sum() > 0 for t in updates), task  # lora_B starts at zero
    assert not torch.equal(saved["encoder.h.0.attn.c_attn.lora_A.rewrite.weight"], saved["encoder.h.0.attn.c_attn.lora_A.color.weight"])
    assert "encoder.wte.token_adapter.trainable_tokens_delta.rewrite" in saved
    assert not [k for k in saved if k.startswith("heads.rewrite.")]  # GPT-2's language-model head is the frozen, tied wte


# ------------------------------------------------------------------------ exports
PLAIN_LOAD = r"""
import json, sys
import torch, transformers
from transformers import pipeline

jobs, out = json.loads(open(sys.argv[1]).read()), {}
for name, job in jobs.items():
    model = getattr(transformers, job["auto_class"]).from_pretrained(job["folder"]).eval()
    with torch.no_grad():
        out[name] = {"logits": model(**{k: torch.tensor(v) for k, v in job["batch"].items()}).logits.tolist()}
    if job.get("pipeline") == "text-classification":
        classify = pipeline("text-classification", model=job["folder"])
        out[name]["pipeline"] = classify(job["inputs"], function_to_apply=job["function"], top_k=None)
    elif job.get("pipeline") == "text-generation":
        generate = pipeline("text-generation", model=job["folder"])
        out[name]["pipeline"] = [r[0]["generated_text"] for r in generate(job["inputs"], max_new_tokens=8, do_sample=False,
                                                                         return_full_text=False)]
assert "peft" not in sys.modules, sorted(m for m in sys.modules if m.startswith("peft"))
print(json.dumps(out))
"""


def validation_batch(model: MultitaskModel, task: str, tokenizer) -> tuple[list, dict]:
    spec = model.specs[task]
    _, raw = load_task(spec, need_train=False)
    tokenized = tokenize(spec, raw["validation"], tokenizer, max_length=32)
    return raw["validation"], dict(make_collator(spec, tokenizer)([tokenized[i] for i in range(min(8, len(tokenized)))]))


def load_plain(jobs: dict, tmp_path: Path) -> dict:
    """Load each exported folder in a fresh process that must not import peft; its outputs."""
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **CLI_ENV}
    done = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_merged_exports_load_with_plain_transformers_and_give_the_multitask_outputs(encoder_run, decoder_run, tmp_path):
    encoder = MultitaskModel.from_checkpoint(encoder_run / "final").eval()
    decoder_dir = decoder_run[0]
    decoder = MultitaskModel.from_checkpoint(decoder_dir / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(encoder_run / "final")
    jobs, expected = {}, {}
    for task, auto_class in (("demo_similarity", "AutoModelForSequenceClassification"),
                             ("demo_entailment", "AutoModelForSequenceClassification"),
                             ("demo_tags", "AutoModelForTokenClassification")):
        rows, batch = validation_batch(encoder, task, tokenizer)
        with torch.no_grad():
            expected[task] = encoder(task=task, **batch).logits
        job = {"folder": str(encoder_run / "final" / "export" / task), "auto_class": auto_class,
               "batch": {k: v.tolist() for k, v in batch.items() if k != "labels"}}
        if task != "demo_tags":
            first, second = encoder.specs[task].columns["text"], encoder.specs[task].columns["text_pair"]
            job.update(pipeline="text-classification", function="none" if task == "demo_similarity" else "softmax",
                       inputs=[{"text": r[first], "text_pair": r[second]} for r in rows.select(range(len(batch["input_ids"])))])
        jobs[task] = job
    lm_tokenizer = AutoTokenizer.from_pretrained(decoder_dir / "final")
    prompts = ["red dog<sep>", "the cat blue bird<sep>", "saw green<sep>"]
    lm_batch = lm_tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected["rewrite"] = decoder(task="rewrite", **lm_batch).logits
        expected["color"] = decoder(task="color", **lm_batch).logits
    generated = []
    for prompt in prompts:
        ids = lm_tokenizer(prompt, return_tensors="pt")
        decoder.activate("rewrite")
        new = decoder.heads["rewrite"].generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=lm_tokenizer.pad_token_id)
        generated.append(lm_tokenizer.decode(new[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    batch = {k: v.tolist() for k, v in lm_batch.items()}
    jobs["rewrite"] = {"folder": str(decoder_dir / "final" / "export" / "rewrite"), "auto_class": "AutoModelForCausalLM",
                       "batch": batch, "pipeline": "text-generation", "inputs": prompts}
    jobs["color"] = {"folder": str(decoder_dir / "final" / "export" / "color"), "auto_class": "AutoModelForSequenceClassification",
                     "batch": batch}

    plain = load_plain(jobs, tmp_path)
    for task, logits in expected.items():
        torch.testing.assert_close(torch.tensor(plain[task]["logits"]), logits, atol=ATOL, rtol=0, msg=task)
    for task in ("demo_similarity", "demo_entailment"):
        logits = expected[task] if task == "demo_similarity" else torch.softmax(expected[task], -1)
        for row, scores in zip(logits.tolist(), plain[task]["pipeline"]):
            by_label = {r["label"]: r["score"] for r in scores}
            labels = encoder.specs[task].labels if task == "demo_entailment" else ["score"]
            assert [by_label[label] for label in labels] == pytest.approx(row, abs=ATOL), task
    assert plain["rewrite"]["pipeline"] == generated
    assert all(not (decoder_dir / "final" / "export" / t / "adapter_config.json").exists() for t in ("rewrite", "color"))


def test_adapter_exports_load_with_peft_on_the_base_and_give_the_multitask_outputs(encoder_run, decoder_run, bases, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

    decoder_dir = decoder_run[0]
    for run_dir, base, tasks in ((encoder_run, bases["bert"], {"demo_entailment": AutoModelForSequenceClassification,
                                                               "demo_tags": AutoModelForTokenClassification}),
                                 (decoder_dir, bases["gpt2"], {"rewrite": AutoModelForCausalLM,
                                                               "color": AutoModelForSequenceClassification})):
        target = tmp_path / run_dir.parent.name
        done = run_cli("export", f"--output_dir={run_dir.parent}", f"--run_name={RUN}", "--lora_export=adapter",
                       f"--output={target}", env=CLI_ENV)
        assert done.returncode == 0, done.stderr[-3000:]
        model = MultitaskModel.from_checkpoint(run_dir / "final").eval()
        for task, auto_class in tasks.items():
            folder = target / task
            assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
            assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
            tokenizer = AutoTokenizer.from_pretrained(folder)
            plain = auto_class.from_pretrained(base, config=AutoConfig.from_pretrained(folder))
            plain.resize_token_embeddings(len(tokenizer))  # GPT-2's <sep>: its row is in the adapter
            peft_model = PeftModel.from_pretrained(plain, folder).eval()
            batch = validation_batch(model, task, tokenizer)[1] if run_dir == encoder_run else \
                tokenizer(["red dog<sep>", "the cat blue bird<sep>"], padding=True, return_tensors="pt")
            batch = {k: v for k, v in batch.items() if k != "labels"}
            with torch.no_grad():
                torch.testing.assert_close(peft_model(**batch).logits, model(task=task, **batch).logits, atol=ATOL, rtol=0,
                                           msg=task)


# ------------------------------------------------------------------------ resume
def test_sigterm_commits_the_adapters_within_the_grace_period_and_the_restart_ends_as_the_uninterrupted_run(
        encoder_run, bases, tiny_tasks, tmp_path):
    # A Spot VM's 30 seconds: the stop step's checkpoint (adapters, heads and their optimizer
    # state only) is committed and the job exits 0 within PREEMPTION_GRACE_SECONDS.
    import re
    import time

    from trainer.checkpoints import commits as cs

    grace = 20
    args = tiny_flags(bases["bert"], tiny_tasks, tmp_path / "out", model_init="pretrained", tasks=ENCODER_TASKS, run_name=RUN,
                      lora="shared", lora_r=4, learning_rate=2e-2, max_steps=96, eval_steps=48, save_steps=48,
                      preemption_grace_seconds=grace)
    stopped = train(*args, env={"TRAINER_SIGTERM_AT": "70"})
    ended = time.time()
    log = stopped.stdout + stopped.stderr
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    sent = [float(t) for t in re.findall(r"sending SIGTERM at step 70 \(t=([\d.]+)\)", log)]
    assert sent and ended - sent[0] < grace, log[-3000:]
    assert "Preempted at step 70: checkpoint committed" in log
    committed = cs.verify_local(tmp_path / "out" / RUN / "checkpoint-70")
    assert committed.step == 70
    saved = load_file(str(tmp_path / "out" / RUN / "checkpoint-70" / "model.safetensors"))
    assert saved and all("lora_" in key or key.startswith("heads.") for key in saved), sorted(saved)[:5]

    restarted = train(*args)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "(step 70)" in restarted.stdout + restarted.stderr
    assert_same_weights(weights(tmp_path / "out" / RUN), weights(encoder_run))


def test_kill_9_then_restart_gives_the_uninterrupted_weights_and_other_base_weights_are_refused(
        decoder_run, bases, decoder_tasks, tmp_path):
    base = tmp_path / "base"
    base.symlink_to(bases["gpt2"])  # MODEL_NAME stays this path when its weights change below
    args = decoder_flags(base, decoder_tasks, tmp_path / "out")
    crashed = train(*args, env={"TRAINER_CRASH_AT": "mid_step:75"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    restarted = train(*args)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "(step 50)" in restarted.stdout + restarted.stderr  # resumed from the committed epoch 1
    assert_same_weights(weights(tmp_path / "out" / RUN), weights(decoder_run[0]))

    other = with_weights(make_tiny_decoder(tmp_path / "other"), seed=1)
    base.unlink()
    base.symlink_to(other)
    refused = train(*args)
    assert refused.returncode == 2, refused.stderr[-3000:]
    # Refused where every resume is checked, once the base is loaded (its progress bar is on stderr too).
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [refused.stderr.strip().splitlines()[-1]], refused.stderr
    assert "was trained with other settings: the base model's weights (fingerprint" in errors[0]
    assert "Warning" not in refused.stderr, refused.stderr  # PEFT's notes that ask nothing of the user are kept out


# ------------------------------------------------------------------------ refused before training
@pytest.mark.parametrize(("model", "extra", "expected"), [
    ("bert", {"lora_target_modules": "query,qkv"}, "LORA_TARGET_MODULES='query,qkv' is not valid: the bert backbone has no module qkv"),
    ("bert", {"model_init": "scratch"}, "MODEL_INIT='scratch' is not valid: expected pretrained when LORA=shared"),
    ("gpt2", {"lora_target_modules": "c_attn,wte"}, "task 'rewrite': its output layer is the backbone's wte matrix (tied)"),
])
def test_bad_lora_settings_stop_before_training_with_one_line(bases, tiny_tasks, decoder_tasks, tmp_path, model, extra, expected):
    out = tmp_path / "out"
    if model == "bert":
        args = tiny_flags(bases["bert"], tiny_tasks, out, **{"model_init": "pretrained", "tasks": ENCODER_TASKS, "run_name": RUN,
                                                             "lora": "shared", **extra})
    else:
        args = decoder_flags(bases["gpt2"], decoder_tasks, out, lora="shared", **extra)
    done = train(*args)
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(done.stderr.strip().splitlines()) == 1 and expected in done.stderr, done.stderr
    assert not list(out.glob(f"{RUN}/checkpoint-*"))

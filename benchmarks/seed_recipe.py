"""Against the seed recipe: one epoch over the tasks' training data, padded to 128 or padded per batch.

Three ways to feed the same `MultitaskTrainer` and `MultitaskModel`:

- `seed`: the seed's approach: every example padded to `max_length` (128), task batches shuffled;
- `dynamic`: each batch padded to its longest example (the trainer's collators), no length grouping;
- `default`: this project's defaults: dynamic padding and length grouping (`GROUP_BY_LENGTH=true`).

Token efficiency (real tokens / tokens computed) is summed over every batch of one epoch over
all the training data, as each approach's real data loader yields them. The epoch time is
measured on `Plan.recipe_samples` randomly drawn training examples (all of them in full mode),
each approach training a fresh model for one epoch, alternating.
"""

from __future__ import annotations

import logging
import math
import time

from .common import (
    BatchLog,
    Setup,
    StepClock,
    bench_config,
    fastest,
    fixed_length_collator,
    load_tasks,
    lockstep_rounds,
    multitask_trainer,
    ratio,
    result,
    value,
    variant,
)

logger = logging.getLogger("benchmarks")

NAME = "seed_recipe"
APPROACHES = {  # name: (pad every example to max_length, group by length)
    "seed": (True, False),
    "dynamic": (False, False),
    "default": (False, True),
}


def _tasks_for(setup: Setup, tasks, approach: str):
    fixed, _ = APPROACHES[approach]
    tokenizer = setup.tokenizer()
    return [variant(t, collator=fixed_length_collator(t.spec, tokenizer, setup.max_length) if fixed else t.collator)
            for t in tasks]


def efficiency(setup: Setup, tasks, approach: str, work) -> dict:
    """Real and computed tokens over every batch of epoch 0 of the trainer's own training data loader."""
    _, group = APPROACHES[approach]
    cfg = bench_config(setup, [t.name for t in tasks], work, group_by_length=group, max_steps=1)
    trainer = multitask_trainer(setup, _tasks_for(setup, tasks, approach), cfg)
    loader = trainer.get_train_dataloader()
    loader.set_epoch(0)
    batches = examples = real = computed = 0
    for batch in loader:
        mask = batch["attention_mask"]
        batches, examples = batches + 1, examples + int(mask.shape[0])
        real, computed = real + int(mask.sum()), computed + int(mask.numel())
    return {"batches": batches, "examples": examples, "real_tokens": real, "computed_tokens": computed,
            "efficiency": real / computed}


def timed_epoch(setup: Setup, tasks, approach: str, work):
    """A lockstep factory: a fresh model trained for one epoch over `tasks` the `approach` way."""
    _, group = APPROACHES[approach]

    def factory(clock: StepClock):
        logs = [BatchLog(t.collator) for t in _tasks_for(setup, tasks, approach)]
        cfg = bench_config(setup, [t.name for t in tasks], work, group_by_length=group, num_train_epochs=1)
        trainer = multitask_trainer(setup, [variant(t, collator=log) for t, log in zip(tasks, logs)], cfg, callbacks=[clock])

        def measure(clock: StepClock) -> dict:
            records = [r for log in logs for r in log.records]
            real, computed = sum(r[1] for r in records), sum(r[2] for r in records)
            return {"seconds": sum(clock.step_seconds()), "steps": clock.steps, "examples": sum(r[0] for r in records),
                    "tokens": real, "computed_tokens": computed, "efficiency": real / computed,
                    "step_seconds": clock.step_seconds()}

        return trainer, measure

    return factory


def run(setup: Setup) -> dict:
    started = time.perf_counter()
    plan = setup.plan
    work = setup.work_dir / NAME
    logger.info("seed recipe: token efficiency over the whole training data")
    full = load_tasks(setup, setup.tasks, max_length=setup.max_length)
    sizes = {t.name: len(t.train) for t in full}
    whole = {a: efficiency(setup, full, a, work) for a in APPROACHES}

    if plan.recipe_samples is None or plan.recipe_samples >= sum(sizes.values()):
        timed_tasks, share = full, sizes
    else:  # the same task proportions as the whole data
        total = sum(sizes.values())
        share = {n: max(setup.batch_size, math.floor(plan.recipe_samples * s / total)) for n, s in sizes.items()}
        timed_tasks = load_tasks(setup, setup.tasks, max_length=setup.max_length, train_samples=share)
    logger.info("seed recipe: timing one epoch of %s examples per approach", share)
    warm = bench_config(setup, [t.name for t in timed_tasks], work, max_steps=plan.warmup_steps)
    multitask_trainer(setup, timed_tasks, warm).train()  # first-use costs (allocator, kernels) land here
    series = lockstep_rounds({a: timed_epoch(setup, timed_tasks, a, work) for a in APPROACHES}, plan.recipe_repeats)

    best = {a: fastest(rounds) for a, rounds in series.items()}
    seed_s, default_s, dynamic_s = (best[a]["seconds"] for a in ("seed", "default", "dynamic"))
    timed_eff = {a: series[a][0]["efficiency"] for a in APPROACHES}
    figures = [
        value(f"token efficiency, seed (pad to {setup.max_length}), whole train data", whole["seed"]["efficiency"]),
        value("token efficiency, dynamic padding, whole train data", whole["dynamic"]["efficiency"]),
        value("token efficiency, defaults (dynamic + length grouping), whole train data", whole["default"]["efficiency"]),
        ratio("epoch speed-up: seed time / defaults time", seed_s, default_s, of=("seed epoch s", "defaults epoch s"),
              goal=(">", 1.0), unit="×"),
        ratio("computed-token ratio: seed / defaults (timed data)", timed_eff["default"], timed_eff["seed"],
              of=("defaults efficiency", "seed efficiency"), unit="×"),
        ratio("epoch speed-up: seed time / dynamic padding time", seed_s, dynamic_s, of=("seed epoch s", "dynamic epoch s"),
              unit="×"),
        ratio("length grouping pays: dynamic time / defaults time", dynamic_s, default_s,
              of=("dynamic epoch s", "defaults epoch s"), goal=(">=", 1.0), unit="×"),
    ]
    timed_note = ("the whole training data" if timed_tasks is full else
                  f"{sum(share.values())} random training examples ({', '.join(f'{n} {k}' for k, n in share.items())}), "
                  "the same proportions as the whole data")
    notes = [f"Token efficiencies come from every batch of one epoch ({whole['seed']['batches']} batches at batch size "
             f"{setup.batch_size}) of the trainer's data loader over {sum(sizes.values())} training examples.",
             f"Epoch times: one epoch over {timed_note}, a fresh model per approach, the approaches training side by "
             f"side one step each in turn; {plan.recipe_repeats} round(s); each step's time is the fastest of its rounds.",
             "The computed-token ratio is what the speed-up would be if time were proportional to the tokens "
             "computed; attention grows with the square of the length, so padding to 128 costs more than that."]
    return result(NAME, "Against the seed recipe (pad to 128, shuffled task batches)", setup, started, figures=figures,
                  measurements={"train_sizes": sizes, "whole_data": whole, "timed_examples": share, "epochs": series,
                                "fastest": best},
                  notes=notes)

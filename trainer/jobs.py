"""The job's commands: train, evaluate, predict, export. Each reads top to bottom, like run_glue:
config → logging → seed → tasks and data → tokenizer → model → Trainer → run → outputs.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from .config import Config
from .data import TaskData, load_task, make_collator, tokenize
from .model import MULTITASK_FILE, MultitaskModel, load_encoder
from .tasks import TaskError, TaskSpec, resolve_tasks
from .training import (
    MACRO_METRIC,
    MultitaskTrainer,
    build_training_args,
    chance_scores,
    decode,
    resolve_precision,
)

logger = logging.getLogger("trainer")
LEARNED_MARGIN = 0.05  # a metric this far above its chance level counts as learned


def setup_logging() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    transformers.logging.set_verbosity_warning()


def load_tokenizer(name: str, specs: list[TaskSpec]):
    from transformers import AutoTokenizer

    # Byte-level BPE tokenizers (RoBERTa…) need a leading space per word for pre-split tokens.
    kwargs = {"add_prefix_space": True} if any(s.type == "token_classification" for s in specs) else {}
    return AutoTokenizer.from_pretrained(name, **kwargs)


def prepare_tasks(cfg: Config, specs: list[TaskSpec], *, need_train: bool) -> tuple[list[TaskSpec], list[dict]]:
    """Load and check every task's raw data (before any model is built)."""
    resolved, raw = [], []
    for spec in specs:
        spec, splits = load_task(spec, need_train=need_train, max_train=cfg.max_train_samples, max_eval=cfg.max_eval_samples)
        resolved.append(spec)
        raw.append(splits)
    return resolved, raw


def tokenize_tasks(cfg: Config, specs: list[TaskSpec], raw: list[dict], tokenizer) -> list[TaskData]:
    tasks = []
    for spec, splits in zip(specs, raw):
        max_length = spec.max_length or cfg.max_seq_length
        tokenized = {name: tokenize(spec, ds, tokenizer, max_length) for name, ds in splits.items()}
        tasks.append(TaskData(spec, tokenized.get("train"), tokenized.get("validation"), make_collator(spec, tokenizer)))
    return tasks


def chance_report(tasks: list[TaskData], metrics: dict[str, float], prefix: str = "eval") -> dict[str, Any]:
    """Compare each task's metrics with what a constant guess scores, and log a table."""
    report: dict[str, Any] = {}
    lines = [f"{'task':<24} {'metric':<22} {'value':>8} {'chance':>8}  learned"]
    for task in tasks:
        if task.validation is None:
            continue
        chance = chance_scores(task.spec, task.validation["labels"])
        rows = {}
        for name, level in chance.items():
            value = metrics.get(f"{prefix}_{task.name}_{name}")
            if value is None:
                continue
            learned = value >= level + LEARNED_MARGIN
            rows[name] = {"value": value, "chance": level, "learned": learned}
            lines.append(f"{task.name:<24} {name:<22} {value:>8.4f} {level:>8.4f}  {'yes' if learned else 'NO'}")
        report[task.name] = rows
    logger.info("Evaluation against chance (a constant guess):\n%s", "\n".join(lines))
    everything = all(r["learned"] for rows in report.values() for r in rows.values())
    logger.info("All tasks learned: every metric is above chance." if everything and report
                else "Not every task is above chance yet: train longer or check the data.")
    return report


# ------------------------------------------------------------------------------ train
def train(cfg: Config) -> dict[str, Any]:
    """Train all tasks together, evaluate, save the final model, export each task, write metrics.json.

    Raises:
        ConfigError, TaskError: bad settings or data, before any model is built.
    """
    from transformers import set_seed

    setup_logging()
    precision = resolve_precision(cfg.precision)
    specs = resolve_tasks(cfg)
    logger.info("Run %s: %s on %s (config %s)", cfg.resolved_run_name, cfg.model_name, ", ".join(cfg.tasks), cfg.hash())
    specs, raw = prepare_tasks(cfg, specs, need_train=True)
    set_seed(cfg.seed)

    tokenizer = load_tokenizer(cfg.tokenizer_name or cfg.model_name, specs)
    tasks = tokenize_tasks(cfg, specs, raw, tokenizer)
    model = MultitaskModel(load_encoder(cfg.model_name, cfg.model_init), specs)

    trainer = MultitaskTrainer(
        model=model, args=build_training_args(cfg, precision=precision), tasks=tasks, cfg=cfg, processing_class=tokenizer,
    )
    resume = cfg.resume if cfg.resume not in ("auto", "never") else None
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()  # the final (or best, with LOAD_BEST_MODEL_AT_END) model, in the run folder

    results: dict[str, Any] = {"run": cfg.resolved_run_name, "config_hash": cfg.hash(), "train": train_result.metrics}
    if any(t.validation is not None for t in tasks):
        eval_metrics = trainer.evaluate()
        results["eval"] = eval_metrics
        results["chance"] = chance_report(tasks, eval_metrics)
    if cfg.export_at_end and trainer.args.should_save:
        results["exported"] = {t.name: str(model.export(t.name, cfg.run_dir / "export" / t.name, tokenizer)) for t in tasks}
        logger.info("Exported %d task models to %s", len(tasks), cfg.run_dir / "export")
    if trainer.args.should_save:
        write_metrics(cfg.run_dir / "metrics.json", results)
    return results


def write_metrics(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=float))
    tmp.replace(path)
    logger.info("Metrics written to %s", path)


# ------------------------------------------------------------------------------ saved models
def find_checkpoint(cfg: Config, checkpoint: str | None) -> Path:
    """The model folder to use: `checkpoint`, else the run's final model, else its newest checkpoint.

    Raises:
        TaskError: nothing usable is found (with where it looked).
    """
    if checkpoint:
        path = Path(checkpoint)
        if not (path / MULTITASK_FILE).is_file():
            raise TaskError(f"--checkpoint={checkpoint!r} is not a multitask model folder ({MULTITASK_FILE} missing)")
        return path
    if (cfg.run_dir / MULTITASK_FILE).is_file():
        return cfg.run_dir
    steps = sorted(cfg.run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    steps = [p for p in steps if (p / MULTITASK_FILE).is_file()]
    if steps:
        return steps[-1]
    raise TaskError(f"no trained model in {cfg.run_dir}: train first, or pass --checkpoint=PATH")


def _trainer_for(cfg: Config, model: MultitaskModel, tasks: list[TaskData], tokenizer) -> MultitaskTrainer:
    args = build_training_args(cfg, precision=resolve_precision(cfg.precision))
    args.report_to = []
    return MultitaskTrainer(model=model, args=args, tasks=tasks, cfg=cfg, processing_class=tokenizer, train_dataset=None)


def _load_saved(cfg: Config, checkpoint: str | None):
    from transformers import AutoTokenizer

    path = find_checkpoint(cfg, checkpoint)
    model = MultitaskModel.from_checkpoint(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return path, model, tokenizer


def evaluate(cfg: Config, checkpoint: str | None = None) -> dict[str, Any]:
    """Evaluate a saved multitask model on every task's validation split."""
    setup_logging()
    path, model, tokenizer = _load_saved(cfg, checkpoint)
    specs = list(model.specs.values())
    specs, raw = prepare_tasks(cfg, specs, need_train=False)
    tasks = tokenize_tasks(cfg, specs, raw, tokenizer)
    metrics = _trainer_for(cfg, model, tasks, tokenizer).evaluate()
    chance_report(tasks, metrics)
    logger.info("%s: %s = %.4f", path, MACRO_METRIC, metrics.get(f"eval_{MACRO_METRIC}", float("nan")))
    return metrics


def export(cfg: Config, checkpoint: str | None = None, output: str | None = None, task: str | None = None) -> dict[str, str]:
    """Export tasks of a saved multitask model as standalone Hugging Face models."""
    setup_logging()
    path, model, tokenizer = _load_saved(cfg, checkpoint)
    names = [task] if task else list(model.specs)
    unknown = [n for n in names if n not in model.specs]
    if unknown:
        raise TaskError(f"--task={unknown[0]!r} is not in this model; it has {', '.join(model.specs)}")
    out_dir = Path(output) if output else path / "export"
    done = {n: str(model.export(n, out_dir / n, tokenizer)) for n in names}
    for name, where in done.items():
        logger.info("Exported %s to %s", name, where)
    return done


def _read_inputs(path: Path):
    import datasets

    suffix = path.suffix.lower()
    if not path.is_file():
        raise TaskError(f"--input={str(path)!r} does not exist")
    if suffix not in (".jsonl", ".json", ".csv", ".tsv"):
        raise TaskError(f"--input={str(path)!r}: use a .jsonl, .csv or .tsv file")
    from .data import _file_loader_args

    builder, kwargs = _file_loader_args(str(path))
    return datasets.load_dataset(builder, data_files={"test": str(path)}, split="test", **kwargs)


def _with_placeholder_labels(spec: TaskSpec, ds):
    """Inputs have no labels: add placeholder ones so batching is the same as in training."""
    col = spec.columns["label"]
    if col in ds.column_names:
        ds = ds.remove_columns(col)
    first = spec.labels[0] if spec.labels else 0.0
    if spec.type == "token_classification":
        return ds.map(lambda row: {col: [first] * len(row[spec.columns["tokens"]])})
    return ds.add_column(col, [first] * len(ds))


def predict(cfg: Config, task: str, input: str, output: str | None = None, checkpoint: str | None = None) -> Path:
    """Predict `task` on a jsonl/csv/tsv of inputs; writes one JSON line per input."""
    import numpy as np
    from scipy.special import softmax

    from .data import check_columns

    setup_logging()
    path, model, tokenizer = _load_saved(cfg, checkpoint)
    if task not in model.specs:
        raise TaskError(f"--task={task!r} is not in this model; it has {', '.join(model.specs)}")
    spec = model.specs[task]
    ds = _with_placeholder_labels(spec, _read_inputs(Path(input)))
    check_columns(spec, "input", ds)
    tokenized = tokenize(spec, ds, tokenizer, spec.max_length or cfg.max_seq_length)
    data = TaskData(spec, None, tokenized, make_collator(spec, tokenizer))
    out = _trainer_for(cfg, model, [data], tokenizer).predict_task(data, tokenized)
    logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions

    rows: list[dict[str, Any]] = []
    if spec.type == "regression":
        rows = [{"score": float(v)} for v in decode(spec, logits)]
    elif spec.type == "token_classification":
        tags, _ = decode(spec, logits, out.label_ids)
        rows = [{"tags": t} for t in tags]
    else:
        probs = softmax(np.asarray(logits, dtype=np.float64), axis=-1)
        for p in probs:
            k = int(p.argmax())
            rows.append({"label": spec.labels[k], "index": k, "probabilities": [round(float(x), 6) for x in p]})
    out_path = Path(output) if output else Path(input).with_suffix(f".{task}.predictions.jsonl")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    logger.info("Wrote %d predictions to %s", len(rows), out_path)
    return out_path

"""Loading, checking and tokenizing task data; the multitask dataset and collator.

What depends on the task type (label checks, encoding, collators) is the type's, called through
``spec.task_type``: this module knows no type. Checks run on the raw data before any model is
built, and every error names the task, the split and the column.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import not_utf8
from .tasks import TaskError, TaskSpec

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ loading
def file_loader_args(path: str) -> tuple[str, dict[str, Any]]:
    suffix = Path(path).suffix.lower()
    if suffix == ".tsv":
        # GLUE TSV files contain quote characters inside sentences: read them with quoting off.
        return "csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "na_filter": False}
    if suffix == ".csv":
        return "csv", {"na_filter": False}
    if suffix in (".jsonl", ".json"):
        return "json", {}
    return "parquet", {}


TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and what it was raised from or during, outermost first."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _ragged_row(path: Path) -> tuple[int, int, int] | None:
    """(line, fields, header fields) of the first CSV/TSV row whose field count is not the header's."""
    _, kwargs = file_loader_args(str(path))
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=kwargs.get("delimiter", ","), quoting=kwargs.get("quoting", csv.QUOTE_MINIMAL))
        width, start = None, 0
        for fields in reader:
            if fields:
                if width is None:
                    width = len(fields)
                elif len(fields) != width:
                    return start + 1, len(fields), width
            start = reader.line_num
    return None


def _bad_json_line(path: Path) -> str | None:
    """What is wrong with the first line of a JSON Lines file that is not one JSON object."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if number == 1 and line.lstrip().startswith("["):
                return None  # one JSON document (a list of rows), not JSON Lines
            try:
                value = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                return f"line {number} is not valid JSON ({e.msg} at column {e.colno}); fix it (one JSON object per line)"
            if not isinstance(value, dict):
                return f"line {number} is a JSON {type(value).__name__}, not an object; write one object per line"
    return None


def _is_blank(path: Path) -> bool:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _load_problem(path: Path, error: BaseException) -> str:
    """Why a loader could not read `path`, with the fix (the file is UTF-8: see `load_file`)."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            ragged = _ragged_row(path)
            if ragged:
                line, fields, width = ragged
                hint = "a TSV field cannot hold a tab" if suffix == ".tsv" else "quote a field that holds a comma"
                return f"line {line} has {fields} fields where the header has {width}; fix that row ({hint})"
        if suffix in (".jsonl", ".json"):
            bad = _bad_json_line(path)
            if bad:
                return bad
    except (OSError, csv.Error):
        pass
    root = _causes(error)[-1]
    found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(root))  # pandas' ParserError
    if found:
        return f"line {found[2]} has {found[3]} fields where the header has {found[1]}; fix that row"
    return f"{_first_line(root)}; check the file's format and columns"


@contextlib.contextmanager
def _quiet_datasets_errors():
    # The loaders log "Failed to read file ..." before raising; the one line below says it better.
    datasets_logger = logging.getLogger("datasets")
    level = datasets_logger.level
    datasets_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logger.setLevel(level)


def load_file(path: str | Path, split: str, *, where: str, empty: str):
    """Load one data file (.csv, .tsv, .jsonl, .json, .parquet) as a `datasets.Dataset`.

    `where` starts every message (e.g. "task 'rte', split train"); `empty` is the message for a
    file without rows. The loaders say only "An error occurred while generating the dataset":
    the message names the cause, the line and the fix.

    Raises:
        TaskError: the file is not UTF-8 text, does not parse (the line and the fix), or has no rows.
    """
    import datasets

    path = Path(path)
    text = path.suffix.lower() in TEXT_SUFFIXES
    # Checked first: a JSON loader may read invalid UTF-8 without complaint and fail later.
    problem = not_utf8(path) if text else None
    if problem:
        raise TaskError(f"{where}: cannot load {path}: it is not UTF-8 text ({problem}); save it as UTF-8")
    if text and _is_blank(path):
        raise TaskError(f"{where}: {empty}")
    builder, kwargs = file_loader_args(str(path))
    try:
        with _quiet_datasets_errors():
            ds = datasets.load_dataset(builder, data_files={split: str(path)}, split=split, **kwargs)
    except Exception as e:  # noqa: BLE001 - the loaders raise many types; one line with the fix
        first = " ".join(_first_line(c) for c in _causes(e))
        if "corresponds to no data" in first or "No columns to parse" in first:
            raise TaskError(f"{where}: {empty}") from None
        raise TaskError(f"{where}: cannot load {path}: {_load_problem(path, e)}") from None
    if len(ds) == 0:
        raise TaskError(f"{where}: {empty}")
    return ds


def load_split(spec: TaskSpec, split: str):
    """Load one split ("train" or "validation") of a task as a `datasets.Dataset`.

    Raises:
        TaskError: the file is missing or unreadable (see `load_file`), the Hub dataset cannot be
            loaded, or the split is empty.
    """
    import datasets

    where = f"task {spec.name!r}, split {split}"
    empty = "the split is empty; give it data or remove the task"
    if spec.files is not None:
        path = spec.files[split]
        if not Path(path).is_file():
            raise TaskError(f"{where}: file {path} does not exist; fix 'files' in the tasks file")
        return load_file(path, split, where=where, empty=empty)
    try:
        ds = datasets.load_dataset(spec.hub, spec.hub_config, split=spec.splits.get(split, split))
    except Exception as e:  # noqa: BLE001 - the loaders raise many types; one line with the fix
        source = f"Hub dataset {spec.hub}" + (f" ({spec.hub_config})" if spec.hub_config else "")
        raise TaskError(f"{where}: cannot load {source}: {_first_line(e)}; check the name, your network "
                        "(HF_HUB_OFFLINE) and that the split exists, or use local 'files' in a tasks file") from None
    if len(ds) == 0:
        raise TaskError(f"{where}: {empty}")
    return ds


def has_split(spec: TaskSpec, split: str) -> bool:
    return split in spec.files if spec.files is not None else split in spec.splits


def source_line(path: str | Path, row: int) -> int | None:
    """The line of `path` on which data row `row` (0-based) starts, counted as the loaders read
    the file: CSV/TSV after the header, with blank lines skipped and quoted fields spanning
    lines; JSON Lines one object per non-blank line. None for other formats or a short file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if suffix in (".csv", ".tsv"):
                _, kwargs = file_loader_args(str(path))
                reader = csv.reader(f, delimiter=kwargs.get("delimiter", ","), quoting=kwargs.get("quoting", csv.QUOTE_MINIMAL))
                records, start = -1, 0  # the header is record -1
                for fields in reader:
                    if fields:
                        if records == row:
                            return start + 1
                        records += 1
                    start = reader.line_num
                return None
            if suffix in (".jsonl", ".json"):
                records = 0
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    if records == 0 and line.lstrip().startswith("["):
                        return None  # one JSON document, not JSON Lines
                    if records == row:
                        return number
                    records += 1
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    return None


def _row(spec: TaskSpec, split: str, row: int) -> str:
    """`task 'x', split train, line 12 of FILE` (or `row 11` where lines do not apply)."""
    where = f"task {spec.name!r}, split {split}"
    path = spec.files.get(split) if spec.files else None
    line = source_line(path, row) if path else None
    return f"{where}, line {line} of {path}" if line else f"{where}, row {row + 1}" + (f" of {path}" if path else "")


# ------------------------------------------------------------------------------ checks and labels
def _column_names(spec: TaskSpec) -> list[tuple[str, str]]:
    out = []
    for role, col in spec.columns.items():
        for c in col if isinstance(col, list) else [col]:
            out.append((role, c))
    return out


def check_columns(spec: TaskSpec, split: str, ds) -> None:
    """Raises TaskError if a declared column is missing from the split."""
    for role, col in _column_names(spec):
        if col not in ds.column_names:
            raise TaskError(
                f"task {spec.name!r}, split {split}: column {col!r} (role '{role}') not found; "
                f"the data has {', '.join(ds.column_names)}; set columns.{role} in the tasks file"
            )


def input_columns(spec: TaskSpec) -> list[tuple[str, str]]:
    """(role, column) of every declared column the model reads (all but the type's label columns)."""
    return [(role, col) for role, col in _column_names(spec) if role not in spec.task_type.label_columns]


def missing_input(spec: TaskSpec, ds) -> tuple[int, str, str] | None:
    """(row, column, role) of the first row with no value (null) in an input column, or None."""
    for role, col in input_columns(spec):
        row = next((i for i, v in enumerate(ds[col]) if v is None), None)
        if row is not None:
            return row, col, role
    return None


def check_values(spec: TaskSpec, split: str, ds) -> None:
    """Refuse rows that would train silently but wrong, naming the row's file and line.

    Runs before the labels are resolved, so an empty cell never becomes a class named ''.

    Raises:
        TaskError: a missing value in a declared column, a missing or empty label, a regression
            target that is not a finite number, or a token row whose tags do not match its tokens.
    """
    missing = missing_input(spec, ds)
    if missing is not None:
        row, col, role = missing
        raise TaskError(f"{_row(spec, split, row)}: no value in column {col!r} (role {role!r}); fill it in or remove the row")
    found = spec.task_type.first_label_problem(spec, ds)
    if found is not None:
        row, problem = found
        raise TaskError(f"{_row(spec, split, row)}: {problem}")


def resolve_labels(spec: TaskSpec, train_ds) -> TaskSpec:
    """`spec` with its label names filled in from the declaration or the train split (the type's rule).

    Raises:
        TaskError: the train split cannot define the labels (one class only, num_labels that
            disagrees, too few choices: see the type's `resolve_labels`).
    """
    return spec.task_type.resolve_labels(spec, train_ds)


def check_labels(spec: TaskSpec, split: str, ds) -> None:
    """Check a split's labels against the resolved label set (after `check_values`).

    Raises:
        TaskError: a label outside the label set, or one the type cannot take (see its `check_labels`).
    """
    spec.task_type.check_labels(spec, split, ds)


# ------------------------------------------------------------------------------ tokenization
def tokenize(spec: TaskSpec, ds, tokenizer, max_length: int, *, with_labels: bool = True):
    """Tokenize a split with `datasets.map` (batched, cached); keeps only model inputs and `labels`.

    Raises:
        TaskError: a tokenizer the type cannot use (token classification needs a fast one).
    """
    task_type = spec.task_type
    task_type.check_tokenizer(spec, tokenizer)
    return ds.map(
        lambda batch: task_type.encode(spec, batch, tokenizer, max_length, with_labels),
        batched=True,
        remove_columns=ds.column_names,
        desc=f"Tokenizing {spec.name}",
    )


def example_lengths(ds) -> np.ndarray:
    """Token count of each example (the longest choice for multiple choice)."""
    ids = ds["input_ids"]
    return np.asarray([max(len(c) for c in x) if x and isinstance(x[0], list) else len(x) for x in ids])


def make_collator(spec: TaskSpec, tokenizer, pad_to_multiple_of: int | None = None, *, stage: str = "train"):
    """The task type's dynamic-padding collator (pads each batch to its longest example) for
    `stage`: "train", "eval" or "predict"."""
    task_type = spec.task_type
    make = {"train": task_type.collator, "eval": task_type.eval_collator, "predict": task_type.predict_collator}[stage]
    return make(tokenizer, pad_to_multiple_of)


# ------------------------------------------------------------------------------ per-task bundle
@dataclass
class TaskData:
    """A task's resolved spec, tokenized splits and collators (evaluation's, when it differs from
    training's: see `TaskType.eval_collator`)."""

    spec: TaskSpec
    train: Any | None
    validation: Any | None
    collator: Any
    eval_collator: Any | None = None

    @property
    def name(self) -> str:
        return self.spec.name


def load_task(spec: TaskSpec, *, need_train: bool = True, max_train: int | None = None,
              max_eval: int | None = None) -> tuple[TaskSpec, dict[str, Any]]:
    """Load and check a task's raw splits; returns the spec with labels resolved and the splits.

    Raises:
        TaskError: on any data problem (see `load_split`, `check_columns`, `check_values`,
            `resolve_labels`, `check_labels`).
    """
    raw: dict[str, Any] = {}
    wanted = (["train"] if need_train else []) + (["validation"] if has_split(spec, "validation") else [])
    if need_train and not has_split(spec, "train"):
        raise TaskError(f"task {spec.name!r}: no train split; add files.train to the tasks file")
    for split in wanted:
        ds = load_split(spec, split)
        limit = max_train if split == "train" else max_eval
        if limit is not None and len(ds) > limit:
            ds = ds.select(range(limit))
        check_columns(spec, split, ds)
        check_values(spec, split, ds)
        raw[split] = ds
    if "train" in raw:
        spec = resolve_labels(spec, raw["train"])
    elif spec.task_type.has_label_set and spec.labels is None:
        raise TaskError(f"task {spec.name!r}: 'labels' must be declared when there is no train split to read them from")
    for split, ds in raw.items():
        check_labels(spec, split, ds)
    return spec, raw


# ------------------------------------------------------------------------------ multitask dataset
class MultitaskDataset(torch.utils.data.Dataset):
    """The tasks' datasets laid end to end; item i is (task index, example)."""

    def __init__(self, datasets: list[Any]):
        self.datasets = datasets
        self.sizes = [len(d) for d in datasets]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> tuple[int, dict]:
        task = bisect.bisect_right(self.offsets, index) - 1
        return task, self.datasets[task][index - self.offsets[task]]


class MultitaskCollator:
    """Collates a one-task batch with that task's collator and tags it with the task name."""

    def __init__(self, names: list[str], collators: list[Any]):
        self.names, self.collators = names, collators

    def __call__(self, items: list[tuple[int, dict]]) -> dict:
        task = items[0][0]
        if any(t != task for t, _ in items):
            raise RuntimeError("a batch mixes tasks: the batch sampler must yield one task per batch")
        batch = dict(self.collators[task]([example for _, example in items]))
        batch["task"] = self.names[task]
        return batch

"""Task declarations: name, type, data source, columns, labels and metrics, read into `TaskSpec`s.

Adding a dataset means adding a declaration (a preset in `presets`, or an entry in a tasks
file), never touching the data, model or metric code. Everything that depends on the task type
is in its module under `types`, which `TaskSpec.task_type` returns.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, not_utf8
from .errors import TaskError
from .metrics import METRICS
from .presets import PRESETS
from .types import TASK_TYPES, TaskType
from .types.base import TYPE_OPTIONS

FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
QUOTING = ("none", "minimal", "all", "nonnumeric")  # the csv module's QUOTE_* constants, by name

# How the files are read, and the file types each option applies to. The defaults are those of the
# suffix: .tsv tab-delimited with quoting off (GLUE's quote characters are text), .csv comma-delimited
# with minimal quoting, every text file UTF-8 (checked before loading), a header line in .csv/.tsv.
READER_OPTIONS = {
    "header": (".csv", ".tsv"),
    "column_names": (".csv", ".tsv"),
    "delimiter": (".csv", ".tsv"),
    "quoting": (".csv", ".tsv"),
    "encoding": (".csv", ".tsv", ".jsonl", ".json"),
    "records": (".jsonl", ".json"),
}
_READER_DEFAULTS = {"header": True, "column_names": None, "delimiter": None, "quoting": None, "encoding": None,
                        "records": None}
# Keys added after the first saved format, left out of `to_dict` at their defaults (see there).
_LATER_DEFAULTS = {**_READER_DEFAULTS, "unanswerable": None, "stride": None, "max_answer_length": None, "threshold": None,
                   "loss_weight": 1.0}


@dataclass(frozen=True)
class TaskSpec:
    """One task. `columns` maps roles (text, text_pair, question, choices, tokens, label) to column names.

    Data comes from `hub` (a Hub dataset id, with `hub_config` naming its configuration) or
    `files` ({split: path}); `splits`
    names the train/validation splits in that source. A column may be a dotted path into nested
    objects (`question.stem`): the loaded split gets a column of that name (see `data.add_path_columns`).

    How `files` are read (`data.ReaderOptions` holds them for the readers): `header` (False: a
    .csv/.tsv whose first line is data), `column_names` (the names of a headerless file's
    columns; without them "0", "1", …), `delimiter`, `quoting` (a `QUOTING` name), `encoding`
    (None: UTF-8) and `records` (the dotted path of nested lists whose innermost elements are the
    rows of a JSON document, e.g. SQuAD's `data.paragraphs.qas`). None: the file suffix's default.
    """

    name: str
    type: str
    columns: dict[str, Any]
    hub: str | None = None
    hub_config: str | None = None
    files: dict[str, str] | None = None
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "validation": "validation"})
    labels: tuple[str, ...] | None = None
    num_labels: int | None = None
    metrics: tuple[str, ...] = ()
    batch_size: int | None = None
    max_length: int | None = None
    special_tokens: tuple[str, ...] = ()  # added to the tokenizer (e.g. a separator), besides SPECIAL_TOKENS
    separator: str | None = None  # generation types: the text between the prompt and the target (e.g. <sep>)
    unanswerable: bool | None = None  # extractive_qa: rows may have no answer (SQuAD 2.0)
    stride: int | None = None  # extractive_qa: tokens shared by consecutive windows of a long context
    max_answer_length: int | None = None  # extractive_qa: the longest answer span, in tokens
    header: bool = True  # .csv/.tsv: the first line names the columns (False: it is the first row)
    column_names: tuple[str, ...] | None = None  # a headerless file's columns (None: "0", "1", …)
    delimiter: str | None = None  # .csv/.tsv, one character (None: tab for .tsv, comma for .csv)
    quoting: str | None = None  # .csv/.tsv, a QUOTING name (None: none for .tsv, minimal for .csv)
    encoding: str | None = None  # text files (None: UTF-8, checked before loading)
    records: str | None = None  # .json/.jsonl: the dotted path of nested lists whose elements are the rows
    threshold: float | None = None  # types with a default_threshold (multi_label): a label is predicted at p >= threshold
    loss_weight: float = 1.0  # times this task's training loss (what the optimizer minimises); not a sampling weight

    @property
    def task_type(self) -> TaskType:
        return TASK_TYPES[self.type]

    @property
    def primary_metric(self) -> str:
        """The first listed metric: the task's one number in the macro average that picks the best checkpoint."""
        return self.metrics[0]

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON values. Keys added since the first format (reader and type
        options) are left out at their defaults: a declaration without them is written (and
        hashed into a run's identity, so a run resumes across versions) as before they existed,
        and older versions can still read it."""
        d = dataclasses.asdict(self)
        d["labels"] = list(self.labels) if self.labels is not None else None
        d["metrics"] = list(self.metrics)
        d["special_tokens"] = list(self.special_tokens)
        d["column_names"] = list(self.column_names) if self.column_names is not None else None
        for key, default in _LATER_DEFAULTS.items():
            if d[key] == default:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskSpec:
        """The spec `to_dict` wrote (a saved model's multitask.json); keys it lacks take their defaults."""
        d = dict(d)
        for key in ("labels", "metrics", "special_tokens", "column_names"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)

    def with_labels(self, labels: list[str]) -> TaskSpec:
        return dataclasses.replace(self, labels=tuple(labels), num_labels=len(labels))


_SPEC_KEYS = {f.name for f in dataclasses.fields(TaskSpec)} | {"preset"}


def _where(source: str, name: str) -> str:
    return f"task {name!r} in {source}" if source else f"task {name!r}"


def build_spec(raw: dict[str, Any], *, source: str = "", base_dir: Path | None = None) -> TaskSpec:
    """Validate one declaration (a dict from a tasks file or a preset) into a TaskSpec.

    A declaration may start from a preset (`preset: rte`) and override any field; `columns`
    overrides merge into the preset's. Relative file paths resolve against `base_dir`.

    Raises:
        TaskError: unknown key, type, metric, preset or column role; a bad source or label list; a
            'threshold' outside (0, 1) or on a type that takes none; a 'loss_weight' that is not a
            positive finite number.
    """
    name = raw.get("name")
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise TaskError(f"a task in {source or 'the task list'} has a bad or missing name {name!r}: use letters, digits, '_' or '-'")
    where = _where(source, name)
    unknown = sorted(set(raw) - _SPEC_KEYS)
    if unknown:
        raise TaskError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_SPEC_KEYS))}")
    merged: dict[str, Any] = {}
    if "preset" in raw:
        if raw["preset"] not in PRESETS:
            raise TaskError(f"{where}: unknown preset {raw['preset']!r}; presets: {', '.join(PRESETS)}")
        merged = json.loads(json.dumps(PRESETS[raw["preset"]]))
        if "files" in raw:
            merged.pop("hub", None)
            merged.pop("hub_config", None)
    for key, value in raw.items():
        if key == "columns" and isinstance(value, dict):
            merged["columns"] = {**merged.get("columns", {}), **value}
        elif key != "preset":
            merged[key] = value
    merged["name"] = name

    type_name = merged.get("type")
    if type_name not in TASK_TYPES:
        raise TaskError(f"{where}: unknown task type {type_name!r}; use one of {', '.join(TASK_TYPES)}")
    task_type = TASK_TYPES[type_name]

    columns = merged.get("columns") or {}
    if not isinstance(columns, dict):
        raise TaskError(f"{where}: 'columns' must map roles to column names, e.g. {{text: sentence, label: label}}")
    allowed = set(task_type.required_columns) | set(task_type.optional_columns)
    bad_roles = sorted(set(columns) - allowed)
    if bad_roles:
        raise TaskError(f"{where}: column role(s) {', '.join(bad_roles)} do not apply to type {type_name}; "
                        f"roles: {', '.join(sorted(allowed))}")
    columns = {**{r: r for r in task_type.required_columns if r not in columns}, **columns}

    hub, files = merged.get("hub"), merged.get("files")
    if (hub is None) == (files is None):
        raise TaskError(f"{where}: give exactly one data source: 'hub: dataset' (with 'hub_config') or 'files: {{train: path, validation: path}}'")
    splits = {"train": "train", "validation": "validation", **(merged.get("splits") or {})}
    if files is not None:
        if not isinstance(files, dict) or "train" not in files:
            raise TaskError(f"{where}: 'files' must map splits to paths and include 'train'")
        resolved = {}
        for split, path in files.items():
            p = Path(path).expanduser()
            if not p.is_absolute() and base_dir is not None:
                # Absolute (normalized, links kept): a saved model keeps these paths, and `evaluate`
                # may run in another folder than `train` did.
                p = Path(os.path.abspath(base_dir / p))
            if p.suffix.lower() not in FILE_FORMATS:
                raise TaskError(f"{where}, split {split}: unsupported file type {p.name!r}; use {', '.join(FILE_FORMATS)}")
            resolved[split] = str(p)
        files = resolved
        splits = {s: s for s in files}

    reader = _reader_options(merged, where, files)
    columns = _positions_named(columns, reader, where)

    labels = merged.get("labels")
    num_labels = merged.get("num_labels")
    if labels is not None:
        if not isinstance(labels, list) or not labels or len({str(x) for x in labels}) != len(labels):
            raise TaskError(f"{where}: 'labels' must be a non-empty list of distinct label names")
        labels = tuple(str(x) for x in labels)
        if num_labels is not None and num_labels != len(labels):
            raise TaskError(f"{where}: num_labels={num_labels} but {len(labels)} labels are listed; make them agree")
    if num_labels is not None and (not isinstance(num_labels, int) or num_labels < 1):
        raise TaskError(f"{where}: num_labels must be a positive integer, got {num_labels!r}")
    task_type.check_declaration(where, labels, num_labels)

    metrics = tuple(merged.get("metrics") or task_type.default_metrics)
    unknown_metrics = [m for m in metrics if m not in METRICS]
    if unknown_metrics:
        raise TaskError(f"{where}: unknown metric(s) {', '.join(unknown_metrics)}; available: {', '.join(METRICS)}")
    foreign = [m for m in metrics if m not in task_type.metrics]
    if foreign:
        raise TaskError(f"{where}: metric(s) {', '.join(foreign)} do not apply to type {type_name}; "
                        f"use {', '.join(task_type.metrics)}")

    special = merged.get("special_tokens") or []
    if not isinstance(special, list) or not all(isinstance(t, str) and t.strip() and t == t.strip() for t in special):
        raise TaskError(f"{where}: 'special_tokens' must be a list of tokens without spaces around them, e.g. [\"<sep>\"]")

    separator = merged.get("separator")
    if separator is not None and (not isinstance(separator, str) or not separator):
        raise TaskError(f"{where}: 'separator' must be a non-empty text, e.g. \"<sep>\" (declare it in special_tokens too)")

    threshold = merged.get("threshold")
    if threshold is not None:
        if task_type.default_threshold is None:
            takes = [n for n, t in TASK_TYPES.items() if t.default_threshold is not None]
            raise TaskError(f"{where}: 'threshold' applies to type(s) {', '.join(takes)}, not to type {type_name}; remove it")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
            raise TaskError(f"{where}: 'threshold' must be a number between 0 and 1 (both excluded), e.g. 0.5; got {threshold!r}")

    loss_weight = merged.get("loss_weight")
    loss_weight = 1.0 if loss_weight is None else loss_weight
    if isinstance(loss_weight, bool) or not isinstance(loss_weight, (int, float)) or not math.isfinite(loss_weight) \
            or loss_weight <= 0:
        raise TaskError(f"{where}: 'loss_weight' must be a positive finite number (it multiplies the task's training "
                        f"loss), e.g. 2.0; got {loss_weight!r}")

    for key in ("batch_size", "max_length", "stride", "max_answer_length"):
        value = merged.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise TaskError(f"{where}: {key} must be a positive integer, got {value!r}")
    unanswerable = merged.get("unanswerable")
    if unanswerable is not None and not isinstance(unanswerable, bool):
        raise TaskError(f"{where}: unanswerable must be true or false, got {unanswerable!r}")

    spec = TaskSpec(
        name=name, type=type_name, columns=columns, hub=hub, hub_config=merged.get("hub_config"), files=files, splits=splits, labels=labels,
        num_labels=num_labels if num_labels is not None else task_type.default_num_labels(),
        metrics=metrics, batch_size=merged.get("batch_size"), max_length=merged.get("max_length"),
        special_tokens=tuple(special), separator=separator, unanswerable=unanswerable,
        stride=merged.get("stride"), max_answer_length=merged.get("max_answer_length"), **reader,
        threshold=float(threshold) if threshold is not None else task_type.default_threshold, loss_weight=float(loss_weight),
    )
    for key in TYPE_OPTIONS:
        if getattr(spec, key) is not None and key not in task_type.options:
            takers = [n for n, t in TASK_TYPES.items() if key in t.options]
            raise TaskError(f"{where}: '{key}' applies to type {' and '.join(takers)}, not to type {type_name}; remove it")
    task_type.check_spec(spec, where)
    return spec


def _reader_options(merged: dict[str, Any], where: str, files: dict[str, str] | None) -> dict[str, Any]:
    """The declared reader options (`READER_OPTIONS`), checked; those not declared are left out.

    Raises:
        TaskError: an option of a wrong type or value, or one that does not apply to the task's
            files (or to a Hub dataset).
    """
    options: dict[str, Any] = {}
    header = merged.get("header", True)
    if not isinstance(header, bool):
        raise TaskError(f"{where}: 'header' must be true or false, got {header!r}")
    if not header:
        options["header"] = False
    names = merged.get("column_names")
    if names is not None:
        if (not isinstance(names, list) or not names or not all(isinstance(n, (str, int)) and not isinstance(n, bool) for n in names)
                or len({str(n) for n in names}) != len(names) or not all(str(n).strip() for n in names)):
            raise TaskError(f"{where}: 'column_names' must be a list of distinct column names, one per column of the file, "
                            "e.g. [source, label, original_label, sentence]")
        if header:
            raise TaskError(f"{where}: 'column_names' names the columns of a file without a header line: add header: false "
                            "(a file with a header line is named by its header)")
        options["column_names"] = tuple(str(n) for n in names)
    delimiter = merged.get("delimiter")
    if delimiter is not None:
        if delimiter == "\\t":
            raise TaskError(f"{where}: 'delimiter' is a backslash and a t, not a tab; write \"\\t\" in double quotes")
        if not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in "\r\n\"":
            raise TaskError(f"{where}: 'delimiter' must be one character (not a quote or a line break), e.g. \"|\" or \";\", "
                            f"got {delimiter!r}")
        options["delimiter"] = delimiter
    quoting = merged.get("quoting")
    if quoting is not None:
        if quoting not in QUOTING:
            raise TaskError(f"{where}: 'quoting' must be one of {', '.join(QUOTING)}, got {quoting!r}")
        options["quoting"] = quoting
    encoding = merged.get("encoding")
    if encoding is not None:
        try:
            codecs.lookup(encoding if isinstance(encoding, str) else "")
        except LookupError:
            raise TaskError(f"{where}: 'encoding' {encoding!r} is not a text encoding Python knows; "
                            "use a codec name, e.g. latin-1, cp1252, utf-16") from None
        options["encoding"] = encoding
    records = merged.get("records")
    if records is not None:
        if not isinstance(records, str) or not all(p.strip() and p == p.strip() for p in records.split(".")):
            raise TaskError(f"{where}: 'records' must be a dotted path of the lists that hold the rows, from the "
                            f"document's top-level field, e.g. data.paragraphs.qas; got {records!r}")
        options["records"] = records
    for key in options:
        if files is None:
            raise TaskError(f"{where}: {key!r} applies to local 'files', not to a Hub dataset; remove it")
        other = next((Path(p).name for p in files.values() if Path(p).suffix.lower() not in READER_OPTIONS[key]), None)
        if other is not None:
            raise TaskError(f"{where}: {key!r} applies to {', '.join(READER_OPTIONS[key])} files, not to {other}; remove it")
    return options


def _positions_named(columns: dict[str, Any], reader: dict[str, Any], where: str) -> dict[str, Any]:
    """`columns` with the columns of a headerless file named: a position (0, 1, …) becomes its
    name in `column_names`, else the text of the position ("0", "1", …), the names the loader gives.

    Raises:
        TaskError: a position in a file with a header line, a position out of range, or a name
            that a headerless file does not have.
    """
    header, names = reader.get("header", True), reader.get("column_names")

    def named(role: str, col: Any) -> Any:
        if isinstance(col, list):
            return [named(role, c) for c in col]
        if isinstance(col, int) and not isinstance(col, bool):
            if header:
                raise TaskError(f"{where}: columns.{role} is {col}, a position: positions name the columns of a file without "
                                "a header line (header: false); give the header's column name")
            if col < 0 or (names is not None and col >= len(names)):
                span = f"0 to {len(names) - 1}, the columns of column_names" if names is not None else "0, 1, …"
                raise TaskError(f"{where}: columns.{role} is position {col}; positions count from 0 ({span})")
            return names[col] if names is not None else str(col)
        if not isinstance(col, str) or not col:
            raise TaskError(f"{where}: columns.{role} must be a column name (or a list of them), got {col!r}")
        if not header:
            if names is not None and col not in names:
                raise TaskError(f"{where}: columns.{role} is {col!r}, not one of column_names ({', '.join(names)}); "
                                "name one of them or give its position (0, 1, …)")
            if names is None and not col.isdigit():
                raise TaskError(f"{where}: columns.{role} is {col!r}, but a file without a header line (header: false) has no "
                                "column names: add column_names: [...] or give the column's position (0, 1, …)")
        return col

    return {role: named(role, col) for role, col in columns.items()}


def read_tasks_file(path: str | Path) -> dict[str, TaskSpec]:
    """Read a YAML or JSON tasks file: a list of declarations, or {tasks: [...]}.

    Raises:
        TaskError: the file is not UTF-8, does not parse, or a declaration is invalid.
    """
    path = Path(path)
    problem = not_utf8(path)
    if problem:
        raise TaskError(f"tasks file {path} is not UTF-8 text ({problem}); save it as UTF-8")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parser error becomes one line
        raise TaskError(f"tasks file {path} does not parse: {str(e).splitlines()[0]}") from None
    if isinstance(data, dict):
        data = data.get("tasks")
    if not isinstance(data, list):
        raise TaskError(f"tasks file {path}: expected a list of tasks (or 'tasks: [...]')")
    specs: dict[str, TaskSpec] = {}
    for raw in data:
        if not isinstance(raw, dict):
            raise TaskError(f"tasks file {path}: every task must be a mapping, got {raw!r}")
        spec = build_spec(raw, source=str(path), base_dir=path.parent)
        if spec.name in specs:
            raise TaskError(f"tasks file {path}: task {spec.name!r} is declared twice")
        specs[spec.name] = spec
    return specs


def resolve_tasks(cfg: Config) -> list[TaskSpec]:
    """The TaskSpecs named by TASKS, from TASKS_FILE first, then presets, in TASKS order.

    Raises:
        ConfigError: a name in TASKS is neither in the tasks file nor a preset.
        TaskError: a declaration is invalid.
    """
    declared = read_tasks_file(cfg.tasks_file) if cfg.tasks_file else {}
    specs = []
    for name in cfg.tasks:
        if name in declared:
            specs.append(declared[name])
        elif name in PRESETS:
            specs.append(build_spec(PRESETS[name], source="presets"))
        else:
            known = sorted(set(declared) | set(PRESETS))
            raise ConfigError(f"TASKS names unknown task {name!r}: declare it in TASKS_FILE or use one of {', '.join(known)}")
    return specs

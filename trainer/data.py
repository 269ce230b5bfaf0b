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
from .tasks.spec import QUOTING

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ loading
TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
QUOTE = {"none": csv.QUOTE_NONE, "minimal": csv.QUOTE_MINIMAL, "all": csv.QUOTE_ALL, "nonnumeric": csv.QUOTE_NONNUMERIC}
assert set(QUOTE) == set(QUOTING)


@dataclass(frozen=True)
class ReaderOptions:
    """How one data file is read. The loader and every helper that reads the file again (the
    line of a row in a message, the first line, a ragged row) take the same object, so that a
    message's line is the line the loader read. Made by `ReaderOptions.for_file`."""

    suffix: str  # ".csv", ".tsv", ".jsonl", ".json" or ".parquet"
    delimiter: str = ","
    quoting: int = csv.QUOTE_MINIMAL  # a csv.QUOTE_* constant
    encoding: str | None = None  # None: UTF-8, checked before loading
    header: bool = True  # .csv/.tsv: the first line names the columns
    column_names: tuple[str, ...] | None = None  # a headerless file's columns (None: "0", "1", …)
    records: str | None = None  # .json/.jsonl: the dotted path of the lists that hold the rows

    @classmethod
    def for_file(cls, path: str | Path, spec: TaskSpec | None = None) -> ReaderOptions:
        """The options of `path`: the task's declared ones, the file suffix's defaults for the
        rest (all of them without `spec`: how `predict` reads its inputs)."""
        suffix = Path(path).suffix.lower()
        tsv = suffix == ".tsv"
        # GLUE TSV files contain quote characters inside sentences: read them with quoting off.
        quoting = (spec.quoting if spec is not None else None) or ("none" if tsv else "minimal")
        if spec is None:
            return cls(suffix=suffix, delimiter="\t" if tsv else ",", quoting=QUOTE[quoting])
        return cls(suffix=suffix, delimiter=spec.delimiter or ("\t" if tsv else ","), quoting=QUOTE[quoting],
                   encoding=spec.encoding, header=spec.header, column_names=spec.column_names, records=spec.records)

    @property
    def tabular(self) -> bool:
        return self.suffix in (".csv", ".tsv")

    @property
    def text(self) -> bool:
        return self.suffix in TEXT_SUFFIXES

    def open(self, path: str | Path):
        """The file as text, as the csv module reads it (newline="")."""
        return open(path, encoding=self.encoding or "utf-8", newline="")

    def csv_reader(self, f):
        # QUOTE_NONNUMERIC only makes the csv module turn unquoted fields into floats (and fail on
        # a text): the fields and the lines split as with minimal quoting.
        quoting = csv.QUOTE_MINIMAL if self.quoting == csv.QUOTE_NONNUMERIC else self.quoting
        return csv.reader(f, delimiter=self.delimiter, quoting=quoting)

    def loader_args(self, names: list[str] | None = None) -> tuple[str, dict[str, Any]]:
        """The `datasets` builder and its arguments; `names`: a headerless file's column names."""
        if self.tabular:
            kwargs: dict[str, Any] = {"delimiter": self.delimiter, "quoting": self.quoting, "na_filter": False}
            if self.encoding:
                kwargs["encoding"] = self.encoding
            if not self.header:
                kwargs.update(header=None, column_names=list(names or self.column_names or ()))
            return "csv", kwargs
        if self.suffix in (".jsonl", ".json"):
            return "json", {"encoding": self.encoding} if self.encoding else {}
        return "parquet", {}


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and what it was raised from or during, outermost first."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _csv_records(f, reader: ReaderOptions):
    """(line, fields) of each record of an open CSV/TSV file, counted as the loaders count them:
    blank lines skipped, a quoted field spanning lines; `line` is where the record starts."""
    rows = reader.csv_reader(f)
    start = 0
    for fields in rows:
        if fields:
            yield start + 1, fields
        start = rows.line_num


def first_record(path: str | Path, reader: ReaderOptions) -> tuple[int, list[str]] | None:
    """(line, fields) of the first record of a CSV/TSV file (its header, if it has one); None if
    it has none or cannot be read."""
    try:
        with reader.open(path) as f:
            return next(_csv_records(f, reader), None)
    except (OSError, UnicodeError, csv.Error):
        return None


def _width_source(reader: ReaderOptions) -> str:
    return "the header" if reader.header else "column_names" if reader.column_names else "the first line"


def _ragged_row(path: Path, reader: ReaderOptions) -> tuple[int, int, int] | None:
    """(line, fields, width) of the first CSV/TSV record with more fields than the file's width
    (its header's, column_names', or a headerless file's first line's): the loader fills a
    shorter row's missing fields with '' (see `check_values`) but cannot place a longer one."""
    width = len(reader.column_names) if not reader.header and reader.column_names else None
    with reader.open(path) as f:
        for line, fields in _csv_records(f, reader):
            if width is None:
                width = len(fields)
            elif len(fields) > width:
                return line, len(fields), width
    return None


def _bad_json_line(path: Path, reader: ReaderOptions) -> str | None:
    """What is wrong with the first line of a JSON Lines file that is not one JSON object."""
    with reader.open(path) as f:
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


def _is_blank(path: Path, reader: ReaderOptions) -> bool:
    with open(path, encoding=reader.encoding or "utf-8", errors="replace") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _load_problem(path: Path, error: BaseException, reader: ReaderOptions) -> str:
    """Why a loader could not read `path`, with the fix (the file is UTF-8: see `load_file`)."""
    width_source = _width_source(reader)
    try:
        if reader.tabular:
            ragged = _ragged_row(path, reader)
            if ragged:
                line, fields, width = ragged
                return f"line {line} has {fields} fields where {width_source} has {width}; fix that row ({_ragged_hint(reader)})"
        if reader.suffix in (".jsonl", ".json") and not reader.records:
            bad = _bad_json_line(path, reader)
            if bad:
                return bad
    except (OSError, UnicodeError, csv.Error):
        pass
    root = _causes(error)[-1]
    found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(root))  # pandas' ParserError
    if found:
        return f"line {found[2]} has {found[3]} fields where {width_source} has {found[1]}; fix that row"
    if isinstance(root, UnicodeError) and reader.encoding:
        return f"it is not {reader.encoding} text ({_first_line(root)}); fix 'encoding' in the tasks file"
    return f"{_first_line(root)}; check the file's format and columns"


def _ragged_hint(reader: ReaderOptions) -> str:
    if reader.quoting == csv.QUOTE_NONE:
        return "a TSV field cannot hold a tab" if reader.delimiter == "\t" else f"a field cannot hold the delimiter {reader.delimiter!r}"
    return "quote a field that holds a comma" if reader.delimiter == "," else f"quote a field that holds the delimiter {reader.delimiter!r}"


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


def load_file(path: str | Path, split: str, *, where: str, empty: str, reader: ReaderOptions | None = None,
              utf8_fix: str = "save it as UTF-8"):
    """Load one data file (.csv, .tsv, .jsonl, .json, .parquet) as a `datasets.Dataset`.

    `where` starts every message (e.g. "task 'rte', split train"); `empty` is the message for a
    file without rows; `reader`: how to read it (default: the suffix's defaults); `utf8_fix`: the
    fix for a file that is not UTF-8. The loaders say only "An error occurred while generating
    the dataset": the message names the cause, the line and the fix.

    Raises:
        TaskError: the file is not UTF-8 text (unless `reader.encoding` is declared), does not
            parse (the line and the fix), its `records` path does not lead to rows (see
            `record_rows`), or it has no rows.
    """
    import datasets

    path = Path(path)
    reader = reader or ReaderOptions.for_file(path)
    # Checked first: a JSON loader may read invalid UTF-8 without complaint and fail later.
    problem = not_utf8(path) if reader.text and reader.encoding is None else None
    if problem:
        raise TaskError(f"{where}: cannot load {path}: it is not UTF-8 text ({problem}); {utf8_fix}")
    if reader.text and _is_blank(path, reader):
        raise TaskError(f"{where}: {empty}")
    if reader.records:
        return _load_records(path, reader, where=where, empty=empty)
    names = None
    if reader.tabular and not reader.header and not reader.column_names:
        first = first_record(path, reader)
        names = [str(i) for i in range(len(first[1]) if first else 1)]  # the positions, as `columns` names them
    builder, kwargs = reader.loader_args(names)
    try:
        with _quiet_datasets_errors():
            ds = datasets.load_dataset(builder, data_files={split: str(path)}, split=split, **kwargs)
    except Exception as e:  # noqa: BLE001 - the loaders raise many types; one line with the fix
        first = " ".join(_first_line(c) for c in _causes(e))
        if "corresponds to no data" in first or "No columns to parse" in first:
            raise TaskError(f"{where}: {empty}") from None
        raise TaskError(f"{where}: cannot load {path}: {_load_problem(path, e, reader)}") from None
    if reader.tabular and "__index_level_0__" in ds.column_names:
        # pandas makes the extra leading fields of a first row longer than the header an index:
        # every field would land in the column to its right.
        ragged = _ragged_row(path, reader)
        if ragged:
            line, fields, width = ragged
            raise TaskError(f"{where}: cannot load {path}: line {line} has {fields} fields where {_width_source(reader)} has "
                            f"{width}; fix that row ({_ragged_hint(reader)})")
    if len(ds) == 0:
        raise TaskError(f"{where}: {empty}")
    return ds


# ------------------------------------------------------------------------------ records of a JSON document
def _json_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a text"
    if isinstance(value, bool):
        return "true/false"
    return "null" if value is None else "a number"


def record_rows(document: Any, records: str) -> list[dict[str, Any]]:
    """The rows of `records` in one parsed JSON document (see `record_places`)."""
    return [row for _, row in record_places(document, records)]


def record_places(document: Any, records: str) -> list[tuple[str, dict[str, Any]]]:
    """The rows that `records` (a dotted path of nested lists, from a key of the top-level
    object) reaches in one parsed JSON document: one per element of the innermost list, holding
    that element's fields under their own names and the fields of every object around it under
    `<list>.<field>`, the list being the one that holds that object (`paragraphs.context`,
    `data.title`). The top-level object's own fields are not kept. Each row comes with its place
    in the document (`data[3].paragraphs[0].qas[2]`), which messages name it by.

    Raises:
        TaskError: the path does not lead to lists of objects; the message (without the task)
            says what is there, e.g. "'data[0]' has no field 'paragraph'; it has paragraphs, title".
    """
    keys = records.split(".")
    rows: list[tuple[str, dict[str, Any]]] = []
    if not isinstance(document, dict):
        raise TaskError(f"the document is {_json_kind(document)}, not an object with field {keys[0]!r}")

    def descend(obj: dict, name: str, depth: int, around: dict[str, Any]) -> None:
        key = keys[depth]
        if key not in obj:
            fields = ", ".join(sorted(obj)) or "no fields"
            raise TaskError(f"{repr(name) if name else 'the document'} has no field {key!r}; it has {fields}")
        held, here = obj[key], f"{name}.{key}" if name else key
        if not isinstance(held, list):
            raise TaskError(f"{here!r} holds {_json_kind(held)}, not a list of objects")
        for i, item in enumerate(held):
            if not isinstance(item, dict):
                raise TaskError(f"'{here}[{i}]' is {_json_kind(item)}, not an object")
            if depth == len(keys) - 1:
                rows.append((f"{here}[{i}]", {**item, **{k: v for k, v in around.items() if k not in item}}))
            else:
                inner = keys[depth + 1]
                descend(item, f"{here}[{i}]", depth + 1, {**around, **{f"{key}.{f}": v for f, v in item.items() if f != inner}})

    descend(document, "", 0, {})
    return rows


def _load_records(path: Path, reader: ReaderOptions, *, where: str, empty: str):
    """The rows `reader.records` reaches in a JSON document (or in each line of a JSON Lines file).

    Raises:
        TaskError: the file does not parse, the path does not lead to rows, or there are none.
    """
    import datasets
    import pyarrow as pa

    # The json builder reads the rows of a document from one top-level field at most (`field=`):
    # it cannot descend nested lists (SQuAD's data, then paragraphs, then qas), nor put the fields
    # of the objects around a row (a paragraph's context) into it. So the json module parses the
    # file and the rows become a dataset in memory.
    try:
        with open(path, encoding=reader.encoding or "utf-8") as f:
            text = f.read()
    except UnicodeError as e:
        raise TaskError(f"{where}: cannot load {path}: it is not {reader.encoding} text ({_first_line(e)}); "
                        "fix 'encoding' in the tasks file") from None
    documents: list[tuple[str, Any]] = []
    try:
        if reader.suffix == ".jsonl":
            for number, line in enumerate(text.split("\n"), 1):
                if line.strip():
                    at = f"line {number}"
                    documents.append((f"{at}: ", json.loads(line)))
        else:
            at = "the document"
            documents.append(("", json.loads(text)))
    except json.JSONDecodeError as e:
        place = f"at column {e.colno}" if reader.suffix == ".jsonl" else f"at line {e.lineno}, column {e.colno}"
        raise TaskError(f"{where}: cannot load {path}: {at} is not valid JSON ({e.msg} {place}); fix it") from None
    rows: list[dict[str, Any]] = []
    for prefix, document in documents:
        try:
            rows.extend(record_rows(document, reader.records))
        except TaskError as e:
            raise TaskError(f"{where}: records: {reader.records}: {prefix}{e}; fix 'records' for {path}") from None
    if not rows:
        raise TaskError(f"{where}: {empty}")
    # `from_list` takes its columns from the first row: every row gets every field (None where a
    # row has none, as SQuAD v2's plausible_answers, given for unanswerable questions only).
    fields = list(dict.fromkeys(k for row in rows for k in row))
    try:
        return datasets.Dataset.from_list([{k: row.get(k) for k in fields} for row in rows])
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise TaskError(f"{where}: cannot load {path}: the rows of records: {reader.records} do not make a table "
                        f"({_first_line(e)}); a field must hold values of one kind in every row") from None


# ------------------------------------------------------------------------------ splits
def load_split(spec: TaskSpec, split: str):
    """Load one split ("train" or "validation") of a task as a `datasets.Dataset`, read with the
    task's reader options, with a column for each declared dotted path (`add_path_columns`).

    Raises:
        TaskError: the file is missing or unreadable (see `load_file`), a headerless file starts
            with its header, the Hub dataset cannot be loaded, the split is empty, or a dotted
            column does not lead to a value (see `add_path_columns`).
    """
    import datasets

    where = f"task {spec.name!r}, split {split}"
    empty = "the split is empty; give it data or remove the task"
    if spec.files is not None:
        path = spec.files[split]
        if not Path(path).is_file():
            raise TaskError(f"{where}: file {path} does not exist; fix 'files' in the tasks file")
        reader = ReaderOptions.for_file(path, spec)
        ds = load_file(path, split, where=where, empty=empty, reader=reader,
                       utf8_fix="save it as UTF-8 or declare its encoding (e.g. encoding: latin-1)")
        if reader.tabular and not reader.header:
            _refuse_header_read_as_data(spec, where, path, reader)
    else:
        try:
            ds = datasets.load_dataset(spec.hub, spec.hub_config, split=spec.splits.get(split, split))
        except Exception as e:  # noqa: BLE001 - the loaders raise many types; one line with the fix
            source = f"Hub dataset {spec.hub}" + (f" ({spec.hub_config})" if spec.hub_config else "")
            raise TaskError(f"{where}: cannot load {source}: {_first_line(e)}; check the name, your network "
                            "(HF_HUB_OFFLINE) and that the split exists, or use local 'files' in a tasks file") from None
        if len(ds) == 0:
            raise TaskError(f"{where}: {empty}")
    return add_path_columns(ds, _column_names(spec), where=where, row_at=lambda row: _row(spec, split, row))


def has_split(spec: TaskSpec, split: str) -> bool:
    return split in spec.files if spec.files is not None else split in spec.splits


def source_line(path: str | Path, row: int, reader: ReaderOptions | None = None) -> int | None:
    """The line of `path` on which data row `row` (0-based) starts, counted as the loaders read
    the file (`reader`, default: the suffix's defaults): CSV/TSV after the header, if any, with
    blank lines skipped and quoted fields spanning lines; JSON Lines one object per non-blank
    line. None for other formats, rows built from `records`, or a short file.
    """
    path = Path(path)
    reader = reader or ReaderOptions.for_file(path)
    if reader.records:
        return None
    try:
        with reader.open(path) as f:
            if reader.tabular:
                first_row = 1 if reader.header else 0  # a headerless file's first record is row 0
                for record, (line, _) in enumerate(_csv_records(f, reader)):
                    if record == row + first_row:
                        return line
                return None
            if reader.suffix in (".jsonl", ".json"):
                records = 0
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    if records == 0 and line.lstrip().startswith("["):
                        return None  # one JSON document, not JSON Lines
                    if records == row:
                        return number
                    records += 1
    except (OSError, UnicodeError, csv.Error):
        return None
    return None


def record_place(path: str | Path, row: int, reader: ReaderOptions) -> str | None:
    """Where data row `row` (0-based) of a file read with `records` is: `data[3].paragraphs[0].qas[2]`
    in one JSON document, `line 4, paragraphs[0].qas[2]` in JSON Lines (None: no such row, or the
    file no longer reads). The file is parsed again: this is for messages, not for loading."""
    if not reader.records:
        return None
    try:
        with reader.open(path) as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()] if reader.suffix == ".jsonl" else None
            documents = ([(f"line {n}, ", json.loads(line)) for n, line in lines] if lines is not None
                         else [("", json.load(f))])
        seen = 0
        for prefix, document in documents:
            places = record_places(document, reader.records)
            if row < seen + len(places):
                return prefix + places[row - seen][0]
            seen += len(places)
    except (OSError, UnicodeError, json.JSONDecodeError, TaskError):
        return None
    return None


def _row(spec: TaskSpec, split: str, row: int) -> str:
    """`task 'x', split train, line 12 of FILE`, or `row 11 (data[0].paragraphs[1].qas[3])` in
    a file of `records`, or `row 11` where neither applies."""
    where = f"task {spec.name!r}, split {split}"
    path = spec.files.get(split) if spec.files else None
    reader = ReaderOptions.for_file(path, spec) if path else None
    line = source_line(path, row, reader) if path else None
    if line:
        return f"{where}, line {line} of {path}"
    place = record_place(path, row, reader) if path else None
    return f"{where}, row {row + 1}" + (f" ({place})" if place else "") + (f" of {path}" if path else "")


# ------------------------------------------------------------------------------ checks and labels
def _column_names(spec: TaskSpec) -> list[tuple[str, str]]:
    out = []
    for role, col in spec.columns.items():
        for c in col if isinstance(col, list) else [col]:
            out.append((role, c))
    return out


def _feature_kind(feature) -> str:
    """What a column (or a field of one) holds, in words, from its `datasets` feature."""
    if isinstance(feature, dict):
        return "an object"
    dtype = getattr(feature, "dtype", None)
    if isinstance(feature, (list, tuple)) or type(feature).__name__ in ("List", "LargeList", "Sequence"):
        return "a list"
    if dtype in ("string", "large_string"):
        return "a text"
    if dtype == "bool":
        return "true/false"
    if isinstance(dtype, str) and dtype.startswith(("int", "uint", "float", "decimal")):
        return "a number"
    return f"a {dtype or type(feature).__name__}"


def add_path_columns(ds, columns: list[tuple[str, str]], *, where: str, row_at, fix: str | None = None):
    """`ds` with a column for each dotted path among `columns` ((role, column) pairs) that is not
    a column itself, named exactly by the path: column `question.stem` holds, per row, field
    `stem` of the object in column `question`, so that the types and checks read it as any
    column. A literal column of that name wins; else the path descends from its longest leading
    part that is a column. A path whose first part is no column is left to `check_columns`.
    `row_at(row)` names a row in messages (`where`, the file and the line); `fix` ends a message
    about the structure (default: set columns.<role> to a field that is there).

    Raises:
        TaskError: a part of the path names no field of the object it descends into (the message
            lists the fields it has), the path descends into something other than an object, or
            a row holds null (or nothing) where the path needs an object.
    """
    for role, col in columns:
        if col in ds.column_names or "." not in col:
            continue
        parts = col.split(".")
        start = next((k for k in range(len(parts) - 1, 0, -1) if ".".join(parts[:k]) in ds.column_names), None)
        if start is None:
            continue
        top = ".".join(parts[:start])
        feature, here = ds.features[top], top
        for part in parts[start:]:
            if isinstance(feature, dict):
                if part not in feature:
                    fields = sorted(feature)
                    raise TaskError(f"{where}: column {col!r} (role {role!r}) not found: {here!r} holds an object with fields "
                                    f"{', '.join(fields)}; " + (fix or f"set columns.{role} to one of "
                                                                   f"{', '.join(f'{here}.{f}' for f in fields)}"))
                feature = feature[part]
            elif type(feature).__name__ == "Json":  # mixed kinds across rows: checked row by row below
                feature = None
            elif feature is not None:
                raise TaskError(f"{where}: column {col!r} (role {role!r}) not found: {here!r} holds {_feature_kind(feature)}, "
                                f"not an object with field {part!r}; " + (fix or f"set columns.{role} to a column of the data"))
            here = f"{here}.{part}"
        values = []
        for row, value in enumerate(ds[top]):
            here = top
            for part in parts[start:]:
                if not isinstance(value, dict):
                    found = "null (or nothing)" if value is None else _json_kind(value)
                    raise TaskError(f"{row_at(row)}: {here!r} holds {found} where column {col!r} (role {role!r}) needs an "
                                    "object; fill it in or remove the row")
                value, here = value.get(part), f"{here}.{part}"
            values.append(value)
        try:
            ds = ds.add_column(col, values, feature=feature)
        except (TypeError, ValueError) as e:  # pyarrow's ArrowInvalid and ArrowTypeError are ValueError and TypeError
            raise TaskError(f"{where}: column {col!r} (role {role!r}) holds values of different kinds across rows "
                            f"({_first_line(e)}); give it one kind in every row") from None
    return ds


def _value_like(field: str) -> bool:
    """A field that reads as a value, not as a column name: empty, a number, or a sentence."""
    text = field.strip()
    return not text or bool(re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text)) or len(text.split()) >= 4 or len(text) > 40


def _preview(fields: list[str]) -> str:
    return ", ".join(f if len(f) <= 24 else f[:23] + "…" for f in fields[:6]) + (", …" if len(fields) > 6 else "")


def _data_as_header(spec: TaskSpec, split: str) -> str | None:
    """Why the split's header line looks like data, with the fix; None when it looks like a
    header (or the file has none, or is not a CSV/TSV). The loader took the first line as the
    header: a declared column is then missing, and the first row of data is gone."""
    path = spec.files.get(split) if spec.files else None
    if path is None:
        return None
    reader = ReaderOptions.for_file(path, spec)
    first = first_record(path, reader) if reader.tabular and reader.header else None
    if first is None:
        return None
    line, fields = first
    declared = {c for _, c in _column_names(spec)}
    if any(f.strip() in declared for f in fields) or not any(_value_like(f) for f in fields):
        return None
    return (f"line {line} of {path} looks like data, not a header ({_preview(fields)}); if the file has no header line, "
            f"declare header: false with column_names: [...] naming its {len(fields)} columns "
            f"(or give the columns by position, 0 to {len(fields) - 1})")


def _refuse_header_read_as_data(spec: TaskSpec, where: str, path: str, reader: ReaderOptions) -> None:
    """Raises TaskError when a file declared headerless starts with a header: its first line
    equals column_names, or every field of it is a declared column name."""
    first = first_record(path, reader)
    if first is None:
        return
    line, fields = first
    fields = [f.strip() for f in fields]
    names = [n for n in {*(reader.column_names or ()), *(c for _, c in _column_names(spec))} if not n.isdigit()]
    if (reader.column_names and fields == list(reader.column_names)) or (names and all(f in names for f in fields)):
        raise TaskError(f"{where}: line {line} of {path} is a header ({_preview(fields)}), but the task declares header: false; "
                        "remove header: false (and column_names) so that the header names the columns")


def check_columns(spec: TaskSpec, split: str, ds) -> None:
    """Raises TaskError if a declared column is missing from the split; when the split's CSV/TSV
    file starts with a line that looks like data, the message says so, with the fix (header: false)."""
    for role, col in _column_names(spec):
        if col not in ds.column_names:
            where = f"task {spec.name!r}, split {split}: column {col!r} (role '{role}') not found"
            data_like = _data_as_header(spec, split)
            if data_like:
                raise TaskError(f"{where}: {data_like}")
            raise TaskError(f"{where}; the data has {', '.join(ds.column_names)}; set columns.{role} in the tasks file")


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

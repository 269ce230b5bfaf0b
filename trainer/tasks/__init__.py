"""Tasks: what a job trains on. `spec` reads declarations (a tasks file, a preset from
`presets`) into `TaskSpec`s; `types` holds one module per task type, the only code that knows a
type's columns, checks, encoding, collator, head, predictions and metrics; `metrics` scores
predictions; `errors` holds `TaskError`."""

from .errors import TaskError
from .presets import PRESETS
from .spec import FILE_FORMATS, TaskSpec, build_spec, read_tasks_file, resolve_tasks
from .types import TASK_TYPES, TaskType

__all__ = ["FILE_FORMATS", "PRESETS", "TASK_TYPES", "TaskError", "TaskSpec", "TaskType", "build_spec", "read_tasks_file",
           "resolve_tasks"]

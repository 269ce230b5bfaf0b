"""Task types, one module each, registered in `TASK_TYPES`: the only code that knows a type.

Adding a type: a module here with a `TaskType` subclass (see `base`), one line in `TASK_TYPES`
below, and its tests (tests/tasks/types/). Nothing else changes.
"""

from .base import TaskType
from .causal_lm import CausalLM
from .classification import Classification
from .extractive_qa import ExtractiveQA
from .masked_lm import MaskedLM
from .multi_label import MultiLabel
from .multiple_choice import MultipleChoice
from .regression import Regression
from .seq2seq import Seq2Seq
from .token_classification import TokenClassification

TASK_TYPES: dict[str, TaskType] = {
    t.name: t for t in (Classification(), Regression(), MultipleChoice(), TokenClassification(), CausalLM(), Seq2Seq(),
                            ExtractiveQA(), MaskedLM(), MultiLabel())
}

__all__ = ["TASK_TYPES", "TaskType"]

"""Built-in tasks: declarations a TASKS name picks without a tasks file (GLUE, CommonsenseQA).

Labels are listed in the order of the Hub datasets' class ids, so integer labels (Hub) and label
names (GLUE TSV files) map to the same head outputs.
"""

from __future__ import annotations

from typing import Any


def _glue(name: str, task_type: str, text: str, text_pair: str | None, labels: list[str] | None,
          metrics: list[str]) -> dict[str, Any]:
    columns = {"text": text, "label": "label", **({"text_pair": text_pair} if text_pair else {})}
    return {"name": name, "type": task_type, "hub": "nyu-mll/glue", "hub_config": name, "columns": columns,
            "labels": labels, "metrics": metrics}


PRESETS: dict[str, dict[str, Any]] = {
    "stsb": _glue("stsb", "regression", "sentence1", "sentence2", None, ["pearson", "spearmanr"]),
    "rte": _glue("rte", "classification", "sentence1", "sentence2", ["entailment", "not_entailment"], ["accuracy"]),
    "mrpc": _glue("mrpc", "classification", "sentence1", "sentence2", ["not_equivalent", "equivalent"],
                  ["accuracy", "f1"]),
    "cola": _glue("cola", "classification", "sentence", None, ["unacceptable", "acceptable"],
                  ["matthews_correlation"]),
    "sst2": _glue("sst2", "classification", "sentence", None, ["negative", "positive"], ["accuracy"]),
    "commonsense_qa": {
        "name": "commonsense_qa", "type": "multiple_choice", "hub": "tau/commonsense_qa",
        "columns": {"question": "question", "choices": "choices", "label": "answerKey"},
        "labels": ["A", "B", "C", "D", "E"], "metrics": ["accuracy"],
    },
}


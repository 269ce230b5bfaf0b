"""The task-type interface, and what the types share.

A task type is one module in this package holding one `TaskType` subclass: its column roles, the
checks on its raw data, how a batch of rows becomes model inputs, its collator, its head, how the
head's outputs become predictions, scores and `predict` lines, and its metrics. The rest of the
package calls these methods through ``spec.task_type`` and never compares a type's name.
Helpers here (`label_to_id`, `encode_text_pairs`, `LabelSetType`) are shared by several types.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import metrics as metric_fns
from ..errors import TaskError

IGNORED = -100  # the label of positions the loss (and the metrics) skip
# Declaration keys that only some types take (each type lists its own in `options`); None: not given.
TYPE_OPTIONS = ("separator", "unanswerable", "stride", "max_answer_length")

if TYPE_CHECKING:
    from ..spec import TaskSpec


def missing(value: Any) -> bool:
    """No value: None, or a string of blanks (a CSV/TSV row with a missing field reads as '')."""
    return value is None or (isinstance(value, str) and not value.strip())


def sort_key(value: Any) -> tuple:
    """Numbers in numeric order before strings in text order: how labels found in data are listed."""
    return (0, float(value), "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0.0, str(value))


def label_to_id(spec: TaskSpec, value: Any) -> int | None:
    """Map a raw label (name or class index) to a class id; None if it is not in the label set."""
    names = spec.labels or ()
    text = str(value)
    if text in names:
        return names.index(text)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < len(names):
        return int(value)
    if isinstance(value, float) and value.is_integer() and 0 <= value < len(names):
        return int(value)
    return None


def logits_of(predictions):
    """The logits array of a prediction: `MultitaskModel.forward` returns only the loss and the
    logits; a tuple (a model that returns more outputs) still has the logits first."""
    return predictions[0] if isinstance(predictions, tuple) else predictions


def encode_text_pairs(spec: TaskSpec, batch: dict, tokenizer, max_length: int) -> dict:
    """Tokenize the `text` column, with `text_pair` as the second segment when declared."""
    texts = [str(t) for t in batch[spec.columns["text"]]]
    pair_col = spec.columns.get("text_pair")
    pairs = [str(t) for t in batch[pair_col]] if pair_col else None
    return dict(tokenizer(texts, pairs, truncation=True, max_length=max_length))


class TaskType:
    """One task type. Subclasses set the class attributes and implement `encode`,
    `configure_head` and `prediction_rows`; the other methods have the defaults of a task with one
    label per row."""

    name: str
    required_columns: tuple[str, ...]  # column roles every declaration has (`label` included)
    optional_columns: tuple[str, ...] = ()
    auto_class: str  # the transformers Auto class of the head and of the standalone export
    pipeline: str | None = None  # transformers.pipeline task of the exported model, if any
    has_label_set: bool = True  # classes (True) or a real-valued score (False)
    metrics: tuple[str, ...]  # the metrics that apply (tasks.metrics names)
    default_metrics: tuple[str, ...]
    tokenizer_kwargs: dict[str, Any] = {}  # what the tokenizer must be loaded with for this type
    label_columns: tuple[str, ...] = ("label",)  # the roles holding what is learned (not model inputs)
    generates: bool = False  # evaluation and predict generate text (see `GenerationType`)
    export_padding_side: str | None = None  # the exported tokenizer's padding side (None: as trained)
    options: tuple[str, ...] = ()  # the type-specific declaration keys (`TYPE_OPTIONS`) this type takes
    output_names: tuple[str, ...] = ("logits",)  # the head's outputs evaluation and `predict` keep
    reports_perplexity: bool = False  # evaluation logs exp(loss) as `<task>_perplexity` (a language-model loss)
    loads_pretrained_head: bool = False  # the head's own weights start from MODEL_NAME's (a language-model head)
    default_threshold: float | None = None  # types that take 'threshold' (a decision threshold on probabilities): its default

    # ---------------------------------------------------------------- the declaration
    def check_declaration(self, where: str, labels: tuple[str, ...] | None, num_labels: int | None) -> None:
        """Refuse a label declaration this type cannot take (raises TaskError, `where` first)."""

    def check_spec(self, spec: TaskSpec, where: str) -> None:
        """Refuse a built declaration this type cannot take (raises TaskError, `where` first).
        (A type-specific option, `TYPE_OPTIONS`, that is not one of its `options` is refused by
        `build_spec`, which knows every type.)"""

    def default_num_labels(self) -> int | None:
        """num_labels when the declaration gives none (None: read from the data)."""
        return None

    # ---------------------------------------------------------------- raw data
    def label_problem(self, spec: TaskSpec, col: str, value: Any) -> str | None:
        """What is wrong with one row's label, with the fix; None if nothing."""
        if missing(value):
            return f"no label in column {col!r}; give the row its label or remove it (check for a missing field)"
        return None

    def first_label_problem(self, spec: TaskSpec, ds) -> tuple[int, str] | None:
        """(row, problem) of the first row whose label is unusable, before the label set is known."""
        col = spec.columns["label"]
        for i, value in enumerate(ds[col]):
            problem = self.label_problem(spec, col, value)
            if problem:
                return i, problem
        return None

    def label_values(self, spec: TaskSpec, ds) -> list[Any]:
        """The distinct raw labels of a split."""
        return ds.unique(spec.columns["label"])

    def resolve_labels(self, spec: TaskSpec, train_ds) -> TaskSpec:
        """`spec` with its label names filled in from the train split (see `LabelSetType`)."""
        return spec

    def check_labels(self, spec: TaskSpec, split: str, ds) -> None:
        """Check a split's labels against the resolved label set (raises TaskError)."""

    # ---------------------------------------------------------------- encoding
    def check_tokenizer(self, spec: TaskSpec, tokenizer) -> None:
        """Refuse a tokenizer this type cannot use (raises TaskError)."""

    def encode(self, spec: TaskSpec, batch: dict, tokenizer, max_length: int, with_labels: bool) -> dict:
        """Model inputs (and `labels` when `with_labels`) for a batch of raw rows (column -> values)."""
        raise NotImplementedError

    def collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        """The dynamic-padding collator of this type's encoded examples."""
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    def eval_collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        """The collator of evaluation batches: the training one unless the training one is random
        (masked-LM masking), where evaluation must score the same inputs at every evaluation."""
        return self.collator(tokenizer, pad_to_multiple_of)

    def predict_collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        """The collator of `predict` batches (inputs with placeholder labels)."""
        return self.eval_collator(tokenizer, pad_to_multiple_of)

    def head_inputs(self, inputs: dict) -> dict:
        """The batch as the head's `forward` takes it (a batch carries what it learns as `labels`;
        a head may name it otherwise, e.g. start and end positions)."""
        return inputs

    def reduce_logits(self, logits, labels):
        """What evaluation keeps of one batch's outputs (the Trainer's `preprocess_logits_for_metrics`):
        all of them by default; a type whose logits span the vocabulary keeps only what it scores."""
        return logits

    def placeholder_labels(self, spec: TaskSpec, ds):
        """`ds` (inputs to predict) with a placeholder label per row, so batching is as in training."""
        first = spec.labels[0] if spec.labels else 0.0
        return ds.add_column(spec.columns["label"], [first] * len(ds))

    # ---------------------------------------------------------------- the head
    def configure_head(self, cfg, spec: TaskSpec) -> None:
        """Set the head's labels and problem type on `cfg` (a copy of the backbone's config)."""
        raise NotImplementedError

    def head_class(self):
        """The transformers Auto class (`auto_class`) that builds this type's head and its export."""
        import transformers

        return getattr(transformers, self.auto_class)

    def serves(self, config) -> bool:
        """Whether transformers has this type's head for the backbone's architecture (`config`)."""
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        mapping = getattr(self.head_class(), "_model_mapping", None)
        return mapping is None or config.model_type not in CONFIG_MAPPING_NAMES or type(config) in mapping

    def head_config(self, encoder_config, spec: TaskSpec):
        """The backbone's config with the task's labels and problem type: the head's config."""
        cfg = copy.deepcopy(encoder_config)
        self.configure_head(cfg, spec)
        cfg.finetuning_task = spec.name
        cfg.architectures = None
        return cfg

    # ---------------------------------------------------------------- outputs
    def num_labels(self, spec: TaskSpec) -> int | None:
        """The label count that label-set metrics (f1) depend on; None without a label set."""
        return len(spec.labels) if self.has_label_set and spec.labels else None

    def decode(self, spec: TaskSpec, logits, label_ids=None):
        """Predictions from the head's logits: class ids by default."""
        return np.asarray(logits_of(logits)).argmax(-1)

    def score(self, spec: TaskSpec, logits, label_ids) -> dict[str, float]:
        """The task's metrics on one split."""
        pred = self.decode(spec, logits, label_ids)
        ref = np.asarray(label_ids).reshape(-1)
        return {name: metric_fns.compute(name, pred, ref, self.num_labels(spec)) for name in spec.metrics}

    def score_split(self, spec: TaskSpec, predictions, label_ids, split, tokenizer) -> dict[str, float]:
        """The task's metrics on a tokenized split whose outputs are `predictions`: `score` by
        default; a type whose rows are several model inputs (extractive QA's windows) or whose
        texts need the tokenizer reads them from `split`."""
        return self.score(spec, predictions, label_ids)

    def split_prediction_rows(self, spec: TaskSpec, predictions, label_ids, split, tokenizer) -> list[dict[str, Any]]:
        """What `predict` writes for a tokenized split: `prediction_rows` by default (see `score_split`)."""
        return self.prediction_rows(spec, predictions, label_ids)

    def references(self, label_ids) -> np.ndarray:
        """The split's labels as one flat array (what a constant guess is scored against)."""
        return np.asarray(label_ids).reshape(-1)

    def chance(self, spec: TaskSpec, label_ids) -> dict[str, float]:
        """What the best constant guess scores on this split, per metric."""
        ref = self.references(label_ids)
        return {name: metric_fns.chance_level(name, ref, self.num_labels(spec)) for name in spec.metrics}

    def split_chance(self, spec: TaskSpec, split, tokenizer) -> dict[str, float]:
        """`chance` on a tokenized split (what the chance table compares each metric with)."""
        return self.chance(spec, split["labels"])

    def prediction_rows(self, spec: TaskSpec, logits, label_ids) -> list[dict[str, Any]]:
        """One JSON object per input, as `predict` writes them."""
        raise NotImplementedError

    def split_size_note(self, spec: TaskSpec, train, validation) -> str | None:
        """A line under the sampling plan when a tokenized split's rows are not the data's rows
        (extractive QA's windows), saying how many of each there are; None by default."""
        return None

    def name_predictions(self, spec: TaskSpec, rows: list[dict[str, Any]], inputs) -> list[dict[str, Any]]:
        """`predict`'s rows given the inputs they answer (the dataset read, one row each): as they
        are by default; a type whose inputs name their own labels (multiple choice's labelled
        choices) names each prediction by its input's."""
        return rows


class LabelSetType(TaskType):
    """A type whose labels are classes: names declared, or read from the train split."""

    def label_feature_names(self, spec: TaskSpec, ds) -> list[str] | None:
        """The class names of the label column's ClassLabel feature (Hub datasets), if any."""
        feature = ds.features.get(spec.columns["label"])
        inner = getattr(feature, "feature", feature)  # Sequence(ClassLabel) for token tags
        names = getattr(inner, "names", None)
        return list(names) if names else None

    def resolve_labels(self, spec: TaskSpec, train_ds) -> TaskSpec:
        """Fill in the label names from the declaration, the dataset's ClassLabel, or the train split.

        Raises:
            TaskError: num_labels disagrees with the labels found in the data, or the train split
                holds a single class (a classifier of one class has loss 0 and learns nothing).
        """
        where = f"task {spec.name!r}, split train"
        present = self.label_values(spec, train_ds)
        if len(present) < 2:
            only = present[0] if present else None
            raise TaskError(f"{where}: every label in column {spec.columns['label']!r} is {only!r}; a classifier needs "
                            "examples of at least two classes: add rows of the others (MAX_TRAIN_SAMPLES, if set, keeps the first rows only)")
        if spec.labels is not None:
            return spec
        names = self.label_feature_names(spec, train_ds)
        if names is None:
            names = [str(v) for v in sorted(set(present), key=sort_key)]
        if spec.num_labels is not None and spec.num_labels != len(names):
            raise TaskError(
                f"{where}: num_labels={spec.num_labels} but column {spec.columns['label']!r} has {len(names)} distinct "
                f"labels ({', '.join(names[:10])}); fix num_labels or list the labels"
            )
        return spec.with_labels(names)

    def check_labels(self, spec: TaskSpec, split: str, ds) -> None:
        """Raises TaskError: a label outside the label set."""
        bad = [v for v in self.label_values(spec, ds) if label_to_id(spec, v) is None]
        if bad:
            raise TaskError(
                f"task {spec.name!r}, split {split}: label {bad[0]!r} in column {spec.columns['label']!r} is not in the "
                f"label set [{', '.join(spec.labels)}]; fix the data or add it to 'labels'"
            )

    def configure_head(self, cfg, spec: TaskSpec) -> None:
        labels = list(spec.labels or [])
        cfg.num_labels = len(labels)
        cfg.id2label = dict(enumerate(labels))
        cfg.label2id = {label: i for i, label in enumerate(labels)}
        cfg.problem_type = None  # the head's own loss for its shape

    def prediction_rows(self, spec: TaskSpec, logits, label_ids) -> list[dict[str, Any]]:
        """`{"label", "index", "probabilities"}` per input."""
        from scipy.special import softmax

        rows = []
        for p in softmax(np.asarray(logits_of(logits), dtype=np.float64), axis=-1):
            k = int(p.argmax())
            rows.append({"label": spec.labels[k], "index": k, "probabilities": [round(float(x), 6) for x in p]})
        return rows


class GenerationType(TaskType):
    """A type whose head writes text (causal_lm, seq2seq): the target is a text, evaluation and
    `predict` generate, and the scores compare generated texts with the targets. Subclasses set
    the columns and implement `encode`, `split_texts` and `generated_tokens`."""

    label_columns = ("target",)
    has_label_set = False
    generates = True
    reports_perplexity = True
    loads_pretrained_head = True  # an untied lm_head (Llama's, Mistral's) is not in AutoModel's weights
    default_metrics = ("chrf", "exact_match")
    prompt_padding = "left"  # where a batch of generation inputs is padded: a decoder continues its prompt's end

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(sorted(metric_fns.GENERATION_METRICS))

    def check_declaration(self, where: str, labels, num_labels: int | None) -> None:
        if labels is not None or num_labels is not None:
            raise TaskError(f"{where}: type {self.name} generates text and takes no 'labels' or 'num_labels'")

    def first_label_problem(self, spec: TaskSpec, ds) -> tuple[int, str] | None:
        col = spec.columns["target"]
        for i, value in enumerate(ds[col]):
            if missing(value):
                return i, f"no text in column {col!r} (role 'target'); give every row its target or remove it"
            if not isinstance(value, str):
                return i, f"column {col!r} (role 'target') holds a {type(value).__name__}, not a text; quote it or fix the row"
        return None

    def label_values(self, spec: TaskSpec, ds) -> list[Any]:
        return []  # texts: no label set

    def collator(self, tokenizer, pad_to_multiple_of: int | None = None):
        """Pads on the right; labels padded with -100 (by position, not by the pad id, which may be EOS)."""
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORED, pad_to_multiple_of=pad_to_multiple_of,
                                      padding="longest")

    def placeholder_labels(self, spec: TaskSpec, ds):
        return ds  # `predict` encodes the inputs only (`encode` without labels)

    def configure_head(self, cfg, spec: TaskSpec) -> None:
        cfg.problem_type = None

    def split_texts(self, input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """(what the model is given to generate from, the target's ids without EOS) of one encoded row."""
        raise NotImplementedError

    def generated_tokens(self, row: list[int], prompt_width: int) -> list[int]:
        """The tokens the model wrote, from one row of `generate`'s output (EOS and after are cut by the caller)."""
        raise NotImplementedError

    def score_texts(self, spec: TaskSpec, predictions: list[str], references: list[str]) -> dict[str, float]:
        return {name: metric_fns.compute(name, predictions, references) for name in spec.metrics}

    def split_chance(self, spec: TaskSpec, split, tokenizer) -> dict[str, float]:
        """The better of an empty output, the most frequent target and a copy of the input text."""
        prompts, references = [], []
        for ids, labels in zip(split["input_ids"], split["labels"]):
            prompt, target = self.split_texts(list(ids), list(labels))
            prompts.append(tokenizer.decode(prompt, skip_special_tokens=True))
            references.append(tokenizer.decode(target, skip_special_tokens=True))
        return {name: metric_fns.generation_chance(name, references, prompts) for name in spec.metrics}

    def chance(self, spec: TaskSpec, label_ids) -> dict[str, float]:
        raise TypeError(f"task {spec.name!r} generates text: its chance level needs the prompts (`split_chance`)")

    def score(self, spec: TaskSpec, logits, label_ids) -> dict[str, float]:
        raise TypeError(f"task {spec.name!r} generates text: it is scored on generated texts (`score_texts`)")

    def prediction_rows(self, spec: TaskSpec, texts, label_ids=None) -> list[dict[str, Any]]:
        """`{"text"}` per input: the generated text (without the prompt)."""
        return [{"text": t} for t in texts]

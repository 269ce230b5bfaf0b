"""trainer.modeling: one shared encoder of any family, one head per task type, the encoder stored once."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AlbertConfig,
    AutoConfig,
    AutoModel,
    BertConfig,
    DebertaConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    RobertaConfig,
)

from tests.conftest import run_cli, tiny_flags
from trainer.modeling import WEIGHTS_FILE, MultitaskModel
from trainer.tasks import build_spec

VOCAB = 120
BATCH, CHOICES, LENGTH = 3, 4, 9
LAYERS = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
# Subprocesses too: a CLI training run took 23 s with two threads, 5 s with one.
CLI_ENV = {"OMP_NUM_THREADS": "1"}

# Tiny configs of several encoder families. trainer/modeling/multitask.py has no list of families: any
# AutoModel whose architecture has the task type's AutoModelFor… class must work.
FAMILIES = {
    "bert": lambda: BertConfig(vocab_size=VOCAB, max_position_embeddings=32, **LAYERS),
    "roberta": lambda: RobertaConfig(vocab_size=VOCAB, max_position_embeddings=40, pad_token_id=1, **LAYERS),
    "distilbert": lambda: DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                           max_position_embeddings=32),
    "albert": lambda: AlbertConfig(vocab_size=VOCAB, embedding_size=16, max_position_embeddings=32, **LAYERS),
    "electra": lambda: ElectraConfig(vocab_size=VOCAB, embedding_size=16, max_position_embeddings=32, **LAYERS),
    "deberta-v2": lambda: DebertaV2Config(vocab_size=VOCAB, max_position_embeddings=32, **LAYERS),
}


def declare(name: str, task_type: str, labels: list[str] | None = None):
    """A TaskSpec from an inline declaration, labels resolved as `load_task` would."""
    spec = build_spec({"name": name, "type": task_type, "files": {"train": f"{name}.jsonl"}})
    return spec.with_labels(labels) if labels is not None else spec


def one_task_of_each_type():
    return [
        declare("similarity", "regression"),
        declare("entailment", "classification", ["yes", "no", "maybe"]),
        declare("choice", "multiple_choice", ["A", "B", "C", "D"]),
        declare("tags", "token_classification", ["O", "B-x", "I-x", "B-y", "I-y"]),
    ]


def tiny_encoder(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModel.from_config(FAMILIES[family]())


def random_inputs(spec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (avoiding the low special ids) and labels shaped for the task type."""
    gen = torch.Generator().manual_seed(seed)
    shape = (BATCH, CHOICES, LENGTH) if spec.type == "multiple_choice" else (BATCH, LENGTH)
    inputs = {"input_ids": torch.randint(5, VOCAB, shape, generator=gen), "attention_mask": torch.ones(shape, dtype=torch.long)}
    if spec.type == "regression":
        inputs["labels"] = torch.rand(BATCH, generator=gen) * 5
    elif spec.type == "token_classification":
        labels = torch.randint(0, len(spec.labels), (BATCH, LENGTH), generator=gen)
        labels[:, 0] = -100  # ignored positions, as for special tokens
        inputs["labels"] = labels
    else:
        inputs["labels"] = torch.randint(0, len(spec.labels), (BATCH,), generator=gen)
    return inputs


def expected_logits_shape(spec) -> tuple[int, ...]:
    return {
        "regression": (BATCH, 1),
        "classification": (BATCH, len(spec.labels or ())),
        "multiple_choice": (BATCH, CHOICES),
        "token_classification": (BATCH, LENGTH, len(spec.labels or ())),
    }[spec.type]


def count(params) -> int:
    return sum(p.numel() for p in params)


def head_only_params(model: MultitaskModel) -> int:
    # A head's own parameters: its encoder slot is bound to the shared encoder, unregistered.
    return sum(count(head.parameters()) for head in model.heads.values())


def safetensors_layout(path: Path) -> tuple[dict, int]:
    """(header, bytes of tensor data) of a safetensors file, read from its own header."""
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
    return header, path.stat().st_size - 8 - header_len


# ------------------------------------------------------------------------ several families
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_task_type_runs_and_trains_the_shared_encoder(family):
    encoder = tiny_encoder(family)
    model = MultitaskModel(encoder, one_task_of_each_type())

    for name, spec in model.specs.items():
        head = model.heads[name]
        assert getattr(head, head.base_model_prefix) is encoder, "the head must run the shared encoder"
        model.zero_grad(set_to_none=True)
        out = model(task=name, **random_inputs(spec))

        assert tuple(out.logits.shape) == expected_logits_shape(spec), f"{family} {spec.type}"
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        out.loss.backward()
        embedding_grad = encoder.get_input_embeddings().weight.grad
        assert embedding_grad is not None and embedding_grad.abs().sum() > 0, f"{family} {spec.type}: no gradient reached the encoder"
        assert all(p.grad is not None for p in head.parameters()), f"{family} {spec.type}: a head parameter got no gradient"
        others = [p for other, h in model.heads.items() if other != name for p in h.parameters()]
        assert all(p.grad is None for p in others), "a batch of one task must not touch the other heads"


def test_forward_returns_only_the_loss_and_the_logits():
    # An encoder configured to return hidden states and attentions: evaluation must still get the
    # logits alone as predictions, never a tuple with them first.
    config = FAMILIES["bert"]()
    config.output_hidden_states = config.output_attentions = True
    model = MultitaskModel(AutoModel.from_config(config), one_task_of_each_type())
    for name, spec in model.specs.items():
        head_output = model.heads[name](**random_inputs(spec), return_dict=True)
        assert head_output.hidden_states is not None  # the head alone returns them
        out = model(task=name, **random_inputs(spec))
        assert type(out) is type(head_output)
        assert list(out.keys()) == ["loss", "logits"], f"{spec.type}: {list(out.keys())}"
        assert out.to_tuple()[1] is out.logits
        inputs = random_inputs(spec)
        inputs.pop("labels")
        assert list(model(task=name, **inputs).keys()) == ["logits"]


def test_an_architecture_without_the_types_auto_class_is_a_clear_error():
    # DeBERTa (v1) has sequence and token classification heads but no AutoModelForMultipleChoice.
    encoder = AutoModel.from_config(DebertaConfig(vocab_size=VOCAB, max_position_embeddings=32, **LAYERS))
    MultitaskModel(encoder, [declare("entailment", "classification", ["yes", "no"]), declare("tags", "token_classification", ["O", "B-x"])])

    with pytest.raises(ValueError, match="DebertaConfig.*AutoModelForMultipleChoice"):
        MultitaskModel(encoder, [declare("choice", "multiple_choice", ["A", "B"])])


def test_the_missing_auto_class_error_names_the_task():
    encoder = AutoModel.from_config(DebertaConfig(vocab_size=VOCAB, max_position_embeddings=32, **LAYERS))
    with pytest.raises(ValueError, match="task 'choice'"):
        MultitaskModel(encoder, [declare("choice", "multiple_choice", ["A", "B"])])


# ------------------------------------------------------------------------ how long inputs may be
class _Tokenizer:
    def __init__(self, model_max_length: int):
        self.model_max_length = model_max_length


def test_max_length_is_checked_against_the_position_embeddings_and_the_tokenizer():
    from trainer.config import ConfigError, load_config
    from trainer.modeling import check_max_length
    from trainer.tasks import TaskError

    config = BertConfig(vocab_size=VOCAB, max_position_embeddings=64, **LAYERS)
    specs = one_task_of_each_type()
    no_limit = _Tokenizer(int(1e30))  # transformers' "no limit" value
    check_max_length(load_config({"max_seq_length": "64"}, environ={}, env_file=""), specs, no_limit, config)

    cfg = load_config({"max_seq_length": "128", "model_name": "tiny"}, environ={}, env_file="")
    with pytest.raises(ConfigError, match=r"^MAX_SEQ_LENGTH=128 is not valid: tiny takes at most 64 tokens "
                                          r"\(its max_position_embeddings\); set MAX_SEQ_LENGTH=64 or less$"):
        check_max_length(cfg, specs, no_limit, config)
    with pytest.raises(ConfigError, match=r"takes at most 32 tokens \(its tokenizer's model_max_length\); set MAX_SEQ_LENGTH=32"):
        check_max_length(load_config({"max_seq_length": "48", "model_name": "tiny"}, environ={}, env_file=""), specs, _Tokenizer(32), config)

    # A task's own max_length is checked instead; MAX_SEQ_LENGTH only where a task uses it.
    own = [dataclasses.replace(s, max_length=32) for s in specs]
    check_max_length(cfg, own, no_limit, config)
    own[1] = dataclasses.replace(own[1], max_length=100)
    with pytest.raises(TaskError, match=r"^task 'entailment': max_length=100 is more than tiny takes \(64 tokens, its "
                                        r"max_position_embeddings\); set max_length to 64 or less in the tasks file$"):
        check_max_length(cfg, own, no_limit, config)


def test_max_length_of_an_encoder_without_absolute_positions_is_the_tokenizers():
    from trainer.config import load_config
    from trainer.modeling import check_max_length

    # DeBERTa-v3 style: relative positions only, max_position_embeddings is no limit on the length.
    config = DebertaV2Config(vocab_size=VOCAB, max_position_embeddings=32, position_biased_input=False, relative_attention=True, **LAYERS)
    check_max_length(load_config({"max_seq_length": "256"}, environ={}, env_file=""), one_task_of_each_type(), _Tokenizer(int(1e30)), config)


# ------------------------------------------------------------------------ the encoder exists once
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_encoder_is_held_once_in_parameters_and_state_dict(family, tmp_path):
    encoder = tiny_encoder(family)
    model = MultitaskModel(encoder, one_task_of_each_type())

    assert count(model.parameters()) == count(encoder.parameters()) + head_only_params(model)
    assert head_only_params(model) < count(encoder.parameters())

    state = model.state_dict()
    encoder_keys = {f"encoder.{k}" for k in encoder.state_dict()}
    assert encoder_keys <= set(state)
    head_keys = set(state) - encoder_keys
    assert all(k.split(".")[0] == "heads" and k.split(".")[1] in model.specs for k in head_keys)
    # No head carries a copy of the encoder under its own prefix (bert., roberta., deberta.…).
    for name, head in model.heads.items():
        assert not any(k.startswith(f"heads.{name}.{head.base_model_prefix}.") for k in head_keys)
    # Every encoder tensor appears once, and no two entries share memory (safetensors refuses that).
    pointers = [t.untyped_storage().data_ptr() for t in state.values() if t.numel()]
    assert len(pointers) == len(set(pointers))
    for key, tensor in encoder.state_dict().items():
        assert sum(t.data_ptr() == tensor.data_ptr() for t in state.values() if t.numel()) == (1 if tensor.numel() else 0), key

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "plain.safetensors"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_and_from_checkpoint_round_trip_with_identical_outputs(family, tmp_path):
    model = MultitaskModel(tiny_encoder(family), one_task_of_each_type()).eval()
    model.save(tmp_path)
    loaded = MultitaskModel.from_checkpoint(tmp_path).eval()

    assert type(loaded.encoder) is type(model.encoder)
    assert loaded.specs == model.specs
    assert loaded.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        for name, spec in model.specs.items():
            inputs = random_inputs(spec, seed=1)
            before, after = model(task=name, **inputs), loaded(task=name, **inputs)
            assert torch.equal(before.logits, after.logits), f"{family} {name}"
            assert torch.equal(before.loss, after.loss), f"{family} {name}"


# ------------------------------------------------------------------------ checkpoint size
def test_checkpoint_size_is_the_encoder_plus_the_heads(tmp_path):
    # Big enough that the safetensors header is well under 2% of the file.
    torch.manual_seed(0)
    encoder = AutoModel.from_config(BertConfig(vocab_size=2000, max_position_embeddings=64, **LAYERS))
    specs = one_task_of_each_type()[:3]
    three, one = MultitaskModel(encoder, specs), MultitaskModel(encoder, specs[:1])
    three.save(tmp_path / "three")
    one.save(tmp_path / "one")

    sizes, data_bytes = {}, {}
    for label, model in (("three", three), ("one", one)):
        path = tmp_path / label / WEIGHTS_FILE
        expected = (count(encoder.parameters()) + head_only_params(model)) * 4  # float32
        _, data_bytes[label] = safetensors_layout(path)
        sizes[label] = path.stat().st_size
        assert data_bytes[label] == expected, label
        assert sizes[label] == pytest.approx(expected, rel=0.02), label

    extra_heads = (head_only_params(three) - head_only_params(one)) * 4
    assert data_bytes["three"] - data_bytes["one"] == extra_heads
    assert sizes["three"] - sizes["one"] == pytest.approx(extra_heads, abs=1024)  # + a few header lines
    assert sizes["three"] - sizes["one"] < count(encoder.parameters()) * 4 / 20


def test_a_trainer_checkpoint_holds_the_encoder_once(tiny_model, tiny_tasks, tmp_path):
    out = tmp_path / "out"
    done = run_cli("train", *tiny_flags(tiny_model, tiny_tasks, out, run_name="once", max_steps=6, export_at_end=False), env=CLI_ENV)
    assert done.returncode == 0, done.stderr[-3000:]

    checkpoint = out / "once" / "checkpoint-6"
    weights = checkpoint / WEIGHTS_FILE
    with safe_open(str(weights), "pt") as f:
        keys = set(f.keys())
    encoder = AutoModel.from_config(AutoConfig.from_pretrained(checkpoint))
    encoder_keys = {f"encoder.{k}" for k in encoder.state_dict()}
    assert encoder_keys <= keys
    head_keys = keys - encoder_keys
    tasks = ("demo_similarity", "demo_entailment", "demo_choice", "demo_tags")
    assert {k.split(".")[1] for k in head_keys} == set(tasks)
    assert all(k.startswith("heads.") and not k.startswith(f"heads.{k.split('.')[1]}.bert.") for k in head_keys), head_keys

    model = MultitaskModel.from_checkpoint(checkpoint)
    _, data = safetensors_layout(weights)
    assert data == count(model.parameters()) * 4 == (count(encoder.parameters()) + head_only_params(model)) * 4
    assert weights.stat().st_size == pytest.approx(data, rel=0.1)  # a 30k-parameter model: the header weighs more


# ------------------------------------------------------------------------ floating-point operations
def non_embedding_parameters(module) -> int:
    """Parameters outside nn.Embedding layers, counted without transformers' helper."""
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    return sum(p.numel() for p in module.parameters() if id(p) not in embeddings)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_floating_point_ops_count_the_encoder_and_the_batchs_head_as_the_trainer_counts_a_model(family):
    import copy


    encoder = tiny_encoder(family)
    model = MultitaskModel(encoder, one_task_of_each_type())
    for name, spec in model.specs.items():
        inputs = random_inputs(spec)
        tokens = inputs["input_ids"].numel()  # a multiple-choice batch runs the encoder on every choice
        ran = non_embedding_parameters(encoder) + non_embedding_parameters(model.heads[name])
        counted = model.floating_point_ops({**inputs, "task": name})
        assert counted == 6 * tokens * ran, f"{family} {spec.type}"
        # Where the standalone model has the shared encoder's layers, the plain Trainer's count for it
        # is the same. (The shared encoder runs its pooler for every task; a standalone BERT token
        # classifier and RoBERTa's heads have none.)
        if family == "bert" and spec.type != "token_classification":
            standalone = spec.task_type.head_class().from_config(copy.deepcopy(model.heads[name].config))
            assert counted == 6 * tokens * standalone.num_parameters(exclude_embeddings=True)
    with_no_ids = {k: v for k, v in random_inputs(model.specs["entailment"]).items() if k != "input_ids"}
    assert model.floating_point_ops({**with_no_ids, "task": "entailment"}) == 0

"""Large backbones: memory. Each head is built without a throwaway backbone of its own (only the
head's layers are allocated, initialised as transformers initialises them), the backbone's layers
can recompute their activations in the backward pass (ACTIVATION_CHECKPOINTING) with the same
gradients, and the weights load in the dtype they train in (MODEL_DTYPE), checked against PRECISION."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AlbertConfig, AutoConfig, AutoModel, AutoTokenizer, BertConfig

from tests.conftest import run_cli, tiny_flags
from tests.modeling.test_multitask import CLI_ENV, FAMILIES, declare, one_task_of_each_type, random_inputs, tiny_encoder
from trainer.modeling import MultitaskModel, fit_backbone, prepare_tokenizer
from trainer.tasks import build_spec


# ------------------------------------------------------------------------ the heads take no second backbone
class Allocations(TorchDispatchMode):
    """Counts the bytes of every tensor storage an operation creates off the meta device: CPU has
    no memory statistics, but every tensor is made by an operation that passes through here."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        real = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and not t.is_meta]
        given = {t.untyped_storage().data_ptr() for t in real}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and not tensor.is_meta and tensor.untyped_storage().data_ptr() not in given:
                self.bytes += tensor.untyped_storage().nbytes()  # a new storage, not a view or an in-place result
        return out


def own_bytes(model: MultitaskModel) -> int:
    """Bytes of the heads' own tensors: not the encoder's, each shared tensor once."""
    shared = {id(t) for t in (*model.encoder.parameters(), *model.encoder.buffers())}
    own = {id(t): t for t in (*model.heads.parameters(), *model.heads.buffers()) if id(t) not in shared}
    return sum(t.numel() * t.element_size() for t in own.values())


def spec_of(name: str, task_type: str, **declaration):
    return build_spec({"name": name, "type": task_type, "files": {"train": f"{name}.jsonl"}, **declaration})


def every_head_type(family: str, directory: Path):
    """(backbone, one task of every type the architecture serves: each head kind to build)."""
    from tests.conftest import make_tiny_decoder, make_tiny_encoder_decoder

    lm = {"columns": {"prompt": "p", "target": "t"}}
    if family == "bert":
        specs = [*one_task_of_each_type(), spec_of("qa", "extractive_qa"), spec_of("mlm", "masked_lm"),
                 spec_of("topics", "multi_label").with_labels(["x", "y", "z"])]
        return tiny_encoder("bert"), specs
    if family in ("gpt2", "llama"):  # GPT-2's language-model head is tied to the embeddings, Llama's is its own
        folder = make_tiny_decoder(directory / family, family)
        specs = [spec_of("lm", "causal_lm", **lm), declare("entailment", "classification", ["yes", "no", "maybe"]),
                 declare("similarity", "regression"), declare("tags", "token_classification", ["O", "B-x"])]
    else:  # T5's and BART's generation heads hold the backbone's own parts at their top
        folder = make_tiny_encoder_decoder(directory / family, family)
        specs = [spec_of("rewrite", "seq2seq"), declare("entailment", "classification", ["yes", "no", "maybe"])]
    torch.manual_seed(0)
    # As `train` fits it: a decoder's classifiers pool before the pad token (EOS here).
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(folder), [])
    return fit_backbone(AutoModel.from_config(AutoConfig.from_pretrained(folder)), tokenizer), specs


HEAD_FAMILIES = ["bert", "gpt2", "llama", "t5", "bart"]


@pytest.mark.parametrize("family", HEAD_FAMILIES)
def test_building_the_heads_allocates_the_heads_alone_not_a_backbone_each(family, tmp_path):
    # The old construction built each head as a whole AutoModelFor… (backbone included) and then
    # dropped its backbone: N heads allocated N throwaway backbones. Now only the heads' own
    # tensors are allocated, whatever the number of heads.
    encoder, specs = every_head_type(family, tmp_path)
    backbone = sum(t.numel() * t.element_size() for t in (*encoder.parameters(), *encoder.buffers()))
    specs = specs + [dataclasses.replace(s, name=f"{s.name}_again") for s in specs]  # 2 of each: 8 to 20 heads

    with Allocations() as allocated:
        model = MultitaskModel(encoder, specs)

    assert allocated.bytes >= own_bytes(model) > 0  # the counter sees the heads being made
    assert allocated.bytes <= 1.1 * own_bytes(model) + 4096, f"{allocated.bytes} bytes for {own_bytes(model)} of heads"
    assert allocated.bytes < backbone, f"{len(specs)} heads allocated {allocated.bytes / backbone:.1f} backbones"
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))


@pytest.mark.parametrize("family", HEAD_FAMILIES)
def test_exporting_a_task_allocates_no_second_backbone_and_the_export_holds_the_trained_weights(family, tmp_path):
    # The old export built each task's AutoModelFor… with from_config (a second, randomly
    # initialised backbone: 32 GB at 8B parameters in float32) and copied the weights into it.
    # The standalone model now takes the live tensors themselves.
    from trainer.modeling.multitask import _backbone_prefix

    encoder, specs = every_head_type(family, tmp_path)
    backbone = sum(t.numel() * t.element_size() for t in (*encoder.parameters(), *encoder.buffers()))
    model = MultitaskModel(encoder, specs).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for spec in specs:
        with Allocations() as allocated:
            folder = model.export(spec.name, tmp_path / "export" / spec.name)
        assert allocated.bytes < 0.05 * backbone, f"{spec.name}: the export allocated {allocated.bytes / backbone:.2f} backbones"

        reloaded = spec.task_type.head_class().from_pretrained(folder)
        prefix = _backbone_prefix(reloaded, type(encoder))
        trained = {f"{prefix}{k}": v for k, v in encoder.state_dict().items()} | model.heads[spec.name].state_dict()
        for key, tensor in reloaded.state_dict().items():
            assert torch.equal(tensor, trained[key]), f"{family} {spec.name}: {key} is not the trained weight"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "exporting changed the model"


@pytest.mark.parametrize("family", HEAD_FAMILIES)
def test_each_head_is_initialised_as_transformers_builds_it_and_the_backbone_is_untouched(family, tmp_path):
    from trainer.modeling import bind_backbone, head_config

    encoder, specs = every_head_type(family, tmp_path)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    flagged = {k for k, p in encoder.named_parameters() if hasattr(p, "_is_hf_initialized")}
    torch.manual_seed(1)
    model = MultitaskModel(encoder, specs)
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items()), "building a head changed the backbone"
    assert {k for k, p in encoder.named_parameters() if hasattr(p, "_is_hf_initialized")} == flagged

    for spec in specs:
        head = model.heads[spec.name]
        # The usual way: the whole model from its config, then the same binding.
        usual = spec.task_type.head_class().from_config(head_config(encoder.config, spec))
        bind_backbone(usual, encoder, spec)
        ours, theirs = dict(head.named_parameters()), dict(usual.named_parameters())
        assert ours.keys() == theirs.keys(), spec.name
        for key, expected in theirs.items():
            got = ours[key]
            assert (got.shape, got.dtype, got.requires_grad) == (expected.shape, expected.dtype, expected.requires_grad)
            if expected.numel() > 1 and expected.std() > 0:  # drawn at random: the same spread
                assert 0.6 < got.std() / expected.std() < 1.6, f"{family} {spec.name} {key}"
                assert abs(got.mean()) < 4 * expected.std() / expected.numel() ** 0.5 + 1e-3, f"{family} {spec.name} {key}"
            else:  # zeros, ones: the same values
                assert torch.equal(got, expected), f"{family} {spec.name} {key}"
        ours, theirs = dict(head.named_buffers()), dict(usual.named_buffers())
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs), spec.name
        # A tied output layer is the shared input embeddings, as in the usual model.
        output = head.get_output_embeddings()
        if output is not None and getattr(head.config, "tie_word_embeddings", False):
            assert output.weight is encoder.get_input_embeddings().weight, spec.name


@pytest.mark.parametrize("family", HEAD_FAMILIES)
def test_on_a_backbone_on_the_meta_device_the_heads_stay_there_and_tied(family, tmp_path):
    # A model of modules only (checking settings against an architecture before any weights are
    # read): nothing is allocated, and a tied output layer is still the backbone's embeddings.
    encoder, specs = every_head_type(family, tmp_path)
    with torch.device("meta"):
        encoder = AutoModel.from_config(encoder.config)
    with Allocations() as allocated:
        model = MultitaskModel(encoder, specs)
    assert allocated.bytes == 0
    assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))
    for spec in specs:
        head = model.heads[spec.name]
        if getattr(head.config, "tie_word_embeddings", False) and head.get_output_embeddings() is not None:
            assert head.get_output_embeddings().weight is encoder.get_input_embeddings().weight, spec.name


def test_heads_start_the_same_for_the_same_seed(tmp_path):
    def build(seed):
        encoder, specs = every_head_type("bert", tmp_path)
        torch.manual_seed(seed)
        return MultitaskModel(encoder, specs).state_dict()

    first, again, other = build(3), build(3), build(4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if k.startswith("heads."))


# ------------------------------------------------------------------------ activation checkpointing
def inputs_for(spec, eos: int | None, seed: int = 0) -> dict[str, torch.Tensor]:
    """`random_inputs`, every row ending with `eos` (T5's classifier reads it), the tokens
    themselves as the targets of a generation task."""
    inputs = random_inputs(declare(spec.name, "regression") if spec.type in ("causal_lm", "seq2seq") else spec, seed)
    if eos is not None:
        inputs["input_ids"][..., -1] = eos
    if spec.type in ("causal_lm", "seq2seq"):
        inputs["labels"] = inputs["input_ids"].clone()
    return inputs


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5"])
def test_activation_checkpointing_recomputes_the_backbone_with_the_same_loss_and_gradients(family, tmp_path):
    from transformers.modeling_layers import GradientCheckpointingLayer

    encoder, specs = every_head_type(family, tmp_path)
    specs = [s for s in specs if s.type not in ("extractive_qa", "masked_lm", "multi_label")]
    model = MultitaskModel(encoder, specs).train()  # dropout on: the recomputation must draw the same masks
    layers = [m for m in encoder.modules() if isinstance(m, GradientCheckpointingLayer)]
    runs = []  # a checkpointed layer's modules run again in the backward pass (the layer's own `forward` is wrapped)
    for layer in layers:
        first = next(m for m in layer.modules() if list(m.parameters(recurse=False)))
        first.register_forward_hook(lambda *_: runs.append(1))

    def step(spec):
        model.zero_grad(set_to_none=True)
        runs.clear()
        torch.manual_seed(7)
        loss = model(task=spec.name, **inputs_for(spec, encoder.config.eos_token_id)).loss
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}, len(runs)

    plain = {s.name: step(s) for s in specs}
    assert not model.is_activation_checkpointing
    model.activation_checkpointing_enable()  # what the Trainer calls for TrainingArguments.activation_checkpointing
    assert model.is_activation_checkpointing and encoder.is_activation_checkpointing
    assert all(layer._gradient_checkpointing_func.keywords["use_reentrant"] is False for layer in layers)
    for spec in specs:
        loss, grads, ran = step(spec)
        loss_before, grads_before, ran_before = plain[spec.name]
        assert ran == 2 * ran_before > 0, f"{family} {spec.name}: the backbone's layers were not recomputed"
        assert torch.allclose(loss, loss_before, rtol=0, atol=1e-6), spec.name
        assert grads.keys() == grads_before.keys(), spec.name
        for key, grad in grads.items():
            assert torch.allclose(grad, grads_before[key], rtol=0, atol=1e-6), f"{family} {spec.name} {key}"
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing


def test_activation_checkpointing_is_refused_for_a_backbone_without_it():
    from trainer.config import ConfigError, load_config
    from trainer.modeling import check_memory_settings

    config = FAMILIES["albert"]()  # transformers has no activation checkpointing for ALBERT
    model = MultitaskModel(AutoModel.from_config(config), one_task_of_each_type()[:1])
    expected = ("ACTIVATION_CHECKPOINTING=true is not valid: {} (AlbertModel) does not support activation "
                "checkpointing in transformers; set ACTIVATION_CHECKPOINTING=false")
    with pytest.raises(ConfigError) as err:
        model.activation_checkpointing_enable()
    assert str(err.value) == expected.format("albert")
    cfg = load_config({"model_name": "tiny-albert", "activation_checkpointing": "true"}, environ={}, env_file="")
    with pytest.raises(ConfigError) as err:  # before any weights are loaded: the config is enough
        check_memory_settings(cfg, config, "fp32")
    assert str(err.value) == expected.format("tiny-albert")
    assert check_memory_settings(cfg, FAMILIES["bert"](), "fp32") == torch.float32


def test_a_backbone_without_activation_checkpointing_stops_the_cli_with_exit_2(tiny_model, tiny_tasks, tmp_path):
    import shutil

    albert = tmp_path / "albert"
    shutil.copytree(tiny_model, albert)
    AlbertConfig.from_dict({**BertConfig.from_pretrained(tiny_model).to_dict(), "model_type": "albert",
                            "embedding_size": 16}).save_pretrained(albert)
    out = tmp_path / "out"
    done = run_cli("train", *tiny_flags(albert, tiny_tasks, out, activation_checkpointing="true"), env=CLI_ENV)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip() == (f"error: ACTIVATION_CHECKPOINTING=true is not valid: {albert} (AlbertModel) does not "
                                   "support activation checkpointing in transformers; set ACTIVATION_CHECKPOINTING=false")
    assert not out.exists()


# ------------------------------------------------------------------------ the weights' dtype
def settings(**values):
    from trainer.config import load_config

    return load_config({"model_name": "tiny", **values}, environ={}, env_file="")


def test_model_dtype_is_float32_named_or_the_checkpoints_own_and_is_checked_against_the_precision():
    from trainer.config import ConfigError
    from trainer.modeling import check_memory_settings

    stored = {name: BertConfig(dtype=name) for name in ("float32", "bfloat16", "float16")}
    assert check_memory_settings(settings(), stored["bfloat16"], "fp32") == torch.float32  # float32 weights by default
    assert check_memory_settings(settings(model_dtype="bfloat16"), stored["float32"], "bf16") == torch.bfloat16
    assert check_memory_settings(settings(model_dtype="bfloat16"), stored["float32"], "fp32") == torch.bfloat16  # pure bf16
    assert check_memory_settings(settings(model_dtype="auto"), stored["bfloat16"], "bf16") == torch.bfloat16
    assert check_memory_settings(settings(model_dtype="auto"), BertConfig(), "fp32") == torch.float32  # the config names none

    with pytest.raises(ConfigError) as err:  # what `auto` finds, which no setting names
        check_memory_settings(settings(model_dtype="auto"), stored["float16"], "fp16")
    assert str(err.value) == ("MODEL_DTYPE=auto is not valid: tiny is stored in float16, and float16 weights cannot be "
                              "trained; set MODEL_DTYPE=float32 (with PRECISION=fp16 for fp16 mixed precision) or bfloat16")
    # PRECISION=auto chose fp16 (a GPU older than compute capability 8.0): its loss scaling trains float32 weights.
    for model_dtype, config in (("bfloat16", stored["float32"]), ("auto", stored["bfloat16"])):
        with pytest.raises(ConfigError, match=rf"^MODEL_DTYPE={model_dtype} is not valid: bfloat16 weights.* cannot train "
                                              r"with PRECISION=auto, which is fp16 on this GPU .*; set MODEL_DTYPE=float32$"):
            check_memory_settings(settings(model_dtype=model_dtype), config, "fp16")


@pytest.mark.parametrize(("values", "named"), [
    ({"model_dtype": "float16"}, "MODEL_DTYPE='float16' is not valid: expected float32 or bfloat16 (float16 weights cannot be trained"),
    ({"model_dtype": "bfloat16", "precision": "fp16"}, "MODEL_DTYPE='bfloat16' is not valid: expected float32 with PRECISION=fp16"),
    ({"model_dtype": "half"}, "MODEL_DTYPE='half' is not valid: expected float32|bfloat16|auto"),
])
def test_a_model_dtype_that_cannot_train_is_refused_with_the_settings(values, named):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError) as err:
        settings(**values)
    assert str(err.value).startswith(named) and "\n" not in str(err.value)


def safetensors_dtypes(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {f.get_slice(key).get_dtype() for key in f.keys()}


def test_the_backbone_loads_in_model_dtype_whatever_the_checkpoint_holds(tiny_model, tmp_path):
    from trainer.modeling import check_memory_settings, load_encoder

    stored = tmp_path / "bf16"
    AutoModel.from_config(BertConfig.from_pretrained(tiny_model), dtype=torch.bfloat16).save_pretrained(stored)
    assert safetensors_dtypes(stored / "model.safetensors") == {"BF16"}
    config = AutoConfig.from_pretrained(stored)
    for model_dtype, expected in (("float32", torch.float32), ("auto", torch.bfloat16), ("bfloat16", torch.bfloat16)):
        dtype = check_memory_settings(settings(model_dtype=model_dtype), config, "fp32")
        for init in ("pretrained", "scratch"):
            encoder = load_encoder(str(stored), init, dtype)
            assert {p.dtype for p in encoder.parameters()} == {expected}, (model_dtype, init)
    heads = MultitaskModel(encoder, one_task_of_each_type())
    assert {p.dtype for p in heads.parameters()} == {torch.bfloat16}  # the heads follow the backbone


def test_a_float32_checkpoint_trains_in_bfloat16_with_precision_bf16(tiny_model, tiny_tasks, tmp_path):
    import shutil

    pretrained = tmp_path / "pretrained"
    shutil.copytree(tiny_model, pretrained)
    AutoModel.from_config(AutoConfig.from_pretrained(pretrained)).save_pretrained(pretrained)
    assert safetensors_dtypes(pretrained / "model.safetensors") == {"F32"}
    out = tmp_path / "out"
    done = run_cli("train", *tiny_flags(pretrained, tiny_tasks, out, run_name="bf16", model_init="pretrained",
                                        model_dtype="bfloat16", precision="bf16", max_steps=1, export_at_end="false"),
                   env=CLI_ENV)
    assert done.returncode == 0, done.stderr[-3000:]

    metrics = json.loads((out / "bf16" / "metrics.json").read_text())
    assert metrics["step"] == 1 and torch.isfinite(torch.tensor(metrics["train"]["train_loss"]))
    final = out / "bf16" / "final"
    assert safetensors_dtypes(final / "model.safetensors") == {"BF16"}  # trained and saved in bfloat16, heads too
    model = MultitaskModel.from_checkpoint(final)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}

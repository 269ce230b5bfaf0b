"""Large backbones: memory. Each head is built without a throwaway backbone of its own (only the
head's layers are allocated, initialised as transformers initialises them)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoConfig, AutoModel, AutoTokenizer

from tests.modeling.test_multitask import declare, one_task_of_each_type, tiny_encoder
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


def test_heads_start_the_same_for_the_same_seed(tmp_path):
    def build(seed):
        encoder, specs = every_head_type("bert", tmp_path)
        torch.manual_seed(seed)
        return MultitaskModel(encoder, specs).state_dict()

    first, again, other = build(3), build(3), build(4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if k.startswith("heads."))

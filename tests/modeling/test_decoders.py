"""Decoder backbones in the multitask model: the tokenizer gets a pad token and the declared
special tokens, the embeddings are resized once before the heads bind, a tied language-model head
is the shared embedding matrix (stored once), an untied one starts from the pretrained model's
own weights, and a type the backbone cannot serve is refused before any data is read."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.conftest import make_tiny_decoder
from trainer.modeling import MultitaskModel, check_backbone, fit_backbone, prepare_tokenizer
from trainer.tasks import TaskError, build_spec

LM = {"name": "lm", "type": "causal_lm", "files": {"train": "/d/train.jsonl"}, "columns": {"prompt": "p", "target": "t"},
      "separator": "<sep>", "special_tokens": ["<sep>"]}
CLS = {"name": "cls", "type": "classification", "files": {"train": "/d/train.jsonl"}, "labels": ["a", "b", "c"]}


def build(model_dir, *, pretrained=None):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    specs = [build_spec(LM), build_spec(CLS)]
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(model_dir), ["<sep>"])
    backbone = AutoModel.from_pretrained(model_dir) if pretrained else AutoModel.from_config(AutoConfig.from_pretrained(model_dir))
    return MultitaskModel(fit_backbone(backbone, tokenizer), specs, pretrained=pretrained), tokenizer


def test_the_tokenizer_pads_with_eos_and_the_backbone_grows_for_the_separator(tiny_gpt2, caplog):
    with caplog.at_level(logging.INFO, logger="trainer.modeling.multitask"):
        model, tokenizer = build(tiny_gpt2)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>" and "no pad token" in caplog.text
    assert tokenizer.convert_tokens_to_ids("<sep>") == len(tokenizer) - 1
    assert model.encoder.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.encoder.config.pad_token_id == tokenizer.eos_token_id  # the classifier pools before it
    assert model.heads["cls"].config.pad_token_id == tokenizer.eos_token_id


def test_a_tokenizer_with_neither_pad_nor_eos_gets_a_pad_token(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.pad_token = None
    size = len(tokenizer)
    prepare_tokenizer(tokenizer, [])
    assert tokenizer.pad_token == "<pad>" and len(tokenizer) == size + 1


def test_a_tied_head_is_the_shared_embedding_matrix_and_is_stored_once(tiny_gpt2, tmp_path):
    model, _ = build(tiny_gpt2)
    embeddings = model.encoder.get_input_embeddings().weight
    assert model.heads["lm"].get_output_embeddings().weight is embeddings
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in model.state_dict().values())
    assert "heads.lm.lm_head.weight" not in model.state_dict()
    model.save(tmp_path)
    reloaded = MultitaskModel.from_checkpoint(tmp_path)
    assert reloaded.heads["lm"].get_output_embeddings().weight is reloaded.encoder.get_input_embeddings().weight
    assert torch.equal(reloaded.encoder.get_input_embeddings().weight, embeddings)


def test_an_untied_head_starts_from_the_pretrained_models_own_weights(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = make_tiny_decoder(tmp_path / "llama", "llama", tie=False)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).save_pretrained(folder)  # a "pretrained" model
    saved = load_file(str(folder / "model.safetensors"))["lm_head.weight"]
    model, tokenizer = build(folder, pretrained=str(folder))
    head = model.heads["lm"].get_output_embeddings().weight
    assert head is not model.encoder.get_input_embeddings().weight
    assert head.shape[0] == len(tokenizer) == saved.shape[0] + 1  # the separator's row added
    assert torch.equal(head[:-1], saved) and torch.allclose(head[-1], saved.mean(0))
    scratch, _ = build(folder)  # MODEL_INIT=scratch: nothing is read
    assert not torch.equal(scratch.heads["lm"].get_output_embeddings().weight[:-1], saved)


def test_a_type_the_backbone_cannot_serve_is_one_line_naming_what_it_serves(tiny_gpt2):
    from transformers import AutoConfig

    choice = build_spec({"name": "mc", "type": "multiple_choice", "files": {"train": "/d/t.jsonl"}})
    with pytest.raises(TaskError) as err:
        check_backbone([build_spec(CLS), choice], AutoConfig.from_pretrained(tiny_gpt2), "tiny-gpt2")
    assert str(err.value) == ("task 'mc': tiny-gpt2 (gpt2) cannot serve type multiple_choice: transformers has no "
                              "AutoModelForMultipleChoice for it; it serves classification, regression, token_classification, "
                              "causal_lm, extractive_qa, multi_label; use another backbone or drop the task")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_regression_on_a_decoder_pools_at_the_last_token_before_padding(arch, tmp_path):
    """A padded row scores as the same row alone: the head reads the last real token, found by
    the pad id (EOS here), never the padding."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    folder = make_tiny_decoder(tmp_path / arch, arch)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(folder), [])
    backbone = fit_backbone(AutoModel.from_config(AutoConfig.from_pretrained(folder)), tokenizer)
    spec = build_spec({"name": "score", "type": "regression", "files": {"train": "/d/t.jsonl"}})
    model = MultitaskModel(backbone, [spec]).eval()
    batch = tokenizer(["red dog", "the blue car is near"], padding=True, return_tensors="pt")
    alone = tokenizer(["red dog"], return_tensors="pt")
    with torch.no_grad():
        out = model(task="score", **batch, labels=torch.tensor([0.5, 2.0]))
        single = model(task="score", **alone).logits
    assert out.logits.shape == (2, 1) and torch.isfinite(out.loss)
    assert torch.allclose(out.logits[0], single[0], atol=1e-5)


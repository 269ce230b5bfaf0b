"""trainer.modeling.lora: PEFT's LoRA adapters on the shared backbone, in process, on tiny models
with saved (random) weights: what trains and what is frozen, what `state_dict` holds, per-task
adapters that change only on their own task's batches, the rebuild from MODEL_NAME and its
fingerprint, and the settings refused before any data is read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, DistilBertConfig

from tests.conftest import make_tiny_bert, make_tiny_decoder, write_decoder_tasks, write_tasks_file
from trainer import commands
from trainer.config import ConfigError, load_config
from trainer.data import make_collator, tokenize
from trainer.modeling import MultitaskModel, check_lora, check_lora_tokens, encoder_config, fit_backbone, load_encoder
from trainer.tasks import TaskError, resolve_tasks


def with_weights(directory: Path, seed: int = 0) -> Path:
    """Save random weights beside a tiny model's config: a "pretrained" model LoRA can adapt."""
    torch.manual_seed(seed)
    AutoModel.from_config(AutoConfig.from_pretrained(directory)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return with_weights(make_tiny_bert(tmp_path_factory.mktemp("lora-bert")))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    return with_weights(make_tiny_decoder(tmp_path_factory.mktemp("lora-gpt2"), "gpt2"))


@pytest.fixture(scope="module")
def encoder_tasks(tmp_path_factory) -> Path:
    return write_tasks_file(tmp_path_factory.mktemp("lora-encoder-tasks"), n_train=16, n_eval=8)


@pytest.fixture(scope="module")
def decoder_tasks(tmp_path_factory) -> Path:
    return write_decoder_tasks(tmp_path_factory.mktemp("lora-decoder-tasks"), n_train=16, n_eval=8)


def settings(model: Path, tasks_file: Path, tasks: str, **extra):
    return load_config({"model_name": str(model), "tasks_file": str(tasks_file), "tasks": tasks, "lora_r": 4, **extra},
                       environ={}, env_file="")


def build(cfg):
    """The job's model as `train` builds it: data and tokenizer, backbone, heads, then the adapters."""
    specs, raw = commands.prepare_tasks(cfg, resolve_tasks(cfg), need_train=True)
    tokenizer = commands.load_tokenizer(cfg.model_name, specs, cfg.special_tokens)
    torch.manual_seed(cfg.seed)
    model = MultitaskModel(fit_backbone(load_encoder(cfg.model_name, "pretrained"), tokenizer), specs, pretrained=cfg.model_name)
    model.enable_lora(commands._lora_setup(cfg))
    batches = {}
    for spec, splits in zip(specs, raw):
        tokenized = tokenize(spec, splits["train"], tokenizer, 32)
        batches[spec.name] = dict(make_collator(spec, tokenizer)([tokenized[i] for i in range(8)]))
    return model, tokenizer, batches


def adapter_weights(model: MultitaskModel, adapter: str) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if f".{adapter}." in f"{k}." and "lora_" in k}


def test_shared_lora_freezes_the_backbone_and_trains_the_adapter_and_every_head(bert, encoder_tasks):
    model, _, _ = build(settings(bert, encoder_tasks, "demo_entailment,demo_tags", lora="shared"))
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    encoder = {k for k, _ in model.named_parameters() if k.startswith("encoder.")}

    assert {k for k in encoder if k in trainable} == {k for k in encoder if ".lora_A.default." in k or ".lora_B.default." in k}
    # PEFT's defaults for BERT: query and value of every layer
    assert sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in encoder if "lora_" in k}) == ["query", "value"]
    assert {k for k, _ in model.named_parameters() if k.startswith("heads.")} <= trainable
    # what the checkpoint holds: exactly what trains
    assert set(model.state_dict()) == trainable


def test_a_tied_language_model_head_stays_the_frozen_embedding_matrix_and_added_tokens_train(gpt2, decoder_tasks):
    model, tokenizer, _ = build(settings(gpt2, decoder_tasks, "rewrite,color", lora="shared"))
    base = AutoConfig.from_pretrained(gpt2).vocab_size
    embeddings = model.encoder.get_input_embeddings()  # PEFT's trainable-tokens wrapper of GPT-2's wte
    lm_head = model.heads["rewrite"].get_output_embeddings()

    assert lm_head.token_adapter.base_layer.weight is embeddings.token_adapter.base_layer.weight  # still tied
    assert not embeddings.token_adapter.base_layer.weight.requires_grad
    delta = embeddings.token_adapter.trainable_tokens_delta["default"]
    assert delta.requires_grad and delta.shape[0] == len(tokenizer) - base == 1  # the <sep> row
    saved = model.state_dict()
    assert "encoder.wte.token_adapter.trainable_tokens_delta.default" in saved
    assert not [k for k in saved if "base_layer" in k or k.startswith("heads.rewrite.")]  # the head is all tied
    ids = torch.tensor([[5, len(tokenizer) - 1, 7]])
    with torch.no_grad():
        delta.add_(1.0)  # the output layer reads the <sep> row the input does
        logits = model(task="rewrite", input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        hidden = model.encoder(input_ids=ids).last_hidden_state
    torch.testing.assert_close(logits[0, :, -1], hidden[0] @ delta[0], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A Llama base with its own (untied) lm_head in its weights, as Llama's and Mistral's checkpoints hold."""
    from transformers import AutoModelForCausalLM

    directory = make_tiny_decoder(tmp_path_factory.mktemp("lora-llama"), "llama")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory)).save_pretrained(directory)
    return directory


def decoder_tasks_without_added_tokens(decoder_tasks: Path, directory: Path) -> Path:
    """The decoder tasks with the rewrite prompted by a space-separated '=' (words of the vocabulary), no <sep> token."""
    declared = json.loads(decoder_tasks.read_text())
    for task in declared["tasks"]:
        task.pop("special_tokens", None)
        if "separator" in task:
            task["separator"] = " ="
    path = directory / "tasks.json"
    path.write_text(json.dumps(declared))
    return path


def test_a_pretrained_untied_lm_head_stays_frozen_out_of_the_checkpoint_and_comes_back_from_the_base(
        llama, decoder_tasks, tmp_path):
    # Llama-3-8B's lm_head is 525 M parameters: trained in full under LoRA it would take 6.3 GB of
    # the GPU (AdamW) and of every checkpoint. It is MODEL_NAME's own: frozen, as PEFT leaves it.
    from safetensors.torch import load_file

    tasks = decoder_tasks_without_added_tokens(decoder_tasks, tmp_path)
    model, tokenizer, batches = build(settings(llama, tasks, "rewrite,color", lora="shared"))
    assert len(tokenizer) == AutoConfig.from_pretrained(llama).vocab_size  # no token added
    lm_head = model.heads["rewrite"].lm_head.weight
    assert torch.equal(lm_head, load_file(str(llama / "model.safetensors"))["lm_head.weight"])  # the base's own
    assert not lm_head.requires_grad and model.frozen_head_weights() == ["heads.rewrite.lm_head.weight"]
    saved = model.state_dict()
    assert not [k for k in saved if "lm_head" in k]
    assert "heads.color.score.weight" in saved and model.heads["color"].score.weight.requires_grad  # a new head trains

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save(tmp_path / "saved")
    reloaded = MultitaskModel.from_checkpoint(tmp_path / "saved").eval()
    assert not reloaded.heads["rewrite"].lm_head.weight.requires_grad
    with torch.no_grad():
        for task in ("rewrite", "color"):
            assert torch.equal(reloaded(task=task, **batches[task]).logits, model(task=task, **batches[task]).logits), task

    # The adapter export: the lm_head is the base model's own there, not one of modules_to_save.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    exported = model.export("rewrite", tmp_path / "adapter", tokenizer, lora_export="adapter")
    assert not json.loads((exported / "adapter_config.json").read_text()).get("modules_to_save")
    assert not [k for k in load_file(str(exported / "adapter_model.safetensors")) if "lm_head" in k]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), exported).eval()
    batch = {k: v for k, v in batches["rewrite"].items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, model(task="rewrite", **batch).logits, atol=1e-5, rtol=0)


def test_an_untied_lm_head_beside_added_tokens_trains_in_full(llama, decoder_tasks):
    # The <sep> token's row has no pretrained value: the output layer trains, and is in the checkpoint.
    model, tokenizer, _ = build(settings(llama, decoder_tasks, "rewrite,color", lora="shared"))
    assert len(tokenizer) > AutoConfig.from_pretrained(llama).vocab_size
    assert model.heads["rewrite"].lm_head.weight.requires_grad and model.frozen_head_weights() == []
    assert "heads.rewrite.lm_head.weight" in model.state_dict()


def test_per_task_adapters_change_only_on_their_own_tasks_batches_and_all_stay_in_the_optimizer(bert, encoder_tasks):
    model, _, batches = build(settings(bert, encoder_tasks, "demo_entailment,demo_similarity", lora="per_task"))
    # As the Trainer does: one optimizer over the parameters that require a gradient when it is built,
    # gradients zeroed to None between steps (`model.zero_grad()`).
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for task in ("demo_entailment", "demo_similarity"):
        assert adapter_weights(model, task) and all(id(model.get_parameter(k)) in held for k in adapter_weights(model, task))

    for task, other in (("demo_entailment", "demo_similarity"), ("demo_similarity", "demo_entailment")):
        before_own, before_other = adapter_weights(model, task), adapter_weights(model, other)
        model.zero_grad()
        model(task=task, **batches[task]).loss.backward()
        optimizer.step()
        after_own, after_other = adapter_weights(model, task), adapter_weights(model, other)
        assert any(not torch.equal(before_own[k], after_own[k]) for k in before_own), f"{task}'s adapter did not train"
        assert all(torch.equal(before_other[k], after_other[k]) for k in before_other), f"{other}'s adapter changed on {task}"
        assert all(p.requires_grad for k, p in model.named_parameters() if "lora_" in k)  # set_adapter turned none off


def test_the_checkpoint_rebuilds_from_model_name_and_refuses_other_base_weights(gpt2, decoder_tasks, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(gpt2, base)
    model, tokenizer, batches = build(settings(base, decoder_tasks, "rewrite,color", lora="per_task"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # adapters as if trained: lora_B starts at zero
    model.eval()
    saved = tmp_path / "saved"
    model.save(saved)
    reloaded = MultitaskModel.from_checkpoint(saved).eval()
    with torch.no_grad():
        for task in ("rewrite", "color"):
            assert torch.equal(reloaded(task=task, **batches[task]).logits, model(task=task, **batches[task]).logits), task
    assert json.loads((saved / "multitask.json").read_text())["lora"]["base_model"] == str(base)

    with_weights(base, seed=1)  # other weights at the same MODEL_NAME
    with pytest.raises(TaskError, match=r"holds LoRA adapters trained on .*base \(weights fingerprint \w+\), whose weights "
                                        r"now have fingerprint \w+: .*restore that model's weights") as refused:
        MultitaskModel.from_checkpoint(saved)
    assert "\n" not in str(refused.value)


def test_loading_is_strict_about_the_trainable_weights_only(bert, encoder_tasks):
    model, _, _ = build(settings(bert, encoder_tasks, "demo_entailment", lora="shared"))
    state = model.state_dict()
    assert model.load_state_dict(state).missing_keys == []  # the frozen base is no missing key
    lora_key = next(k for k in state if "lora_B" in k)
    with pytest.raises(RuntimeError, match="missing"):
        model.load_state_dict({k: v for k, v in state.items() if k != lora_key})
    with pytest.raises(RuntimeError, match="unexpected"):
        model.load_state_dict({**state, "encoder.embeddings.word_embeddings.weight": torch.zeros(1)})
    partial = model.load_state_dict({k: v for k, v in state.items() if k != lora_key}, strict=False)
    assert partial.missing_keys == [lora_key] and partial.unexpected_keys == []  # what the Trainer warns about


# ---------------------------------------------------------------------- refused before any data is read
@pytest.mark.parametrize(("model", "tasks", "extra", "error", "expected"), [
    ("bert", "encoder", {"lora_target_modules": "query,attn"}, ConfigError,
     r"LORA_TARGET_MODULES='query,attn' is not valid: the bert backbone has no module attn \(task heads are trained in "
     r"full, not adapted\); it has e.g. word_embeddings, .*query, key, value, dense"),
    ("gpt2", "decoder", {"lora_target_modules": "c_attn,wte"}, TaskError,
     r"task 'rewrite': its output layer is the backbone's wte matrix \(tied\), which LORA_TARGET_MODULES='c_attn,wte' "
     r"adapts: .*drop that module from LORA_TARGET_MODULES"),
    ("gpt2", "decoder", {"lora_target_modules": "ln_f"}, ConfigError,
     r"LORA_TARGET_MODULES='ln_f' is not valid for .*: PEFT cannot adapt them: Target module .* is not supported"),
])
def test_settings_peft_or_the_export_cannot_carry_out_are_refused_from_the_config(
        bert, gpt2, encoder_tasks, decoder_tasks, model, tasks, extra, error, expected):
    model_dir = {"bert": bert, "gpt2": gpt2}[model]
    tasks_file, names = {"encoder": (encoder_tasks, "demo_entailment,demo_tags"), "decoder": (decoder_tasks, "rewrite,color")}[tasks]
    cfg = settings(model_dir, tasks_file, names, lora="shared", **extra)
    with pytest.raises(error, match=expected) as refused:
        check_lora(cfg, resolve_tasks(cfg), encoder_config(str(model_dir)))
    assert "\n" not in str(refused.value)


def test_an_architecture_without_peft_defaults_needs_target_modules(tmp_path, encoder_tasks):
    config = DistilBertConfig(vocab_size=120, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=32)
    cfg = settings(tmp_path, encoder_tasks, "demo_entailment", lora="shared")
    with pytest.raises(ConfigError, match=r"LORA_TARGET_MODULES is empty and PEFT has no default target modules for "
                                          r"distilbert: set LORA_TARGET_MODULES to some of its modules: .*q_lin, k_lin, v_lin"):
        check_lora(cfg, resolve_tasks(cfg), config)
    named = settings(tmp_path, encoder_tasks, "demo_entailment", lora="shared", lora_target_modules="q_lin,v_lin")
    check_lora(named, resolve_tasks(named), config)


def test_a_masked_lm_head_is_refused_for_the_adapter_export_and_beside_added_tokens(bert, tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"the {w} is near the red car"}) + "\n" for w in ("dog", "cat", "bus")))
    tasks_file = tmp_path / "tasks.json"
    tasks_file.write_text(json.dumps({"tasks": [{"name": "words", "type": "masked_lm", "files": {"train": str(text)}}]}))
    config = encoder_config(str(bert))
    adapter = settings(bert, tasks_file, "words", lora="shared", lora_export="adapter")
    with pytest.raises(TaskError, match=r"task 'words': LORA_EXPORT=adapter cannot save its head: its own weights "
                                        r"\(cls\.predictions\.bias.*\) sit in a module with the output layer .*use LORA_EXPORT=merged"):
        check_lora(adapter, resolve_tasks(adapter), config)
    merged = settings(bert, tasks_file, "words", lora="shared", special_tokens="<new>")
    check_lora(merged, resolve_tasks(merged), config)  # merged: the tie is kept in the export
    specs = resolve_tasks(merged)
    tokenizer = commands.load_tokenizer(merged.model_name, specs, merged.special_tokens)
    with pytest.raises(TaskError, match=r"task 'words': with LORA=shared, the 1 token\(s\) added to the vocabulary .*drop the "
                                        r"bias of this task's output layer .*add no tokens, or set LORA=false"):
        check_lora_tokens(merged, specs, config, tokenizer)

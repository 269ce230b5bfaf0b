"""FSDP (FSDP=full_shard|shard_grad_op): the Trainer's own `fsdp`/`fsdp_config` options, the checks
that refuse it where it cannot shard, and the multitask model under PyTorch's FSDP2 on CPU.

accelerate sets FSDP up for GPU jobs only: under torchrun on CPU (gloo) the Trainer, given the
FSDP plugin, still trains plain DDP (`Trainer.is_fsdp_enabled` is False), which is why FSDP is
refused without CUDA. What the Trainer's FSDP path needs from the model is checked here on CPU
with accelerate's own wrap policy and torch's `fully_shard` (tests/fsdp_probe.py).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import write_tasks_file
from trainer.config import ConfigError, load_config
from trainer.tasks import build_spec


def fsdp_cfg(tmp_path, **settings):
    return load_config({"output_dir": str(tmp_path / "out"), **settings}, environ={}, env_file="")


def test_fsdp_maps_to_the_trainers_fsdp2_options(tmp_path):
    from trainer.training import build_training_args

    args = build_training_args(fsdp_cfg(tmp_path, fsdp="full_shard", fsdp_offload=True), precision="fp32")
    assert args.fsdp is True
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is True and plugin["cpu_offload"] is True
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert "transformer_cls_names_to_wrap" not in plugin  # the model's `_no_split_modules`: the backbone's

    # ACTIVATION_CHECKPOINTING goes to FSDP's own: the Trainer refuses both at once.
    args = build_training_args(fsdp_cfg(tmp_path, fsdp="shard_grad_op", activation_checkpointing=True), precision="fp32")
    assert args.fsdp_plugin_args["reshard_after_forward"] is False and "cpu_offload" not in args.fsdp_plugin_args
    assert args.fsdp_plugin_args["activation_checkpointing"] is True and args.activation_checkpointing is False

    # Off by default, and for evaluation and prediction of a saved model (`shard=False`).
    assert not build_training_args(fsdp_cfg(tmp_path), precision="fp32").fsdp
    unsharded = build_training_args(fsdp_cfg(tmp_path, fsdp="full_shard"), precision="fp32", shard=False)
    assert not unsharded.fsdp and unsharded.fsdp_plugin_args is None


def test_accelerates_wrap_policy_makes_the_backbones_layers_fsdp_units(tiny_model, tiny_tasks, tmp_path):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from trainer.modeling import MultitaskModel, load_encoder
    from trainer.tasks import resolve_tasks
    from trainer.training import build_training_args

    cfg = fsdp_cfg(tmp_path, model_name=str(tiny_model), model_init="scratch", tasks_file=str(tiny_tasks),
                   tasks="demo_similarity,demo_choice", fsdp="full_shard")
    model = MultitaskModel(load_encoder(cfg.model_name, cfg.model_init), resolve_tasks(cfg))
    plugin = FullyShardedDataParallelPlugin(**build_training_args(cfg, precision="fp32").fsdp_plugin_args)
    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert set(model._no_split_modules) == {"BertEmbeddings", "BertLayer"}
    assert [name for name, module in model.named_modules() if policy(module)] == [
        "encoder.embeddings", "encoder.encoder.layer.0", "encoder.encoder.layer.1"]


def test_fsdp_is_refused_on_one_process_without_a_gpu_and_with_a_generation_task():
    from trainer.training import check_fsdp

    cfg = load_config({"fsdp": "full_shard"}, environ={}, env_file="")
    classify = build_spec({"name": "c", "type": "classification", "files": {"train": "t.jsonl"}})
    generate = build_spec({"name": "g", "type": "causal_lm", "files": {"train": "t.jsonl"}})
    check_fsdp(cfg, [classify], environ={"WORLD_SIZE": "8"}, cuda=True)
    check_fsdp(load_config({}, environ={}, env_file=""), [generate], environ={}, cuda=False)  # FSDP=false: nothing to check
    for environ, cuda, specs, says in [
        ({}, True, [classify], "this job is one process (WORLD_SIZE=1)"),
        ({"WORLD_SIZE": "1"}, True, [classify], "this job is one process (WORLD_SIZE=1)"),
        ({"WORLD_SIZE": "2"}, False, [classify], "FSDP needs CUDA GPUs"),
        ({"WORLD_SIZE": "2"}, True, [classify, generate], "not valid with task 'g' (type causal_lm)"),
    ]:
        with pytest.raises(ConfigError, match=r"^FSDP='full_shard' is not valid") as err:
            check_fsdp(cfg, specs, environ=environ, cuda=cuda)
        assert says in str(err.value) and "\n" not in str(err.value)


def test_fsdp_needs_a_backbone_that_names_its_layer_classes(monkeypatch):
    from transformers import BertConfig, BertModel

    from trainer.modeling import check_memory_settings

    cfg = load_config({"fsdp": "full_shard", "model_name": "some/bert"}, environ={}, env_file="")
    check_memory_settings(cfg, BertConfig(), "fp32")
    monkeypatch.setattr(BertModel, "_no_split_modules", None)
    with pytest.raises(ConfigError) as err:
        check_memory_settings(cfg, BertConfig(), "fp32")
    assert str(err.value) == ("FSDP='full_shard' is not valid: some/bert (BertModel) names no transformer layer classes "
                              "(_no_split_modules) for FSDP to shard by; set FSDP=false")


@pytest.fixture(scope="module")
def fsdp_run(tiny_model, tmp_path_factory) -> dict:
    """tests/fsdp_probe.py under torchrun, 2 processes on gloo: the ranks' records and the output folder."""
    from tests.fsdp_probe import WATCHDOG_S
    from tests.torchrun import run_probe

    tmp = tmp_path_factory.mktemp("fsdp")
    tasks_file = write_tasks_file(tmp / "tasks", n_train=9, n_eval=4, token_task=False)
    out = tmp / "out"
    out.mkdir()
    run_probe("fsdp_probe.py", [str(tiny_model), str(tasks_file), str(out)], tmp, processes=2, timeout=WATCHDOG_S + 30)
    return {"records": {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(2)}, "out": out}


def test_fsdp2_trains_the_multitask_model_one_task_per_step_on_both_ranks(fsdp_run):
    first, second = fsdp_run["records"][0], fsdp_run["records"][1]
    assert first["wrapped"] == ["encoder.embeddings", "encoder.encoder.layer.0", "encoder.encoder.layer.1"]
    assert [s["task"] for s in first["steps"]] == [s["task"] for s in second["steps"]]  # every step: one task on every rank
    assert [s["loss"] for s in first["steps"]] != [s["loss"] for s in second["steps"]]  # each rank its own shard of the data
    assert first["final_checksum"] == second["final_checksum"] != first["initial_checksum"]
    trained = {s["task"] for s in first["steps"]}
    for task, before in first["heads_before"].items():
        # A head no step ran got no gradient and stays as it was; the others trained.
        assert (first["heads_after"][task] != before) == (task in trained), task


def test_the_full_state_dict_under_fsdp2_is_the_models_own_format_and_loads(fsdp_run):
    from safetensors.torch import load_file

    from tests.ddp_probe import checksum
    from trainer.modeling import MultitaskModel

    record = fsdp_run["records"][0]
    assert record["keys"] == record["plain_keys"]  # tied weights once, as `MultitaskModel.state_dict` saves them
    saved = fsdp_run["out"] / "saved"
    model = MultitaskModel.from_checkpoint(saved)
    assert checksum(model.state_dict()) == checksum(load_file(str(saved / "model.safetensors"))) == record["final_checksum"]

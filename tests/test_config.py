"""Config: source priority, types, validation with one-line errors, and the CLI's exit code 2."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT, run_cli
from trainer.config import FIELDS, Config, ConfigError, describe_settings, load_config


def test_defaults_are_the_seed_job():
    cfg = load_config({}, environ={}, env_file=None)
    assert cfg.model_name == "roberta-base"
    assert cfg.tasks == ["stsb", "rte", "commonsense_qa"]
    assert cfg.resolved_run_name == "roberta-base-stsb-rte-commonsense_qa"


def test_priority_cli_over_environment_over_env_file_over_demo(tmp_path):
    env_file = tmp_path / "job.env"
    env_file.write_text("LEARNING_RATE=1e-4\nSEED=5\nTRAIN_BATCH_SIZE=8\nGOOGLE_APPLICATION_CREDENTIALS=/k.json\n")
    cfg = load_config({"seed": 9}, environ={"TRAIN_BATCH_SIZE": "4", "SEED": "7"}, env_file=env_file, demo=True)
    assert cfg.seed == 9  # flag beats environment
    assert cfg.train_batch_size == 4  # environment beats env file
    assert cfg.learning_rate == 1e-4  # env file beats the demo preset (1e-3)
    assert cfg.model_init == "scratch"  # demo preset beats defaults
    assert cfg.eval_batch_size == 32  # default


def test_env_file_named_by_ENV_FILE(tmp_path):
    env_file = tmp_path / "other.env"
    env_file.write_text("RUN_NAME=from-file\n")
    assert load_config({}, environ={"ENV_FILE": str(env_file)}).run_name == "from-file"


def test_types_are_parsed():
    cfg = load_config(
        {"tasks": "stsb, rte", "task_weights": "stsb=1,rte=2.5", "group_by_length": "false", "labels": "team=nlp",
         "max_train_samples": "none", "learning-rate": "3e-5", "SPOT": True},
        environ={},
    )
    assert cfg.tasks == ["stsb", "rte"]
    assert cfg.task_weights == {"stsb": 1.0, "rte": 2.5}
    assert cfg.group_by_length is False and cfg.spot is True
    assert cfg.labels == {"team": "nlp"}
    assert cfg.max_train_samples is None
    assert cfg.learning_rate == 3e-5


def test_report_to_takes_the_trainers_trackers_comma_separated():
    assert load_config({}, environ={}).report_to == ["none"]
    assert load_config({"report_to": "tensorboard, wandb,mlflow"}, environ={}).report_to == ["tensorboard", "wandb", "mlflow"]
    assert load_config({}, environ={"REPORT_TO": "mlflow"}).report_to == ["mlflow"]
    with pytest.raises(ConfigError, match=r"^REPORT_TO='wandb,comet_ml' is not valid: expected none or trackers from "
                                          r"tensorboard,wandb,mlflow, comma-separated \(not: comet_ml\)$"):
        load_config({"report_to": "wandb,comet_ml"}, environ={})


def test_early_stopping_needs_an_evaluation_strategy():
    cfg = load_config({"early_stopping_patience": "3", "early_stopping_threshold": "0.01"}, environ={})
    assert cfg.early_stopping_patience == 3 and cfg.early_stopping_threshold == 0.01
    assert load_config({}, environ={}).early_stopping_patience is None  # off unless set
    with pytest.raises(ConfigError) as err:
        load_config({"early_stopping_patience": 3, "eval_strategy": "no", "load_best_model_at_end": False}, environ={})
    assert str(err.value) == ("EARLY_STOPPING_PATIENCE=3 is not valid: expected empty when EVAL_STRATEGY=no "
                              "(early stopping counts evaluations: set EVAL_STRATEGY=epoch or steps)")


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ({"learning_rate": "fast"}, "LEARNING_RATE='fast'"),
        ({"learning_rate": -1}, "LEARNING_RATE=-1"),
        ({"train_batch_size": 0}, "TRAIN_BATCH_SIZE=0"),
        ({"train_batch_size": 2.5}, "TRAIN_BATCH_SIZE=2.5"),
        ({"precision": "fp8"}, "PRECISION='fp8'"),
        ({"sampling": "random"}, "SAMPLING='random'"),
        ({"sampling": "weights", "tasks": "stsb,rte", "task_weights": "stsb=1"}, "TASK_WEIGHTS"),
        ({"task_weights": "mnli=1"}, "TASK_WEIGHTS"),
        ({"task_weights": "stsb=0"}, "TASK_WEIGHTS"),
        ({"task_weights": "stsb"}, "TASK_WEIGHTS"),
        ({"sampling_temperature": 0}, "SAMPLING_TEMPERATURE=0"),
        ({"tasks": ","}, "TASKS"),
        ({"tasks": "rte,rte"}, "TASKS"),
        ({"warmup_ratio": 1.5}, "WARMUP_RATIO=1.5"),
        ({"eval_strategy": "sometimes"}, "EVAL_STRATEGY"),
        ({"eval_strategy": "no"}, "LOAD_BEST_MODEL_AT_END"),
        ({"eval_strategy": "steps", "save_strategy": "epoch"}, "SAVE_STRATEGY"),
        ({"eval_strategy": "steps", "save_strategy": "steps", "eval_steps": 30, "save_steps": 50}, "SAVE_STEPS=50"),
        ({"group_by_length": "maybe"}, "GROUP_BY_LENGTH='maybe'"),
        ({"model_init": "random"}, "MODEL_INIT"),
        ({"run_name": "my run/1"}, "RUN_NAME"),
        ({"tasks_file": "/nonexistent/tasks.yaml"}, "TASKS_FILE"),
        ({"max_steps": 0}, "MAX_STEPS=0"),
        ({"checkpoint_uri": "s3://bucket/x"}, "CHECKPOINT_URI"),
        ({"resume": "sometimes"}, "RESUME"),
        ({"replica_count": 0}, "REPLICA_COUNT=0"),
        # Every float setting must be finite, whatever its own range check says.
        ({"learning_rate": "inf"}, "LEARNING_RATE='inf'"),
        ({"num_train_epochs": "inf"}, "NUM_TRAIN_EPOCHS='inf'"),
        ({"preemption_grace_seconds": "inf"}, "PREEMPTION_GRACE_SECONDS='inf'"),
        ({"storage_retry_deadline": "Infinity"}, "STORAGE_RETRY_DEADLINE='Infinity'"),
        ({"sampling_temperature": "inf"}, "SAMPLING_TEMPERATURE='inf'"),
        ({"max_grad_norm": "nan"}, "MAX_GRAD_NORM='nan'"),
        ({"weight_decay": "-inf"}, "WEIGHT_DECAY='-inf'"),
        ({"learning_rate": float("nan")}, "LEARNING_RATE=nan"),
        ({"task_weights": "stsb=inf,rte=1", "tasks": "stsb,rte", "sampling": "weights"}, "TASK_WEIGHTS='stsb=inf,rte=1'"),
        ({"task_weights": "stsb=nan"}, "TASK_WEIGHTS='stsb=nan'"),
        ({"report_to": "comet_ml"}, "REPORT_TO='comet_ml'"),
        ({"report_to": "none,wandb"}, "REPORT_TO='none,wandb'"),
        ({"report_to": "wandb,wandb"}, "REPORT_TO='wandb,wandb'"),
        ({"early_stopping_patience": 0}, "EARLY_STOPPING_PATIENCE=0"),
        ({"early_stopping_patience": "soon"}, "EARLY_STOPPING_PATIENCE='soon'"),
        ({"early_stopping_threshold": -0.01}, "EARLY_STOPPING_THRESHOLD=-0.01"),
        ({"lora": "true"}, "LORA='true' is not valid: expected false|shared|per_task"),
        ({"lora_r": 0}, "LORA_R=0"),
        ({"lora_alpha": 0}, "LORA_ALPHA=0"),
        ({"lora_dropout": 1}, "LORA_DROPOUT=1.0"),
        ({"lora_target_modules": "query,value proj"}, "LORA_TARGET_MODULES='query,value proj'"),
        ({"lora_export": "gguf"}, "LORA_EXPORT='gguf'"),
    ],
)
def test_bad_values_name_the_setting(flags, named):
    with pytest.raises(ConfigError) as err:
        load_config(flags, environ={})
    message = str(err.value)
    assert named in message
    assert "\n" not in message


def test_non_finite_numbers_are_refused_from_every_source(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("LEARNING_RATE=inf\n")
    with pytest.raises(ConfigError, match=r"^LEARNING_RATE='inf' is not valid: expected a finite number"):
        load_config({}, environ={}, env_file=env_file)
    with pytest.raises(ConfigError, match=r"^NUM_TRAIN_EPOCHS='inf' is not valid: expected a finite number"):
        load_config({}, environ={"NUM_TRAIN_EPOCHS": "inf"}, env_file="")


def test_an_empty_value_means_not_set_for_every_setting_and_source(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{name.upper()}=\n" for name in Config.__dataclass_fields__))
    empty = {name: "" for name in Config.__dataclass_fields__}
    cfg = load_config(empty, environ={name.upper(): " " for name in empty}, env_file=env_file)
    assert cfg == Config()


def test_the_config_records_which_settings_a_source_set(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("LEARNING_RATE=1e-4\nSEED=\n")
    cfg = load_config({"max_steps": "5", "run_name": ""}, environ={"SPOT": "true"}, env_file=env_file)
    assert {name for name in FIELDS if cfg.is_set(name)} == {"learning_rate", "max_steps", "spot"}  # empty: not set
    demo = load_config({}, environ={}, env_file="", demo=True)
    assert demo.is_set("max_seq_length") and demo.is_set("tasks_file") and not demo.is_set("max_steps")
    assert all(Config().is_set(name) for name in FIELDS)  # built in code: nothing is a default by omission


def test_an_empty_value_leaves_the_next_source_in_charge(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("LEARNING_RATE=1e-4\nRUN_NAME=from-file\nSPOT=true\n")
    cfg = load_config({"learning_rate": "", "spot": ""}, environ={"LEARNING_RATE": "", "RUN_NAME": ""}, env_file=env_file)
    assert cfg.learning_rate == 1e-4 and cfg.run_name == "from-file" and cfg.spot is True
    assert load_config({"run_name": ""}, environ={}, env_file="", demo=True).run_name == "demo"


def test_unknown_flag_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"--learnig_rate.*did you mean LEARNING_RATE"):
        load_config({"learnig_rate": 1e-4}, environ={})


def test_unknown_env_file_key_is_a_typo(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("NUM_TRAIN_EPOCH=3\n")
    with pytest.raises(ConfigError, match=r"unknown setting NUM_TRAIN_EPOCH in .*did you mean NUM_TRAIN_EPOCHS"):
        load_config({}, environ={}, env_file=env_file)


def test_an_env_file_that_is_not_utf8_is_one_line(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_bytes("RUN_NAME=x\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"^env file .*\.env is not UTF-8 text \(byte 0xe9 on line 2\); save it as UTF-8$"):
        load_config({}, environ={}, env_file=env_file)


def test_missing_env_file_named_explicitly_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="ENV_FILE"):
        load_config({}, environ={"ENV_FILE": str(tmp_path / "missing.env")})


def test_fp16_without_gpu_is_refused_before_loading(monkeypatch):
    import torch

    from trainer.training import resolve_precision

    # Both sides on any machine: the answer depends only on whether CUDA is there.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="^PRECISION='fp16' is not valid"):
        resolve_precision("fp16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_precision("fp16") == "fp16"


def test_to_env_round_trips_changed_settings():
    cfg = load_config({"learning_rate": 5e-5, "tasks": "stsb,rte", "task_weights": "stsb=2,rte=1", "sampling": "weights"},
                      environ={})
    env = cfg.to_env()
    assert env["LEARNING_RATE"] == "5e-05" and env["TASKS"] == "stsb,rte"
    assert "PROJECT_ID" not in env  # cloud settings stay on the submitting side
    again = load_config({}, environ=env)
    assert again.to_env() == env and again.hash() == cfg.hash()


def test_hash_ignores_where_outputs_go():
    a = load_config({"output_dir": "/a"}, environ={})
    b = load_config({"output_dir": "/b"}, environ={})
    c = load_config({"learning_rate": 1e-4}, environ={})
    assert a.hash() == b.hash() != c.hash()


def test_hash_ignores_what_only_changes_memory():
    # Checkpointed activations give the same gradients; the weights' dtype changes the training.
    plain = load_config({}, environ={})
    assert load_config({"activation_checkpointing": "true"}, environ={}).hash() == plain.hash()
    assert load_config({"model_dtype": "bfloat16"}, environ={}).hash() != plain.hash()


def test_settings_table_lists_every_setting():
    text = describe_settings()
    for name in Config.__dataclass_fields__:
        assert name.upper() in text


def test_env_example_documents_every_setting():
    """.env.example is the real job's file: every setting appears with a comment line above it."""
    lines = (ROOT / ".env.example").read_text().splitlines()
    documented = {}
    for i, line in enumerate(lines):
        key = line.split("=", 1)[0]
        if "=" in line and not line.startswith("#") and key.isupper():
            documented[key] = i > 0 and lines[i - 1].startswith("#")
    for name in Config.__dataclass_fields__:
        assert documented.get(name.upper()), f"{name.upper()} is not documented in .env.example"
    cfg = load_config({}, environ={}, env_file=ROOT / ".env.example")
    assert cfg.model_name == "roberta-base" and cfg.tasks == ["stsb", "rte", "commonsense_qa"]


def test_cli_bad_setting_exits_2_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "outputs"
    result = run_cli("train", "--learning_rate=fast", f"--output_dir={out}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: LEARNING_RATE='fast'")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_unknown_task_exits_2(tmp_path):
    result = run_cli("train", "--tasks=stsb,nope", f"--output_dir={tmp_path / 'o'}")
    assert result.returncode == 2
    assert "unknown task 'nope'" in result.stderr and "stsb" in result.stderr
    assert not (tmp_path / "o").exists()


def test_cli_settings_and_help():
    listed = run_cli("settings")
    assert listed.returncode == 0 and "LEARNING_RATE" in listed.stdout
    helped = run_cli("--help", env={"PAGER": "cat"})
    for command in ("train", "evaluate", "predict", "export"):
        assert command in helped.stdout + helped.stderr


def test_lora_settings_and_lora_on_a_scratch_backbone():
    cfg = load_config({"lora": "per_task", "lora_target_modules": "query, value,attention.output.dense", "lora_r": 4}, environ={})
    assert (cfg.lora, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == ("per_task", 4, 16, 0.05)
    assert cfg.lora_target_modules == ["query", "value", "attention.output.dense"] and cfg.lora_export == "merged"
    assert load_config({}, environ={}).lora == "false"
    with pytest.raises(ConfigError) as err:
        load_config({"lora": "shared", "model_init": "scratch"}, environ={})
    assert str(err.value) == ("MODEL_INIT='scratch' is not valid: expected pretrained when LORA=shared (LoRA trains adapters "
                              "on frozen pretrained weights; a scratch backbone would stay random): set MODEL_INIT=pretrained, "
                              "or LORA=false")


def test_fsdp_settings_and_what_fsdp_cannot_combine_with():
    cfg = load_config({"fsdp": "shard_grad_op", "fsdp_offload": "true"}, environ={})
    assert (cfg.fsdp, cfg.fsdp_offload) == ("shard_grad_op", True)
    assert (load_config({}, environ={}).fsdp, load_config({}, environ={}).fsdp_offload) == ("false", False)
    # Sharding changes where the weights live, not the gradients (the run's identity records FSDP: its files differ).
    assert load_config({"fsdp": "full_shard"}, environ={}).hash() == load_config({}, environ={}).hash()
    refused = {
        ("hybrid_shard", "false", False): "FSDP='hybrid_shard' is not valid: expected false|full_shard|shard_grad_op "
                                          "(hybrid_shard is FSDP1-only in transformers)",
        ("false", "false", True): "FSDP_OFFLOAD=True is not valid: expected false when FSDP=false (there is nothing sharded "
                                  "to offload): set FSDP=full_shard or shard_grad_op, or FSDP_OFFLOAD=false",
        ("full_shard", "per_task", False): "FSDP='full_shard' is not valid: expected false with LORA=per_task (LoRA "
                                           "checkpoints hold only the adapters and heads, FSDP saves and loads whole state "
                                           "dicts): set LORA=false or FSDP=false",
    }
    for (fsdp, lora, offload), message in refused.items():
        with pytest.raises(ConfigError) as err:
            load_config({"fsdp": fsdp, "lora": lora, "fsdp_offload": offload}, environ={})
        assert str(err.value) == message


def test_cli_fsdp_on_one_process_exits_2_with_one_line_before_anything_is_written(tmp_path):
    out = tmp_path / "outputs"
    result = run_cli("train", "--demo", "--fsdp=full_shard", f"--output_dir={out}", cwd=tmp_path,
                     env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("error: FSDP='full_shard' is not valid: this job is one process (WORLD_SIZE=1), with "
                                    "nothing to shard over; run it on several GPUs")
    assert result.stderr.strip().endswith("or set FSDP=false")
    assert not out.exists()


def test_cli_fsdp_without_a_gpu_exits_2_with_one_line(tmp_path):
    # A torchrun process on a machine without CUDA: accelerate would ignore FSDP and train plain DDP.
    torchrun = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": ""}
    result = run_cli("train", "--demo", "--fsdp=shard_grad_op", f"--output_dir={tmp_path / 'o'}", cwd=tmp_path, env=torchrun)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (
        "error: FSDP='shard_grad_op' is not valid: FSDP needs CUDA GPUs (accelerate shards only GPU jobs; on CPU it ignores "
        "FSDP and would train every weight on every process); set FSDP=false on CPU")
    assert not (tmp_path / "o").exists()

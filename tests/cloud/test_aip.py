"""The Vertex AI contract inside the container (AIP_* folders, hyperparameter-tuning metrics) and
`python -m trainer submit` sending the real client's request to a local Vertex endpoint."""

from __future__ import annotations

import json

from google.cloud import aiplatform_v1

from tests.conftest import ROOT, run_cli, tiny_flags
from trainer.checkpoints import commits as cs
from trainer.checkpoints.storage import open_store


def test_training_honours_the_vertex_contract(gcs_server, tiny_model, tiny_tasks, tmp_path):
    base = "gs://test-bucket/job-123"
    env = {
        "AIP_CHECKPOINT_DIR": f"{base}/checkpoints",
        "AIP_MODEL_DIR": f"{base}/model",
        "AIP_TENSORBOARD_LOG_DIR": f"{base}/logs",
        "CLOUD_ML_TRIAL_ID": "7",
        "CLOUD_ML_HP_METRIC_FILE": str(tmp_path / "hypertune" / "output.metrics"),
    }
    result = run_cli("train", *tiny_flags(tiny_model, tiny_tasks, tmp_path / "out", run_name="vertex"), env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    checkpoints = open_store(env["AIP_CHECKPOINT_DIR"])  # the default CHECKPOINT_URI on Vertex
    assert [m.step for m in cs.list_checkpoints(checkpoints, "vertex")] == [6, 12]
    assert cs.read_final(checkpoints, "vertex") is not None

    model_files = {o.key for o in open_store(env["AIP_MODEL_DIR"]).list()}
    for task in ("demo_similarity", "demo_entailment", "demo_choice", "demo_tags"):
        assert f"{task}/model.safetensors" in model_files and f"{task}/config.json" in model_files

    logs = [o.key for o in open_store(env["AIP_TENSORBOARD_LOG_DIR"]).list()]
    assert any("events.out.tfevents" in key for key in logs)

    lines = [json.loads(x) for x in (tmp_path / "hypertune" / "output.metrics").read_text().splitlines()]
    assert [x["global_step"] for x in lines][:2] == [6, 12]
    assert all(x["trial"] == "7" and 0 <= x["macro_avg"] <= 1 for x in lines)


def test_submit_sends_the_custom_job_with_the_job_settings(vertex_server, tmp_path):
    flags = [f"--env_file={ROOT / '.env.example'}", f"--vertex_api_endpoint={vertex_server.endpoint}",
             "--learning_rate=3e-5", "--spot=true", "--replica_count=2", "--accelerator_count=2"]
    result = run_cli("submit", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    posts = [r for r in vertex_server.requests if r.method == "POST"]
    assert len(posts) == 1 and posts[0].path == "/v1/projects/my-project/locations/us-central1/customJobs"
    job = aiplatform_v1.CustomJob.from_json(posts[0].body)
    pools = job.job_spec.worker_pool_specs
    assert [p.replica_count for p in pools] == [1, 1]
    assert pools[0].machine_spec.accelerator_count == 2
    env = {e.name: e.value for e in pools[0].container_spec.env}
    assert env["LEARNING_RATE"] == "3e-05" and env["CHECKPOINT_URI"] == "gs://my-bucket/multitask"
    assert env["RUN_NAME"] == "roberta-base-stsb-rte-commonsense_qa"  # restarts resume the same run
    assert "PROJECT_ID" not in env and "SPOT" not in env
    assert list(pools[0].container_spec.args) == ["train"]
    assert job.job_spec.scheduling.strategy == aiplatform_v1.Scheduling.Strategy.SPOT
    assert "console.cloud.google.com/vertex-ai" in result.stdout


def test_submit_dry_run_sends_nothing_and_prints_a_valid_job(vertex_server):
    result = run_cli("submit", "--dry_run", f"--env_file={ROOT / '.env.example'}", f"--vertex_api_endpoint={vertex_server.endpoint}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert vertex_server.requests == []
    job = aiplatform_v1.CustomJob.from_json(result.stdout)
    assert job.job_spec.base_output_directory.output_uri_prefix == "gs://my-bucket/multitask/roberta-base-stsb-rte-commonsense_qa"


def test_submit_passes_the_env_files_variables_of_the_named_trackers_to_the_job(vertex_server, tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text((ROOT / ".env.example").read_text().replace("REPORT_TO=none", "REPORT_TO=wandb")
                        + "WANDB_PROJECT=multitask\nWANDB_API_KEY=k-123\nWANDB_ENTITY=\nMLFLOW_TRACKING_URI=http://mlflow:5000\n")
    result = run_cli("submit", "--dry_run", f"--env_file={env_file}", f"--vertex_api_endpoint={vertex_server.endpoint}")
    assert result.returncode == 0, result.stderr[-2000:]
    job = aiplatform_v1.CustomJob.from_json(result.stdout)
    env = {e.name: e.value for e in job.job_spec.worker_pool_specs[0].container_spec.env}
    assert env["REPORT_TO"] == "wandb" and env["WANDB_PROJECT"] == "multitask" and env["WANDB_API_KEY"] == "k-123"
    assert "WANDB_ENTITY" not in env  # empty means unset
    assert "MLFLOW_TRACKING_URI" not in env  # REPORT_TO does not name mlflow


def test_submit_refuses_a_bad_combination_before_sending(vertex_server):
    result = run_cli("submit", f"--env_file={ROOT / '.env.example'}", f"--vertex_api_endpoint={vertex_server.endpoint}",
                     "--machine_type=a2-highgpu-1g", "--accelerator_type=NVIDIA_TESLA_T4")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "accelerator" in result.stderr.lower()
    assert vertex_server.requests == []


def test_settings_get_prints_one_resolved_value():
    result = run_cli("settings", "--get=IMAGE_URI", f"--env_file={ROOT / '.env.example'}")
    assert result.returncode == 0
    assert result.stdout.strip() == "us-central1-docker.pkg.dev/my-project/training/multitask-trainer:latest"

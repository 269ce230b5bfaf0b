"""trainer.cloud.vertex against a local Vertex endpoint, through the real client.

The jobs go through ``google-cloud-aiplatform`` (REST transport, anonymous
credentials) to ``tests/vertex_server.py``; what the server received is parsed
back with ``aiplatform_v1.CustomJob.from_json`` and compared to the settings.
"""

from __future__ import annotations

import ast
import io
import json
import socket
import sys
import types
from pathlib import Path

import pytest
from google.cloud import aiplatform_v1

from trainer.cloud import vertex as cloud
from trainer.cloud.vertex import CloudApiError, CloudConfigError, CloudJobFailed

try:  # tests/ importable as a package (rootdir on sys.path) ...
    from tests import vertex_server as vertex
except (
    ImportError
):  # ... or tests/ itself on sys.path (pytest's default without __init__.py)
    import vertex_server as vertex

vertex_server = vertex.vertex_server  # the fixture

ENV = {"TRAINER_TASKS": "sst2,mnli", "TRAINER_LEARNING_RATE": "3e-05", "EMPTY": ""}
IMAGE = "us-central1-docker.pkg.dev/test-project/trainers/multitask:v1"
STATE = aiplatform_v1.JobState
STRATEGY = aiplatform_v1.Scheduling.Strategy


def settings(**overrides) -> types.SimpleNamespace:
    """The attributes of trainer.config.Config that trainer.cloud.vertex reads."""
    values = {
        "project_id": "test-project",
        "region": "us-central1",
        "image_uri": IMAGE,
        "job_display_name": None,
        "run_name": "glue-run-7",
        "machine_type": "n1-standard-8",
        "accelerator_type": "NVIDIA_TESLA_T4",
        "accelerator_count": 1,
        "replica_count": 1,
        "spot": False,
        "timeout": "24h",
        "restart_job_on_worker_restart": True,
        "service_account": None,
        "labels": {},
        "base_output_dir": None,
        "checkpoint_uri": "gs://test-bucket/checkpoints",
        "vertex_api_endpoint": None,
        "boot_disk_size_gb": 100,
    }
    unknown = set(overrides) - set(values)
    assert not unknown, f"not a setting: {unknown}"
    values.update(overrides)
    return types.SimpleNamespace(**values)


def sent_job(server: vertex.VertexServer) -> aiplatform_v1.CustomJob:
    (request,) = [r for r in server.requests if r.method == "POST"]
    return aiplatform_v1.CustomJob.from_json(request.body)


# --------------------------------------------------------------------------
# The job Vertex receives
# --------------------------------------------------------------------------


@pytest.mark.parametrize("replica_count", [1, 3])
def test_every_setting_reaches_vertex(vertex_server, replica_count):
    cfg = settings(
        vertex_api_endpoint=vertex_server.endpoint,
        region="europe-west4",
        machine_type="n1-highmem-16",
        accelerator_type="NVIDIA_TESLA_V100",
        accelerator_count=4,
        replica_count=replica_count,
        spot=True,
        timeout="2h30m",
        restart_job_on_worker_restart=False,
        service_account="trainer@test-project.iam.gserviceaccount.com",
        labels={"team": "nlp", "cost-center": "r_and_d-42"},
        boot_disk_size_gb=250,
    )
    out = io.StringIO()
    returned = cloud.submit(cfg, ENV, args=["--max_steps", "10"], out=out)

    (request,) = vertex_server.requests
    assert (request.method, request.path) == (
        "POST",
        "/v1/projects/test-project/locations/europe-west4/customJobs",
    )
    job = sent_job(vertex_server)
    assert job.display_name == "glue-run-7"
    assert dict(job.labels) == {"team": "nlp", "cost-center": "r_and_d-42"}
    spec = job.job_spec
    assert spec.service_account == "trainer@test-project.iam.gserviceaccount.com"
    assert spec.base_output_directory.output_uri_prefix == (
        "gs://test-bucket/checkpoints/glue-run-7"
    )
    assert spec.scheduling.timeout.total_seconds() == 2 * 3600 + 30 * 60
    assert spec.scheduling.restart_job_on_worker_restart is False
    assert spec.scheduling.strategy == STRATEGY.SPOT

    expected_replicas = [1] if replica_count == 1 else [1, replica_count - 1]
    assert [pool.replica_count for pool in spec.worker_pool_specs] == expected_replicas
    for pool in spec.worker_pool_specs:
        assert pool.machine_spec.machine_type == "n1-highmem-16"
        assert (
            pool.machine_spec.accelerator_type
            == aiplatform_v1.AcceleratorType.NVIDIA_TESLA_V100
        )
        assert pool.machine_spec.accelerator_count == 4
        assert pool.disk_spec.boot_disk_size_gb == 250
        assert pool.container_spec.image_uri == IMAGE
        assert list(pool.container_spec.args) == ["--max_steps", "10"]
        env = [(e.name, e.value) for e in pool.container_spec.env]
        assert env == list(ENV.items())

    job_id = returned["name"].rsplit("/", 1)[-1]
    name = f"projects/test-project/locations/europe-west4/customJobs/{job_id}"
    assert returned["name"] == name
    assert returned["state"] == "JOB_STATE_QUEUED"
    assert returned["jobSpec"]["scheduling"]["strategy"] == "SPOT"
    assert f"Created Vertex job {name}" in out.getvalue()
    assert (
        "https://console.cloud.google.com/vertex-ai/locations/europe-west4"
        f"/training/{job_id}?project=test-project"
    ) in out.getvalue()


def test_cpu_only_job_with_explicit_names(vertex_server):
    cfg = settings(
        vertex_api_endpoint=vertex_server.endpoint,
        machine_type="e2-standard-4",
        accelerator_type="NONE",
        job_display_name="nightly glue",
        base_output_dir="gs://other-bucket/out",
        checkpoint_uri="/tmp/checkpoints",
    )
    cloud.submit(cfg, {}, out=io.StringIO())

    job = sent_job(vertex_server)
    assert job.display_name == "nightly glue"
    (pool,) = job.job_spec.worker_pool_specs
    assert pool.machine_spec.machine_type == "e2-standard-4"
    assert (
        pool.machine_spec.accelerator_type
        == aiplatform_v1.AcceleratorType.ACCELERATOR_TYPE_UNSPECIFIED
    )
    assert pool.machine_spec.accelerator_count == 0
    assert list(pool.container_spec.args) == []  # the image's CMD runs
    assert job.job_spec.service_account == ""
    assert job.job_spec.scheduling.strategy == STRATEGY.STANDARD
    assert job.job_spec.scheduling.timeout.total_seconds() == 24 * 3600
    assert (
        job.job_spec.base_output_directory.output_uri_prefix == "gs://other-bucket/out"
    )


def test_dry_run_prints_the_job_and_sends_nothing(vertex_server):
    cfg = settings(
        vertex_api_endpoint=vertex_server.endpoint, replica_count=2, spot=True
    )
    out = io.StringIO()
    returned = cloud.submit(cfg, ENV, dry_run=True, out=out)

    assert vertex_server.requests == []
    assert json.loads(out.getvalue()) == returned == cloud.build_custom_job(cfg, ENV)
    job = aiplatform_v1.CustomJob.from_json(out.getvalue())
    assert [p.replica_count for p in job.job_spec.worker_pool_specs] == [1, 1]
    assert job.job_spec.scheduling.strategy == STRATEGY.SPOT


def test_gcloud_config_is_the_job_spec():
    job = cloud.build_custom_job(settings(labels={"team": "nlp"}), ENV)
    config = cloud.gcloud_config(job)

    assert config == job["jobSpec"] and config is not job["jobSpec"]
    aiplatform_v1.CustomJobSpec.from_json(json.dumps(config))  # a CustomJobSpec

    def keys(node):
        if isinstance(node, dict):
            for key, value in node.items():
                yield key
                yield from keys(value)
        elif isinstance(node, list):
            for item in node:
                yield from keys(item)

    # gcloud rejects snake_case keys in --config files.
    assert not [k for k in keys(config) if "_" in k]


# --------------------------------------------------------------------------
# Waiting for the job
# --------------------------------------------------------------------------


def test_wait_streams_states_until_success(vertex_server):
    out = io.StringIO()
    cfg = settings(vertex_api_endpoint=vertex_server.endpoint)
    job = cloud.submit(cfg, ENV, wait=True, poll_interval=0.01, out=out)

    assert job["state"] == "JOB_STATE_SUCCEEDED"
    states = [
        line.rsplit(": ", 1)[1]
        for line in out.getvalue().splitlines()
        if ": JOB_STATE" in line
    ]
    assert states == ["JOB_STATE_QUEUED", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"]
    assert [r.method for r in vertex_server.requests] == ["POST", "GET", "GET"]


def test_wait_raises_when_the_job_fails(vertex_server):
    vertex_server.script = (
        "JOB_STATE_PENDING",
        "JOB_STATE_RUNNING",
        "JOB_STATE_FAILED",
    )
    vertex_server.error = {
        "code": 13,
        "message": "replica workerpool1-0 exited with status 1",
    }
    out = io.StringIO()
    cfg = settings(vertex_api_endpoint=vertex_server.endpoint)

    with pytest.raises(CloudJobFailed, match="exited with status 1") as failed:
        cloud.submit(cfg, ENV, wait=True, poll_interval=0.01, out=out)
    assert failed.value.state == "JOB_STATE_FAILED"
    assert failed.value.job_name.startswith(
        "projects/test-project/locations/us-central1/customJobs/"
    )
    assert "JOB_STATE_RUNNING" in out.getvalue()


def test_wait_rides_out_a_transient_error(vertex_server):
    vertex_server.fail_next(503, "UNAVAILABLE", "backend busy", method="GET")
    cfg = settings(vertex_api_endpoint=vertex_server.endpoint)
    job = cloud.submit(cfg, ENV, wait=True, poll_interval=0.01, out=io.StringIO())

    assert job["state"] == "JOB_STATE_SUCCEEDED"
    assert [r.method for r in vertex_server.requests] == ["POST", "GET", "GET", "GET"]


# --------------------------------------------------------------------------
# Errors from the API
# --------------------------------------------------------------------------


def test_permission_denied_names_the_identity_to_fix(vertex_server):
    vertex_server.fail_next(
        403, "PERMISSION_DENIED", "Permission 'aiplatform.customJobs.create' denied"
    )
    cfg = settings(
        vertex_api_endpoint=vertex_server.endpoint,
        service_account="runner@test-project.iam.gserviceaccount.com",
    )
    with pytest.raises(CloudApiError) as error:
        cloud.submit(cfg, ENV, out=io.StringIO())
    message = str(error.value)
    assert "\n" not in message
    assert "aiplatform.customJobs.create" in message
    assert "gcloud auth application-default login" in message
    assert "runner@test-project.iam.gserviceaccount.com" in message


def test_not_found_points_at_project_and_region(vertex_server):
    vertex_server.fail_next(404, "NOT_FOUND", "Project 'test-project' not found")
    cfg = settings(vertex_api_endpoint=vertex_server.endpoint)
    with pytest.raises(
        CloudApiError, match="project_id='test-project' and region='us-central1'"
    ):
        cloud.submit(cfg, ENV, out=io.StringIO())


def test_unreachable_endpoint_is_one_line():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = settings(vertex_api_endpoint=f"http://127.0.0.1:{port}")
    with pytest.raises(CloudApiError, match="vertex_api_endpoint") as error:
        cloud.submit(cfg, ENV, out=io.StringIO())
    assert "\n" not in str(error.value)


def test_missing_default_credentials_say_how_to_log_in(monkeypatch, tmp_path):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(CloudApiError, match="gcloud auth application-default login"):
        cloud._credentials(cloud.api_endpoint(settings()))


# --------------------------------------------------------------------------
# Invalid settings: refused before anything is sent
# --------------------------------------------------------------------------

INVALID = {
    "no project": ({"project_id": None}, "project_id"),
    "project name, not ID": ({"project_id": "My Project"}, "project_id"),
    "no image": ({"image_uri": None}, "image_uri"),
    "image with scheme": ({"image_uri": "https://" + IMAGE}, "image_uri"),
    "no output dir, local checkpoints": (
        {"base_output_dir": None, "checkpoint_uri": "/tmp/ckpt"},
        "base_output_dir",
    ),
    "output dir not gs": ({"base_output_dir": "/tmp/out"}, "base_output_dir"),
    "region typo": ({"region": "us-central"}, "region"),
    "region not offered": ({"region": "mars-north1"}, "region"),
    "region upper case": ({"region": "US-CENTRAL1"}, "region"),
    "unknown accelerator": (
        {"accelerator_type": "NVIDIA_GTX_1080"},
        "accelerator_type",
    ),
    "retired K80": ({"accelerator_type": "NVIDIA_TESLA_K80"}, "accelerator_type"),
    "A100 on N1": ({"accelerator_type": "NVIDIA_TESLA_A100"}, "accelerator_type"),
    "L4 on N1": ({"accelerator_type": "NVIDIA_L4"}, "accelerator_type"),
    "T4 on A2": (
        {"machine_type": "a2-highgpu-1g", "accelerator_type": "NVIDIA_TESLA_T4"},
        "accelerator_type",
    ),
    "A100 40GB on ultragpu": (
        {"machine_type": "a2-ultragpu-1g", "accelerator_type": "NVIDIA_TESLA_A100"},
        "accelerator_type",
    ),
    "A2 count mismatch": (
        {
            "machine_type": "a2-highgpu-2g",
            "accelerator_type": "NVIDIA_TESLA_A100",
            "accelerator_count": 1,
        },
        "accelerator_count",
    ),
    "A2 size that does not exist": (
        {
            "machine_type": "a2-highgpu-3g",
            "accelerator_type": "NVIDIA_TESLA_A100",
            "accelerator_count": 3,
        },
        "machine_type",
    ),
    "H100 count mismatch": (
        {
            "machine_type": "a3-highgpu-8g",
            "accelerator_type": "NVIDIA_H100_80GB",
            "accelerator_count": 4,
        },
        "accelerator_count",
    ),
    "plain H100 on megagpu": (
        {
            "machine_type": "a3-megagpu-8g",
            "accelerator_type": "NVIDIA_H100_80GB",
            "accelerator_count": 8,
        },
        "accelerator_type",
    ),
    "H100 on ultragpu (H200)": (
        {
            "machine_type": "a3-ultragpu-8g",
            "accelerator_type": "NVIDIA_H100_MEGA_80GB",
            "accelerator_count": 8,
        },
        "accelerator_type",
    ),
    "T4 on G2": (
        {"machine_type": "g2-standard-8", "accelerator_type": "NVIDIA_TESLA_T4"},
        "accelerator_type",
    ),
    "G2 count mismatch": (
        {
            "machine_type": "g2-standard-24",
            "accelerator_type": "NVIDIA_L4",
            "accelerator_count": 1,
        },
        "accelerator_count",
    ),
    "T4 count 3": ({"accelerator_count": 3}, "accelerator_count"),
    "V100 count 16": (
        {"accelerator_type": "NVIDIA_TESLA_V100", "accelerator_count": 16},
        "accelerator_count",
    ),
    "T4 count 0": ({"accelerator_count": 0}, "accelerator_count"),
    "GPU on E2": ({"machine_type": "e2-standard-4"}, "accelerator_type"),
    "CPU-only A2": (
        {"machine_type": "a2-highgpu-1g", "accelerator_type": "NONE"},
        "accelerator_type",
    ),
    "CPU-only G2": (
        {"machine_type": "g2-standard-4", "accelerator_type": ""},
        "accelerator_type",
    ),
    "unknown family": (
        {"machine_type": "x9-standard-4", "accelerator_type": "NONE"},
        "machine_type",
    ),
    "not a machine type": ({"machine_type": "big-gpu"}, "machine_type"),
    "no replicas": ({"replica_count": 0}, "replica_count"),
    "label key upper case": ({"labels": {"Team": "nlp"}}, "labels"),
    "label key starts with digit": ({"labels": {"1team": "nlp"}}, "labels"),
    "label key too long": ({"labels": {"k" * 64: "v"}}, "labels"),
    "label value upper case": ({"labels": {"team": "NLP"}}, "labels[team]"),
    "label value with space": ({"labels": {"team": "n l p"}}, "labels[team]"),
    "label value with dot": ({"labels": {"version": "1.2"}}, "labels[version]"),
    "timeout unparsable": ({"timeout": "forever"}, "timeout"),
    "timeout zero": ({"timeout": "0s"}, "timeout"),
    "timeout empty": ({"timeout": ""}, "timeout"),
    "timeout negative": ({"timeout": "-5"}, "timeout"),
    "boot disk too small": ({"boot_disk_size_gb": 50}, "boot_disk_size_gb"),
    "service account not an email": ({"service_account": "trainer"}, "service_account"),
}


@pytest.mark.parametrize(("overrides", "setting"), INVALID.values(), ids=INVALID.keys())
def test_invalid_settings_are_refused_before_sending(vertex_server, overrides, setting):
    cfg = settings(vertex_api_endpoint=vertex_server.endpoint, **overrides)
    with pytest.raises(CloudConfigError) as error:
        cloud.submit(cfg, ENV, out=io.StringIO())
    message = str(error.value)
    assert message.startswith(f"{setting}="), message
    assert "\n" not in message
    assert "; " in message  # problem; fix
    assert vertex_server.requests == []


def test_plain_http_is_only_for_local_endpoints():
    with pytest.raises(CloudConfigError, match="^vertex_api_endpoint="):
        cloud.validate_job(settings(vertex_api_endpoint="http://vertex.example.com"))
    cloud.validate_job(settings(vertex_api_endpoint="https://vertex.example.com"))
    cloud.validate_job(settings(vertex_api_endpoint="http://localhost:8080"))


def test_fix_for_a_misplaced_gpu_names_the_machines_that_carry_it():
    with pytest.raises(CloudConfigError, match="a2-highgpu-1g"):
        cloud.validate_job(settings(accelerator_type="NVIDIA_TESLA_A100"))


def test_bad_env_names_are_refused():
    with pytest.raises(CloudConfigError, match="^env="):
        cloud.build_custom_job(settings(), {"NOT-A-NAME": "1"})
    with pytest.raises(CloudConfigError, match=r"^env\[STEPS\]="):
        cloud.build_custom_job(settings(), {"STEPS": 10})


# --------------------------------------------------------------------------
# The tables and small helpers
# --------------------------------------------------------------------------


VALID_MACHINES = (
    [(machine, gpu, count) for machine, (gpu, count) in cloud.GPU_MACHINES.items()]
    + [
        ("n1-standard-8", gpu, n)
        for gpu, counts in cloud.N1_GPU_COUNTS.items()
        for n in counts
    ]
    + [(f"{family}-standard-4", "NONE", 0) for family in sorted(cloud.CPU_FAMILIES)]
)


@pytest.mark.parametrize(("machine", "gpu", "count"), VALID_MACHINES)
def test_every_table_combination_is_a_valid_job(machine, gpu, count):
    cfg = settings(machine_type=machine, accelerator_type=gpu, accelerator_count=count)
    cloud.validate_job(cfg)
    job = aiplatform_v1.CustomJob.from_json(
        json.dumps(cloud.build_custom_job(cfg, ENV))
    )
    spec = job.job_spec.worker_pool_specs[0].machine_spec
    assert spec.machine_type == machine
    assert spec.accelerator_count == count


def test_table_accelerators_are_vertex_enum_names():
    assert cloud.ACCELERATOR_TYPES <= set(aiplatform_v1.AcceleratorType.__members__)
    assert {"SPOT", "STANDARD"} <= set(STRATEGY.__members__)
    assert {s.removeprefix("JOB_STATE_") for s in cloud.TERMINAL_STATES} <= {
        s.removeprefix("JOB_STATE_") for s in STATE.__members__
    }


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("24h", 86400),
        ("90m", 5400),
        ("3600s", 3600),
        ("2h30m", 9000),
        ("3600", 3600),
        ("1d", 86400),
        (7200, 7200),
        (" 2H ", 7200),
    ],
)
def test_parse_timeout(text, seconds):
    assert cloud.parse_timeout(text) == seconds


def test_defaults_derived_from_other_settings():
    cfg = settings(checkpoint_uri="gs://bucket/ckpt/", job_display_name=None)
    assert cloud.base_output_dir(cfg) == "gs://bucket/ckpt/glue-run-7"
    assert cloud.display_name(cfg) == "glue-run-7"
    assert (
        cloud.api_endpoint(settings(region="asia-east1"))
        == "asia-east1-aiplatform.googleapis.com"
    )
    assert cloud.console_url("projects/p1/locations/us-east4/customJobs/42") == (
        "https://console.cloud.google.com/vertex-ai/locations/us-east4/training/42?project=p1"
    )


def test_cloud_module_imports_only_the_standard_library():
    tree = ast.parse(Path(cloud.__file__).read_text())
    top_level = set()
    for node in tree.body:  # module level only: functions may import the SDK
        if isinstance(node, ast.Import):
            top_level |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            top_level.add(node.module.split(".")[0])
    assert top_level <= set(sys.stdlib_module_names) | {"__future__"}

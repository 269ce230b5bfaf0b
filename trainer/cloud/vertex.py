"""Submit the trainer to Vertex AI as a CustomJob.

A leaf module: only the standard library is imported here; the Vertex client
(``google.cloud.aiplatform_v1``), ``google.auth`` and ``google.api_core`` are
imported inside the functions that talk to the API, so validating and building
a job (and ``--dry-run``) work without them.

The flow is ``submit`` = ``validate_job`` (every setting checked before
anything is sent) + ``build_custom_job`` (the CustomJob as a REST/JSON dict) +
``JobServiceClient.create_custom_job`` (+ polling with ``wait=True``).

The settings object is duck-typed: anything with the attributes of
``trainer.config.Config`` listed in ``validate_job`` works.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO
from urllib.parse import urlsplit

# --------------------------------------------------------------------------
# Facts about Vertex AI custom training, kept as data.
#
# Source: Vertex AI documentation, "Configure compute resources for custom
# training" (cloud.google.com/vertex-ai/docs/training/configure-compute: the
# machine-type and GPU tables), "Vertex AI locations"
# (cloud.google.com/vertex-ai/docs/general/locations: regions that offer
# custom training) and the Compute Engine "GPU machine types" page. The
# accelerator names are the ``AcceleratorType`` enum of
# ``google.cloud.aiplatform_v1`` (tests check each name exists there).
# GPUs are offered per region and change over time: these tables catch
# impossible combinations early; whether a region has capacity is only known
# to Vertex.
# --------------------------------------------------------------------------

#: Regions where Vertex AI offers custom training.
TRAINING_REGIONS: frozenset[str] = frozenset(
    {
        "us-central1", "us-east1", "us-east4", "us-east5", "us-south1",
        "us-west1", "us-west2", "us-west3", "us-west4",
        "northamerica-northeast1", "northamerica-northeast2",
        "southamerica-east1", "southamerica-west1",
        "europe-central2", "europe-north1", "europe-southwest1",
        "europe-west1", "europe-west2", "europe-west3", "europe-west4",
        "europe-west6", "europe-west8", "europe-west9", "europe-west12",
        "me-central1", "me-central2", "me-west1", "africa-south1",
        "asia-east1", "asia-east2", "asia-northeast1", "asia-northeast2",
        "asia-northeast3", "asia-south1", "asia-southeast1", "asia-southeast2",
        "australia-southeast1", "australia-southeast2",
    }
)  # fmt: skip

#: GPUs attached to general-purpose N1 machines, with the counts allowed.
N1_GPU_COUNTS: dict[str, tuple[int, ...]] = {
    "NVIDIA_TESLA_T4": (1, 2, 4),
    "NVIDIA_TESLA_P4": (1, 2, 4),
    "NVIDIA_TESLA_P100": (1, 2, 4),
    "NVIDIA_TESLA_V100": (1, 2, 4, 8),
}

#: Accelerator-optimized machines: the GPU model and count are fixed by the
#: machine type (the number before "g" in a2/a3, the size for g2).
GPU_MACHINES: dict[str, tuple[str, int]] = {
    "a2-highgpu-1g": ("NVIDIA_TESLA_A100", 1),
    "a2-highgpu-2g": ("NVIDIA_TESLA_A100", 2),
    "a2-highgpu-4g": ("NVIDIA_TESLA_A100", 4),
    "a2-highgpu-8g": ("NVIDIA_TESLA_A100", 8),
    "a2-megagpu-16g": ("NVIDIA_TESLA_A100", 16),
    "a2-ultragpu-1g": ("NVIDIA_A100_80GB", 1),
    "a2-ultragpu-2g": ("NVIDIA_A100_80GB", 2),
    "a2-ultragpu-4g": ("NVIDIA_A100_80GB", 4),
    "a2-ultragpu-8g": ("NVIDIA_A100_80GB", 8),
    "a3-highgpu-1g": ("NVIDIA_H100_80GB", 1),
    "a3-highgpu-2g": ("NVIDIA_H100_80GB", 2),
    "a3-highgpu-4g": ("NVIDIA_H100_80GB", 4),
    "a3-highgpu-8g": ("NVIDIA_H100_80GB", 8),
    "a3-megagpu-8g": ("NVIDIA_H100_MEGA_80GB", 8),
    "a3-ultragpu-8g": ("NVIDIA_H200_141GB", 8),
    "a4-highgpu-8g": ("NVIDIA_B200", 8),
    "g2-standard-4": ("NVIDIA_L4", 1),
    "g2-standard-8": ("NVIDIA_L4", 1),
    "g2-standard-12": ("NVIDIA_L4", 1),
    "g2-standard-16": ("NVIDIA_L4", 1),
    "g2-standard-24": ("NVIDIA_L4", 2),
    "g2-standard-32": ("NVIDIA_L4", 1),
    "g2-standard-48": ("NVIDIA_L4", 4),
    "g2-standard-96": ("NVIDIA_L4", 8),
}

#: Families whose machines always come with GPUs (so CPU-only is impossible).
GPU_ONLY_FAMILIES: frozenset[str] = frozenset({"a2", "a3", "a4", "g2"})

#: Families offered for CPU-only custom training (n1 also takes N1_GPU_COUNTS).
CPU_FAMILIES: frozenset[str] = frozenset({"n1", "n2", "n2d", "e2", "c2", "c2d", "m1"})

#: Every accelerator this module knows how to request.
ACCELERATOR_TYPES: frozenset[str] = frozenset(N1_GPU_COUNTS) | {
    gpu for gpu, _ in GPU_MACHINES.values()
}

#: Values of ``accelerator_type`` meaning "no accelerator".
NO_ACCELERATOR = frozenset({"", "NONE"})

#: Boot disk limits for custom training, in GB.
BOOT_DISK_GB = (100, 64_000)

#: Job states after which a CustomJob never changes again.
TERMINAL_STATES = frozenset(
    {
        "JOB_STATE_SUCCEEDED",
        "JOB_STATE_FAILED",
        "JOB_STATE_CANCELLED",
        "JOB_STATE_EXPIRED",
        "JOB_STATE_PARTIALLY_SUCCEEDED",
    }
)

_REGION = re.compile(r"^[a-z]+-[a-z]+[0-9]+$")
_PROJECT = re.compile(r"^([a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_MACHINE = re.compile(r"^([a-z][a-z0-9]*)-[a-z]+-[0-9]+g?$")
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SERVICE_ACCOUNT = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_CLOUD_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
_MAX_LABELS = 64
_MAX_LABEL_CHARS = 63
_MAX_DISPLAY_NAME = 128
_POLL_RETRIES = 5  # consecutive transient errors tolerated while waiting


class CloudConfigError(ValueError):
    """A setting makes the job impossible; the message names it and the fix."""


class CloudApiError(RuntimeError):
    """Vertex AI (or the credentials needed to reach it) refused a call."""


class CloudJobFailed(RuntimeError):
    """A submitted job ended in a state other than JOB_STATE_SUCCEEDED."""

    def __init__(self, job_name: str, state: str, message: str) -> None:
        self.job_name = job_name
        self.state = state
        self.error_message = message
        super().__init__(
            f"Vertex job {job_name} ended in {state}: {message or 'no error message'}"
        )


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _bad(setting: str, value: object, problem: str, fix: str) -> CloudConfigError:
    return CloudConfigError(f"{setting}={value!r}: {problem}; {fix}")


def parse_timeout(value: str | int) -> int:
    """Seconds in a duration such as "24h", "90m", "3600s", "2h30m", "1d" or "3600".

    Raises:
        CloudConfigError: unparsable, or not more than zero seconds.
    """
    text = str(value).strip().lower()
    match = _DURATION.match(text) if text and not text.isdigit() else None
    if text.isdigit():
        seconds = int(text)
    elif match:
        days, hours, minutes, secs = (int(part or 0) for part in match.groups())
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    else:
        raise _bad(
            "timeout",
            value,
            "not a duration",
            'write it like "24h", "90m", "2h30m" or "3600s"',
        )
    if seconds <= 0:
        raise _bad(
            "timeout",
            value,
            "the job needs a positive time limit",
            'set e.g. timeout="24h"',
        )
    return seconds


def accelerator(cfg: Any) -> str | None:
    """The normalized accelerator type, or None for a CPU-only job."""
    name = (cfg.accelerator_type or "").strip().upper()
    return None if name in NO_ACCELERATOR else name


def base_output_dir(cfg: Any) -> str | None:
    """``base_output_dir``, else ``checkpoint_uri/run_name`` when that is gs://."""
    if cfg.base_output_dir:
        return cfg.base_output_dir
    if (cfg.checkpoint_uri or "").startswith("gs://"):
        return f"{cfg.checkpoint_uri.rstrip('/')}/{cfg.run_name}"
    return None


def display_name(cfg: Any) -> str:
    """``job_display_name``, falling back to ``run_name``."""
    return cfg.job_display_name or cfg.run_name


def api_endpoint(cfg: Any) -> str:
    """``vertex_api_endpoint``, else the regional ``REGION-aiplatform.googleapis.com``."""
    return cfg.vertex_api_endpoint or f"{cfg.region}-aiplatform.googleapis.com"


def _check_machine(cfg: Any) -> None:
    machine = cfg.machine_type
    gpu = accelerator(cfg)
    count = cfg.accelerator_count
    match = _MACHINE.match(machine or "")
    if not match:
        raise _bad(
            "machine_type",
            machine,
            "not a machine type",
            'use a Compute Engine name like "n1-standard-8"',
        )
    family = match.group(1)
    if gpu is not None and gpu not in ACCELERATOR_TYPES:
        known = ", ".join(sorted(ACCELERATOR_TYPES))
        raise _bad(
            "accelerator_type",
            cfg.accelerator_type,
            "unknown accelerator",
            f'use one of {known}, or "NONE" for CPU only',
        )

    if machine in GPU_MACHINES:
        want_gpu, want_count = GPU_MACHINES[machine]
        fix = f"set accelerator_type={want_gpu} and accelerator_count={want_count}"
        if gpu is None:
            raise _bad(
                "accelerator_type",
                cfg.accelerator_type,
                f"machine_type={machine} always has {want_count} {want_gpu}",
                fix,
            )
        if gpu != want_gpu:
            raise _bad(
                "accelerator_type",
                gpu,
                f"machine_type={machine} carries {want_gpu}, not {gpu}",
                fix + _machines_for(gpu),
            )
        if count != want_count:
            raise _bad(
                "accelerator_count",
                count,
                f"machine_type={machine} has exactly {want_count} {want_gpu}",
                fix,
            )
        return
    if family in GPU_ONLY_FAMILIES:
        same = ", ".join(m for m in GPU_MACHINES if m.startswith(family + "-"))
        raise _bad(
            "machine_type",
            machine,
            "not a Vertex training machine type",
            f"use one of {same}",
        )
    if family not in CPU_FAMILIES:
        families = ", ".join(sorted(CPU_FAMILIES | GPU_ONLY_FAMILIES))
        raise _bad(
            "machine_type",
            machine,
            f"machine family {family} is not offered for custom training",
            f"use one of the families {families}",
        )
    if gpu is None:
        return
    if family != "n1" or gpu not in N1_GPU_COUNTS:
        carriers = (
            "N1 machines" if gpu in N1_GPU_COUNTS else "no general-purpose machine"
        )
        raise _bad(
            "accelerator_type",
            gpu,
            f"cannot be attached to machine_type={machine} ({carriers} take it)",
            f'use accelerator_type="NONE" for CPU only{_machines_for(gpu)}',
        )
    if count not in N1_GPU_COUNTS[gpu]:
        allowed = "/".join(str(n) for n in N1_GPU_COUNTS[gpu])
        raise _bad(
            "accelerator_count",
            count,
            f"{gpu} on N1 comes in counts {allowed}",
            f"set accelerator_count to one of {allowed}",
        )


def _machines_for(gpu: str) -> str:
    """A hint naming the machine types that carry ``gpu``."""
    if gpu in N1_GPU_COUNTS:
        return f", or machine_type=n1-standard-N for {gpu}"
    machines = [m for m, (g, _) in GPU_MACHINES.items() if g == gpu]
    return f", or machine_type in {', '.join(machines)} for {gpu}" if machines else ""


def _label_ok(text: str, *, key: bool) -> bool:
    # Vertex label rules: at most 63 characters of lowercase letters
    # (international ones included), digits, "_" and "-"; keys start with a
    # letter and are not empty.
    if len(text) > _MAX_LABEL_CHARS or (key and not text):
        return False
    if key and not (text[0].isalpha() and text[0] == text[0].lower()):
        return False
    return all(
        c.isdigit() or c in "_-" or (c.isalpha() and c == c.lower()) for c in text
    )


def validate_job(cfg: Any) -> None:
    """Check every setting the CustomJob needs, before anything is sent.

    Reads ``project_id, region, image_uri, job_display_name, run_name,
    machine_type, accelerator_type, accelerator_count, replica_count, spot,
    timeout, restart_job_on_worker_restart, service_account, labels,
    base_output_dir, checkpoint_uri, vertex_api_endpoint, boot_disk_size_gb``.

    Raises:
        CloudConfigError: one line naming the setting, its value and the fix.
    """
    if not cfg.project_id:
        raise _bad(
            "project_id",
            cfg.project_id,
            "a Vertex job needs a Google Cloud project",
            "set project_id (see `gcloud config get-value project`)",
        )
    if not _PROJECT.match(cfg.project_id):
        raise _bad(
            "project_id",
            cfg.project_id,
            "not a project ID",
            "use the ID (6-30 lowercase letters, digits, hyphens), not the display name or number",
        )
    if not _REGION.match(cfg.region or ""):
        raise _bad(
            "region",
            cfg.region,
            "not a region name",
            'write it like region="us-central1" (a region, not a zone)',
        )
    if cfg.region not in TRAINING_REGIONS:
        raise _bad(
            "region",
            cfg.region,
            "Vertex AI custom training is not offered there",
            f"use one of {', '.join(sorted(TRAINING_REGIONS))}",
        )
    if not cfg.image_uri:
        raise _bad(
            "image_uri",
            cfg.image_uri,
            "a Vertex job runs a container image",
            "set image_uri=REGION-docker.pkg.dev/PROJECT/REPO/IMAGE:TAG "
            "(push it with `docker push`)",
        )
    if "://" in cfg.image_uri or any(c.isspace() for c in cfg.image_uri):
        raise _bad(
            "image_uri",
            cfg.image_uri,
            "not an image reference",
            "write it without a scheme, like REGION-docker.pkg.dev/PROJECT/REPO/IMAGE:TAG",
        )
    name = display_name(cfg)
    if not name or len(name) > _MAX_DISPLAY_NAME:
        raise _bad(
            "job_display_name",
            name,
            f"must be 1 to {_MAX_DISPLAY_NAME} characters",
            "set job_display_name or run_name",
        )

    output = base_output_dir(cfg)
    if output is None:
        raise _bad(
            "base_output_dir",
            cfg.base_output_dir,
            f"needed because checkpoint_uri={cfg.checkpoint_uri!r} is not gs://",
            "set base_output_dir=gs://BUCKET/PATH or checkpoint_uri=gs://BUCKET/PATH",
        )
    if not output.startswith("gs://") or len(output) <= len("gs://"):
        raise _bad(
            "base_output_dir",
            output,
            "Vertex writes job output to Cloud Storage only",
            "use a gs://BUCKET/PATH URI",
        )

    _check_machine(cfg)
    if not isinstance(cfg.replica_count, int) or cfg.replica_count < 1:
        raise _bad(
            "replica_count",
            cfg.replica_count,
            "the job needs at least the chief node",
            "set replica_count >= 1 (1 chief + replica_count-1 workers)",
        )
    low, high = BOOT_DISK_GB
    if (
        not isinstance(cfg.boot_disk_size_gb, int)
        or not low <= cfg.boot_disk_size_gb <= high
    ):
        raise _bad(
            "boot_disk_size_gb",
            cfg.boot_disk_size_gb,
            f"Vertex boot disks are {low} to {high} GB",
            f"set boot_disk_size_gb between {low} and {high}",
        )
    parse_timeout(cfg.timeout)

    if cfg.service_account and not _SERVICE_ACCOUNT.match(cfg.service_account):
        raise _bad(
            "service_account",
            cfg.service_account,
            "not a service account email",
            "use NAME@PROJECT.iam.gserviceaccount.com",
        )
    labels = cfg.labels or {}
    if len(labels) > _MAX_LABELS:
        raise _bad(
            "labels",
            f"{len(labels)} labels",
            f"Vertex allows at most {_MAX_LABELS}",
            "drop some labels",
        )
    for key, value in labels.items():
        if not isinstance(key, str) or not _label_ok(key, key=True):
            raise _bad(
                "labels",
                key,
                "label keys are 1-63 lowercase letters, digits, _ or -, starting with a letter",
                "rename the key",
            )
        if not isinstance(value, str) or not _label_ok(value, key=False):
            raise _bad(
                f"labels[{key}]",
                value,
                "label values are at most 63 lowercase letters, digits, _ or -",
                "change the value",
            )

    endpoint = cfg.vertex_api_endpoint
    if endpoint and "://" in endpoint:
        url = urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise _bad(
                "vertex_api_endpoint",
                endpoint,
                "not an http(s) endpoint",
                "use HOST, https://HOST or http://127.0.0.1:PORT",
            )
        if url.scheme == "http" and url.hostname not in _LOCAL_HOSTS:
            raise _bad(
                "vertex_api_endpoint",
                endpoint,
                "plain http would send credentials in clear",
                "use https:// (http is for local test servers only)",
            )


# --------------------------------------------------------------------------
# Building the CustomJob
# --------------------------------------------------------------------------


def build_custom_job(
    cfg: Any, env: Mapping[str, str], *, args: list[str] | None = None
) -> dict[str, Any]:
    """The CustomJob for ``cfg`` as a REST/JSON dict (camelCase, enums by name).

    Pool 0 is the chief (one replica); pool 1 holds the ``replica_count - 1``
    workers on the same machine spec when ``replica_count > 1``. ``env`` (the
    job's own settings, prepared by the caller) becomes ``containerSpec.env``;
    ``args``, when given, replace the image's CMD.

    The result is accepted by ``aiplatform_v1.CustomJob.from_json(json.dumps(d))``
    and by the REST ``customJobs.create`` call; for ``gcloud`` see
    `gcloud_config`. Call `validate_job` first: this function trusts ``cfg``.

    Raises:
        CloudConfigError: an ``env`` name that is not a valid variable name,
            or a value that is not a string.
    """
    for name, value in env.items():
        if not _ENV_NAME.match(name):
            raise _bad(
                "env",
                name,
                "not an environment variable name",
                "use letters, digits and _ only",
            )
        if not isinstance(value, str):
            raise _bad(
                f"env[{name}]",
                value,
                "environment values must be strings",
                "convert it with str() or json.dumps()",
            )

    machine_spec: dict[str, Any] = {"machineType": cfg.machine_type}
    gpu = accelerator(cfg)
    if gpu is not None:
        machine_spec["acceleratorType"] = gpu
        machine_spec["acceleratorCount"] = cfg.accelerator_count
    container: dict[str, Any] = {
        "imageUri": cfg.image_uri,
        "env": [{"name": name, "value": value} for name, value in env.items()],
    }
    if args is not None:
        container["args"] = list(args)

    def pool(replicas: int) -> dict[str, Any]:
        return {
            "replicaCount": replicas,
            "machineSpec": dict(machine_spec),
            "diskSpec": {"bootDiskSizeGb": cfg.boot_disk_size_gb},
            "containerSpec": {**container, "env": [dict(e) for e in container["env"]]},
        }

    pools = [pool(1)]
    if cfg.replica_count > 1:
        pools.append(pool(cfg.replica_count - 1))

    job_spec: dict[str, Any] = {
        "workerPoolSpecs": pools,
        "scheduling": {
            "timeout": f"{parse_timeout(cfg.timeout)}s",
            "restartJobOnWorkerRestart": bool(cfg.restart_job_on_worker_restart),
            # aiplatform_v1.Scheduling.Strategy: STANDARD is on-demand capacity
            # (ON_DEMAND and LOW_COST are deprecated), SPOT is preemptible.
            "strategy": "SPOT" if cfg.spot else "STANDARD",
        },
        "baseOutputDirectory": {"outputUriPrefix": base_output_dir(cfg)},
    }
    if cfg.service_account:
        job_spec["serviceAccount"] = cfg.service_account
    return {
        "displayName": display_name(cfg),
        "jobSpec": job_spec,
        "labels": dict(cfg.labels or {}),
    }


def gcloud_config(job: Mapping[str, Any]) -> dict[str, Any]:
    """What ``gcloud ai custom-jobs create --config FILE`` expects for ``job``.

    The difference from the CustomJob: gcloud's config file is a
    ``CustomJobSpec`` (the ``jobSpec`` part alone, camelCase keys, YAML or
    JSON), while the display name, labels and region are flags. So write the
    returned dict to FILE and run::

        gcloud ai custom-jobs create --config FILE --region REGION \\
            --display-name NAME --labels k=v,...

    with NAME and the labels from ``job["displayName"]`` and ``job["labels"]``.
    """
    return json.loads(json.dumps(job["jobSpec"]))


# --------------------------------------------------------------------------
# Talking to Vertex AI
# --------------------------------------------------------------------------


def console_url(job_name: str) -> str:
    """The Cloud console page of ``projects/P/locations/R/customJobs/ID``."""
    parts = job_name.split("/")
    project, region, job_id = parts[1], parts[3], parts[-1]
    return (
        f"https://console.cloud.google.com/vertex-ai/locations/{region}"
        f"/training/{job_id}?project={project}"
    )


def _is_local(endpoint: str) -> bool:
    url = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    return url.hostname in _LOCAL_HOSTS


def _credentials(endpoint: str) -> Any:
    """Anonymous credentials for a local test endpoint, else Application Default Credentials."""
    if _is_local(endpoint):
        from google.auth.credentials import AnonymousCredentials

        return AnonymousCredentials()
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        credentials, _ = google.auth.default(scopes=[_CLOUD_SCOPE])
    except DefaultCredentialsError as exc:
        raise CloudApiError(
            "no Google credentials found: run `gcloud auth application-default login` "
            f"or set GOOGLE_APPLICATION_CREDENTIALS to a key file ({_first_line(exc)})"
        ) from None
    return credentials


def _client(endpoint: str) -> Any:
    from google.cloud import aiplatform_v1

    return aiplatform_v1.JobServiceClient(
        transport="rest",
        client_options={"api_endpoint": endpoint},
        credentials=_credentials(endpoint),
    )


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", "") or exc).strip()
    # The REST transport prefixes "METHOD URL: "; the URL is noise here.
    text = re.sub(r"^[A-Z]+ \S+: ", "", text)
    return text.splitlines()[0] if text else type(exc).__name__


def _api_error(exc: Exception, cfg: Any, action: str) -> CloudApiError:
    """A one-line CloudApiError saying what to do about a client exception.

    The REST transport raises the HTTP-status classes of google.api_core
    (Forbidden for 403, ...); the gRPC-code classes are their subclasses.
    """
    from google.api_core import exceptions as gexc

    where = f"projects/{cfg.project_id}/locations/{cfg.region}"
    if isinstance(exc, gexc.Unauthorized):
        fix = "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
    elif isinstance(exc, gexc.Forbidden):
        runner = (
            f"and roles/iam.serviceAccountUser on service_account={cfg.service_account}"
            if cfg.service_account
            else "(the job runs as the Vertex AI Custom Code Service Agent)"
        )
        fix = (
            "the submitting identity (`gcloud auth application-default login`, or the key in "
            f"GOOGLE_APPLICATION_CREDENTIALS) needs roles/aiplatform.user on project "
            f"{cfg.project_id} {runner}"
        )
    elif isinstance(exc, gexc.NotFound):
        fix = (
            f"check project_id={cfg.project_id!r} and region={cfg.region!r}, "
            "and that the Vertex AI API (aiplatform.googleapis.com) is enabled"
        )
    elif isinstance(exc, gexc.TooManyRequests):
        resource = accelerator(cfg) or cfg.machine_type
        fix = f"request quota for {resource} in {cfg.region}, or try another region"
    elif isinstance(exc, gexc.BadRequest):
        fix = "fix the setting Vertex names"
    elif isinstance(exc, gexc.GoogleAPICallError):
        fix = "retry later; see https://status.cloud.google.com"
    else:
        fix = f"check vertex_api_endpoint={api_endpoint(cfg)!r} and the network"
    return CloudApiError(f"{action} in {where} failed: {_first_line(exc)}; {fix}")


def _transient() -> tuple[type[BaseException], ...]:
    from google.api_core import exceptions as gexc

    return (
        gexc.ServiceUnavailable,
        gexc.DeadlineExceeded,
        gexc.InternalServerError,
        gexc.TooManyRequests,
        OSError,
    )


def _job_dict(job: Any) -> dict[str, Any]:
    text = type(job).to_json(
        job, use_integers_for_enums=False, always_print_fields_with_no_presence=False
    )
    return json.loads(text)


def submit(
    cfg: Any,
    env: Mapping[str, str],
    *,
    args: list[str] | None = None,
    dry_run: bool = False,
    wait: bool = False,
    poll_interval: float = 30.0,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Validate, build and create the CustomJob; optionally wait for it to end.

    ``dry_run`` prints the CustomJob JSON to ``out`` and returns it without
    any network call. Otherwise the job is created through the
    ``aiplatform_v1`` REST client at `api_endpoint` (anonymous credentials for
    a local endpoint, Application Default Credentials otherwise), and its
    resource name and console link are printed. With ``wait``, the job is
    polled every ``poll_interval`` seconds and each state change printed.

    Returns:
        The job as a REST/JSON dict: the built one for ``dry_run``, else the
        one Vertex returned (the final one with ``wait``).

    Raises:
        CloudConfigError: a setting is invalid (nothing was sent).
        CloudApiError: Vertex or the credentials refused a call.
        CloudJobFailed: with ``wait``, the job ended without succeeding.
    """
    out = out if out is not None else sys.stdout
    validate_job(cfg)
    job = build_custom_job(cfg, env, args=args)
    if dry_run:
        print(json.dumps(job, indent=2), file=out)
        return job

    from google.api_core.exceptions import GoogleAPICallError
    from google.cloud import aiplatform_v1

    endpoint = api_endpoint(cfg)
    client = _client(endpoint)
    parent = f"projects/{cfg.project_id}/locations/{cfg.region}"
    try:
        created = client.create_custom_job(
            parent=parent, custom_job=aiplatform_v1.CustomJob.from_json(json.dumps(job))
        )
    except (GoogleAPICallError, OSError) as exc:
        raise _api_error(exc, cfg, "creating the custom job") from None
    print(f"Created Vertex job {created.name}", file=out)
    print(f"View it at {console_url(created.name)}", file=out)
    if not wait:
        return _job_dict(created)
    return _job_dict(_wait(client, created, cfg, poll_interval, out))


def _wait(client: Any, job: Any, cfg: Any, poll_interval: float, out: TextIO) -> Any:
    """Poll ``job`` until it reaches a terminal state; print each change."""
    from google.api_core.exceptions import GoogleAPICallError

    transient, retries_left = _transient(), _POLL_RETRIES
    state = job.state.name
    print(f"{job.name}: {state}", file=out, flush=True)
    try:
        while state not in TERMINAL_STATES:
            time.sleep(poll_interval)
            try:
                job = client.get_custom_job(name=job.name)
            except transient as exc:
                retries_left -= 1
                if retries_left < 0:
                    raise _api_error(exc, cfg, "polling the custom job") from None
                continue
            except GoogleAPICallError as exc:
                raise _api_error(exc, cfg, "polling the custom job") from None
            retries_left = _POLL_RETRIES
            if job.state.name != state:
                state = job.state.name
                print(f"{job.name}: {state}", file=out, flush=True)
    except KeyboardInterrupt:
        print(
            f"Stopped waiting; the job keeps running: {console_url(job.name)}", file=out
        )
        raise
    if state != "JOB_STATE_SUCCEEDED":
        raise CloudJobFailed(job.name, state, job.error.message)
    return job

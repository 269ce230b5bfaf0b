"""The training image and the Makefile's Docker and Vertex AI targets, on a real Docker engine.

`make docker-build` builds the image, `make docker-local-train` runs the job in it with the
checkpoints going to a bucket of the GCS emulator (the container reaches it on the host's
network), `make docker-push` pushes it to a local registry, from which it is pulled back.

These need an engine (DOCKER_HOST, or the default socket) and the Dockerfile's base image present
locally (BASE_IMAGE names another one). CI starts both with .ci/docker-up.sh (a stand-in base with
the pinned CPU torch, a registry at DOCKER_REGISTRY) and sets REQUIRE_DOCKER=1: there a missing
engine fails the tests instead of skipping them. Without an engine they skip, saying why. The
checks of the Makefile's wiring (GPU flag, Cloud Build, submit) and the linters need no engine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.gcs_server import TEST_BUCKET

DOCKER = os.environ.get("DOCKER", "docker")
REQUIRED = os.environ.get("REQUIRE_DOCKER") == "1"
DOCKERFILE_BASE = re.search(r"^ARG BASE_IMAGE=(\S+)", (ROOT / "Dockerfile").read_text(), re.M)[1]
BASE_IMAGE = os.environ.get("BASE_IMAGE") or DOCKERFILE_BASE
IMAGE = "multitask-trainer-test:latest"
VENV_BIN = Path(sys.executable).parent

# Files the build context holds that must never reach the image.
LEAK_PROBES = {
    ".env": "HF_TOKEN=hf_secret\n",
    "service-account.json": '{"type": "service_account", "private_key": "secret"}\n',
    "outputs/demo/model.safetensors": "weights",
    ".venv/bin/python": "#!/bin/sh\n",
    ".git/HEAD": "ref: refs/heads/main\n",
    "trainer/__pycache__/config.cpython-311.pyc": "bytecode",
    ".pytest_cache/README.md": "cache",
}


def unavailable(reason: str) -> None:
    """Skip, or fail where CI promised an engine (REQUIRE_DOCKER=1)."""
    if REQUIRED:
        pytest.fail(f"REQUIRE_DOCKER=1 but {reason}")
    pytest.skip(reason)


def run(*args: str | Path, check: bool = True, timeout: float = 300, env: dict | None = None) -> str:
    """Run a command; return stdout and stderr together; fail the test with its output."""
    result = subprocess.run([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=timeout, cwd=ROOT, env=env)
    if check and result.returncode:
        pytest.fail(f"`{' '.join(map(str, args))}` exited {result.returncode}:\n{result.stdout[-8000:]}")
    return result.stdout


def make(target: str, *flags: str, check: bool = True, timeout: float = 900, env: dict | None = None,
         **variables: str | Path) -> str:
    """`make TARGET VAR=value ...` in the project, as a user would type it (no outer make's flags)."""
    base = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    return run("make", "--no-print-directory", *flags, target, *(f"{k}={v}" for k, v in variables.items()),
               check=check, timeout=timeout, env={**base, **(env or {})})


def docker(*args: str | Path, check: bool = True, timeout: float = 300) -> str:
    return run(DOCKER, *args, check=check, timeout=timeout).strip()


# ---------------------------------------------------------------------- engine, image
@pytest.fixture(scope="module")
def engine() -> None:
    if shutil.which(DOCKER) is None:
        unavailable(f"no Docker client `{DOCKER}` on PATH")
    info = subprocess.run([DOCKER, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=60)
    if info.returncode or not info.stdout.strip():
        unavailable(f"no Docker engine answers ({(info.stderr or info.stdout).strip()[-300:]})")
    if subprocess.run([DOCKER, "image", "inspect", BASE_IMAGE], capture_output=True, timeout=60).returncode:
        unavailable(f"the base image {BASE_IMAGE} is not present locally: pull it, or build a stand-in "
                    "with .ci/docker-up.sh and export what it writes (BASE_IMAGE)")


@dataclass(frozen=True)
class Built:
    tag: str
    context: Path  # the copy of the project it was built from

    @property
    def make_variables(self) -> dict[str, str | Path]:
        """What makes a target that builds first (docker-local-train, docker-push) build this image again."""
        base = {"BASE_IMAGE": os.environ["BASE_IMAGE"]} if os.environ.get("BASE_IMAGE") else {}
        return {"IMAGE": self.tag, "DOCKER_CONTEXT": self.context, **base}


@pytest.fixture(scope="module")
def image(engine, tmp_path_factory) -> Built:
    """`make docker-build` on a copy of the project that also holds what must stay out of the image."""
    context = tmp_path_factory.mktemp("build") / "project"
    shutil.copytree(ROOT, context, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".env", "outputs", "pulled", "__pycache__", ".pytest_cache", ".ruff_cache"))
    for name, text in LEAK_PROBES.items():
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        (context / name).write_text(text)
    built = Built(IMAGE, context)
    make("docker-build", **built.make_variables)
    return built


def inspect(ref: str, field: str):
    return json.loads(docker("image", "inspect", "--format", f"{{{{json {field}}}}}", ref))


# ---------------------------------------------------------------------- the image
def test_image_runs_the_trainer_as_a_non_root_user(image):
    assert inspect(image.tag, ".Config.Entrypoint") == ["python", "-m", "trainer"]
    assert inspect(image.tag, ".Config.Cmd") == ["train"]
    assert docker("run", "--rm", "--entrypoint", "id", image.tag, "-u") != "0"
    # Arguments and environment pass straight through to the trainer.
    out = docker("run", "--rm", "-e", "LEARNING_RATE=3e-5", image.tag, "settings", "--get=learning_rate")
    assert out.splitlines()[-1] == "3e-05"


def test_image_keeps_the_base_images_torch(image):
    version = ["python", "-W", "ignore", "-c", "import torch; print(torch.__version__)"]
    in_base = docker("run", "--rm", "--entrypoint", version[0], BASE_IMAGE, *version[1:])
    in_image = docker("run", "--rm", "--entrypoint", version[0], image.tag, *version[1:])
    assert in_image.splitlines()[-1] == in_base.splitlines()[-1]


def test_image_holds_only_what_the_job_needs(image):
    listing = docker("run", "--rm", "--entrypoint", "find", image.tag, "/app", "-mindepth", "1").splitlines()
    names = {Path(p).relative_to("/app").as_posix() for p in listing}
    assert {n for n in names if "/" not in n} == {"requirements.txt", "requirements-trackers.txt", "constraints.txt", "trainer",
                                              "outputs"}
    assert not [n for n in names if n.startswith("outputs/")], "the output folder must be empty"
    shipped = {p.relative_to(image.context).as_posix() for p in (image.context / "trainer").rglob("*")
               if "__pycache__" not in p.parts}
    assert {n for n in names if n.startswith("trainer/")} == shipped
    leaked = [p for p in LEAK_PROBES if p in names or Path(p).name in {Path(n).name for n in names}]
    assert not leaked, f"in the image: {leaked}"


# ---------------------------------------------------------------------- make docker-local-train
def owned_by(folder: Path, uid: int) -> list[str]:
    """Paths under folder not owned by uid."""
    return [str(p) for p in [folder, *folder.rglob("*")] if p.lstat().st_uid != uid]


def test_docker_local_train_commits_checkpoints_to_the_bucket(image, gcs_server, tmp_path):
    from trainer.checkpoints.commits import latest_valid_checkpoint, read_final, verify_checkpoint
    from trainer.checkpoints.storage import open_store

    outputs = tmp_path / "outputs"
    outputs.mkdir()
    uid, user = os.getuid(), {}
    if uid == 0:  # CI runs as root: run as a uid the image has never heard of, as a laptop user's is
        uid, user = 4321, {"DOCKER_USER": "4321:4321"}
        os.chown(outputs, uid, uid)
    env_file = tmp_path / "job.env"
    env_file.write_text(
        "# the demo's settings, written as people write a .env: quotes, comments, other tools' variables\n"
        'MODEL_NAME="/app/trainer/demo/model"\n'
        "MODEL_INIT=scratch\n"
        "TASKS='demo_similarity,demo_entailment,demo_choice'\n"
        "TASKS_FILE=/app/trainer/demo/tasks.json\n"
        "RUN_NAME=docker-demo\n"
        "MAX_SEQ_LENGTH=64  # the demo model's position embeddings\n"
        f'CHECKPOINT_URI="gs://{TEST_BUCKET}/docker"  # the emulator\'s bucket\n'
        "LEARNING_RATE=5e-4\n"
        f"STORAGE_EMULATOR_HOST={gcs_server.url}\n"
        "GOOGLE_CLOUD_PROJECT=test\n"
        "HF_HUB_OFFLINE=1\n"
        "REPORT_TO=tensorboard,wandb  # the image carries the trackers' clients\n"
        "WANDB_MODE=offline\n"
    )
    out = make(
        "docker-local-train", **image.make_variables, ENV_FILE=env_file, DOCKER_OUTPUTS=outputs,
        DOCKER_RUN_ARGS="--network host",  # the emulator listens on the host's 127.0.0.1
        DOCKER_TRAIN_ARGS="--max_steps=6 --eval_strategy=steps --eval_steps=3 --save_strategy=steps "
                          "--save_steps=3 --logging_steps=3 --train_batch_size=16",
        DOCKER_HF_CACHE="", DOCKER_CREDENTIALS="", **user,
    )
    assert "--env-file" in out

    store = open_store(f"gs://{TEST_BUCKET}/docker", retry_deadline=10, timeout=10)
    latest = latest_valid_checkpoint(store, "docker-demo")
    assert latest is not None and latest.step == 6, out[-3000:]
    verify_checkpoint(store, latest)
    assert {"optimizer.pt", "trainer_state.json", "run_identity.json"} <= {Path(f.path).name for f in latest.files}
    final = read_final(store, "docker-demo")
    assert final is not None
    verify_checkpoint(store, final)

    assert (outputs / "docker-demo" / "metrics.json").is_file()
    assert list((outputs / "docker-demo" / "wandb").glob("offline-run-*/run-*.wandb")), out[-3000:]
    assert list((outputs / "docker-demo" / "tensorboard").glob("events.out.tfevents.*")), out[-3000:]
    assert not owned_by(outputs, uid)


def test_docker_local_train_without_env_file_runs_the_demo_as_the_invoking_user(image, tmp_path):
    outputs = tmp_path / "outputs"
    out = make(
        "docker-local-train", **image.make_variables, ENV_FILE="", DOCKER_OUTPUTS=outputs, DOCKER_HF_CACHE="",
        DOCKER_CREDENTIALS="", DOCKER_TRAIN_ARGS="--max_steps=2 --eval_strategy=no --save_strategy=no "
                                                 "--load_best_model_at_end=false --export_at_end=false",
    )
    assert "running the built-in demo" in out and "train --demo" in out
    assert (outputs / "demo" / "final" / "model.safetensors").is_file()
    assert not owned_by(outputs, os.getuid())


# ---------------------------------------------------------------------- make docker-push
def test_docker_push_to_a_registry_and_pull_back(image, tmp_path):
    registry = os.environ.get("DOCKER_REGISTRY")
    if not registry:
        unavailable("no registry to push to: set DOCKER_REGISTRY=127.0.0.1:PORT (.ci/docker-up.sh starts one)")
    tag = f"test-{uuid.uuid4().hex[:8]}"
    uri = f"{registry}/training/multitask-trainer:{tag}"  # Artifact Registry's HOST/PROJECT/REPO/IMAGE:TAG shape
    env_file = tmp_path / "push.env"
    env_file.write_text(f'PROJECT_ID=test-project\nIMAGE_URI="{uri}"\n')
    make("docker-push", **image.make_variables, ENV_FILE=env_file)

    # The registry holds the manifest and every blob it names.
    api = f"http://{registry}/v2/training/multitask-trainer"
    accept = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
    with urllib.request.urlopen(urllib.request.Request(f"{api}/manifests/{tag}", headers=accept), timeout=10) as r:
        manifest = json.load(r)
    for blob in [manifest["config"], *manifest["layers"]]:
        head = urllib.request.Request(f"{api}/blobs/{blob['digest']}", method="HEAD")
        with urllib.request.urlopen(head, timeout=10) as r:
            assert r.status == 200 and int(r.headers["Content-Length"]) == blob["size"]
    built = inspect(image.tag, ".Id")
    docker("rmi", uri)
    docker("pull", uri)
    assert inspect(uri, ".Id") == built
    docker("rmi", uri)


# ---------------------------------------------------------------------- the Makefile's wiring (no engine)
def fake_command(folder: Path, name: str, script: str) -> Path:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.mark.parametrize("runtimes, gpus", [
    ('{"io.containerd.runc.v2":{"path":"runc"},"runc":{"path":"runc"}}', False),
    ('{"nvidia":{"path":"nvidia-container-runtime"},"runc":{"path":"runc"}}', True),
])
def test_docker_local_train_asks_for_gpus_only_with_an_nvidia_runtime(tmp_path, runtimes, gpus):
    fake = fake_command(tmp_path, "docker", f"[ \"$1\" = info ] && echo '{runtimes}'\nexit 0\n")
    out = make("docker-local-train", "--dry-run", DOCKER=fake, ENV_FILE="", DOCKER_OUTPUTS=tmp_path / "out")
    assert ("--gpus all" in out) == gpus


def test_cloud_build_submits_the_context_to_cloud_build_with_the_env_files_settings(tmp_path):
    record = tmp_path / "gcloud.args"
    fake_command(tmp_path, "gcloud", f'printf "%s\\n" "$@" > {record}\n')
    env_file = tmp_path / "cloud.env"
    env_file.write_text('PROJECT_ID="my-project"\nIMAGE_URI=europe-west4-docker.pkg.dev/my-project/training/trainer:v1\n')
    make("cloud-build", ENV_FILE=env_file, env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert record.read_text().split() == [
        "builds", "submit", "--project=my-project",
        "--tag=europe-west4-docker.pkg.dev/my-project/training/trainer:v1", "--timeout=30m", ".",
    ]


def test_cloud_build_and_push_name_the_missing_setting(tmp_path):
    env_file = tmp_path / "empty.env"
    env_file.write_text("# nothing yet\n")
    for target in ("cloud-build", "docker-push"):
        out = make(target, check=False, ENV_FILE=env_file, DOCKER="false")  # stops before any docker command
        assert f"IMAGE_URI is not set: set it in {env_file}" in out, out


def test_cloud_train_submits_the_env_files_job(tmp_path):
    env_file = tmp_path / "cloud.env"
    env_file.write_text(
        "PROJECT_ID=my-project\nREGION=europe-west4\n"
        "IMAGE_URI=europe-west4-docker.pkg.dev/my-project/training/trainer:v1\n"
        "CHECKPOINT_URI=gs://my-bucket/runs\nTASKS=stsb,rte\nLEARNING_RATE=3e-5\n"
    )
    out = make("cloud-train", ENV_FILE=env_file, DRY_RUN=1)
    assert "europe-west4-docker.pkg.dev/my-project/training/trainer:v1" in out
    assert "3e-05" in out


def test_make_help_lists_every_target():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z0-9_-]*):(?!=)", makefile, re.M))
    out = make("help")
    listed = {line.split()[0] for line in re.sub(r"\x1b\[[0-9;]*m", "", out).splitlines() if line.strip()}
    assert {"docker-build", "docker-local-train", "docker-push", "cloud-build", "cloud-train"} <= targets
    assert targets <= listed, f"targets without a ## line: {sorted(targets - listed)}"


# ---------------------------------------------------------------------- linters
def linter(name: str) -> str:
    found = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail(f"{name} is not installed: run `make venv-dev` (requirements-dev.txt has it)")
    return found


def test_dockerfile_passes_hadolint():
    run(linter("hadolint"), ROOT / "Dockerfile")


def test_shell_scripts_pass_shellcheck():
    run(linter("shellcheck"), *sorted((ROOT / ".ci").iterdir()), ROOT / "benchmarks" / "device.sh")

# Multitask trainer: every target reads its settings from the env file (ENV_FILE, default .env).
# `make help` lists the targets.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ENV_FILE ?= .env
HAS_ENV := $(wildcard $(ENV_FILE))
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: help venv venv-trackers venv-dev run-local test lint clean pull-checkpoint list-checkpoints create-bucket

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[1m%-20s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.runtime: requirements.txt requirements-cloud.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r constraints.txt
	$(PIP) -c constraints.txt -r requirements.txt -r requirements-cloud.txt
	touch $@

# The trainer itself, with its `multitask-trainer` command: editable, so the command runs the
# checkout's code as edited (again only when pyproject.toml changes), and without dependencies,
# which the pinned requirements above installed: pip resolves nothing, torch stays at its pin.
$(VENV)/.package: $(VENV)/.runtime pyproject.toml
	$(PIP) -c constraints.txt --no-deps -e .
	touch $@

$(VENV)/.trackers: $(VENV)/.runtime requirements-trackers.txt
	$(PIP) -c constraints.txt -r requirements-trackers.txt
	touch $@

$(VENV)/.dev: $(VENV)/.trackers requirements-dev.txt
	$(PIP) -c constraints.txt -r requirements-dev.txt
	touch $@

venv: $(VENV)/.package ## create the virtualenv: the runtime requirements and the trainer (`multitask-trainer`)

venv-trackers: $(VENV)/.package $(VENV)/.trackers ## the virtualenv plus the W&B and MLflow clients, for REPORT_TO=wandb,mlflow

venv-dev: $(VENV)/.package $(VENV)/.dev ## the virtualenv plus the trackers, test and lint tools

run-local: venv ## train on this machine: the .env job, or the built-in offline demo when there is no .env
ifeq ($(HAS_ENV),)
	@echo "No $(ENV_FILE): running the built-in offline demo (copy .env.example to .env for a real job)."
	HF_HUB_OFFLINE=1 $(PY) -m trainer train --demo
else
	ENV_FILE=$(ENV_FILE) $(PY) -m trainer train
endif

list-checkpoints: venv ## list the run's committed checkpoints in CHECKPOINT_URI (step, time, metrics)
	ENV_FILE=$(ENV_FILE) $(PY) -m trainer pull --list

pull-checkpoint: venv ## download a checkpoint, verified: WHICH=latest|best|final|STEP, TASK=name for one exported model, DEST=dir
	ENV_FILE=$(ENV_FILE) $(PY) -m trainer pull --which=$(or $(WHICH),latest) $(if $(TASK),--task=$(TASK)) $(if $(DEST),--dest=$(DEST))

create-bucket: venv ## create CHECKPOINT_URI's bucket in REGION (uniform access) unless it exists
	ENV_FILE=$(ENV_FILE) $(PY) -m trainer create-bucket

# ==================================================================== Docker and Vertex AI ====
# The training image (Dockerfile): built, run here as Vertex AI runs it, pushed, submitted.
# Settings come from the env file as the trainer reads it (`python -m trainer settings --get`),
# never through `include`: values may be quoted. Knobs (make VAR=value or the environment):
#   IMAGE               local tag of the image (default multitask-trainer:latest)
#   BASE_IMAGE          overrides the Dockerfile's PyTorch CUDA base image
#   DOCKER_OUTPUTS      host folder mounted as the container's output folder (default outputs)
#   DOCKER_USER         uid:gid the container runs as (default: yours, so outputs stay yours)
#   DOCKER_GPUS         default `--gpus all` when `docker info` lists an nvidia runtime
#   DOCKER_RUN_ARGS     more `docker run` options, e.g. --network host -e STORAGE_EMULATOR_HOST=...
#   DOCKER_TRAIN_ARGS   flags for `train`, e.g. --max_steps=100
#   DRY_RUN=1, WAIT=1   for cloud-train: print the job without sending it / follow it to the end
DOCKER ?= docker
IMAGE ?= multitask-trainer:latest
BASE_IMAGE ?=
DOCKER_CONTEXT ?= .
DOCKER_BUILD_ARGS ?=
DOCKER_OUTPUTS ?= outputs
DOCKER_USER ?= $(shell id -u):$(shell id -g)
DOCKER_GPUS ?= $(shell $(DOCKER) info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"nvidia"' && echo --gpus all)
DOCKER_RUN_ARGS ?=
DOCKER_TRAIN_ARGS ?=
# Google credentials for a gs:// CHECKPOINT_URI, mounted read-only: the key file that
# GOOGLE_APPLICATION_CREDENTIALS names, else the `gcloud auth application-default login` one.
DOCKER_CREDENTIALS ?= $(or $(GOOGLE_APPLICATION_CREDENTIALS),$(HOME)/.config/gcloud/application_default_credentials.json)
# The host's Hugging Face cache, shared so that models and datasets download once.
DOCKER_HF_CACHE ?= $(or $(HF_HOME),$(HOME)/.cache/huggingface)

# The env file the trainer reads: a missing default .env is no error (defaults and the
# environment apply), a missing ENV_FILE that was asked for is.
env_file_setting = ENV_FILE=$(if $(or $(HAS_ENV),$(filter-out file,$(origin ENV_FILE))),$(ENV_FILE))
setting = $(env_file_setting) $(PY) -m trainer settings --get=$(1)
# `docker run --env-file` takes KEY=VALUE lines literally (no quotes, no ${VAR}): give it the env
# file as python-dotenv reads it, without the host path in GOOGLE_APPLICATION_CREDENTIALS.
docker_env_file = $(PY) -c 'import sys; from dotenv import dotenv_values; \
	env = {k: v for k, v in dotenv_values(sys.argv[1]).items() if v is not None and k != "GOOGLE_APPLICATION_CREDENTIALS"}; \
	bad = [k for k, v in env.items() if "\n" in v]; \
	sys.exit(f"error: {bad[0]} in {sys.argv[1]} spans several lines, which docker --env-file cannot pass") if bad else \
	print("".join(f"{k}={v}\n" for k, v in env.items()), end="")'
docker_mounts = -e OUTPUT_DIR=/app/outputs -v "$(abspath $(DOCKER_OUTPUTS))":/app/outputs \
	$(if $(wildcard $(DOCKER_CREDENTIALS)),-v "$(abspath $(DOCKER_CREDENTIALS))":/run/secrets/google-credentials.json:ro \
		-e GOOGLE_APPLICATION_CREDENTIALS=/run/secrets/google-credentials.json) \
	$(if $(wildcard $(DOCKER_HF_CACHE)),-v "$(abspath $(DOCKER_HF_CACHE))":/hf-cache -e HF_HOME=/hf-cache)
# Reads one setting into a shell variable, or stops the recipe: $(call read_setting,var,name,hint)
read_setting = $(1)=$$($(call setting,$(2))) || exit 2; \
	[ -n "$$$(1)" ] || { echo "error: $(2) is not set: $(3)" >&2; exit 2; }

.PHONY: docker-build docker-local-train docker-push cloud-build cloud-train

docker-build: ## build the training image IMAGE (BASE_IMAGE= overrides the PyTorch CUDA base image)
	$(DOCKER) build $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) $(DOCKER_BUILD_ARGS) -t $(IMAGE) $(DOCKER_CONTEXT)

docker-local-train: docker-build $(if $(HAS_ENV),venv) ## build and run the image here as Vertex AI would: the .env job (else the demo), outputs/ mounted
	@mkdir -p $(DOCKER_OUTPUTS)
	@set -e; envfile=$$(mktemp); trap 'rm -f "$$envfile"' EXIT; \
	$(if $(HAS_ENV),$(docker_env_file) $(ENV_FILE) >"$$envfile";,echo "No env file$(if $(ENV_FILE), $(ENV_FILE)): running the built-in demo.";) \
	(set -x; $(DOCKER) run --rm --shm-size=1g $(DOCKER_GPUS) --user $(DOCKER_USER) $(if $(HAS_ENV),--env-file "$$envfile") \
		$(docker_mounts) $(DOCKER_RUN_ARGS) $(IMAGE) train $(if $(HAS_ENV),,--demo) $(DOCKER_TRAIN_ARGS))

docker-push: venv ## build, tag as IMAGE_URI (REGION-docker.pkg.dev/PROJECT/REPO/IMAGE:TAG) and push the image
	@$(call read_setting,uri,IMAGE_URI,set it in $(ENV_FILE) to REGION-docker.pkg.dev/PROJECT/REPO/IMAGE:TAG); \
	$(MAKE) --no-print-directory docker-build || exit $$?; \
	(set -x; $(DOCKER) tag $(IMAGE) "$$uri" && $(DOCKER) push "$$uri") || { \
	echo "push failed: for Artifact Registry, log Docker in once with: gcloud auth configure-docker $${uri%%/*}" >&2; exit 1; }

cloud-build: venv ## build and push IMAGE_URI with Cloud Build instead of a local Docker (gcloud, PROJECT_ID)
	@$(call read_setting,uri,IMAGE_URI,set it in $(ENV_FILE) to REGION-docker.pkg.dev/PROJECT/REPO/IMAGE:TAG); \
	$(call read_setting,project,PROJECT_ID,set it in $(ENV_FILE)); \
	set -x; gcloud builds submit --project="$$project" --tag="$$uri" --timeout=30m $(DOCKER_CONTEXT)

cloud-train: venv ## submit the .env job to Vertex AI on IMAGE_URI (push it first); DRY_RUN=1 prints it, WAIT=1 follows it
	$(env_file_setting) $(PY) -m trainer submit $(if $(filter 1 true yes,$(DRY_RUN)),--dry-run) $(if $(filter 1 true yes,$(WAIT)),--wait)
# ================================================================ end of Docker and Vertex AI ====

# Test modules run on TEST_WORKERS processes (pytest-xdist), a module per worker: most tests wait on
# one single-threaded training subprocess, so two workers keep both cores of a small machine busy.
TEST_WORKERS ?= 2

test: venv-dev ## run the test suite (offline, tiny models, real GCS servers and Vertex endpoint); TEST_WORKERS=1 runs it serially
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q --durations=30 tests $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

lint: venv-dev ## static checks: ruff, shellcheck (.ci and benchmarks/device.sh), hadolint (Dockerfile)
	$(PY) -m ruff check trainer tests benchmarks
	$(VENV)/bin/shellcheck .ci/run .ci/*.sh benchmarks/device.sh
	$(VENV)/bin/hadolint Dockerfile

clean: ## remove the virtualenv and local outputs
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache

# ============================================================================== benchmarks ====
# benchmarks/: speed, memory, accuracy and checkpoint-upload benchmarks on the real GLUE data in
# ../shared/data/glue, against baselines each benchmark runs itself (README, "Benchmarks").
#   BENCH_FULL=1   the long run (more steps and rounds, whole epochs, 3 seeds); default: quick
#   BENCH_ARGS     more flags, e.g. --only=throughput,memory --tasks-file=my_tasks.yaml
BENCH_FULL ?=
BENCH_ARGS ?=

.PHONY: bench

$(VENV)/.bench: $(VENV)/.dev requirements-bench.txt constraints.txt
	$(PIP) -c constraints.txt -r requirements-bench.txt
	touch $@

bench: $(VENV)/.bench ## benchmarks vs the plain Trainer and the seed recipe on real GLUE data (BENCH_FULL=1: long run) -> benchmarks/results/
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m benchmarks $(if $(filter 1 true yes,$(BENCH_FULL)),--full) $(BENCH_ARGS)
# ========================================================================== end of benchmarks ====

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

.PHONY: help venv venv-dev run-local test lint clean pull-checkpoint list-checkpoints create-bucket

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[1m%-20s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.runtime: requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r constraints.txt
	$(PIP) -c constraints.txt -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PIP) -c constraints.txt -r requirements-dev.txt
	touch $@

venv: $(VENV)/.runtime ## create the virtualenv with the runtime requirements

venv-dev: $(VENV)/.dev ## the virtualenv plus test and lint tools

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

test: venv-dev ## run the test suite (offline, tiny models, real GCS emulator and Vertex endpoint)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q tests

lint: venv-dev ## static checks (ruff)
	$(PY) -m ruff check trainer tests

clean: ## remove the virtualenv and local outputs
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache

# The training image: the official PyTorch CUDA runtime image, this project's requirements and
# the `trainer` package. It runs `python -m trainer`, `train` by default; settings come from the
# environment (Vertex AI's containerSpec.env, `docker run --env-file`) and from flags:
#   docker run --gpus all --env-file .env IMAGE train --max_steps=100
#
# BASE_IMAGE must hold the torch that requirements.txt and constraints.txt pin (checked below).
# Docker Hub tags read <torch>-cuda<X.Y>-cudnn<N>-runtime; torch 2.13.0 comes with CUDA 12.6, 13.0
# and 13.2. CUDA 12.6 rather than 13.x: it needs older GPU drivers, and CUDA 13 no longer supports
# the Pascal and Volta GPUs (P4, P100, V100) that trainer/cloud/vertex.py offers. CI builds on a local
# stand-in with the same torch (.ci/docker-up.sh).
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE}

# PIP_BREAK_SYSTEM_PACKAGES: a Debian-Python base refuses system-wide pip without it; conda ignores it.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_ROOT_USER_ACTION=ignore \
    LANG=C.UTF-8 \
    HOME=/home/trainer \
    PYTHONPATH=/app

WORKDIR /app

# Dependencies before the source, so that editing the trainer rebuilds only the last layer.
# The base's torch must be the pinned one: pip then keeps its CUDA build (constraints.txt holds
# torch) instead of downloading another torch with a few GB of CUDA wheels.
COPY requirements.txt requirements-trackers.txt constraints.txt ./
RUN python -W ignore -c "import re, torch; pin = re.search(r'^torch==(\S+)', open('constraints.txt').read(), re.M)[1]; \
have = torch.__version__.split('+')[0]; \
have == pin or exit(f'BASE_IMAGE has torch {have}, constraints.txt pins {pin}: use a base image with torch {pin}')" \
    && python -m pip install --no-cache-dir -c constraints.txt -r requirements.txt

# The W&B and MLflow clients (about 200 MB beside a CUDA base of several GB), so that REPORT_TO=wandb
# or mlflow works in Docker and on Vertex AI as it does locally; their own layer, as they change apart.
RUN python -m pip install --no-cache-dir -c constraints.txt -r requirements-trackers.txt

# A non-root user. HOME (Hugging Face and torch caches) and the output folder are writable for
# any uid, since `make docker-local-train` runs the image as the invoking host user.
RUN useradd --no-log-init --create-home --uid 10001 --user-group trainer \
    && mkdir -p /app/outputs \
    && chown trainer:trainer /app/outputs \
    && chmod 1777 /home/trainer /app/outputs

COPY trainer/ trainer/

USER 10001:10001
ENTRYPOINT ["python", "-m", "trainer"]
CMD ["train"]

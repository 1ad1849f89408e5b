# syntax=docker/dockerfile:1
#
# Two images from one file:
#   docker build --target operator -t personalization-operator .
#   docker build --target trainer  -t personalization-trainer  .          # CUDA PyTorch base
#   docker build --target trainer  -t personalization-trainer:cpu \
#       --build-arg TRAINER_BASE_IMAGE=python:3.11.7-slim-bookworm \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .  # CPU base
#
# Every Python package is pinned by requirements.lock, the same lock CI and the demo install
# (used here as pip constraints, so each image takes only what its extra needs); base images are
# pinned by tag.

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
# The CUDA build of PyTorch ships in this image; pip keeps it (the lock's torch line, the CPU
# build of the same version, is left out of the trainer's constraints).
ARG TRAINER_BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime

# ---------------------------------------------------------------------------------------------
# wheel: build the project once; the final stages install the wheel, never the source tree.
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2
COPY pyproject.toml README.md ./
COPY trainer/ trainer/
COPY operator/ operator/
RUN python -m build --wheel --outdir /dist .

# ---------------------------------------------------------------------------------------------
# operator: slim Python, no torch (the operator and the spec model are torch-free).
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS operator
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.lock /tmp/requirements.lock
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    pip install --no-cache-dir -c /tmp/requirements.lock "$(ls /dist/*.whl)[operator]" \
    && rm /tmp/requirements.lock
RUN groupadd --gid 10001 pj-operator \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin pj-operator
# Numeric UID so that Kubernetes can verify runAsNonRoot without reading /etc/passwd.
USER 10001:10001
# 8080: /metrics, 8081: /healthz (kopf liveness)
EXPOSE 8080 8081
ENTRYPOINT ["personalization-operator"]

# ---------------------------------------------------------------------------------------------
# trainer: PyTorch base (CUDA by default). With a CPU base, set TORCH_INDEX_URL and pip installs
# the lock's torch (the CPU build) from that index first.
# ---------------------------------------------------------------------------------------------
FROM ${TRAINER_BASE_IMAGE} AS trainer
ARG TORCH_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/trainer \
    HF_HOME=/home/trainer/.cache/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    HF_HUB_DISABLE_TELEMETRY=1
COPY requirements.lock /tmp/requirements.lock
RUN if [ -n "${TORCH_INDEX_URL}" ]; then \
        pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "$(grep '^torch==' /tmp/requirements.lock)"; \
    fi \
    && grep -v '^torch==' /tmp/requirements.lock > /tmp/constraints.txt
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    pip install --no-cache-dir -c /tmp/constraints.txt "$(ls /dist/*.whl)[trainer]" \
    && rm /tmp/constraints.txt /tmp/requirements.lock
RUN groupadd --gid 10001 pj-trainer \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/trainer \
        --shell /usr/sbin/nologin pj-trainer \
    && mkdir -p /output && chown 10001:10001 /output
USER 10001:10001
WORKDIR /home/trainer
# 8000: /metrics while training (the operator's PJ_TRAINER_METRICS_PORT)
EXPOSE 8000
ENTRYPOINT ["personalize-train"]

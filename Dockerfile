# syntax=docker/dockerfile:1
# mien's service: FastAPI + onnxruntime-gpu on the bundled models (models/*.onnx), no torch.
#
#   docker build -t mien .                        # CUDA 13 + cuDNN 9 base: what onnxruntime-gpu 1.31 is built for
#   docker run --gpus all -p 8000:8000 mien
#
# BASE_IMAGE may be any Debian or Ubuntu image (python3 >= 3.11 from its apt sources); the CUDA libraries only
# matter on a GPU host, and onnxruntime-gpu falls back to the CPU without them. CI builds it FROM a Debian
# bookworm made with debootstrap (scripts/container_test.sh). Settings: MIEN_* variables (README, docs/deployment.md).
ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# ---- python: the base image plus the distribution's python3 (apt works the same on Ubuntu and Debian) ----
FROM ${BASE_IMAGE} AS python
ARG DEBIAN_FRONTEND=noninteractive
# Versions come from the base image's release (Ubuntu 24.04: 3.12, Debian 12: 3.11); pinning one would break the other.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -c "import sys; assert sys.version_info >= (3, 11), sys.version"

# ---- build: a virtual environment with mien and its serving dependencies (no train extra, so no torch) ----
FROM python AS build
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# PIP_CERT: the system bundle, whatever the pip version's own default (CI bind-mounts the host's over it).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN python3 -m venv /opt/mien
WORKDIR /src
COPY pyproject.toml README.md ./
# The whole distribution (one wheel, one import name: mien, mien.service, mien.export, mien.training), without
# the train extra: training/ is copied because the wheel lists its packages, but with no torch it never imports.
COPY mien ./mien
COPY service ./service
COPY export ./export
COPY training ./training
# -P: import the installed mien, not the source tree in /src (whose mien/ has no service/ inside).
RUN /opt/mien/bin/pip install --no-cache-dir . \
    && /opt/mien/bin/python -c "import importlib.util as u; assert u.find_spec('torch') is None, 'torch in image'" \
    && /opt/mien/bin/python -P -c "import onnxruntime, mien.service.main; print('onnxruntime', onnxruntime.__version__)"

# ---- runtime: python3, the virtual environment, the bundled models, a non-root user ----
FROM python AS runtime
RUN groupadd --system --gid 10001 mien \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/mien --shell /usr/sbin/nologin mien
COPY --from=build /opt/mien /opt/mien
# Root-owned and read-only to the service user: models/*.onnx with cards, ensembles and detector/.
COPY models /app/models
WORKDIR /app
ENV PATH=/opt/mien/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MIEN_HOST=0.0.0.0 \
    MIEN_PORT=8000 \
    MIEN_WORKERS=1 \
    MIEN_MODEL_DIR=/app/models \
    MIEN_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider
# Numeric, so that a runtime can check it is not root without reading /etc/passwd (user mien).
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('MIEN_PORT', '8000') + '/health', timeout=4)"]
# Each uvicorn worker is a process with its own copy of the models (and its own CUDA context on a GPU).
CMD ["sh", "-c", "exec uvicorn mien.service.main:create_app --factory --host \"$MIEN_HOST\" --port \"$MIEN_PORT\" --workers \"$MIEN_WORKERS\""]

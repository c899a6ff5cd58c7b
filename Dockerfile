# ScheInfer server image: CUDA PyTorch base, non-root user, checkpoints mounted at /models,
# configured by SCHEINFER_* environment variables (see server/settings.py, docs/DEPLOY.md).
#
#   docker build -t scheinfer .
#   docker run --gpus all -p 8000:8000 -v /path/to/models:/models:ro \
#     -e SCHEINFER_MODEL=/models/Mixtral-8x7B-v0.1 -e SCHEINFER_GPU_MEMORY_BUDGET=24GiB scheinfer
#
# The base image already has a CUDA build of torch that satisfies pyproject's torch>=2.11, so
# `pip install` keeps it (override BASE_IMAGE with --build-arg for another CUDA/torch pair).
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# g++ and ninja: the CPU kernels (engine/cpu_kernels) are compiled on first use with -march=native
# for the host CPU; without them the engine falls back to the slower torch path. Not pinned: the
# base image is, and the distribution's current compiler packages carry its security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ ninja-build \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin scheinfer \
    && mkdir -p /models \
    && chown scheinfer:scheinfer /models

WORKDIR /app
# Dependencies first (cached while only the sources change): metadata only, no sources yet.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY engine ./engine
COPY server ./server
COPY configs ./configs
# Editable: the packages read configs/ (server.yaml preset, configs/models/ architectures) from
# the directory beside them, so they stay in /app rather than being copied to site-packages.
RUN pip install --no-cache-dir --no-deps -e . \
    && python -c "import engine, server.app; print('scheinfer import ok')"

ENV PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/home/scheinfer/.cache/huggingface \
    SCHEINFER_KERNEL_CACHE=/home/scheinfer/.cache/scheinfer/kernels \
    SCHEINFER_HOST=0.0.0.0 \
    SCHEINFER_PORT=8000

# numeric, so that the host and orchestrators resolve it without the image's /etc/passwd
USER 1000:1000
VOLUME ["/models"]
EXPOSE 8000

# 200 only when the model is loaded and the engine runs (503 while loading or draining).
# Loading a large checkpoint takes minutes: failures during the start period do not count.
HEALTHCHECK --interval=30s --timeout=10s --start-period=15m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SCHEINFER_PORT', '8000'), timeout=8)"]

# SIGTERM drains running requests for up to SCHEINFER_DRAIN_TIMEOUT_S (default 30 s).
STOPSIGNAL SIGTERM
CMD ["scheinfer", "serve", "--host", "0.0.0.0"]

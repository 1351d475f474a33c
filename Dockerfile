# GPU image of train_lora.
#
#   docker build -t lora-trainer .
#   docker run --rm --gpus all -v /data:/data lora-trainer --config /data/config.json
#
# Everything a run reads or writes lives under the /data volume: the config, the dataset, the outputs and the
# Hugging Face cache (HF_HOME=/data/hf-cache, so a base model is downloaded once, not once per container).
# Paths inside the config are relative to the config file, so a config in /data can say "dataset_path": "dataset".
# stdout carries only the JSON event stream (`docker run ... | my-parser` or `docker logs`); logs go to stderr.
#
# `docker stop` sends SIGTERM: the trainer finishes the current step, writes a checkpoint and exits 143; give it
# time for that with `docker stop -t 120` (the default 10 s is enough for SD1.5, tight for SDXL on a slow disk).
# Then rerun with `--resume` to continue.
#
# Build arguments: TORCH_INDEX_URL / TORCH_SPEC choose the torch build (default: the newest CUDA 12.8 build, which
# runs on drivers >= 570); TRAINER_UID should match the owner of the host folder mounted on /data.

# The runtime flavour (not cudnn-runtime): torch's CUDA wheels bring their own cuDNN, cuBLAS and NCCL as pip
# packages, so the image's CUDA libraries matter little; the base supplies the NVIDIA container environment.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC=torch
ARG TRAINER_UID=1000

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/data/hf-cache

# Python 3 (3.12 on Ubuntu 24.04) in a venv (Ubuntu's system Python refuses pip installs, PEP 668).
# tini runs as PID 1: it forwards `docker stop`'s SIGTERM to the trainer and reaps data-loader workers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && pip install --upgrade pip

# torch FIRST, the CUDA build from PyTorch's index; requirements.txt's `torch>=2.4` then keeps it (the
# constraint file makes sure no other requirement swaps it for PyPI's build). Both layers stay cached while
# only the project's code changes.
RUN pip install "${TORCH_SPEC}" --index-url "${TORCH_INDEX_URL}" \
 && python -c "import torch; assert torch.version.cuda, 'not a CUDA build of torch'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

COPY requirements.txt /app/requirements.txt
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch-constraint.txt \
 && pip install -r /app/requirements.txt -c /tmp/torch-constraint.txt \
 && rm /tmp/torch-constraint.txt

# The project itself (lora_trainer/*_schema.json are symlinks to the top-level files copied beside it;
# the wheel build turns them into real files in site-packages).
COPY pyproject.toml README.md config_schema.json events_schema.json train_lora.py /app/
COPY lora_trainer /app/lora_trainer
RUN pip install --no-deps /app \
 && train-lora --version

# A non-root user owns /data, so files the trainer writes on a named volume are not root's.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && useradd --uid "${TRAINER_UID}" --create-home --shell /usr/sbin/nologin trainer \
 && mkdir -p /data/hf-cache \
 && chown -R trainer:trainer /data
USER trainer
WORKDIR /data
VOLUME ["/data"]

# No HEALTHCHECK on purpose: a training container has no endpoint to probe, and "the process is alive" is what
# Docker already knows. The liveness signal is the event stream: the trainer emits a `heartbeat` event whenever
# it has been silent for heartbeat_seconds, so whoever reads stdout can call a run hung after ~2-3 intervals
# without a line (see examples/node_client).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "train-lora"]
CMD ["--help"]

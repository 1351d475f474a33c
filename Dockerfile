# GPU image of train_lora. Needs BuildKit (the default builder of Docker >= 23; `DOCKER_BUILDKIT=1` on 20.10).
#
#   docker build -t lora-trainer .
#   docker run --rm --gpus all --user "$(id -u):$(id -g)" -v /srv/lora:/data lora-trainer --config /data/config.json
#   docker stop -t 120 <container>        # SIGTERM: finish the step, checkpoint, exit 143; rerun with --resume
#
# Everything a run reads or writes lives under the /data volume: the config, the dataset, the outputs and the
# Hugging Face cache (HF_HOME=/data/hf-cache, so a base model is downloaded once, not once per container).
# Paths inside the config are relative to the config file, so a config in /data can say "dataset_path": "dataset".
# stdout carries only the JSON event stream (`docker run ... | my-parser` or `docker logs`); logs go to stderr.
# Do not pass -t/-it to `docker run` when a program reads the events: a TTY merges stderr into stdout.
#
# --user: with a host folder mounted on /data (-v HOST:/data), run as the folder's owner, `--user "$(id -u):$(id -g)"`,
# so the trainer can write there and what it writes belongs to you. Without --user it runs as `trainer`
# (uid TRAINER_UID, 1000), which owns /data in the image and so a fresh named volume (`-v lora-data:/data`).
#
# `docker stop` sends SIGTERM to tini (PID 1), which passes it to the trainer: it finishes the current step, writes
# a checkpoint and exits 143. `docker stop` waits 10 s before SIGKILL; give it time for the save with
# `docker stop -t 120` (10 s is enough for SD1.5, tight for SDXL on a slow disk). Then rerun with `--resume`.
#
# Build arguments:
#   BASE_IMAGE       the base (default: NVIDIA's CUDA 12.8 runtime on Ubuntu 24.04). Any Debian/Ubuntu image works;
#                    docker/debian-base.sh builds one from Debian packages where no registry is reachable.
#   TORCH_INDEX_URL, TORCH_SPEC   the torch build (default: the newest CUDA 12.8 build, for drivers >= 570).
#   TORCH_WHEELS     an image whose files are torch wheels, offered to pip with --find-links, so no large download:
#                      docker build -t torch-wheels -f docker/wheels.Dockerfile /path/to/wheel/folder
#                      docker build --build-arg TORCH_WHEELS=torch-wheels --build-arg TORCH_SPEC=torch==2.13.0+cpu \
#                        --build-arg REQUIRE_CUDA_TORCH=0 ...     (tests/test_docker.py builds so, with PyPI as index)
#   REQUIRE_CUDA_TORCH   1 (default): the build fails unless torch is a CUDA build; 0 for a CPU image.
#   TRAINER_UID      uid of the image's `trainer` user.
# Behind a TLS-intercepting proxy pip needs your CA bundle; it is passed as a build secret (never stored in a layer):
#   docker build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt -t lora-trainer .
# tests/test_docker.py builds and runs this image (CPU torch, Debian base) end to end.

ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG TORCH_WHEELS=scratch

# Only a source of wheels for the torch layer's bind mount (empty by default); nothing of it lands in the image.
FROM ${TORCH_WHEELS} AS torch-wheels

# The runtime flavour (not cudnn-runtime): torch's CUDA wheels bring their own cuDNN, cuBLAS and NCCL as pip
# packages, so the image's CUDA libraries matter little; the base supplies the NVIDIA container environment.
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC=torch
ARG REQUIRE_CUDA_TORCH=1

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/data/hf-cache

# Python 3 (3.12 on Ubuntu 24.04, 3.11 on Debian 12) in a venv (the system Python refuses pip installs, PEP 668).
# tini runs as PID 1: it forwards `docker stop`'s SIGTERM to the trainer and reaps data-loader workers.
# apt is skipped when the base already has all of it (docker/debian-base.sh's image does).
# Every RUN that uses pip mounts the optional pip_cert secret and points pip at it when it was given.
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && if ! { python3 -c "import ensurepip, venv" && command -v tini && test -s /etc/ssl/certs/ca-certificates.crt; } >/dev/null 2>&1; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/venv \
 && pip install --upgrade pip

# torch FIRST, the CUDA build from PyTorch's index (or a wheel from TORCH_WHEELS); requirements.txt's `torch>=2.4`
# then keeps it (the constraint file makes sure no other requirement swaps it for PyPI's build). Both layers stay
# cached while only the project's code changes.
RUN --mount=type=secret,id=pip_cert --mount=type=bind,from=torch-wheels,target=/wheels \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && pip install --find-links /wheels "${TORCH_SPEC}" --index-url "${TORCH_INDEX_URL}" \
 && python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda); assert torch.version.cuda or '${REQUIRE_CUDA_TORCH}' == '0', 'not a CUDA build of torch (REQUIRE_CUDA_TORCH=0 allows it)'"

COPY requirements.txt /app/requirements.txt
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch-constraint.txt \
 && pip install -r /app/requirements.txt -c /tmp/torch-constraint.txt \
 && rm /tmp/torch-constraint.txt

# The project itself (lora_trainer/*_schema.json are symlinks to the top-level files copied beside it;
# the wheel build turns them into real files in site-packages; pip fetches setuptools for it, hence the secret).
COPY pyproject.toml README.md config_schema.json events_schema.json train_lora.py /app/
COPY lora_trainer /app/lora_trainer
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && pip install --no-deps /app \
 && train-lora --version

# Under `--user UID` without a passwd entry HOME is /, which that uid cannot write: matplotlib (the loss curve)
# would warn on stderr and build its font cache in a fresh temporary folder on every run. (Set after the installs,
# so changing it does not rebuild them.)
ENV MPLCONFIGDIR=/tmp/matplotlib

# A non-root user owns /data, so files the trainer writes on a named volume are not root's. (Declared here: an ARG
# is in the environment of every later RUN, so a changed value would otherwise rebuild the installs above.)
ARG TRAINER_UID=1000
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

# The vbatch image: the API, Dagster's code location and the run pods it launches (Kubernetes:
# deploy/kubernetes/), the setup Job, and the engines' init container. Build from the repository root:
#   docker build -t registry.example.com/vbatch:0.1.0 .
FROM python:3.11-slim-bookworm

# Triton (vLLM, torch) compiles small launchers with a C compiler at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

# NVIDIA_DRIVER_CAPABILITIES: the NVIDIA runtime mounts nvidia-smi (vbatch counts a pod's GPUs with it).
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    VBATCH_ENVS_DIR=/opt/vbatch/envs \
    VBATCH_HOME=/var/lib/vbatch

WORKDIR /opt/vbatch
COPY . .
# An editable install, as `make install` does: the code stays a checkout at /opt/vbatch (the vLLM
# middleware is imported from it, dagster.yaml is read from it). torch from PyPI is the CUDA build.
RUN pip install -e ".[local,kubernetes]"
# vLLM's own virtualenv, CUDA build (vbatch_pipelines/engine/vllm-cuda.txt): an install's smoke test starts
# the new model on the GPU of its run's pod. Fine-tunes train with TRL + PEFT (Unsloth's env needs a GPU to
# build).
RUN VBATCH_GPUS=1 VBATCH_HOME=/tmp/vbatch-build vbatch engine install && rm -rf /tmp/vbatch-build

RUN useradd --uid 10001 --create-home vbatch && mkdir -p /var/lib/vbatch && chown vbatch /var/lib/vbatch
USER 10001

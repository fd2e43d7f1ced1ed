# syntax=docker/dockerfile:1.7
# srcid API image. Needs BuildKit (the default builder since Docker 23).
#   CPU (default):     docker build -t srcid:cpu .
#   GPU (CUDA 12):     docker build --build-arg VARIANT=gpu -t srcid:gpu .
# Run:  docker run -p 8000:8000 srcid:cpu     (embedded default bundle + demo catalog, state in the /data volume)
# Layout inside: venv /opt/venv, state under /data (SRCID_DATA_DIR: SQLite catalog and index unless
# SRCID_CATALOG_URL / SRCID_INDEX_DIR say otherwise), optional bundles mounted under /bundles.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---- bases: the same venv path on both, so the stages below do not care which one they run on
FROM ${PYTHON_IMAGE} AS base-cpu
RUN python3 -m venv /opt/venv

FROM ${CUDA_IMAGE} AS base-gpu
# Versions come with the CUDA image's Ubuntu release; pinning Debian revisions breaks the build on every
# security update of the base.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# BuildKit builds only the base that VARIANT names. DL3006: base-${VARIANT} is a stage above, not a registry
# image, so there is no tag to pin.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# ---- builder: wheels for srcid and every dependency; the runtime installs from them with no index
FROM base AS wheels
ARG VARIANT
# A C compiler for srcid's one extension (srcid/service/_bodyjson.c, the request body parser) and, on the CUDA
# image's system Python, its headers (the python images carry theirs). Only this stage compiles: the runtime
# installs the built wheel. Versions come with the base image's release, as above.
# hadolint ignore=DL3008
RUN apt-get update \
 && if [ "$VARIANT" = gpu ]; then apt-get install -y --no-install-recommends gcc libc6-dev python3-dev; \
    else apt-get install -y --no-install-recommends gcc libc6-dev; fi \
 && rm -rf /var/lib/apt/lists/*
# torch from PyTorch's own index: PyPI's default Linux torch wheel is the multi-GB CUDA build. The local
# version (+cpu / +cu128) sorts above PyPI's plain 2.13.0, so pip takes it for the pinned torch==2.13.0.
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_GPU_INDEX_URL=https://download.pytorch.org/whl/cu128
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY srcid ./srcid
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ "$VARIANT" = gpu ]; then index="$TORCH_GPU_INDEX_URL"; target=".[gpu]"; \
    else index="$TORCH_CPU_INDEX_URL"; target="."; fi \
 && pip wheel --wheel-dir /wheels --extra-index-url "$index" "$target"

# ---- runtime
FROM base AS runtime
ARG VARIANT
# faiss-cpu and faiss-gpu-cu12 both install the module `faiss`, onnxruntime and onnxruntime-gpu both
# `onnxruntime`: on GPU the CPU builds (base dependencies) are removed and the GPU builds laid down again
# over the files they shared. The asserts fail the build if the image would not have the backends it claims.
# DL3013: versions are pinned by the wheel set, resolved once in the builder; --no-index cannot pick others.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    if [ "$VARIANT" = gpu ]; then \
      pip install --no-cache-dir --no-index --find-links /wheels "srcid[gpu]" \
   && pip uninstall -y faiss-cpu onnxruntime \
   && pip install --no-cache-dir --no-index --find-links /wheels --no-deps --force-reinstall \
        faiss-gpu-cu12 onnxruntime-gpu \
   && python -c "import faiss, onnxruntime as ort, torch; \
assert hasattr(faiss, 'GpuIndexFlatIP'), 'faiss has no GPU kernels'; \
assert 'CUDAExecutionProvider' in ort.get_available_providers(), 'onnxruntime has no CUDA provider'; \
assert torch.version.cuda, 'torch is a CPU build'"; \
    else \
      pip install --no-cache-dir --no-index --find-links /wheels srcid \
   && python -c "import faiss, onnxruntime, torch; \
assert torch.version.cuda is None, 'torch is a CUDA build: the image would carry GBs of CUDA libraries'"; \
    fi

RUN groupadd --system --gid 10001 srcid \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/srcid --shell /usr/sbin/nologin srcid \
 && mkdir -p /data /bundles \
 && chown srcid:srcid /data
COPY deploy/healthcheck.py /opt/srcid/healthcheck.py

# A fresh named volume copies /data's ownership from the image, so the non-root user can write it.
ENV SRCID_HOST=0.0.0.0 \
    SRCID_PORT=8000 \
    SRCID_DATA_DIR=/data \
    HF_HUB_OFFLINE=1
# Numeric, so Kubernetes' runAsNonRoot can verify it without the image's /etc/passwd.
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
# /healthz is liveness; compose waits on /readyz (bundle and index loaded) before it routes traffic.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "/opt/srcid/healthcheck.py", "/healthz"]
ENTRYPOINT ["srcid"]
CMD ["serve"]

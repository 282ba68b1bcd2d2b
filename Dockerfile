# The one image of kdflow: every pipeline step runs in it, and so do the MLflow server and the
# CronJob that submits runs (k8s/). Everything is installed here, at build time, from the
# lock requirements/image.txt by docker/install.sh; tests/e2e/test_image_smoke.py installs
# the same lock with the same script into a fresh venv and runs a compiled step with it.
#
#   docker build -t registry.example.com/kdflow:0.1.0 .
#
# The tag must match `image:` in the pipeline config (default kdflow:<package version>).

# Both stages use one base; the lock is resolved for CPython 3.11 on Linux, so its minor
# version stays in step with the lock (tests/e2e/test_image_smoke.py checks both).
FROM python:3.11-slim-bookworm AS build
# The lock pins torch's CPU build, served by the PyTorch index (a few hundred MB, not the
# multi-GB CUDA build PyPI serves for Linux).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY requirements/image.txt requirements/image.txt
COPY docker/install.sh docker/install.sh
COPY pyproject.toml ./
COPY kd_lib/ kd_lib/
COPY components/ components/
COPY pipelines/ pipelines/
RUN python -m venv /opt/venv \
    && TORCH_INDEX_URL="${TORCH_INDEX_URL}" sh docker/install.sh /opt/venv/bin/python /src

FROM python:3.11-slim-bookworm
ARG UID=10001
RUN groupadd --system --gid "${UID}" kdflow \
    && useradd --system --uid "${UID}" --gid kdflow --home-dir /home/kdflow --create-home --shell /usr/sbin/nologin kdflow
COPY --from=build /opt/venv /opt/venv
COPY configs/ /app/configs/
# The PyTorchJob template a training step's launcher renders (cluster.pytorchjob).
COPY k8s/training/pytorchjob.yaml /app/k8s/training/pytorchjob.yaml
# KFP starts each step as `sh -c "... python3 -m kfp.dsl.executor_main ..."`: python3 must be
# the venv's. Writable paths (HOME, /tmp) are volumes on Kubernetes where the root filesystem
# is read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    HOME=/home/kdflow \
    KDFLOW_K8S_DIR=/app/k8s
WORKDIR /app
USER ${UID}:${UID}
# A batch image: Kubernetes probes (k8s/) watch the long-running MLflow server; steps and
# CronJob runs are judged by their exit code.
HEALTHCHECK NONE
CMD ["kdflow", "--help"]

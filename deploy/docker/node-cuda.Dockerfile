# syntax=docker/dockerfile:1
# FedGuard client node with CUDA: DP-SGD on the node's GPU (`device = "auto"` or "cuda" in the run
# config). The PyPI torch wheel for Linux x86_64 is the CUDA build and brings the CUDA runtime
# libraries as wheels; only the NVIDIA driver comes from the host (NVIDIA container toolkit,
# or the device plugin in Kubernetes: `nvidia.com/gpu` in deploy/k8s/node-gpu.yaml). Build:
#   docker build -f deploy/docker/node-cuda.Dockerfile -t fedguard-node-cuda .
# Kits and node keys are mounted as secrets at run time (never baked in); the work directory
# (privacy ledger, logs) is a volume that must outlive the container; data is mounted read-only.
FROM python:3.11-slim-bookworm

ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/var/lib/fedguard

RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Another CUDA line: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 (for example).
ARG TORCH_INDEX=https://pypi.org/simple
RUN pip install torch==2.13.0 --index-url "${TORCH_INDEX}"

WORKDIR /opt/fedguard
COPY pyproject.toml README.md ./
COPY common/ common/
COPY server/ server/
COPY client/ client/
COPY fedguard/ fedguard/
RUN pip install --no-cache-dir . && fedguard --help >/dev/null

COPY --chmod=0755 deploy/docker/entrypoint.py /usr/local/bin/fedguard-entrypoint
COPY --chmod=0755 deploy/docker/node_probe.py /usr/local/bin/fedguard-node-probe

RUN groupadd --system --gid 10001 fedguard \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/fedguard --shell /usr/sbin/nologin fedguard \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/fedguard /run/fedguard

USER 10001:10001
VOLUME ["/var/lib/fedguard"]
ENV FEDGUARD_KIT_SOURCE=/run/secrets/node-kit \
    FEDGUARD_KIT=/run/fedguard/kit
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["fedguard-node-probe", "/var/lib/fedguard"]
# tini is PID 1: it forwards SIGTERM to FedGuard (which stops its children cleanly) and reaps
# orphaned grandchildren (ServerApp / ClientApp processes) that a Python PID 1 would leave as zombies.
ENTRYPOINT ["/usr/bin/tini", "--", "fedguard-entrypoint"]
# No CMD: the data, schema, server address and CA fingerprint are the node owner's, given at run
# time, e.g. `fedguard client start --kit /run/fedguard/kit --workdir /var/lib/fedguard ...`
# (deploy/compose.yaml, deploy/k8s/node.yaml).

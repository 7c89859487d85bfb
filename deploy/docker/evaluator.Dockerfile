# syntax=docker/dockerfile:1
# FedGuard evaluator: the node that holds the central held-out set (and, in homomorphic mode, the
# HE key), scores every round and audits fairness (`fedguard evaluator start`). CPU build.
#   docker build -f deploy/docker/evaluator.Dockerfile -t fedguard-evaluator .
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

RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

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
ENV FEDGUARD_KIT_SOURCE=/run/secrets/evaluator-kit \
    FEDGUARD_KIT=/run/fedguard/kit
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["fedguard-node-probe", "/var/lib/fedguard"]
# tini is PID 1: it forwards SIGTERM to FedGuard (which stops its children cleanly) and reaps
# orphaned grandchildren (ServerApp / ClientApp processes) that a Python PID 1 would leave as zombies.
ENTRYPOINT ["/usr/bin/tini", "--", "fedguard-entrypoint"]
# No CMD: the data, schema, server address and CA fingerprint are the node owner's, given at run
# time, e.g. `fedguard evaluator start --kit /run/fedguard/kit --workdir /var/lib/fedguard ...`
# (deploy/compose.yaml, deploy/k8s/evaluator.yaml); once, in homomorphic mode, `fedguard evaluator he-keygen`.

# syntax=docker/dockerfile:1
# FedGuard aggregation server: SuperLink + control service (`fedguard server start`), and the
# TLS gateway (`fedguard-gateway`, nginx) run from the same image as a second container that
# shares the server's network namespace. Build from the repository root:
#   docker build -f deploy/docker/server.Dockerfile -t fedguard-server .
# No kit, key or token is ever part of the image: kits are mounted as secrets at run time
# (FEDGUARD_KIT_SOURCE, see deploy/docker/entrypoint.py) and state lives in a volume.
FROM python:3.11-slim-bookworm

ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/var/lib/fedguard

RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx-light tini \
    && rm -rf /var/lib/apt/lists/*

# torch first, CPU build (the server aggregates; it trains nothing).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# The project itself, installed as a wheel would be: the app bundle and the gateway templates
# come from the installed packages.
WORKDIR /opt/fedguard
COPY pyproject.toml README.md ./
COPY common/ common/
COPY server/ server/
COPY client/ client/
COPY fedguard/ fedguard/
RUN pip install --no-cache-dir . && fedguard --help >/dev/null

COPY --chmod=0755 deploy/docker/entrypoint.py /usr/local/bin/fedguard-entrypoint
COPY --chmod=0755 deploy/docker/gateway.py /usr/local/bin/fedguard-gateway

RUN groupadd --system --gid 10001 fedguard \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/fedguard --shell /usr/sbin/nologin fedguard \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/fedguard /run/fedguard

USER 10001:10001
VOLUME ["/var/lib/fedguard"]
# 8443: control service (HTTPS API, dashboard, /health); 9443: the gateway's fleet port.
EXPOSE 8443 9443
ENV FEDGUARD_KIT_SOURCE=/run/secrets/server-kit \
    FEDGUARD_KIT=/run/fedguard/kit
# tini is PID 1: it forwards SIGTERM to FedGuard (which stops its children cleanly) and reaps
# orphaned grandchildren (ServerApp / ClientApp processes) that a Python PID 1 would leave as zombies.
ENTRYPOINT ["/usr/bin/tini", "--", "fedguard-entrypoint"]
CMD ["fedguard", "server", "start", "--kit", "/run/fedguard/kit", "--workdir", "/var/lib/fedguard", "--port", "9092", "--control-port", "8443", "--control-host", "0.0.0.0"]

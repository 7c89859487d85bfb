#!/usr/bin/env python3
"""``fedguard-gateway``: run the TLS gateway (nginx) in a container, in front of the SuperLink.

The gateway must share the server's network namespace (a sidecar in the server's pod, or
``network_mode: service:server`` in compose): it forwards ``/v1/fleet/*`` and ``/health`` to
the SuperLink on 127.0.0.1, which never listens on another address. The config is rendered by
FedGuard's own ``server.gateway.render`` from the templates installed with the ``server`` package,
checked with ``nginx -t``, then nginx replaces this process in the foreground.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedguard-gateway", description=__doc__.splitlines()[0])
    p.add_argument("--kit", required=True, help="the server kit (server.crt, server.key, ca.crt are used)")
    p.add_argument("--ca-fingerprint", help="the federation CA fingerprint: pins the kit before nginx gets its key")
    p.add_argument("--listen-host", default="0.0.0.0", help="address other hosts reach (default 0.0.0.0)")
    p.add_argument("--listen-port", type=int, default=9443, help="the fleet port nodes use (default 9443)")
    p.add_argument("--upstream-port", type=int, required=True, help="the SuperLink's --port on 127.0.0.1")
    p.add_argument("--upstream-name", default="localhost", help="a name the server certificate carries")
    p.add_argument("--prefix", default="/tmp/fedguard-gateway", help="nginx prefix: rendered config, logs, temp")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from common.errors import FedGuardError
    from common.kit import verify_kit
    from server.gateway import GatewaySettings, render

    try:
        kit = verify_kit(args.kit, args.ca_fingerprint)
        if kit.role != "server" or kit.server_cert is None or kit.server_key is None:
            raise FedGuardError(f"this is a {kit.role} kit, not the server's", where=args.kit)
        settings = GatewaySettings(
            args.listen_host,
            args.listen_port,
            kit.server_cert,
            kit.server_key,
            kit.ca_cert,
            args.upstream_port,
            args.upstream_name,
        )
        prefix = Path(args.prefix)
        conf = render(settings, prefix)
    except FedGuardError as exc:
        print(f"fedguard-gateway: error: {exc}", file=sys.stderr)
        return 2
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    base = [nginx, "-e", "stderr", "-c", str(conf), "-p", str(prefix.resolve())]
    check = subprocess.run([*base, "-t", "-q"], capture_output=True, text=True)
    if check.returncode != 0:
        print(f"fedguard-gateway: error: nginx rejected {conf}: {check.stderr[-800:]}", file=sys.stderr)
        return 2
    print(
        f"fedguard-gateway: {args.listen_host}:{args.listen_port} → SuperLink 127.0.0.1:{args.upstream_port} "
        "(/v1/fleet/* and /health only)",
        flush=True,
    )
    os.execv(nginx, [*base, "-g", "daemon off;"])


if __name__ == "__main__":
    sys.exit(main())

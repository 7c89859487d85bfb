#!/usr/bin/env python3
"""Container entrypoint: install the mounted kit as private plain files, then run the command.

Why a copy: FedGuard refuses a kit whose files are symlinks, and a private key that others may
read. A Kubernetes secret volume presents every key as a symlink into a ``..data`` directory (and,
with ``fsGroup``, as mode 0440); a compose secret is a bind mount that keeps the host's owner and
mode. So at start the kit is copied once into ``/run/fedguard`` (memory-backed in Kubernetes) as
regular files owned by the container's user, mode 0600. Nothing is trusted here: FedGuard then
verifies the copy against its CA-signed manifest and the CA fingerprint exactly as on bare metal.

Environment (all optional; without a source nothing is copied):

- ``FEDGUARD_KIT_SOURCE``: the mounted kit, a directory or a tar made with ``tar -C KIT -cf kit.tar .``
  (a Kubernetes secret cannot hold the server kit's ``enrolled/`` folder; a tar can).
- ``FEDGUARD_KIT``: where the kit goes (default ``/run/fedguard/kit``); pass the same path as ``--kit``.
- ``FEDGUARD_NODE_KEY_SOURCE``: the node's private key when it lives outside the kit (production:
  made by ``fedguard client init`` on the node); ``FEDGUARD_NODE_KEY`` (default
  ``/run/fedguard/node.key``) is where it goes: pass that path as ``--key``.
- ``FEDGUARD_RUN_SIGNING_KEY_SOURCE``: only where the federation lets the control service sign runs;
  installed as ``FEDGUARD_RUN_SIGNING_KEY`` (default ``/run/fedguard/run-signing.key``), pass it as
  ``server start --run-signing-key``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
from pathlib import Path

DEFAULT_KIT = "/run/fedguard/kit"
#: Single private keys kept outside the kit: ``<NAME>_SOURCE`` (mounted) → ``<NAME>`` (default below).
KEYS = {
    "FEDGUARD_NODE_KEY": "/run/fedguard/node.key",
    "FEDGUARD_RUN_SIGNING_KEY": "/run/fedguard/run-signing.key",
}


class EntrypointError(Exception):
    """The mounted kit or key cannot be installed; the message says what and where."""


def _fresh_dir(dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    dest.mkdir(mode=0o700)


def _copy_private(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
        shutil.copyfileobj(inp, out)


def install_kit(source: Path, dest: Path) -> list[str]:
    """Copy a kit directory (following the secret volume's symlinks) or unpack a kit tar into ``dest``.

    Entries whose name starts with ``..`` are a Kubernetes secret volume's own bookkeeping
    (``..data``, ``..2026_01_01_...``), never kit files. Returns the installed relative paths.
    """
    if not source.exists():
        raise EntrypointError(f"kit source {source} does not exist: mount the kit secret there")
    _fresh_dir(dest)
    installed: list[str] = []
    if source.is_file():
        try:
            with tarfile.open(source) as tar:
                tar.extractall(dest, filter="data")  # no absolute paths, no escaping links, no devices
        except tarfile.TarError as exc:
            raise EntrypointError(f"kit source {source} is a file but not a tar ({exc})") from None
        for path in sorted(dest.rglob("*")):
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o700)
            elif path.is_file() and not path.is_symlink():
                path.chmod(0o600)
                installed.append(path.relative_to(dest).as_posix())
        return installed
    for root, dirs, names in os.walk(source, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".."))
        for name in sorted(names):
            if name.startswith(".."):
                continue
            src = Path(root) / name
            if not src.is_file():  # a dangling link or a special file: leave it out, verify_kit names it missing
                continue
            rel = src.relative_to(source)
            _copy_private(src, dest / rel)
            installed.append(rel.as_posix())
    return installed


def install_key(source: Path, dest: Path) -> None:
    """Copy one private key (a secret volume item or a bind mount) to ``dest``, mode 0600."""
    if not source.is_file():
        raise EntrypointError(f"key source {source} is not a file: mount the key's secret there")
    if dest.exists():
        dest.unlink()
    _copy_private(source, dest)


def prepare(env: dict[str, str]) -> list[str]:
    """Install what the environment names; return one line per action for the container log."""
    done: list[str] = []
    if env.get("FEDGUARD_KIT_SOURCE"):
        dest = Path(env.get("FEDGUARD_KIT") or DEFAULT_KIT)
        files = install_kit(Path(env["FEDGUARD_KIT_SOURCE"]), dest)
        done.append(f"kit from {env['FEDGUARD_KIT_SOURCE']} installed in {dest} ({len(files)} files)")
    for name, default in KEYS.items():
        if env.get(f"{name}_SOURCE"):
            dest = Path(env.get(name) or default)
            install_key(Path(env[f"{name}_SOURCE"]), dest)
            done.append(f"key from {env[f'{name}_SOURCE']} installed as {dest}")
    return done


def main(argv: list[str]) -> int:
    if not argv:
        print("fedguard-entrypoint: no command given", file=sys.stderr)
        return 2
    os.umask(0o077)
    try:
        for line in prepare(dict(os.environ)):
            print(f"fedguard-entrypoint: {line}", flush=True)
    except (EntrypointError, OSError) as exc:
        print(f"fedguard-entrypoint: error: {exc}", file=sys.stderr)
        return 2
    os.execvp(argv[0], argv)  # the command becomes the container's main process and gets its signals


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

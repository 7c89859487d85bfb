"""Launch Flower's SuperLink, and its SuperExec, with FedGuard's boundary around their private APIs.

``python -m server.superlink_launch superlink --superexec-address HOST:PORT <flower-superlink args>``:
Flower's own entry point, with a Control API that accepts only the shared secret in
``$FEDGUARD_CONTROL_SECRET_FILE``, in process isolation; before serving it starts its SuperExec as
its own child (as Flower's subprocess isolation does), so the ServerApps stay in the SuperLink's
process tree and die with it. ``python -m server.superlink_launch superexec <flower-superexec args>``:
Flower's SuperExec, which hands each ServerApp its task token in a 0600 file under
``$FEDGUARD_TASK_TOKEN_DIR`` (0700) instead of on its command line.

Secrets travel as file paths in the environment, never as values on a command line (every
user of the host can read /proc/PID/cmdline). ``server/superlink.py`` starts the SuperLink.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

#: Environment variables the launcher reads (set by ``server/superlink.py``).
CONTROL_SECRET_ENV = "FEDGUARD_CONTROL_SECRET_FILE"
TOKEN_DIR_ENV = "FEDGUARD_TASK_TOKEN_DIR"


def _private(path: Path, what: str, *, directory: bool = False) -> Path:
    """``path`` if it exists and no other user may read it; exits with a clear message otherwise."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        sys.exit(f"fedguard: {what} {path} is not readable: {exc.strerror}")
    if (directory and not path.is_dir()) or mode & 0o077:
        sys.exit(f"fedguard: {what} {path} must be a private {'folder' if directory else 'file'} (0700/0600)")
    return path


def _env_path(name: str) -> Path:
    value = os.environ.get(name)
    if not value:
        sys.exit(f"fedguard: {name} is not set; start the server with `fedguard server start`")
    return Path(value)


def _option(argv: list[str], name: str) -> str:
    if name not in argv or argv.index(name) + 1 >= len(argv):
        sys.exit(f"fedguard: {name} is missing from the SuperLink's arguments")
    return argv[argv.index(name) + 1]


def superexec_command(address: str, ca_cert: str, secret_file: str, parent_pid: int) -> list[str]:
    """The SuperExec for the SuperLink at ``address`` (exits when process ``parent_pid`` does)."""
    return [
        sys.executable,
        "-P",  # nothing in the working directory can shadow installed code
        "-m",
        "server.superlink_launch",
        "superexec",
        "--runtime-api-address",
        address,
        "--root-certificates",
        ca_cert,
        "--superexec-auth-secret-file",
        secret_file,
        "--parent-pid",
        str(parent_pid),
    ]


def main(argv: list[str]) -> None:
    from common.flower_internals import run_flower_superexec, run_flower_superlink
    from common.progress import no_colour_codes

    if not sys.stdout.isatty():  # superlink.log: no colour codes
        no_colour_codes()

    if not argv or argv[0] not in ("superlink", "superexec"):
        sys.exit("usage: python -m server.superlink_launch superlink|superexec <flower args>")
    if argv[0] == "superexec":
        token_dir = _private(_env_path(TOKEN_DIR_ENV), "the task token folder", directory=True)
        run_flower_superexec(argv[1:], str(token_dir))
        return
    secret = _private(_env_path(CONTROL_SECRET_ENV), "the Control API secret").read_text(encoding="utf-8").strip()
    args = argv[1:]
    if args[:1] == ["--superexec-address"] and len(args) > 1:
        address, flower_args = args[1], args[2:]
        _private(_env_path(TOKEN_DIR_ENV), "the task token folder", directory=True)
        command = superexec_command(
            address,
            _option(flower_args, "--ssl-ca-certfile"),
            _option(flower_args, "--superexec-auth-secret-file"),
            os.getpid(),
        )
        env = {k: v for k, v in os.environ.items() if k != CONTROL_SECRET_ENV}  # it needs no Control API secret
        # Its own session, as Flower detaches it: a signal to the server's process group does not cut
        # a ServerApp short before it records how its run ended (it exits with the SuperLink).
        subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    else:
        flower_args = args
    run_flower_superlink(flower_args, secret)


if __name__ == "__main__":
    main(sys.argv[1:])

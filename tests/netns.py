"""A throw-away multi-host lab on one machine: Linux network namespaces joined by veth pairs.

One "server" namespace holds a bridge with the server's address (``<subnet>.1``); each node
namespace holds one end of a veth pair (``eth0``, ``<subnet>.<10+i>``) whose other end is a port of
that bridge. No namespace has a default route or a link to the host's namespace, so nothing sent
inside can leave the lab. Names carry a per-lab prefix (``fg<pid>``...), so parallel runs never
collide; ``destroy`` kills what still runs inside (by PID, from ``ip netns pids``) and deletes the
namespaces, which removes their veths and bridge with them. Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN)
and iproute2.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field


class NetnsError(RuntimeError):
    """A namespace, link or address could not be set up."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; raise ``NetnsError`` with its stderr on failure when ``check``."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def unavailable_reason() -> str | None:
    """None when this process can create (and delete) a network namespace; else why it cannot."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"fg{os.getpid()}probe"
    try:
        made = ip("netns", "add", probe, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns add` could not run: {exc}"
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()} (needs root: CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    try:
        veth = ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1", check=False)
        if veth.returncode != 0:
            return f"cannot create a veth pair: {veth.stderr.strip()} (kernel without veth?)"
    finally:
        ip("netns", "del", probe, check=False)
    return None


@dataclass
class Lab:
    """The server namespace, a bridge in it, and one namespace per node wired to that bridge."""

    nodes: Sequence[str]
    prefix: str = field(default_factory=lambda: f"fg{os.getpid()}")
    subnet: str = "10.231.7"  # a private /24 used nowhere else; it exists only inside the lab

    def __post_init__(self) -> None:
        self.server_ns = f"{self.prefix}-srv"
        self.node_ns = {name: f"{self.prefix}-n{i}" for i, name in enumerate(self.nodes)}
        self.server_addr = f"{self.subnet}.1"
        self.node_addr = {name: f"{self.subnet}.{10 + i}" for i, name in enumerate(self.nodes)}
        # The node's veth end in the server namespace (a bridge port): taking it down cuts that node off.
        self.port = {name: f"v{i}" for i, name in enumerate(self.nodes)}
        self._made: list[str] = []

    @property
    def namespaces(self) -> list[str]:
        return [self.server_ns, *self.node_ns.values()]

    def create(self) -> Lab:
        """Build the lab; on any failure, remove what was built and raise ``NetnsError``."""
        try:
            for ns in self.namespaces:
                ip("netns", "add", ns)
                self._made.append(ns)
                ip("-n", ns, "link", "set", "lo", "up")  # the SuperLink, SuperNode APIs and nginx use loopback
            srv = self.server_ns
            ip("-n", srv, "link", "add", "br0", "type", "bridge")
            ip("-n", srv, "addr", "add", f"{self.server_addr}/24", "dev", "br0")
            ip("-n", srv, "link", "set", "br0", "up")
            for name, ns in self.node_ns.items():
                port = self.port[name]
                # Created inside the server namespace (never in the host's), the peer moved into the node's.
                ip("-n", srv, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
                ip("-n", srv, "link", "set", port, "master", "br0", "up")
                ip("-n", ns, "addr", "add", f"{self.node_addr[name]}/24", "dev", "eth0")
                ip("-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            self.destroy()
            raise
        return self

    def exec_argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        """``argv`` to run inside namespace ``ns`` (``ip netns exec`` execs it: same PID, our process group)."""
        return ["ip", "netns", "exec", ns, *argv]

    def run(self, ns: str, argv: Sequence[str], timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.exec_argv(ns, argv), capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload,no-any-return]

    def set_link(self, node: str, up: bool) -> None:
        """Plug or pull ``node``'s cable: its veth end on the server's bridge, up or down."""
        ip("-n", self.server_ns, "link", "set", self.port[node], "up" if up else "down")

    def carrier(self, node: str) -> bool:
        """Whether the node side sees a carrier on its link (it does not while its cable is pulled)."""
        return "LOWER_UP" in ip("-n", self.node_ns[node], "link", "show", "eth0").stdout

    def connect(self, ns: str, host: str, port: int, timeout: float = 3.0) -> str | None:
        """Open a TCP connection from inside ``ns``: None when it connects, else the error it got."""
        code = (
            "import socket,sys\n"
            "try:\n"
            f"    socket.create_connection(({host!r}, {port}), timeout={timeout}).close()\n"
            "except OSError as e:\n"
            "    print(type(e).__name__, e); sys.exit(1)\n"
        )
        proc = self.run(ns, [sys.executable, "-c", code], timeout=timeout + 30)
        return None if proc.returncode == 0 else (proc.stdout + proc.stderr).strip()

    def pids(self, ns: str) -> list[int]:
        proc = ip("netns", "pids", ns, check=False)
        return [int(p) for p in proc.stdout.split() if p.isdigit()] if proc.returncode == 0 else []

    def destroy(self) -> None:
        """Kill what still runs in the lab's namespaces (by PID), then delete them (veths and bridge go too)."""
        for ns in self._made:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                pids = self.pids(ns)
                for pid in pids:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + 5
                while pids and time.monotonic() < deadline and self.pids(ns):
                    time.sleep(0.1)
        for ns in reversed(self._made):
            ip("netns", "del", ns, check=False)
        self._made.clear()

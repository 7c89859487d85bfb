"""Attacks on the SuperLink's Control and Runtime APIs from another Unix user on the server host (issue 20, item 1).

A real SuperLink over real TLS, started by FedGuard's own ``SuperLink`` class (what ``fedguard
server start`` uses), with two enrolled node keys registered and one legitimate run waiting for
its nodes (status ``running``). A second Unix user, created here (``useradd``; needs root, as CI
runs), holds only the federation's CA certificate and a fresh ``FLWR_HOME`` and tries what issue
20 found possible with the plain ``flwr`` CLI: ``flwr run`` of an app bundle, ``flwr supernode
register`` of its own key, ``flwr supernode unregister`` of a real node, ``flwr stop`` of the
legitimate run, ``flwr ls``; then raw HTTPS to the Runtime and Control APIs, reading the server's
secrets and task tokens, and looking for them in every process's command line. Each is refused,
and the real state is unchanged. FedGuard's own flows (registering nodes, submitting, reading and
stopping runs) still work, and a run config naming a server-side path is refused by the ServerApp.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import tomli_w

from common.processes import bin_path, flwr_env
from server.enrollment import Enrolled, write_enrolled
from server.runs import CONNECTION, RunError, flwr_json, run_logs, run_status, stage_app, start_run, stop_run
from server.store import RunStore
from server.superlink import SuperLink, SuperLinkError, TlsFiles, key_fingerprint
from tests.helpers import ROOT, need, tabular_config, write_run_toml
from tests.tls_material import TlsMaterial, make_tls_material, make_unregistered_key

T = TypeVar("T")

#: What the attacker runs as the other user: raw HTTPS calls, file reads, a scan of every command line.
PROBE = r"""
import http.client, json, os, ssl, sys
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
paths = json.loads(sys.argv[4])
out = {"http": {}, "read": {}, "cmdlines": []}
ctx = ssl.create_default_context(cafile=ca)
for path, bearer in [(p, None) for p in paths] + [("/v1/control/list-runs", "0" * 64)]:
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=15)
    headers = {"Content-Type": "application/protobuf", "Accept": "application/protobuf"}
    if bearer:
        headers["Authorization"] = "Bearer " + bearer
    conn.request("POST", path, body=b"", headers=headers)
    out["http"][path + (" (guessed bearer)" if bearer else "")] = conn.getresponse().status
    conn.close()
for path in json.loads(sys.argv[5]):
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            open(path, "rb").read()
        out["read"][path] = "read"
    except OSError as exc:
        out["read"][path] = type(exc).__name__
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            out["cmdlines"].append(open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").split("\0"))
        except OSError:
            pass
print(json.dumps(out))
"""


@dataclass
class Attacker:
    uid: int
    gid: int
    home: Path  # owned by the attacker: the CA certificate, FLWR_HOME, an app bundle, a rogue key

    def run(self, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "HOME": str(self.home),
            "FLWR_HOME": str(self.home / "flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "NO_COLOR": "1",
            "TERM": "dumb",
        }
        who = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups"]
        return subprocess.run(
            [*who, *argv], env=env, cwd=self.home, capture_output=True, text=True, timeout=timeout, check=False
        )

    def flwr(self, *args: str) -> dict:
        """The stock ``flwr`` CLI as this user; its JSON answer (it exits 0 on errors)."""
        proc = self.run([bin_path("flwr"), *args, "--format", "json"])
        out = proc.stdout
        assert "{" in out, f"no JSON from flwr {args}: {proc.stdout[-500:]} {proc.stderr[-500:]}"
        return json.loads(out[out.index("{") :])


@pytest.fixture(scope="module")
def attacker() -> Iterator[Attacker]:
    need(os.geteuid() == 0, "creating a second Unix user needs root (CI runs as root)")
    need(shutil.which("useradd") and shutil.which("setpriv"), "useradd and setpriv (util-linux) are needed")
    name = f"fgatk{os.getpid()}"[:30]
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
        timeout=30,
    )
    user = pwd.getpwnam(name)
    home = Path(tempfile.mkdtemp(prefix="fg-attacker-"))  # /tmp: the attacker cannot enter pytest's 0700 folders
    try:
        os.chown(home, user.pw_uid, user.pw_gid)
        yield Attacker(user.pw_uid, user.pw_gid, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        subprocess.run(["userdel", name], capture_output=True, timeout=30, check=False)


@dataclass
class Deployment:
    base: Path
    tls: TlsMaterial
    superlink: SuperLink
    node_ids: dict[str, int]
    run_id: int  # a legitimate run, waiting for its nodes (status running)

    def status(self) -> str:
        sl = self.superlink
        return run_status(self.run_id, sl.address, self.tls.ca_cert, sl.flwr_home).status

    def serverapp_cmdlines(self) -> list[list[str]]:
        out = []
        for pid in os.listdir("/proc"):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if any(a.endswith("flwr-serverapp") for a in argv[:2]) and self.superlink.address in argv:
                out.append(argv)
        return out


def wait_for(what: str, check: Callable[[], T], timeout: float = 120.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    base = tmp_path_factory.mktemp("boundary")
    tls = make_tls_material(base / "kits", ["alpha", "beta"])
    superlink = SuperLink(base / "server", TlsFiles(tls.ca_cert, tls.server_cert, tls.server_key))
    try:
        superlink.start(timeout=90)
        node_ids = {name: superlink.register_node(tls.nodes[name].public, name) for name in ("alpha", "beta")}
        write_enrolled(
            superlink.workdir,
            [Enrolled(n, "client", key_fingerprint(tls.nodes[n].public)) for n in ("alpha", "beta")],
        )
        # Waits (up to 10 minutes) for two nodes that never come: the run stays `running`.
        cfg = tabular_config(None, rounds=1, clients_per_round=2, server={"round_timeout": 120, "wait_for_nodes": 600})
        run_id = start_run(
            superlink.address,
            tls.ca_cert,
            ROOT,
            write_run_toml(cfg, base / "legit.toml"),
            None,
            superlink.flwr_home,
        )
        dep = Deployment(base, tls, superlink, node_ids, run_id)
        wait_for("the legitimate run to be running", lambda: dep.status() == "running")
        wait_for("its ServerApp process", dep.serverapp_cmdlines)
        yield dep
    finally:
        superlink.stop()


@pytest.fixture(scope="module")
def armed(attacker: Attacker, deployment: Deployment) -> Attacker:
    """The attacker's kit: the CA certificate, a connection in a fresh FLWR_HOME, an app, a rogue key."""
    home = attacker.home
    shutil.copyfile(deployment.tls.ca_cert, home / "ca.crt")
    (home / "flwr-home").mkdir()
    (home / "flwr-home" / "config.toml").write_text(
        tomli_w.dumps(
            {
                "superlink": {
                    "default": "target",
                    "target": {"address": deployment.superlink.address, "root-certificates": str(home / "ca.crt")},
                }
            }
        ),
        encoding="utf-8",
    )
    stage_app(ROOT, home / "app")
    make_unregistered_key(home / "rogue")
    for path in [home, *home.rglob("*")]:
        os.chown(path, attacker.uid, attacker.gid)
    return attacker


REFUSED = ("authentication failed", "flwr login")


def refused(answer: dict) -> bool:
    message = str(answer.get("error-message", "")).lower()
    return answer.get("success") is False and any(r in message for r in REFUSED)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_plain_flwr_cli_of_another_user_is_refused(armed: Attacker, deployment: Deployment) -> None:
    sl = deployment.superlink
    runs_before = flwr_json(["ls", CONNECTION], sl.flwr_home)["runs"]
    attempts = {
        "ls": armed.flwr("ls", "target"),
        "run": armed.flwr("run", str(armed.home / "app" / "fedguard"), "target"),
        "supernode register": armed.flwr("supernode", "register", str(armed.home / "rogue" / "node.pub"), "target"),
        "supernode ls": armed.flwr("supernode", "ls", "target"),
        "supernode unregister": armed.flwr("supernode", "unregister", str(deployment.node_ids["alpha"]), "target"),
        "stop": armed.flwr("stop", str(deployment.run_id), "target"),
    }
    assert {what: refused(a) for what, a in attempts.items()} == dict.fromkeys(attempts, True), attempts
    # Nothing changed: no new run, no new node, alpha still registered, the run still running.
    runs_after = flwr_json(["ls", CONNECTION], sl.flwr_home)["runs"]
    assert [r["run-id"] for r in runs_after] == [r["run-id"] for r in runs_before]
    nodes = {int(n["node-id"]): n["status"] for n in sl.list_nodes()}
    assert set(nodes) == set(deployment.node_ids.values())
    assert nodes[deployment.node_ids["alpha"]] != "unregistered"
    assert deployment.status() == "running"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_raw_https_secrets_and_task_tokens_are_out_of_another_users_reach(
    armed: Attacker, deployment: Deployment
) -> None:
    sl = deployment.superlink
    (serverapp,) = deployment.serverapp_cmdlines()
    assert "--token" not in serverapp and "--token-file" in serverapp  # the task token is not on the command line
    token_file = Path(serverapp[serverapp.index("--token-file") + 1])
    assert token_file.parent == sl.token_dir and token_file.is_file()
    paths = [
        "/v1/runtime/acquire-task",
        "/v1/runtime/get-nodes",
        "/v1/runtime/pull-messages",
        "/v1/control/list-runs",
        "/v1/control/register-node",
        "/v1/control/stop-run",
        "/v1/control/unregister-node",
    ]
    private = [sl.control_secret, sl.superexec_secret, sl.flwr_home / "credentials.yaml", sl.token_dir, token_file]
    (armed.home / "probe.py").write_text(PROBE, encoding="utf-8")
    proc = armed.run(
        [
            sys.executable,
            str(armed.home / "probe.py"),
            sl.local_host,
            str(sl.port),
            str(armed.home / "ca.crt"),
            json.dumps(paths),
            json.dumps([str(p) for p in private]),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout)
    assert set(seen["http"].values()) == {401}, seen["http"]
    assert set(seen["read"].values()) == {"PermissionError"}, seen["read"]
    # No process shows a secret or a task token on its command line.
    secrets = [p.read_text(encoding="utf-8").strip() for p in (sl.control_secret, sl.superexec_secret, token_file)]
    assert secrets[2] and not any(s in arg for argv in seen["cmdlines"] for arg in argv for s in secrets)
    assert not any("--token" in argv for argv in seen["cmdlines"])
    assert deployment.status() == "running"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_run_config_naming_a_server_path_is_refused_by_the_serverapp(deployment: Deployment) -> None:
    """Even FedGuard's own credentials cannot make the ServerApp write where a run config says."""
    sl = deployment.superlink
    app = stage_app(ROOT, deployment.base / "pathy")
    project = tomllib.loads((app / "pyproject.toml").read_text(encoding="utf-8"))
    evil = deployment.base / "elsewhere" / "evil.db"
    project["tool"]["flwr"]["app"]["config"]["store-path"] = str(evil)
    cfg = tabular_config(None, rounds=1, clients_per_round=2)
    project["tool"]["flwr"]["app"]["config"]["config-json"] = cfg.to_json()
    (app / "pyproject.toml").write_text(tomli_w.dumps(project), encoding="utf-8")
    with RunStore(sl.workdir / "runs.db") as store:
        before = len(store.runs())
    run_id = int(flwr_json(["run", str(app), CONNECTION], sl.flwr_home, what="submitting")["run-id"])
    status = wait_for(
        "the run to end",
        lambda: (s := run_status(run_id, sl.address, deployment.tls.ca_cert, sl.flwr_home)).finished and s,
        timeout=300,
    )
    assert status.status == "finished:failed"
    assert "may not choose paths on the server" in run_logs(run_id, sl.address, deployment.tls.ca_cert, sl.flwr_home)
    assert not evil.exists() and not evil.parent.exists()
    with RunStore(sl.workdir / "runs.db") as store:
        assert len(store.runs()) == before  # nothing recorded
    with pytest.raises(RunError, match="cannot choose another store"):
        start_run(sl.address, deployment.tls.ca_cert, ROOT, deployment.base / "legit.toml", evil, sl.flwr_home)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fedguards_own_flows_still_work_and_stop_the_run(deployment: Deployment) -> None:
    sl = deployment.superlink
    extra = make_unregistered_key(deployment.base / "gamma")
    gamma = sl.register_node(extra.public, "gamma")
    assert gamma in {int(n["node-id"]) for n in sl.list_nodes()}
    sl.unregister_node(extra.public)
    stop_run(deployment.run_id, sl.address, deployment.tls.ca_cert, sl.flwr_home)
    wait_for("the run to stop", lambda: deployment.status().startswith("finished"), timeout=120)
    assert deployment.status() == "finished:stopped"
    wait_for("its ServerApp to exit", lambda: not deployment.serverapp_cmdlines(), timeout=120)
    # The token file goes with it: the SuperExec's reaper deletes it once it has reaped the child (an
    # exited child's cmdline is already empty while it waits to be reaped, so this may take a moment).
    wait_for("the task token file to be deleted", lambda: not list(sl.token_dir.iterdir()), timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_superlink_without_the_guards_is_refused_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The self-check fails closed: stock flower-superlink (no Control API plugin) never becomes a server."""
    tls = make_tls_material(tmp_path / "kits", ["alpha"])
    superlink = SuperLink(tmp_path / "server", TlsFiles(tls.ca_cert, tls.server_cert, tls.server_key))
    ours = superlink.command()
    stock = [bin_path("flower-superlink"), *ours[ours.index("--superexec-address") + 2 :]]
    monkeypatch.setattr(superlink, "command", lambda: stock)
    with pytest.raises(SuperLinkError, match="answered HTTP 200, not 401"):
        superlink.start(timeout=90)
    assert not superlink.running()
    assert not any(str(superlink.port) in " ".join(argv) for argv in _cmdlines()), (
        "a process of the refused SuperLink is still running"
    )


def _cmdlines() -> list[list[str]]:
    out = []
    for pid in os.listdir("/proc"):
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0"))
        except OSError:
            continue
    return out


@pytest.mark.timeout(60)
def test_flwr_env_is_what_the_server_gives_its_flower_processes(tmp_path: Path) -> None:
    """The server workdir reaches the ServerApp through the environment, not the run config."""
    tls = make_tls_material(tmp_path / "kits", ["alpha"])
    superlink = SuperLink(tmp_path / "server", TlsFiles(tls.ca_cert, tls.server_cert, tls.server_key))
    env = superlink._env({})
    assert env["FEDGUARD_SERVER_WORKDIR"] == str(superlink.workdir)
    assert env["FEDGUARD_RUN_STORE"] == str(superlink.workdir / "runs.db")
    elsewhere = SuperLink(tmp_path / "s2", superlink.tls, run_store=tmp_path / "kept" / "runs.db")
    assert elsewhere._env({})["FEDGUARD_RUN_STORE"] == str((tmp_path / "kept" / "runs.db").resolve())
    assert env["FLWR_HOME"] == flwr_env(superlink.flwr_home)["FLWR_HOME"]
    assert "FEDGUARD_CONTROL_SECRET_FILE" not in env  # given to the SuperLink process alone


# --- The gateway's network namespace --------------------------------------------------------------

#: Runs inside the server's network namespace: the SuperLink (as `server start` runs it) and one real
#: SuperNode on its Fleet API; prints where it listens, then serves until its stdin closes.
SERVER_IN_NETNS = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from client.supernode import SuperNode
from server.superlink import SuperLink, TlsFiles
base, ca, cert, key, node_pub, node_key = (Path(a) for a in sys.argv[2:8])
superlink = SuperLink(base / "server", TlsFiles(ca, cert, key))
node = None
try:
    superlink.start(timeout=120)
    node_id = superlink.register_node(node_pub, "alpha")
    node = SuperNode(base / "alpha", superlink=superlink.address, root_certificates=ca, private_key=node_key,
                     node_config={"data-path": "/nonexistent.csv"}, executor=False)
    node.start(timeout=120)
    online = {int(n["node-id"]): n["status"] for n in superlink.list_nodes()}
    print(json.dumps({"host": superlink.local_host, "port": superlink.port, "node": online.get(node_id)}), flush=True)
    sys.stdin.read()
finally:
    if node is not None:
        node.stop()
    superlink.stop()
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_process_in_the_gateways_network_namespace_reaches_only_the_fleet_api(
    attacker: Attacker, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The gateway sidecar shares the server's network namespace: loopback is no boundary, the secrets are."""
    from tests import netns

    reason = netns.unavailable_reason()
    need(reason is None, f"network namespaces: {reason}")
    base = tmp_path_factory.mktemp("netns-boundary")
    tls = make_tls_material(base / "kits", ["alpha"])
    script = base / "server_in_netns.py"
    script.write_text(SERVER_IN_NETNS, encoding="utf-8")
    lab = netns.Lab(nodes=[]).create()
    server = None
    try:
        paths = [tls.ca_cert, tls.server_cert, tls.server_key, tls.nodes["alpha"].public, tls.nodes["alpha"].private]
        server = subprocess.Popen(
            lab.exec_argv(lab.server_ns, [sys.executable, str(script), str(ROOT), str(base), *map(str, paths)]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert server.stdout is not None
        ready = json.loads(server.stdout.readline() or "{}")
        assert ready.get("node") == "online", f"the server in the namespace did not come up: {ready}"
        # Where the gateway sits: the namespace's own loopback reaches the SuperLink's one port.
        assert lab.connect(lab.server_ns, "127.0.0.1", ready["port"]) is None
        home = attacker.home / "netns"
        home.mkdir()
        shutil.copyfile(tls.ca_cert, home / "ca.crt")
        (home / "probe.py").write_text(PROBE, encoding="utf-8")
        for path in (home, *home.iterdir()):
            os.chown(path, attacker.uid, attacker.gid)
        guarded = ["/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/acquire-task"]
        argv = [sys.executable, str(home / "probe.py"), ready["host"], str(ready["port"]), str(home / "ca.crt")]
        who = ["setpriv", f"--reuid={attacker.uid}", f"--regid={attacker.gid}", "--clear-groups"]
        proc = lab.run(lab.server_ns, [*who, *argv, json.dumps(guarded), "[]"], timeout=120, cwd=home)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert set(json.loads(proc.stdout)["http"].values()) == {401}
        health = (
            "import http.client,ssl,sys\n"
            "c=http.client.HTTPSConnection(sys.argv[1],int(sys.argv[2]),"
            "context=ssl.create_default_context(cafile=sys.argv[3]),timeout=15)\n"
            "c.request('GET','/health'); print(c.getresponse().status)\n"
        )
        proc = lab.run(lab.server_ns, [*who, sys.executable, "-c", health, *argv[2:]], timeout=60, cwd=home)
        assert proc.stdout.strip() == "200", proc.stderr[-2000:]
    finally:
        if server is not None and server.stdin is not None:
            server.stdin.close()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
        lab.destroy()


# --- Fast checks (no processes) ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_fedguards_cli_credentials_follow_the_secret_and_the_address(tmp_path: Path) -> None:
    import stat

    from flwr.supercore.credential_store.file_credential_store import FileCredentialStore

    from server.runs import control_secret_path, ensure_connection

    home = tmp_path / "server" / "flwr-home"
    secret = control_secret_path(home)
    secret.parent.mkdir(parents=True, mode=0o700)
    secret.write_text("a" * 64, encoding="utf-8")
    ensure_connection(home, "127.0.0.1:9001", tmp_path / "ca.crt")
    creds = home / "credentials.yaml"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600 and stat.S_IMODE(home.stat().st_mode) == 0o700
    key = "flower.account-auth.%s.oidc-access-token"
    assert FileCredentialStore(creds).get(key % "127.0.0.1:9001") == b"a" * 64
    secret.write_text("b" * 64, encoding="utf-8")  # a restart: new secret, new port
    ensure_connection(home, "127.0.0.1:9002", tmp_path / "ca.crt")
    assert FileCredentialStore(creds).get(key % "127.0.0.1:9002") == b"b" * 64
    assert FileCredentialStore(creds).get(key % "127.0.0.1:9001") is None


@pytest.mark.timeout(60)
def test_a_refused_control_call_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from server import runs

    answer = {
        "success": False,
        "error-message": "Using SuperLink: x (127.0.0.1:1)\n\nAuthentication failed. Please run `flwr login` "
        "to authenticate and try again.",
    }

    def fake_run(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 0, json.dumps(answer), "")

    monkeypatch.setattr(runs.subprocess, "run", fake_run)
    with pytest.raises(RunError) as refused:
        flwr_json(["ls", CONNECTION], tmp_path / "flwr-home", what="listing runs")
    assert "refused FedGuard's control credentials" in refused.value.what
    assert refused.value.fix and "secrets/superlink-control.secret" in refused.value.fix


@pytest.mark.timeout(60)
def test_a_run_cannot_choose_where_the_server_records_it(tmp_path: Path) -> None:
    workdir = tmp_path / "server"
    (workdir / "flwr-home").mkdir(parents=True)
    config = write_run_toml(tabular_config(None), tmp_path / "run.toml")
    with pytest.raises(RunError, match="cannot choose another store"):
        start_run("127.0.0.1:1", tmp_path / "ca.crt", ROOT, config, tmp_path / "evil.db", workdir / "flwr-home")
    bundle = tomllib.loads((stage_app(ROOT, tmp_path / "app") / "pyproject.toml").read_text(encoding="utf-8"))
    declared = bundle["tool"]["flwr"]["app"]["config"]
    assert "store-path" not in declared and "config-path" not in declared and "config-json" in declared

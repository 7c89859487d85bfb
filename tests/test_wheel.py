"""FedGuard as a user installs it: a wheel, installed non-editable outside the source tree.

The fast tests check what goes into the wheel (every module and every file the product reads at
run time), that no product code reads the source tree, that the Flower app bundle is built from
the installed packages with the identity nodes accept, and that the demo's work dir is private.

The slow tests build the wheel, install it into a fresh venv outside the checkout and, from a
temp dir with no PYTHONPATH, render the gateway config, provision a federation, start a server,
submit `run start` (the ServerApp must run from the bundle staged from site-packages), put the
installed gateway (nginx) in front of that SuperLink and run `fedguard demo --simulate`. To avoid
reinstalling torch, the fresh venv sees the dependencies of the project's venv through a plain
path in a ``.pth`` (which does not process that folder's own ``.pth`` files, so the editable
FedGuard there stays invisible); a test asserts every FedGuard package is imported from the
fresh venv. Nothing skips: under CI a missing tool is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import site
import stat
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest
import tomli_w

from server.store import RunStore
from tests.helpers import ROOT, tabular_config, write_run_toml

PACKAGES = ("common", "server", "client", "fedguard")
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_JUNK = re.compile(r"(^\.|~$|\.(pyc|orig|rej|swp)$)")


def source_files() -> list[str]:
    """Every file under the product packages in the checkout (what the wheel must carry)."""
    files = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*"):
            rel = path.relative_to(ROOT)
            if path.is_file() and "__pycache__" not in rel.parts and not _JUNK.search(path.name):
                files.append(rel.as_posix())
    return sorted(files)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the wheel offline from a copy of the sources (the checkout itself is never written to)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            "dist",
            "./src",
        ],
        cwd=base,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"building the wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (built,) = (base / "dist").glob("fedguard-*.whl")
    return built


# --- fast checks -----------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_the_wheel_carries_every_module_and_every_file_the_product_reads(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    missing = [f for f in source_files() if f not in names]
    assert not missing, (
        f"not in the wheel (a folder without __init__.py, or package data missing from pyproject.toml "
        f"[tool.setuptools.package-data]): {missing}"
    )
    for needed in (
        "server/app_bundle.toml",
        "server/gateway_templates/nginx.conf",
        "server/gateway_templates/proxy_tls.conf",
    ):
        assert needed in names


def test_no_product_code_reads_the_source_tree() -> None:
    offenders = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if "__file__" in line and ".parent" in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "product code must ship what it reads as package data:\n" + "\n".join(offenders)


@pytest.mark.timeout(120)
def test_the_app_bundle_is_built_from_the_installed_packages(tmp_path: Path) -> None:
    from flwr.cli.build import build_fab_from_disk

    from client.executor import check_fab, installed_identity
    from server.runs import stage_app

    staged = stage_app(None, tmp_path)
    config = (staged / "pyproject.toml").read_text(encoding="utf-8")
    for key in ("config-json", "resume-run-id", "evaluator-key", "run-signature"):
        assert f"{key} = " in config, f"the bundle does not declare run-config key {key}"
    assert "store-path" not in config and "config-path" not in config  # no run chooses a server-side path
    assert (staged / "server" / "app.py").is_file() and (staged / "client" / "app.py").is_file()
    assert not list(staged.rglob("__pycache__"))
    # The nodes' executor accepts exactly their installed FedGuard: the bundle must name it.
    check_fab(build_fab_from_disk(staged), installed_identity())


def test_the_demo_work_dir_is_private_and_ignored(tmp_path: Path) -> None:
    from fedguard.demo import prepare_workdir

    old = os.umask(0)
    try:
        fresh = prepare_workdir(tmp_path / "a" / "fedguard-demo")
    finally:
        os.umask(old)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    earlier = tmp_path / "earlier-demo"  # left by a version that made it 0755
    (earlier / "deployment").mkdir(parents=True)
    earlier.chmod(0o755)
    prepare_workdir(earlier)
    assert stat.S_IMODE(earlier.stat().st_mode) == 0o700
    shared = tmp_path / "shared"  # a folder the user pointed --workdir at: not the demo's to change
    shared.mkdir()
    shared.chmod(0o755)
    prepare_workdir(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    ignored = (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert "/fedguard-demo/" in ignored


# --- the installed wheel, as a user runs it ---------------------------------------------------------


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A fresh venv outside the checkout with the wheel installed; the environment to run it in."""
    base = tmp_path_factory.mktemp("installed")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"installing the wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    purelib = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # Dependencies from the project's venv, as a plain path: its .pth files (the editable FedGuard) stay unread.
    deps = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if Path(p).is_dir()]
    (purelib / "_fedguard_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n", encoding="utf-8")
    # Console scripts of the dependencies (flwr, flower-superlink, ...) run with the fresh interpreter.
    bin_dir = Path(sys.executable).parent
    for script in bin_dir.iterdir():
        target = venv / "bin" / script.name
        if target.exists() or not script.is_file() or script.name.startswith(("python", "pip", "activate")):
            continue
        try:
            text = script.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        first, _, rest = text.partition("\n")
        if first.startswith("#!") and "python" in first:
            target.write_text(f"#!{python}\n{rest}", encoding="utf-8")
            target.chmod(0o755)
    path = [
        str(venv / "bin"),
        *(p for p in os.environ.get("PATH", "").split(os.pathsep) if not p.startswith(str(ROOT))),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(
        {
            "PATH": os.pathsep.join(path),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "FEDGUARD_CONTROL_PORT": "0",
        }
    )
    cwd = base / "user"
    cwd.mkdir()
    return {"venv": venv, "python": python, "fedguard": venv / "bin" / "fedguard", "env": env, "cwd": cwd}


def run(inst: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=inst["cwd"], env=inst["env"], capture_output=True, text=True, timeout=timeout
    )


def wait_for(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not in {log}:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def kits(installed: dict) -> Path:
    """A federation provisioned by the installed CLI."""
    (installed["cwd"] / "federation.toml").write_text(
        tomli_w.dumps(
            {
                "name": "wheel-test",
                "nodes": [
                    {"name": "alpha", "organisation": "Clinic A"},
                    {"name": "judge", "organisation": "Ethics board", "role": "evaluator"},
                ],
            }
        )
    )
    proc = run(
        installed,
        installed["fedguard"],
        "provision",
        "init",
        "federation.toml",
        "--out",
        "kits",
        "--generate-node-keys",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return installed["cwd"] / "kits"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_installed_packages_come_from_the_fresh_venv(installed: dict) -> None:
    code = (
        "import importlib.metadata, common, server, client, fedguard, server.gateway as g\n"
        "for m in (common, server, client, fedguard): print(m.__file__)\n"
        "print(g.TEMPLATES)\n"
        "print(importlib.metadata.distribution('fedguard').locate_file(''))\n"
    )
    proc = run(installed, installed["python"], "-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    venv = str(installed["venv"].resolve())
    for line in proc.stdout.split():
        assert str(Path(line).resolve()).startswith(venv), f"{line} is not inside the fresh venv {venv}"
        assert not str(Path(line).resolve()).startswith(str(ROOT)), f"{line} comes from the checkout"


def nginx() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


#: Run in the fresh venv: start the installed gateway in front of the SuperLink (argv: kit, SuperLink
#: port), print "<path> <status> <body>" for a health check and a control call, stop it.
LIVE_GATEWAY = """
import http.client, ssl, sys
from pathlib import Path
from common.processes import free_port
from server.gateway import Gateway, GatewaySettings
kit, upstream, port = Path(sys.argv[1]), int(sys.argv[2]), free_port()
settings = GatewaySettings("127.0.0.1", port, kit / "server.crt", kit / "server.key", kit / "ca.crt", upstream)
gateway = Gateway(settings, Path("gateway-live")).start()
try:
    for method, path in (("GET", "/health"), ("POST", "/v1/control/list-runs")):
        ctx = ssl.create_default_context(cafile=str(kit / "ca.crt"))
        conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=20)
        conn.request(method, path, body=b"" if method == "POST" else None)
        resp = conn.getresponse()
        print(path, resp.status, resp.read()[:200].decode(errors="replace").replace(chr(10), " "))
        conn.close()
finally:
    gateway.stop()
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_installed_gateway_renders_its_config(installed: dict, kits: Path) -> None:
    server = kits / "server"
    code = (
        "import sys; from pathlib import Path\n"
        "from server.gateway import GatewaySettings, render\n"
        "s = Path(sys.argv[1])\n"
        "print(render(GatewaySettings('127.0.0.1', 9443, s / 'server.crt', s / 'server.key', s / 'ca.crt', 9092), "
        "Path('gateway')))\n"
    )
    proc = run(installed, installed["python"], "-c", code, server)
    assert proc.returncode == 0, proc.stderr[-3000:]
    conf = Path(proc.stdout.strip())
    assert conf == installed["cwd"] / "gateway" / "nginx.conf"
    text = conf.read_text()
    assert "listen 127.0.0.1:9443 ssl;" in text and "server 127.0.0.1:9092;" in text and "${" not in text
    assert str((server / "ca.crt").resolve()) in (conf.parent / "proxy_tls.conf").read_text()
    if nginx() is None:
        assert not CI, "nginx is not installed: CI must check the rendered config with `nginx -t`"
        return
    check = run(installed, nginx(), "-t", "-q", "-e", "stderr", "-c", conf, "-p", conf.parent)
    assert check.returncode == 0, check.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_run_start_ships_the_installed_app_to_a_live_server(installed: dict, kits: Path) -> None:
    from common.kit import fingerprint_cert
    from common.processes import free_port

    cwd = installed["cwd"]
    log = cwd / "server.log"
    port = free_port()
    server = subprocess.Popen(
        [
            str(installed["fedguard"]),
            "server",
            "start",
            "--kit",
            "kits/server",
            "--workdir",
            "srv",
            "--port",
            str(port),
            "--ca-fingerprint",
            fingerprint_cert(kits / "server" / "ca.crt"),
        ],
        cwd=cwd,
        env=installed["env"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(log, "server ready", server)
        cfg = tabular_config(rounds=1, server={"wait_for_nodes": 5, "round_timeout": 60})
        write_run_toml(cfg, cwd / "run.toml")
        proc = run(
            installed,
            installed["fedguard"],
            "run",
            "start",
            "--config",
            "run.toml",
            "--server-workdir",
            "srv",
            "--signing-key",
            "kits/admin/run-signing.key",
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "submitted signed run" in proc.stdout
        assert "no pyproject.toml" not in proc.stdout + proc.stderr
        # The ServerApp (run by the SuperLink from the bundle staged out of site-packages) records the run.
        deadline, runs = time.monotonic() + 300, []
        while time.monotonic() < deadline and not runs:
            if (cwd / "srv" / "runs.db").exists():
                with RunStore(cwd / "srv" / "runs.db") as store:
                    runs = store.runs()
            time.sleep(1)
        assert runs and runs[0]["name"] == cfg.name, f"the ServerApp never recorded the run:\n{log.read_text()[-3000:]}"
        if nginx() is None:
            assert not CI, "nginx is not installed: CI must run the installed gateway"
            return
        # The installed gateway in front of the live SuperLink: health answered by the SuperLink itself.
        proc = run(installed, installed["python"], "-c", LIVE_GATEWAY, "kits/server", str(port), timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        answers = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
        assert answers["/health"].startswith("200 ") and "FedGuard gateway" not in answers["/health"]
        assert (
            answers["/v1/control/list-runs"].startswith("403 ")
            and "FedGuard gateway" in answers["/v1/control/list-runs"]
        )
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_installed_demo_runs_in_simulation(installed: dict) -> None:
    proc = run(installed, installed["fedguard"], "demo", "--simulate", "--rounds", "1", timeout=540)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    workdir = installed["cwd"] / "fedguard-demo"
    assert "demo finished" in out and "privacy report: " + str(workdir) in out
    assert stat.S_IMODE(workdir.stat().st_mode) == 0o700
    assert list(workdir.glob("privacy-report-run-*.html"))

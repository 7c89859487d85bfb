"""Containers, compose and Kubernetes manifests, checked without a container engine.

No Docker, kubectl or kustomize exists on the build machines, so this proves what can be proved
from the files themselves and the real project: every YAML and Dockerfile parses; every command a
container runs parses with the real CLI (``fedguard.cli.build_parser``, the gateway's and the
probe's own parsers); ports agree between commands, probes, services and published ports; every
referenced secret, config map, claim, volume and mount exists; every COPY source exists and passes
the image's dockerignore; images run as non-root and carry no kit or key. Then the kits themselves:
``fedguard provision init`` and ``client init`` run for real, the kits are laid out as a Kubernetes
secret volume or a compose bind mount, installed by the image's real entrypoint, and verified by
``verify_kit`` exactly as the container command will; the gateway command starts real nginx.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import pytest
import yaml

from common.errors import FedGuardError
from common.kit import check_node_private_key, fingerprint_cert, verify_kit
from fedguard.cli import build_parser
from fedguard.cli import main as fedguard_main
from tests.helpers import need, wait_until

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
KUSTOMIZATIONS = sorted(K8S.glob("*/kustomization.yaml"))
#: image repository → its Dockerfile (``fedguard-node-cuda`` → ``deploy/docker/node-cuda.Dockerfile``)
IMAGES = {f"fedguard-{p.name.removesuffix('.Dockerfile')}": p for p in DOCKERFILES}
WORKDIR = "/var/lib/fedguard"
FAKE_FP = ":".join(["AB"] * 32)


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"deploy_{name}", DOCKER / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


entrypoint = load_script("entrypoint")
gateway = load_script("gateway")
node_probe = load_script("node_probe")


# --- commands ---------------------------------------------------------------------------------


def parse_command(argv: list[str], where: str) -> Any:
    """Parse a container command with the real parser of the program it runs; fail naming ``where``."""
    assert argv, f"{where}: empty command"
    program, args = argv[0], argv[1:]
    parsers = {"fedguard": build_parser, "fedguard-gateway": gateway.build_parser}
    if program == "fedguard-node-probe":
        assert args == [WORKDIR], f"{where}: fedguard-node-probe takes the node's workdir {WORKDIR}, got {args}"
        return None
    if program not in parsers:
        pytest.fail(f"{where}: runs {program!r}, which is not a FedGuard command ({', '.join(parsers)})")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parsers[program]().parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: `{shlex.join(argv)}` does not parse with the real CLI: {err.getvalue().strip()}")


def command_name(ns: Any) -> str:
    """``server start`` / ``client start`` / ``evaluator start`` / ``gateway``."""
    if ns is None:
        return "probe"
    if hasattr(ns, "upstream_port"):
        return "gateway"
    sub = getattr(ns, "server_command", None) or getattr(ns, "client_command", None)
    sub = sub or getattr(ns, "evaluator_command", None)
    return f"{ns.command} {sub}"


# --- Dockerfiles --------------------------------------------------------------------------------


@dataclass
class Instruction:
    name: str
    args: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    known = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER"}
    known |= {"WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
    out: list[Instruction] = []
    buf, start = "", 0
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        name, _, args = buf.partition(" ")
        assert name.upper() == name and name in known, f"{rel(path)}:{start}: unknown instruction {name!r}"
        out.append(Instruction(name, args.strip(), start))
        buf = ""
    assert not buf, f"{rel(path)}: ends inside a continued line"
    return out


def exec_form(inst: Instruction, path: Path) -> list[str]:
    text = inst.args.partition("CMD ")[2].strip() if inst.name == "HEALTHCHECK" else inst.args
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        pytest.fail(f"{rel(path)}:{inst.line}: {inst.name} must use the exec (JSON) form, got {text!r}")
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"{rel(path)}:{inst.line}"
    return value


def copy_sources(inst: Instruction) -> tuple[list[str], str]:
    parts = [p for p in shlex.split(inst.args) if not p.startswith("--")]
    return parts[:-1], parts[-1]


def dockerignore_rules(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, regex) per line of ``<Dockerfile>.dockerignore``, in BuildKit's pattern syntax."""
    rules = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        rx = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pattern[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pattern[i] == "?":
                rx, i = rx + "[^/]", i + 1
            else:
                rx, i = rx + re.escape(pattern[i]), i + 1
        rules.append((not negate, re.compile(rx + r"\Z")))
    return rules


def ignored(rules: list[tuple[bool, re.Pattern[str]]], relpath: str) -> bool:
    """Last matching rule wins; a rule matching a parent directory matches the file (moby's matcher)."""
    parts = PurePosixPath(relpath).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for exclude, rx in rules:
        if any(rx.match(c) for c in candidates):
            result = exclude
    return result


def tracked_files(under: str) -> list[str]:
    """Files git tracks under ``under`` (every file there when the checkout is not a git repository)."""
    out = subprocess.run(["git", "ls-files", "--", under], cwd=ROOT, capture_output=True, text=True)
    if out.returncode == 0:
        return [line for line in out.stdout.splitlines() if line]
    root = ROOT / under
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    return [rel(p) for p in files if "__pycache__" not in p.parts]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile(dockerfile: Path) -> None:
    where = rel(dockerfile)
    insts = parse_dockerfile(dockerfile)
    names = [i.name for i in insts]
    assert names[0] in ("FROM", "ARG"), f"{where}: must start with FROM"
    ignore_file = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore_file.is_file(), f"{where}: no {ignore_file.name}: the build context would include kits and keys"
    rules = dockerignore_rules(ignore_file)
    for secret in ("deploy/kits/server/server.key", "kits/nodes/a/node.key", "deploy/k8s/node/kits/node-kit.tar"):
        assert ignored(rules, secret), f"{rel(ignore_file)}: {secret} would enter the build context"
    assert ignored(rules, ".venv/bin/python"), f"{rel(ignore_file)}: .venv would enter the build context"

    env = " ".join(i.args for i in insts if i.name == "ENV")
    for setting in ("FLWR_TELEMETRY_ENABLED=0", "FLWR_DISABLE_UPDATE_CHECK=1"):
        assert setting in env, f"{where}: ENV lacks {setting} (Flower would try the network)"

    installed: dict[str, str] = {}
    for inst in insts:
        if inst.name in ("COPY", "ADD"):
            sources, dest = copy_sources(inst)
            assert inst.name == "COPY", f"{where}:{inst.line}: use COPY, not ADD (no URLs or archives)"
            for src in sources:
                path = ROOT / src
                assert path.exists(), f"{where}:{inst.line}: COPY source {src} does not exist in the repository"
                assert not re.search(r"(^|/)kits?(/|$)|\.key$|\.tar$|admin/|token", src), (
                    f"{where}:{inst.line}: COPY {src} would bake secret material into the image"
                )
                files = tracked_files(src) if path.is_dir() else [src]
                assert files, f"{where}:{inst.line}: COPY {src} copies no tracked file"
                for f in files:
                    if not re.search(r"__pycache__|\.pyc$", f):
                        assert not ignored(rules, f), (
                            f"{where}:{inst.line}: COPY {src}: {f} is excluded by {ignore_file.name}; the build fails"
                        )
                if dest.startswith("/usr/local/bin/"):
                    installed[dest.rsplit("/", 1)[1]] = src
                    assert "--chmod=0755" in inst.args, f"{where}:{inst.line}: {dest} must be executable"
    runs = " ".join(i.args for i in insts if i.name == "RUN")
    assert re.search(r"pip install (--no-cache-dir )?\. ", runs) and "pip install -e" not in runs, (
        f"{where}: RUN must install the project as a wheel would (pip install .): the app bundle and the gateway "
        "templates come from the installed packages, never from a source tree"
    )
    torch = re.search(r"pip install torch==(\S+) --index-url (\S+)", runs)
    assert torch and torch.group(1) == "2.13.0", f"{where}: RUN must install torch==2.13.0 first"
    if "cuda" in dockerfile.name:
        assert "whl/cpu" not in torch.group(2), f"{where}: the CUDA image installs the CPU torch build"
    else:
        assert torch.group(2) == "https://download.pytorch.org/whl/cpu", f"{where}: CPU image, use the CPU torch"

    users = [i.args for i in insts if i.name == "USER"]
    assert users, f"{where}: no USER: the container would run as root"
    assert users[-1].split(":")[0] not in ("root", "0"), f"{where}: USER {users[-1]} is root"
    entry = [exec_form(i, dockerfile) for i in insts if i.name == "ENTRYPOINT"]
    assert entry and entry[-1] == ["/usr/bin/tini", "--", "fedguard-entrypoint"], (
        f"{where}: ENTRYPOINT must be tini (PID 1: signals, zombie reaping) running fedguard-entrypoint"
    )
    assert re.search(r"apt-get install [^&]*\btini\b", runs), f"{where}: tini is not installed"
    assert installed.get("fedguard-entrypoint") == "deploy/docker/entrypoint.py", f"{where}: entrypoint not installed"
    for inst in insts:
        if inst.name in ("CMD", "HEALTHCHECK"):
            argv = exec_form(inst, dockerfile)
            ns = parse_command(argv, f"{where}:{inst.line} {inst.name}")
            if argv[0] != "fedguard":
                assert argv[0] in installed, f"{where}:{inst.line}: {argv[0]} is not installed by this Dockerfile"
            if ns is not None and command_name(ns) == "server start":
                assert ns.kit == env_value(insts, "FEDGUARD_KIT"), f"{where}: CMD --kit is not FEDGUARD_KIT"


def env_value(insts: list[Instruction], name: str) -> str | None:
    for inst in insts:
        if inst.name == "ENV" and (m := re.search(rf"(?:^|\s){name}=(\S+)", inst.args)):
            return m.group(1)
    return None


def binaries(dockerfile: Path) -> set[str]:
    out = {"fedguard", "python"}
    for inst in parse_dockerfile(dockerfile):
        if inst.name == "COPY":
            _, dest = copy_sources(inst)
            if dest.startswith("/usr/local/bin/"):
                out.add(dest.rsplit("/", 1)[1])
    return out


def image_dockerfile(image: str, where: str) -> Path:
    repo = image.rsplit(":", 1)[0]
    assert repo in IMAGES, f"{where}: image {image} is built by no Dockerfile in deploy/docker ({sorted(IMAGES)})"
    return IMAGES[repo]


# --- Kubernetes ---------------------------------------------------------------------------------


@dataclass
class Bundle:
    """One kustomization: its objects and generated secrets / config maps."""

    path: Path
    objects: list[dict[str, Any]] = field(default_factory=list)
    secrets: dict[str, set[str]] = field(default_factory=dict)  # name → keys
    configmaps: dict[str, dict[str, str]] = field(default_factory=dict)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o.get("kind") == kind]


def load_bundle(kustomization: Path) -> Bundle:
    where = rel(kustomization)
    k = yaml.safe_load(kustomization.read_text(encoding="utf-8"))
    assert k.get("kind") == "Kustomization", f"{where}: kind must be Kustomization"
    bundle = Bundle(kustomization)
    for res in k.get("resources", []):
        path = kustomization.parent / res
        assert path.is_file(), f"{where}: resources: {res} does not exist"
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            assert isinstance(doc, dict) and doc.get("kind") and doc.get("apiVersion"), f"{rel(path)}: not an object"
            assert doc.get("metadata", {}).get("name"), f"{rel(path)}: {doc['kind']} without metadata.name"
            doc["_file"] = rel(path)
            bundle.objects.append(doc)
    for gen in k.get("secretGenerator", []):
        keys = set()
        for spec in gen.get("files", []):
            key, _, src = spec.partition("=")
            assert src.startswith("kits/"), (
                f"{where}: secretGenerator {gen['name']}: {src or key} must come from kits/ (kept out of git)"
            )
            keys.add(key)
        bundle.secrets[gen["name"]] = keys
    for gen in k.get("configMapGenerator", []):
        bundle.configmaps[gen["name"]] = dict(lit.split("=", 1) for lit in gen.get("literals", []))
    for obj in bundle.of_kind("Secret"):
        bundle.secrets[obj["metadata"]["name"]] = set(obj.get("data", {})) | set(obj.get("stringData", {}))
    for obj in bundle.of_kind("ConfigMap"):
        bundle.configmaps[obj["metadata"]["name"]] = dict(obj.get("data", {}))
    return bundle


BUNDLES = {p.parent.name: load_bundle(p) for p in KUSTOMIZATIONS}


@dataclass
class Container:
    where: str
    spec: dict[str, Any]
    pod: dict[str, Any]
    bundle: Bundle

    @property
    def argv(self) -> list[str]:
        return [*(self.spec.get("command") or []), *(self.spec.get("args") or [])]

    def env(self) -> dict[str, str]:
        """The container's environment with config map values filled in, as the kubelet does."""
        out: dict[str, str] = {}
        for e in self.spec.get("env", []):
            if "value" in e:
                out[e["name"]] = str(e["value"])
                continue
            ref = e.get("valueFrom", {}).get("configMapKeyRef") or {}
            cm = self.bundle.configmaps.get(ref.get("name", ""))
            assert cm is not None, f"{self.where}: env {e['name']}: config map {ref.get('name')!r} is not defined"
            assert ref.get("key") in cm, f"{self.where}: env {e['name']}: config map {ref['name']} has no {ref['key']}"
            out[e["name"]] = cm[ref["key"]]
        return out

    def resolved_argv(self) -> list[str]:
        env = self.env()

        def sub(m: re.Match[str]) -> str:
            assert m.group(1) in env, f"{self.where}: $({m.group(1)}) in args but not in the container's env"
            return env[m.group(1)]

        return [re.sub(r"\$\(([A-Z0-9_]+)\)", sub, a) for a in self.argv]

    def mounts(self) -> dict[str, dict[str, Any]]:
        """mountPath → the pod volume it mounts."""
        volumes = {v["name"]: v for v in self.pod.get("volumes", [])}
        out = {}
        for m in self.spec.get("volumeMounts", []):
            assert m["name"] in volumes, f"{self.where}: volumeMount {m['name']} names no volume of the pod"
            out[m["mountPath"]] = {**volumes[m["name"]], "_readOnly": m.get("readOnly", False)}
        return out

    def ports(self) -> dict[str, int]:
        return {str(p.get("name", p["containerPort"])): int(p["containerPort"]) for p in self.spec.get("ports", [])}


def containers() -> Iterator[Container]:
    for bundle in BUNDLES.values():
        for obj in bundle.objects:
            if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
                pod = obj["spec"]["template"]["spec"]
                for c in [*pod.get("initContainers", []), *pod["containers"]]:
                    where = f"{obj['_file']}: {obj['kind']}/{obj['metadata']['name']} container {c['name']}"
                    yield Container(where, c, pod, bundle)


CONTAINERS = list(containers())


def under_mount(path: str, mounts: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any], str] | None:
    best = None
    for mount, vol in mounts.items():
        if path == mount or path.startswith(mount.rstrip("/") + "/"):
            if best is None or len(mount) > len(best[0]):
                best = (mount, vol, path[len(mount) :].lstrip("/"))
    return best


def listens(ns: Any) -> dict[str, int]:
    """Ports a command listens on, on addresses other containers and the kubelet can reach."""
    name = command_name(ns)
    if name == "server start":
        assert ns.control_host in ("0.0.0.0", "::"), "the control service must listen on all addresses in a container"
        return {"control": ns.control_port}
    if name == "gateway":
        assert ns.listen_host in ("0.0.0.0", "::"), "the gateway must listen on all addresses in a container"
        return {"fleet": ns.listen_port}
    return {}


def test_k8s_layout() -> None:
    assert set(BUNDLES) >= {"server", "node", "node-gpu", "evaluator"}, f"kustomizations found: {sorted(BUNDLES)}"
    committed = [f for f in tracked_files("deploy") if re.search(r"(^|/)kits/|\.key$|\.tar$", f)]
    assert not committed, f"secret material committed under deploy/: {committed}"


@pytest.mark.parametrize("c", CONTAINERS, ids=lambda c: c.where.removeprefix("deploy/k8s/"))
def test_k8s_container(c: Container) -> None:
    pod_sc, sc = c.pod.get("securityContext", {}), c.spec.get("securityContext", {})
    assert pod_sc.get("runAsNonRoot") is True and pod_sc.get("runAsUser", 0) != 0, f"{c.where}: must run as non-root"
    assert sc.get("allowPrivilegeEscalation") is False, f"{c.where}: securityContext.allowPrivilegeEscalation: false"
    assert not sc.get("privileged"), f"{c.where}: privileged"
    binary_set = binaries(image_dockerfile(c.spec["image"], c.where))
    argv = c.resolved_argv()
    assert not c.spec.get("command"), f"{c.where}: `command` would bypass the image's entrypoint (kit install)"
    assert argv[0] in binary_set, f"{c.where}: {argv[0]} is not installed in image {c.spec['image']}"
    ns = parse_command(argv, f"{c.where} args")
    env, mounts = c.env(), c.mounts()
    writable = {
        m for m, v in mounts.items() if ("emptyDir" in v or "persistentVolumeClaim" in v) and not v["_readOnly"]
    }

    # The kit (and node key) come from mounted secrets, installed by the entrypoint where --kit/--key read them.
    for source_var, dest_var, flag in (
        ("FEDGUARD_KIT_SOURCE", "FEDGUARD_KIT", "kit"),
        ("FEDGUARD_NODE_KEY_SOURCE", "FEDGUARD_NODE_KEY", "key"),
        ("FEDGUARD_RUN_SIGNING_KEY_SOURCE", "FEDGUARD_RUN_SIGNING_KEY", "run_signing_key"),
    ):
        if source_var not in env:
            assert not getattr(ns, flag, None) or flag == "key", f"{c.where}: --{flag} without {source_var}"
            continue
        found = under_mount(env[source_var], mounts)
        assert found and "secret" in found[1], f"{c.where}: env {source_var}={env[source_var]} is in no secret mount"
        _, vol, item = found
        secret = vol["secret"]["secretName"]
        keys = c.bundle.secrets.get(secret)
        assert keys is not None, f"{c.where}: volume {vol['name']}: secret {secret} is not defined in the kustomization"
        items = {i["path"]: i["key"] for i in vol["secret"].get("items", [])} or {k: k for k in keys}
        assert item in items, f"{c.where}: env {source_var}: {item} is not an item of secret volume {vol['name']}"
        assert items[item] in keys, f"{c.where}: volume {vol['name']}: secret {secret} has no key {items[item]}"
        dest = env.get(dest_var) or {**entrypoint.KEYS, "FEDGUARD_KIT": entrypoint.DEFAULT_KIT}[dest_var]
        assert getattr(ns, flag) == dest, f"{c.where}: --{flag} {getattr(ns, flag)} is not where {dest_var} puts it"
        assert under_mount(dest, {m: mounts[m] for m in writable}), (
            f"{c.where}: {dest_var}={dest} must be on a writable volume (the root filesystem is read-only)"
        )
        if flag == "kit":
            assert item == "kit.tar", f"{c.where}: the kit secret must hold kit.tar (the server kit has a subfolder)"
    # Every other path the command reads or writes is on a mounted volume.
    for flag in ("workdir", "data", "schema", "policy", "prefix"):
        value = getattr(ns, flag, None) if ns is not None else None
        if value:
            found = under_mount(value, mounts)
            assert found, f"{c.where}: --{flag} {value} is on no volume mount"
            if flag in ("workdir", "prefix"):
                assert found[0] in writable, f"{c.where}: --{flag} {value} must be on a writable volume"
            if flag == "workdir":
                assert "persistentVolumeClaim" in found[1], f"{c.where}: --workdir must be on a PersistentVolumeClaim"
    for vol in c.pod.get("volumes", []):
        if claim := vol.get("persistentVolumeClaim"):
            pvcs = {o["metadata"]["name"] for o in c.bundle.of_kind("PersistentVolumeClaim")}
            assert claim["claimName"] in pvcs, f"{c.where}: volume {vol['name']}: claim {claim['claimName']} undefined"
        if sec := vol.get("secret"):
            assert sec["secretName"] in c.bundle.secrets, f"{c.where}: volume {vol['name']}: secret undefined"
            assert sec.get("defaultMode", 0o644) & 0o007 == 0, f"{c.where}: volume {vol['name']}: world-readable"

    # Ports: declared ports are the ones the command listens on; probes use them.
    listening = listens(ns)
    for name, port in c.ports().items():
        assert port in listening.values(), f"{c.where}: containerPort {port} ({name}) is not a port its command opens"
    probes = {k: c.spec[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in c.spec}
    for kind, probe in probes.items():
        if "exec" in probe:
            probe_argv = probe["exec"]["command"]
            assert probe_argv[0] in binary_set, f"{c.where}: {kind}: {probe_argv[0]} is not in the image"
            parse_command(probe_argv, f"{c.where} {kind}")
            assert getattr(ns, "workdir", None) == probe_argv[1], f"{c.where}: {kind} checks another workdir"
            continue
        check = probe.get("httpGet") or probe.get("tcpSocket")
        assert check, f"{c.where}: {kind} is neither exec, httpGet nor tcpSocket"
        port = check["port"]
        port = c.ports().get(port) if isinstance(port, str) else port
        assert port in listening.values(), f"{c.where}: {kind} port {check['port']} is not a port the command opens"
        if "httpGet" in probe:
            assert check["path"] == "/health" and check.get("scheme") == "HTTPS", f"{c.where}: {kind}: HTTPS /health"
    if command_name(ns) == "server start":
        assert {"startupProbe", "livenessProbe", "readinessProbe"} <= set(probes), f"{c.where}: probes missing"
        assert ns.port not in c.ports().values(), f"{c.where}: the SuperLink port {ns.port} must stay loopback-only"
    if command_name(ns) in ("client start", "evaluator start"):
        assert "livenessProbe" in probes and "startupProbe" in probes, f"{c.where}: node liveness probe missing"
    if command_name(ns) == "gateway":
        servers = [
            o
            for o in CONTAINERS
            if o.pod is c.pod and command_name(parse_command(o.resolved_argv(), o.where)) == "server start"
        ]
        assert servers, f"{c.where}: the gateway must run in the server's pod (it forwards to 127.0.0.1)"
        upstream = parse_command(servers[0].resolved_argv(), servers[0].where).port
        assert ns.upstream_port == upstream, f"{c.where}: --upstream-port {ns.upstream_port} != SuperLink --port"
    if "gpu" in c.where:
        res = c.spec.get("resources", {})
        assert res.get("limits", {}).get("nvidia.com/gpu"), f"{c.where}: resources.limits nvidia.com/gpu missing"
        assert "cuda" in c.spec["image"], f"{c.where}: a GPU node runs the CUDA image"
    assert c.spec.get("resources", {}).get("requests"), f"{c.where}: resources.requests missing"


def test_k8s_services_and_node_addresses() -> None:
    server = BUNDLES["server"]
    pods = [o for o in server.objects if o["kind"] == "Deployment"]
    for svc in server.of_kind("Service"):
        where = f"{svc['_file']}: Service/{svc['metadata']['name']}"
        selector = svc["spec"]["selector"]
        matched = [p for p in pods if selector.items() <= p["spec"]["template"]["metadata"]["labels"].items()]
        assert matched, f"{where}: selector {selector} matches no pod template"
        named = {
            p.get("name"): p["containerPort"]
            for pod in matched
            for c in pod["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in named or target in named.values(), f"{where}: targetPort {target} is no containerPort"
    fleet = next(s for s in server.of_kind("Service") if s["metadata"]["name"] == "fedguard-fleet")
    fleet_port = fleet["spec"]["ports"][0]["port"]
    for name in ("node", "node-gpu", "evaluator"):
        for cm in BUNDLES[name].configmaps.values():
            if "superlink" in cm:
                assert cm["superlink"].endswith(f":{fleet_port}"), (
                    f"{rel(BUNDLES[name].path)}: superlink {cm['superlink']} is not the fleet Service port {fleet_port}"
                )


# --- compose ------------------------------------------------------------------------------------


def interpolate(value: Any, env: dict[str, str], where: str) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, where) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, where) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if name in env:
            return env[name]
        assert op != ":?", f"{where}: ${{{name}}} is required: {arg}"
        return arg if op == ":-" else ""

    return re.sub(r"\$\{([A-Z0-9_]+)(:[-?])?([^}]*)\}", sub, value)


COMPOSE_DOC = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def compose_services() -> dict[str, dict[str, Any]]:
    doc = interpolate(COMPOSE_DOC, {"FEDGUARD_CA_FINGERPRINT": FAKE_FP}, "deploy/compose.yaml")
    return {name: svc for name, svc in doc["services"].items()}


def test_compose() -> None:
    services = compose_services()
    where = "deploy/compose.yaml"
    secrets, volumes = COMPOSE_DOC.get("secrets", {}), COMPOSE_DOC.get("volumes", {})
    commands = {}
    for name, svc in services.items():
        w = f"{where}: services.{name}"
        assert svc.get("user") not in ("root", "0", 0) and not svc.get("privileged"), f"{w}: must not run as root"
        image = svc["image"]
        dockerfile = image_dockerfile(image, w)
        if "build" in svc:
            assert (ROOT / svc["build"]["dockerfile"]) == dockerfile, f"{w}: build.dockerfile does not build {image}"
            assert (DEPLOY / svc["build"]["context"]).resolve() == ROOT, f"{w}: build context must be the repo root"
        argv = svc["command"]
        assert argv[0] in binaries(dockerfile), f"{w}: {argv[0]} is not installed in {image}"
        ns = parse_command([str(a) for a in argv], f"{w}.command")
        commands[name] = ns
        env = svc.get("environment", {})
        svc_secrets = [s if isinstance(s, str) else s["source"] for s in svc.get("secrets", [])]
        for s in svc_secrets:
            assert s in secrets, f"{w}.secrets: {s} is not declared under top-level secrets"
        if "FEDGUARD_KIT_SOURCE" in env:
            assert env["FEDGUARD_KIT_SOURCE"] in [f"/run/secrets/{s}" for s in svc_secrets], (
                f"{w}.environment.FEDGUARD_KIT_SOURCE {env['FEDGUARD_KIT_SOURCE']} is none of its secrets"
            )
            assert ns.kit == env["FEDGUARD_KIT"], f"{w}.command: --kit {ns.kit} is not FEDGUARD_KIT"
        mounts = {}
        for v in svc.get("volumes", []):
            source, target, *_ = v.split(":")
            if not source.startswith((".", "/")):
                assert source in volumes, f"{w}.volumes: named volume {source} is not declared"
            mounts[target] = {"name": source, "bind" if source.startswith(".") else "volume": True, "_readOnly": False}
        for flag in ("workdir", "data", "schema"):
            value = getattr(ns, flag, None)
            if value:
                assert under_mount(value, mounts), f"{w}.command: --{flag} {value} is on no volume"
        if getattr(ns, "workdir", None):
            assert mounts.get(ns.workdir, {}).get("volume"), f"{w}: --workdir must be a named volume (ledger, state)"
        if ns is not None and command_name(ns) in ("client start", "evaluator start"):
            assert svc["healthcheck"]["test"][1:] == ["fedguard-node-probe", WORKDIR], f"{w}: node healthcheck"
    for s, spec in secrets.items():
        assert spec["file"].startswith("./kits/"), f"{where}: secrets.{s}.file must be under ./kits (out of git)"

    # Ports: the gateway shares the server's network namespace; published ports are ones opened there.
    netns: dict[str, dict[str, int]] = {}
    for name, svc in services.items():
        owner = svc.get("network_mode", "").removeprefix("service:") or name
        netns.setdefault(owner, {}).update(listens(commands[name]))
    for name, svc in services.items():
        w = f"{where}: services.{name}"
        for port in svc.get("ports", []):
            container_port = int(str(port).split(":")[-1])
            assert container_port in netns[name].values(), f"{w}.ports: {port}: nothing listens on {container_port}"
        for url_port in re.findall(r"https://localhost:(\d+)/health", json.dumps(svc.get("healthcheck", {}))):
            owner = svc.get("network_mode", "").removeprefix("service:") or name
            assert int(url_port) in netns[owner].values(), f"{w}.healthcheck: nothing listens on {url_port}"
        ns = commands[name]
        if command_name(ns) == "gateway":
            owner = svc["network_mode"].removeprefix("service:")
            assert command_name(commands[owner]) == "server start", f"{w}: network_mode must be the server's"
            assert ns.upstream_port == commands[owner].port, f"{w}: --upstream-port != the SuperLink's --port"
        if getattr(ns, "superlink", None):
            host, port = ns.superlink.rsplit(":", 1)
            assert host in services and int(port) in netns[host].values(), f"{w}: --superlink {ns.superlink}"
            assert int(port) == listens(next(c for c in commands.values() if command_name(c) == "gateway"))["fleet"], (
                f"{w}: nodes must reach the server through the gateway, not {ns.superlink}"
            )
    roles = sorted(command_name(ns) for ns in commands.values())
    assert roles.count("client start") == 3 and "evaluator start" in roles and "gateway" in roles, roles


# --- kits: provision for real, install as the containers do, verify as the commands do ----------


def run_cli(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert fedguard_main(argv) == 0, f"fedguard {shlex.join(argv)} failed"
    return out.getvalue()


def as_secret_volume(files: dict[str, Path], dest: Path, mode: int = 0o440) -> Path:
    """Lay files out as the kubelet does: ``..<timestamp>/`` with the data, ``..data`` → it, keys → ``..data/key``."""
    stamp = dest / "..2026_01_01_00_00_00.000000001"
    stamp.mkdir(parents=True)
    for key, src in files.items():
        shutil.copyfile(src, stamp / key)
        (stamp / key).chmod(mode)
        (dest / key).symlink_to(f"..data/{key}")
    (dest / "..data").symlink_to(stamp.name)
    return dest


def container_paths(env: dict[str, str], root: Path) -> dict[str, str]:
    """The container's absolute paths, re-rooted under ``root``."""
    return {k: str(root / v.lstrip("/")) if v.startswith("/") else v for k, v in env.items()}


@pytest.fixture(scope="module")
def k8s_kits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    base = tmp_path_factory.mktemp("k8s-federation")
    shutil.copyfile(K8S / "federation.example.toml", base / "federation.toml")
    import tomllib

    fed = tomllib.loads((base / "federation.toml").read_text(encoding="utf-8"))
    for node in fed["nodes"]:
        workdir = base / Path(node["public_key"]).parent
        run_cli(["client", "init", "--workdir", str(workdir)])
    run_cli(["provision", "init", str(base / "federation.toml"), "--out", str(base / "kits")])
    return base, fingerprint_cert(base / "kits" / "server" / "ca.crt")


@pytest.mark.parametrize("c", CONTAINERS, ids=lambda c: c.where.removeprefix("deploy/k8s/"))
def test_k8s_kit_installs_and_verifies(c: Container, k8s_kits: tuple[Path, str], tmp_path: Path) -> None:
    """The kit tar made as kustomization.yaml says, in a secret volume, installed by the real entrypoint."""
    base, fp = k8s_kits
    role_of = {
        "server start": "server",
        "gateway": "server",
        "client start": "st-mary",
        "evaluator start": "ethics-eval",
    }
    ns = parse_command(c.resolved_argv(), c.where)
    participant = role_of[command_name(ns)]
    kit_dir = base / "kits" / ("server" if participant == "server" else f"nodes/{participant}")
    tar = tmp_path / "kit.tar"
    subprocess.run(["tar", "-C", str(kit_dir), "-cf", str(tar), "."], check=True)  # the documented recipe
    env = c.env()
    root = tmp_path / "container"
    mounts = c.mounts()
    for mount, vol in mounts.items():
        if "secret" in vol:
            files = {"kit.tar": tar} if "kit" in vol["secret"]["secretName"] else {}
            if "key" in vol["secret"]["secretName"]:
                files = {"node.key": base / "keys" / participant / "node.key"}
            as_secret_volume(files, root / mount.lstrip("/"), vol["secret"].get("defaultMode", 0o644))
    if "FEDGUARD_NODE_KEY_SOURCE" in env:  # why the entrypoint copies at all: the kubelet's files are 0440
        with pytest.raises(FedGuardError, match="readable by other users"):
            check_node_private_key(verify_kit(kit_dir, fp), root / env["FEDGUARD_NODE_KEY_SOURCE"].lstrip("/"))
    env = container_paths(env, root)
    entrypoint.prepare(env)
    kit = verify_kit(env["FEDGUARD_KIT"], fp.lower())
    assert kit.role == ("server" if participant == "server" else "client" if participant == "st-mary" else "evaluator")
    if "FEDGUARD_NODE_KEY_SOURCE" in env:
        check_node_private_key(kit, env["FEDGUARD_NODE_KEY"])  # 0600, EC P-384, the registered key


@pytest.fixture(scope="module")
def compose_kits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    base = tmp_path_factory.mktemp("compose-federation")
    shutil.copyfile(DEPLOY / "compose.federation.toml", base / "compose.federation.toml")
    run_cli(["provision", "init", str(base / "compose.federation.toml"), "--out", str(base / "kits"),
             "--generate-node-keys"])  # fmt: skip
    return base, fingerprint_cert(base / "kits" / "server" / "ca.crt")


def test_compose_kits_install_and_verify(compose_kits: tuple[Path, str], tmp_path: Path) -> None:
    """Each service's secret is a kit `provision init compose.federation.toml` writes, for that service's role."""
    base, fp = compose_kits
    secrets = COMPOSE_DOC["secrets"]
    for name, svc in compose_services().items():
        ns = parse_command([str(a) for a in svc["command"]], name)
        (secret,) = svc["secrets"]
        source = base / secrets[secret]["file"]
        assert source.is_dir(), f"deploy/compose.yaml: secrets.{secret}: provision init writes no {source.name}"
        shutil.copytree(source, tmp_path / name / "mount")
        for f in (tmp_path / name / "mount").rglob("*"):
            f.chmod(0o644 if f.is_file() else 0o755)  # a bind mount keeps whatever mode the host has
        env = {
            "FEDGUARD_KIT_SOURCE": str(tmp_path / name / "mount"),
            "FEDGUARD_KIT": str(tmp_path / name / svc["environment"]["FEDGUARD_KIT"].lstrip("/")),
        }
        if name == "server":  # why the entrypoint copies at all: a bind mount keeps the host's modes
            with pytest.raises(FedGuardError, match="readable by other users"):
                verify_kit(env["FEDGUARD_KIT_SOURCE"], fp)
        entrypoint.prepare(env)
        kit = verify_kit(env["FEDGUARD_KIT"], ns.ca_fingerprint.replace(FAKE_FP, fp))
        expected = {"server start": "server", "gateway": "server", "client start": "client"}
        assert kit.role == expected.get(command_name(ns), "evaluator"), f"services.{name}: wrong kit {kit.role}"
        if kit.role != "server":
            assert kit.participant == name, f"services.{name} mounts the kit of {kit.participant}"
            assert kit.node_private_key is not None
            check_node_private_key(kit, kit.node_private_key)


def test_entrypoint_refuses_a_missing_mount_and_runs_the_command(tmp_path: Path) -> None:
    with pytest.raises(entrypoint.EntrypointError, match="mount the kit secret"):
        entrypoint.prepare({"FEDGUARD_KIT_SOURCE": str(tmp_path / "nothing"), "FEDGUARD_KIT": str(tmp_path / "k")})
    out = subprocess.run(
        [sys.executable, str(DOCKER / "entrypoint.py"), sys.executable, "-c", "print('ran')"],
        capture_output=True,
        text=True,
        env={**os.environ, "FEDGUARD_KIT_SOURCE": ""},
        timeout=30,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ran", out.stderr


# --- the gateway command and the node probe, for real ------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_gateway_command_serves_only_fleet_and_health(k8s_kits: tuple[Path, str], tmp_path: Path) -> None:
    """The server pod's gateway args, on a free loopback port: nginx starts, refuses the control API."""
    nginx = shutil.which("nginx") or Path("/usr/sbin/nginx").exists()
    need(nginx, "nginx is not installed (apt-get install nginx-light)")
    base, fp = k8s_kits
    (c,) = [c for c in CONTAINERS if c.spec["name"] == "gateway"]
    ns = parse_command(c.resolved_argv(), c.where)
    port = free_port()
    argv = ["--kit", str(base / "kits" / "server"), "--ca-fingerprint", fp, "--listen-host", "127.0.0.1"]
    argv += ["--listen-port", str(port), "--upstream-port", str(ns.upstream_port), "--prefix", str(tmp_path / "gw")]
    proc = subprocess.Popen(
        [sys.executable, str(DOCKER / "gateway.py"), *argv],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        ctx = ssl.create_default_context(cafile=str(base / "kits" / "server" / "ca.crt"))
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"fedguard-gateway exited: {proc.stdout.read().decode() if proc.stdout else ''}"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
                    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                        tls.sendall(
                            b"POST /v1/control/start-run HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
                        )
                        reply = tls.recv(4096)
                break
            except (ConnectionRefusedError, ssl.SSLError, OSError):
                assert time.monotonic() < deadline, "the gateway did not listen within 20 s"
                time.sleep(0.1)
        assert reply.startswith(b"HTTP/1.1 403"), reply[:200]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_node_probe_follows_the_real_processes(tmp_path: Path) -> None:
    """Healthy only while the SuperNode named in supernode.session and the workdir's executor live."""
    workdir = tmp_path / "node"
    workdir.mkdir()
    assert "not joined" in (node_probe.check(workdir) or "")
    sleeper = "import time; time.sleep(60)"
    supernode = subprocess.Popen([sys.executable, "-c", sleeper, "-m", "client.supernode", str(workdir / "nc.toml")])
    executor = subprocess.Popen([sys.executable, "-c", sleeper, "-m", "client.executor"], cwd=workdir)
    try:
        (workdir / "supernode.session").write_text(json.dumps({"node_id": 7, "pid": supernode.pid}))
        # Until exec, a child's command line is still pytest's: wait for both to show theirs.
        wait_until(lambda: node_probe.check(workdir) is None, "both processes visible to the probe", timeout=10)
        executor.kill()
        executor.wait()
        assert "executor" in (node_probe.check(workdir) or "")
        supernode.kill()
        supernode.wait()
        assert f"PID {supernode.pid}" in (node_probe.check(workdir) or "")
        out = subprocess.run([sys.executable, str(DOCKER / "node_probe.py"), str(workdir)], capture_output=True)
        assert out.returncode == 1
    finally:
        for p in (supernode, executor):
            p.kill()
            p.wait()

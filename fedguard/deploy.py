"""``fedguard server start``, ``client start``, ``evaluator start``, ``run start|status|stop|logs``, ``node revoke``.

Real Flower processes: the SuperLink (TLS, node authentication, loopback only) on the server
host, a SuperNode plus FedGuard's executor on each node host. Every command verifies its kit
first; a node also checks its data against its schema before it connects, so a bad file is
reported locally and never half-joins a run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.errors import ConfigError, FedGuardError
from fedguard.cli_guards import add_ca_pin_args, ca_pin, nonnegative_float, positive_float, positive_int, probability
from fedguard.he_cli import add_command as add_he_keygen
from fedguard.tracking import add_mlflow_argument

_STATE = "server.json"  # written by `server start` in its workdir; read by `run ...` and `node revoke`


def _wait_for_signal(stop: threading.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        stop.wait(1.0)


def cmd_server_start(args: argparse.Namespace) -> int:
    from common.kit import verify_kit
    from server.superlink import SuperLink, TlsFiles

    pin = ca_pin(args, "server start")
    kit = verify_kit(args.kit, pin)
    if kit.role != "server":
        raise ConfigError(f"this is a {kit.role} kit, not the server's", where=str(args.kit))
    signing_key = None
    if args.run_signing_key:  # fail before anything starts
        from common.run_signing import load_signing_key

        signing_key = load_signing_key(args.run_signing_key)
    workdir = Path(args.workdir).resolve()
    for run_id, name in fail_orphaned_runs(workdir):
        print(f"run {run_id} ({name!r}) was still recorded running: marked failed ({ORPHANED})", flush=True)
        _audit(workdir, "run.fail", f"run {run_id} ({name[:64]})", ORPHANED)
    superlink = SuperLink(workdir, TlsFiles(kit.ca_cert, kit.server_cert, kit.server_key), port=args.port)  # type: ignore[arg-type]
    print(f"starting the SuperLink for federation {kit.federation!r} on 127.0.0.1:{superlink.port} ...", flush=True)
    superlink.start(timeout=args.timeout)
    control = None
    try:
        enroll(workdir, kit, superlink)
        control = start_control_service(
            workdir, kit, superlink, args.control_host, args.control_port, signing_key=signing_key
        )
        state = {
            "address": superlink.address,
            "port": superlink.port,
            "ca_cert": str(kit.ca_cert),
            "flwr_home": str(superlink.flwr_home),
            "kit": str(Path(args.kit).resolve()),
            "pid": superlink.pid,
            "control_url": control.url,
            # What later commands (`run start`, `node revoke`) pin this kit to; null only when waived.
            "ca_fingerprint": pin,
        }
        (workdir / _STATE).write_text(json.dumps(state, indent=1), encoding="utf-8")
        signing = "runs are signed by the service" if signing_key else "runs need a `fedguard run sign` token"
        print(f"control service (API + dashboard): {control.url} ({signing})", flush=True)
        print(f"  add people with `fedguard user add NAME --role reviewer|operator|admin --server-workdir {workdir}`")
        print(f"server ready: {superlink.address} (log {superlink.log_path}); Ctrl-C stops it", flush=True)
        _wait_for_signal(threading.Event())
    finally:
        if control is not None:
            control.stop()
        superlink.stop()
        print("server stopped")
    return 0


#: The reason recorded for a run that was ``running`` when its server started again.
ORPHANED = "the server stopped during the run (found at start)"


def _superlink_alive(workdir: Path) -> int | None:
    """The pid of a SuperLink a previous ``server start`` in ``workdir`` left running, if any."""
    state = workdir / _STATE
    try:
        pid = int(json.loads(state.read_text(encoding="utf-8"))["pid"])
        cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if b"superlink" in cmdline and str(workdir.resolve()).encode() in cmdline else None


def fail_orphaned_runs(workdir: Path) -> list[tuple[int, str]]:
    """Mark every run the store still calls ``running`` as failed: at start, no ServerApp can be alive.

    A server that was SIGKILLed (power loss, OOM) never recorded the end of its runs; left
    ``running`` they would look live forever and ``run resume`` could not tell them from a run in
    progress. A SuperLink still running from this workdir means it is not a restart: refuse.
    """
    from server.runs import server_store

    store_path = server_store(workdir)
    if not store_path.is_file():
        return []
    alive = _superlink_alive(workdir)
    if alive is not None:
        raise ConfigError(
            f"a SuperLink from this work directory is still running (pid {alive})",
            where=str(workdir / _STATE),
            fix="stop that server first (Ctrl-C in its terminal, or end its `fedguard server start`), then start again",
        )
    from server.store import RunStore

    with RunStore(store_path) as store:
        orphans = [(int(r["run_id"]), str(r["name"])) for r in store.runs() if r["status"] == "running"]
        for run_id, _ in orphans:
            store.finish_run(run_id, "failed", ORPHANED)
    return orphans


def start_control_service(
    workdir: Path, kit: Any, superlink: Any | None, host: str, port: int, *, signing_key: Any = None
) -> Any:
    """The HTTPS API + dashboard in this process, with the server kit's certificate (``server.control``)."""
    from server.control.app import create_app
    from server.control.federation import SuperLinkFederation
    from server.control.serve import ControlServer
    from server.control.service import ControlService
    from server.superlink import SuperLinkError, local_name

    store = workdir / "runs.db"
    federation = SuperLinkFederation(kit, superlink, store) if superlink is not None else None
    service = ControlService(workdir, store, federation, signing_key)
    try:
        name = local_name(kit.server_cert, "127.0.0.1" if host in ("0.0.0.0", "::") else host)
    except SuperLinkError:
        name = host
    return ControlServer(create_app(service), kit.server_cert, kit.server_key, host=host, port=port, name=name).start()


def enroll(workdir: Path, kit: Any, superlink: Any) -> None:
    """Make the SuperLink's registry the kit's, then write the enrolled set the ServerApp trusts.

    Strangers (keys registered behind FedGuard's back) and revoked keys are removed, every enrolled
    key is (re-)registered; each change is printed and audited. A SuperLinkError names the node
    that could not be put right: the server does not start half-enrolled.
    """
    from server.enrollment import Enrolled, write_enrolled

    result = superlink.reconcile(kit.nodes, [r.fingerprint for r in kit.revoked])
    for fp, node_id in result.strangers:
        print(f"  WARNING: removed key {fp} (node {node_id}): registered at the SuperLink, not enrolled in the kit")
        _audit(workdir, "node.stranger", f"{fp} (node {node_id})", "removed at server start: not enrolled")
    for fp, node_id in result.unregistered:
        print(f"  unregistered revoked key {fp} (node {node_id})")
        _audit(workdir, "node.unregister", f"{fp} (node {node_id})", "revoked key removed at server start")
    for node in result.revoked:
        print(f"  {node.role} {node.name} ({node.organisation}) key {node.fingerprint} is revoked: left out")
    for node, node_id, restored in result.registered:
        again = " (re-registered: it had been unregistered outside FedGuard)" if restored else ""
        who = f"{node.role} {node.name} ({node.organisation})"
        print(f"  enrolled {who} key {node.fingerprint} → node {node_id}{again}")
        if restored:
            _audit(workdir, "node.reregister", f"{node.name} ({node.fingerprint})", "unregistered outside FedGuard")
    write_enrolled(workdir, [Enrolled(n.name, n.role, n.fingerprint) for n, _, _ in result.registered])


def _audit_ready(workdir: Path) -> None:
    """Refuse to act on the SuperLink when the action could not be audited (a wiped or truncated log)."""
    from server.control.audit import AuditLog

    AuditLog(workdir).check_appendable()


def _audit(workdir: Path, action: str, target: str, outcome: str) -> None:
    """An audit entry for a server-side change made outside the control service (same format as the CLI's)."""
    from fedguard.control_cli import _record

    _record(workdir, action, target, outcome)


def cmd_node_start(args: argparse.Namespace, role: str) -> int:
    from client.supernode import SuperNode
    from common.data import load_encoded
    from common.kit import check_node_private_key, verify_kit
    from common.policy import NodePolicy, load_policy
    from common.schema import load_schema

    kit = verify_kit(args.kit, args.ca_fingerprint)
    if kit.role != role:
        raise ConfigError(f"this is a {kit.role} kit, not a {role} kit", where=str(args.kit))
    workdir = Path(args.workdir).resolve()
    key = Path(args.key) if args.key else (kit.node_private_key or workdir / "node.key")
    check_node_private_key(kit, key)
    policy = load_policy(args.policy) if args.policy else NodePolicy.default_for(role)  # a bad file fails here
    print(f"{role} {kit.participant}: policy {args.policy or '(built-in defaults)'}", flush=True)
    schema = load_schema(args.schema)
    data = load_encoded(args.data, schema, cache_dir=workdir / "cache")  # bad data fails here, before joining
    print(f"{role} {kit.participant}: {len(data)} rows of {args.data} match the schema", flush=True)
    check_server_identity(args.superlink, policy)
    node_config: dict[str, Any] = {
        "data-path": str(Path(args.data).resolve()),
        "schema-path": str(Path(args.schema).resolve()),
        "workdir": str(workdir),
        "role": role,
        "run-signing-pub-path": str(Path(kit.run_signing_public_key).resolve()),
        "policy-path": str(Path(args.policy).resolve()) if args.policy else "default",
        "federation": kit.federation,
        "node-name": kit.participant,
    }
    for flag, key_name in (
        ("dataset_id", "dataset-id"),
        ("budget_epsilon", "budget-epsilon"),
        ("budget_delta", "budget-delta"),
        ("declared_size", "declared-size"),
        ("device", "device"),
        ("watts_per_core", "watts-per-core"),
        ("gpu_watts", "gpu-watts"),
        ("carbon_intensity", "carbon-intensity"),
    ):
        if getattr(args, flag, None) is not None:
            node_config[key_name] = getattr(args, flag)
    # Owner settings fail here, before joining, rather than on the first message.
    from common.devices import resolve_device
    from common.resources import EnergyModel

    if args.device:
        resolve_device(args.device, where="--device")
    EnergyModel.from_config(node_config, where="client start")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "node-start.json").write_text(json.dumps({"role": role, "policy": node_config["policy-path"]}))
    node = SuperNode(
        workdir,
        superlink=args.superlink,
        root_certificates=kit.ca_cert,
        private_key=key,
        node_config=node_config,
        progress_terminal=sys.stdout,  # local steps as a bar when the owner runs it in a terminal
    )
    print(f"connecting to {args.superlink} ...", flush=True)
    node.start()
    try:
        print(f"{role} {kit.participant} joined as node {node.node_id}; logs in {workdir}; Ctrl-C stops it", flush=True)
        _wait_for_signal(threading.Event())
    finally:
        node.stop()
        print(f"{role} stopped")
    return 0


def check_server_identity(superlink: str, policy: Any) -> None:
    """With ``allowed_servers`` in the policy, connect only to a server presenting one of those certificates."""
    if not policy.allowed_servers:
        return
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    host, _, port = superlink.rpartition(":")
    try:
        pem = ssl.get_server_certificate((host.strip("[]"), int(port)), timeout=15)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the server's certificate: {exc}", where=superlink) from None
    fp = x509.load_pem_x509_certificate(pem.encode()).fingerprint(hashes.SHA256()).hex(":").upper()
    if fp not in policy.allowed_servers:
        raise ConfigError(
            f"the server presents certificate {fp}, which the node policy does not allow",
            where="policy allowed_servers",
            fix="check you are connecting to the right server; the owner adds its fingerprint to allowed_servers",
        )
    print(f"server certificate {fp} is allowed by the policy", flush=True)


def _server_state(workdir: str) -> dict[str, Any]:
    path = Path(workdir) / _STATE
    if not path.is_file():
        raise ConfigError(
            "no running server here", where=str(path), fix="start it with `fedguard server start --workdir DIR`"
        )
    return dict(json.loads(path.read_text(encoding="utf-8")))


def _run_token(args: argparse.Namespace, config_json: str) -> str:
    """The admin's approval of this run: signed here with the key, or a token from `fedguard run sign`."""
    from common.run_signing import load_signing_key, sign_run

    if getattr(args, "signature", None):
        return Path(args.signature).read_text(encoding="utf-8").strip()
    if getattr(args, "signing_key", None):
        return sign_run(config_json, load_signing_key(args.signing_key))
    raise ConfigError(
        "nodes accept only runs signed with the federation's run-signing key",
        fix="pass --signing-key <admin>/run-signing.key, or --signature FILE from `fedguard run sign` "
        "(the admin can sign offline)",
    )


def _submit(args: argparse.Namespace, config: Path | None, config_json: str, what: str, resume_run_id: int = 0) -> int:
    """Submit a signed run (or the continuation of one) to this host's SuperLink; follow it if asked."""
    from common.kit import verify_kit
    from server.runs import recorded_end, run_logs, start_run, wait_for_run

    token = _run_token(args, config_json)

    state = _server_state(args.server_workdir)
    store = Path(args.store or Path(args.server_workdir) / "runs.db").resolve()
    kit = verify_kit(state["kit"], state.get("ca_fingerprint"))  # pinned as `server start` pinned it
    evaluator = next((n.fingerprint for n in kit.nodes if n.role == "evaluator"), "")
    address, ca, home = state["address"], Path(state["ca_cert"]), Path(state["flwr_home"])
    action = "run.resume" if resume_run_id else "run.start"
    _audit_ready(Path(args.server_workdir))
    try:
        run_id = start_run(
            address,
            ca,
            None,  # ship the installed FedGuard
            config,
            store,
            home,
            resume_run_id=resume_run_id,
            evaluator_key=evaluator,
            run_signature=token,
        )
    except FedGuardError as exc:
        _audit(Path(args.server_workdir), action, what, f"failed: {exc.what}")
        raise
    # The CLI acts on the SuperLink as the control service does: every start is in the audit log.
    _audit(Path(args.server_workdir), action, what, f"ok: Flower run {run_id}")
    print(f"submitted {what} as Flower run {run_id}; run store {store}", flush=True)
    if not args.follow:
        return 0
    log = _LogFollower(lambda: run_logs(run_id, address, ca, home))
    status = wait_for_run(
        run_id, address, ca, home, timeout=args.timeout, poll=2.0, on_poll=log.poll, ended=recorded_end(store, run_id)
    )
    log.flush()
    print(f"run {run_id}: {status.status}")
    if status.succeeded and getattr(args, "mlflow_uri", None):
        from fedguard.tracking import log_after_run, store_run_id

        log_after_run(args, store, store_run_id(store, run_id))
    return 0 if status.succeeded else 1


class _LogFollower:
    """Prints the ServerApp log's new lines while a run works (round N/T, replies, ETA), every ``every_s``."""

    def __init__(self, read: Callable[[], str], every_s: float = 10.0) -> None:
        self.read, self.every_s, self.shown, self.last = read, every_s, 0, time.monotonic()

    def poll(self) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        self.last = time.monotonic()
        try:
            text = self.read()
        except FedGuardError as exc:  # the log is a courtesy; the run's status decides the outcome
            print(f"(could not read the run log: {exc.what})", flush=True)
            return
        if len(text) < self.shown:  # the log restarted (a new ServerApp of the run): show it all
            self.shown = 0
        new, self.shown = text[self.shown :], len(text)
        if new.strip():
            print(new.rstrip("\n"), flush=True)


def cmd_run_start(args: argparse.Namespace) -> int:
    from common.config import load_config
    from fedguard.tracking import checked_args

    cfg = load_config(args.config)  # refuse a bad config before anything is submitted
    checked_args(args)  # --mlflow-uri: MLflow installed, the store usable and --follow given, before submitting
    return _submit(args, Path(args.config), cfg.to_json(), f"signed run {cfg.name!r}")


def cmd_run_sign(args: argparse.Namespace) -> int:
    """Sign a run config offline (the admin's machine); `run start --signature` submits it."""
    from common.config import load_config
    from common.run_signing import load_signing_key, sign_run

    cfg = load_config(args.config)
    token = sign_run(cfg.to_json(), load_signing_key(args.key))
    out = Path(args.out)
    out.write_text(token + "\n", encoding="utf-8")
    print(f"signed run {cfg.name!r} (config sha256 {cfg.digest()[:16]}…) → {out}")
    return 0


def cmd_run_resume(args: argparse.Namespace) -> int:
    """Continue a crashed or stopped deployed run from its last good checkpoint, as a new Flower run."""
    from server.app import resume_point

    store = Path(args.store or Path(args.server_workdir) / "runs.db").resolve()
    refuse_if_live(args.server_workdir, store, args.run_id)
    cfg, ckpt = resume_point(store, args.run_id)  # fails here, before submitting, if nothing can resume
    what = f"the continuation of run {args.run_id} ({cfg.name!r}) after round {ckpt.round}"
    return _submit(args, None, cfg.to_json(), what, args.run_id)


def refuse_if_live(server_workdir: str, store_path: Path, run_id: int) -> None:
    """Refuse to resume a run whose ServerApp may still be running: two ServerApps on one run would
    both train and write its rounds.

    The store says ``running`` for a live run and for one whose server died without recording it
    (``server start`` marks those failed). With the server up, the SuperLink decides: a run it still
    reports pending, starting or running is live; one it reports finished is recorded failed here and
    may resume. If the SuperLink cannot be asked, the run may be live: refuse.
    """
    from server.runs import run_status
    from server.store import RunStore

    if not store_path.is_file():
        return  # resume_point names the missing store
    with RunStore(store_path) as store:
        run = store.run(run_id)
    if run["status"] != "running":
        return
    flower_run = run.get("flower_run_id")
    stop_hint = f"stop it with `fedguard run stop {flower_run} --server-workdir {server_workdir}` and resume after"
    if not flower_run:
        raise ConfigError(
            f"run {run_id} is recorded running and has no Flower run id to check: it may still be live",
            where=str(store_path),
            fix="wait for it to end, or restart the server (`server start` marks runs it finds running as failed)",
        )
    state = _server_state(server_workdir)
    try:
        st = run_status(int(flower_run), state["address"], Path(state["ca_cert"]), Path(state["flwr_home"]))
    except FedGuardError as exc:  # RunError, or no connection to the SuperLink
        raise ConfigError(
            f"run {run_id} is recorded running and the SuperLink cannot say whether Flower run {flower_run} is "
            f"still live ({exc.what})",
            where=str(store_path),
            fix="if the server is down, start it again (it marks the run failed), then resume",
        ) from None
    if not st.finished:
        raise ConfigError(
            f"run {run_id} is still live: Flower run {flower_run} is {st.status} at the SuperLink",
            where=str(store_path),
            fix=stop_hint,
        )
    with RunStore(store_path) as store:  # the SuperLink ended it without the ServerApp recording it
        store.finish_run(run_id, "failed", f"the ServerApp ended without recording it (SuperLink: {st.status})")


def cmd_run_status(args: argparse.Namespace) -> int:
    from server.runs import run_status

    state = _server_state(args.server_workdir)
    st = run_status(args.run_id, state["address"], Path(state["ca_cert"]), Path(state["flwr_home"]))
    alarms = _run_alarms(Path(args.server_workdir), args.run_id)
    if args.json:
        print(json.dumps({**st.raw, "alarms": alarms}))
        return 0
    print(f"run {st.run_id}: {st.status} ({st.elapsed:.0f}s) {st.details}")
    for a in alarms:
        print(f"ALARM ({a['kind']}, round {a['first_round']}): {a['detail']}")
    return 0


def _run_alarms(server_workdir: Path, flower_run_id: int) -> list[dict[str, Any]]:
    """The alarms the ServerApp recorded for this Flower run (e.g. keys the kit does not enroll)."""
    from server.store import RunStore

    path = server_workdir / "runs.db"
    if not path.is_file():
        return []
    with RunStore(path) as store:
        run = store.run_by_flower_id(flower_run_id)
        return [] if run is None else store.alarms(int(run["run_id"]))


def cmd_run_stop(args: argparse.Namespace) -> int:
    from server.runs import stop_run

    state = _server_state(args.server_workdir)
    _audit_ready(Path(args.server_workdir))
    try:
        stop_run(args.run_id, state["address"], Path(state["ca_cert"]), Path(state["flwr_home"]))
    except FedGuardError as exc:
        _audit(Path(args.server_workdir), "run.stop", f"Flower run {args.run_id}", f"failed: {exc.what}")
        raise
    _audit(Path(args.server_workdir), "run.stop", f"Flower run {args.run_id}", "ok")
    print(f"run {args.run_id} stopped")
    return 0


def cmd_run_logs(args: argparse.Namespace) -> int:
    from server.runs import run_logs

    state = _server_state(args.server_workdir)
    print(run_logs(args.run_id, state["address"], Path(state["ca_cert"]), Path(state["flwr_home"])))
    return 0


def cmd_node_revoke(args: argparse.Namespace) -> int:
    from common.kit import verify_kit
    from server.superlink import SuperLink, TlsFiles

    state = _server_state(args.server_workdir)
    kit = verify_kit(state["kit"], state.get("ca_fingerprint"))  # pinned as `server start` pinned it
    node = next((n for n in kit.nodes if n.name == args.name), None)
    if node is None:
        raise ConfigError(f"no enrolled node named {args.name!r}", where=state["kit"])
    superlink = SuperLink(
        Path(args.server_workdir), TlsFiles(kit.ca_cert, kit.server_cert, kit.server_key), port=state["port"]
    )  # type: ignore[arg-type]
    superlink.local_host = state["address"].rsplit(":", 1)[0]
    try:
        superlink.unregister_node(node.public_key_file)  # remembered as revoked: later starts keep it out
    except FedGuardError as exc:
        _audit(Path(args.server_workdir), "node.revoke", f"{args.name} ({node.fingerprint})", f"failed: {exc.what}")
        raise
    _audit(Path(args.server_workdir), "node.revoke", f"{args.name} ({node.fingerprint})", "ok")
    print(f"node {args.name} ({node.fingerprint}) unregistered: it can no longer join")
    return 0


def add_signing_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--signing-key", help="sign the run here with <admin>/run-signing.key")
    g.add_argument("--signature", help="a token from `fedguard run sign` (signed offline by the admin)")


def add_commands(
    sub: argparse._SubParsersAction, client_sub: argparse._SubParsersAction, run_sub: argparse._SubParsersAction
) -> None:  # type: ignore[type-arg]
    """Add the deployment commands to the CLI: server, client/evaluator start, run start/status/stop/logs, node."""
    srv = sub.add_parser("server", help="the aggregation server (SuperLink)")
    ssub = srv.add_subparsers(dest="server_command", required=True)
    ss = ssub.add_parser("start", help="start the SuperLink with TLS and node authentication, enroll the kit's nodes")
    ss.add_argument("--kit", required=True, help="the server kit from `fedguard provision init`")
    ss.add_argument("--workdir", required=True, help="server state: SuperLink database, logs, run store")
    ss.add_argument("--port", type=int, help="HTTPS port on 127.0.0.1 (default: a free port)")
    add_ca_pin_args(ss, "the server kit")
    ss.add_argument("--timeout", type=float, default=90.0)
    ss.add_argument(
        "--control-port",
        type=int,
        default=int(os.environ.get("FEDGUARD_CONTROL_PORT", "8443")),
        help="HTTPS port of the control service (API + dashboard); 0: any free port "
        "(default: $FEDGUARD_CONTROL_PORT, else 8443)",
    )
    ss.add_argument(
        "--control-host", default="127.0.0.1", help="address the control service binds (default: loopback only)"
    )
    ss.add_argument(
        "--run-signing-key",
        help="<admin>/run-signing.key: let the control service sign runs operators start (else each run needs "
        "a token from `fedguard run sign`)",
    )
    ss.set_defaults(func=cmd_server_start)

    def node_parser(parent: argparse._SubParsersAction, role: str) -> None:  # type: ignore[type-arg]
        p = parent.add_parser("start", help=f"start this {role} node next to its data")
        p.add_argument("--kit", required=True)
        p.add_argument("--workdir", required=True)
        p.add_argument("--data", required=True)
        p.add_argument("--schema", required=True)
        p.add_argument("--superlink", required=True, help="HOST:PORT of the server (or its gateway)")
        p.add_argument("--ca-fingerprint", required=True, help="the federation CA fingerprint you got out of band")
        p.add_argument("--key", help="the node's private key (default: from the kit, else <workdir>/node.key)")
        p.add_argument(
            "--policy", help="your node policy (policy.toml): which runs this node accepts (default: the safe defaults)"
        )
        if role == "client":
            p.add_argument("--dataset-id", help="your name for this dataset: the ledger's key")
            p.add_argument("--budget-epsilon", type=positive_float)
            p.add_argument("--budget-delta", type=probability)
            p.add_argument("--declared-size", type=positive_int, help="public size used as the FedAvg weight")
        p.add_argument("--device", help="auto (default: CUDA when present), cpu, cuda or cuda:N: this node's GPU")
        p.add_argument(
            "--watts-per-core", type=nonnegative_float, help="energy model: watts per busy CPU core (default 10)"
        )
        p.add_argument("--gpu-watts", type=nonnegative_float, help="energy model: watts per busy GPU (default 250)")
        p.add_argument("--carbon-intensity", type=nonnegative_float, help="your grid's gCO2e per kWh (default 475)")
        p.set_defaults(func=lambda a: cmd_node_start(a, role))

    node_parser(client_sub, "client")
    ev = sub.add_parser("evaluator", help="the evaluator node (central held-out set)")
    ev_sub = ev.add_subparsers(dest="evaluator_command", required=True)
    node_parser(ev_sub, "evaluator")
    add_he_keygen(ev_sub)

    rs = run_sub.add_parser("start", help="submit a run to the server")
    rs.add_argument("--config", required=True)
    rs.add_argument("--server-workdir", required=True)
    rs.add_argument("--store", help="run store (default: <server workdir>/runs.db)")
    rs.add_argument("--follow", action="store_true", help="wait for the run and print its log")
    rs.add_argument("--timeout", type=float, default=3600.0)
    add_signing_args(rs)
    add_mlflow_argument(rs)
    rs.set_defaults(func=cmd_run_start)
    sg = run_sub.add_parser("sign", help="sign a run config with the run-signing key (the admin, offline)")
    sg.add_argument("--config", required=True)
    sg.add_argument("--key", required=True, help="<admin>/run-signing.key from `fedguard provision init`")
    sg.add_argument("--out", required=True, help="token file for `run start --signature`")
    sg.set_defaults(func=cmd_run_sign)
    for name, fn, text in (
        ("status", cmd_run_status, "a run's status at the SuperLink"),
        ("stop", cmd_run_stop, "stop a run"),
        ("logs", cmd_run_logs, "the ServerApp's log of a run"),
    ):
        q = run_sub.add_parser(name, help=text)
        q.add_argument("run_id", type=int)
        q.add_argument("--server-workdir", required=True)
        if name == "status":
            q.add_argument("--json", action="store_true")
        q.set_defaults(func=fn)

    nd = sub.add_parser("node", help="manage enrolled nodes")
    ndsub = nd.add_subparsers(dest="node_command", required=True)
    nr = ndsub.add_parser("revoke", help="unregister a node: it can no longer join")
    nr.add_argument("name")
    nr.add_argument("--server-workdir", required=True)
    nr.set_defaults(func=cmd_node_revoke)

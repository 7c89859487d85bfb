"""``fedguard server start``, ``client start``, ``evaluator start``, ``run start|status|stop|logs``, ``node revoke``.

Real Flower processes: the SuperLink (TLS, node authentication, loopback only) on the server
host, a SuperNode plus FedGuard's executor on each node host. Every command verifies its kit
first; a node also checks its data against its schema before it connects, so a bad file is
reported locally and never half-joins a run.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path
from typing import Any

from common.errors import ConfigError, FedGuardError

_STATE = "server.json"  # written by `server start` in its workdir; read by `run ...` and `node revoke`


def _wait_for_signal(stop: threading.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        stop.wait(1.0)


def cmd_server_start(args: argparse.Namespace) -> int:
    from common.kit import verify_kit
    from server.superlink import SuperLink, TlsFiles

    kit = verify_kit(args.kit, args.ca_fingerprint)
    if kit.role != "server":
        raise ConfigError(f"this is a {kit.role} kit, not the server's", where=str(args.kit))
    workdir = Path(args.workdir).resolve()
    superlink = SuperLink(workdir, TlsFiles(kit.ca_cert, kit.server_cert, kit.server_key), port=args.port)  # type: ignore[arg-type]
    print(f"starting the SuperLink for federation {kit.federation!r} on 127.0.0.1:{superlink.port} ...", flush=True)
    superlink.start(timeout=args.timeout)
    try:
        for node in kit.nodes:
            node_id = superlink.register_node(node.public_key_file, node.name)
            print(f"  enrolled {node.role} {node.name} ({node.organisation}) key {node.fingerprint} → node {node_id}")
        for revoked in kit.revoked:
            try:
                superlink.unregister_node(_write_pub(workdir, revoked.name, revoked.public_key))
            except FedGuardError:
                pass  # never registered here
        state = {
            "address": superlink.address,
            "port": superlink.port,
            "ca_cert": str(kit.ca_cert),
            "flwr_home": str(superlink.flwr_home),
            "kit": str(Path(args.kit).resolve()),
            "pid": superlink.pid,
        }
        (workdir / _STATE).write_text(json.dumps(state, indent=1), encoding="utf-8")
        print(f"server ready: {superlink.address} (log {superlink.log_path}); Ctrl-C stops it", flush=True)
        _wait_for_signal(threading.Event())
    finally:
        superlink.stop()
        print("server stopped")
    return 0


def _write_pub(workdir: Path, name: str, line: str) -> Path:
    path = workdir / "revoked" / f"{name}.pub"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(line.strip() + "\n", encoding="utf-8")
    return path


def cmd_node_start(args: argparse.Namespace, role: str) -> int:
    from client.supernode import SuperNode
    from common.data import load_encoded
    from common.kit import check_node_private_key, verify_kit
    from common.schema import load_schema

    kit = verify_kit(args.kit, args.ca_fingerprint)
    if kit.role != role:
        raise ConfigError(f"this is a {kit.role} kit, not a {role} kit", where=str(args.kit))
    workdir = Path(args.workdir).resolve()
    key = Path(args.key) if args.key else (kit.node_private_key or workdir / "node.key")
    check_node_private_key(kit, key)
    schema = load_schema(args.schema)
    data = load_encoded(args.data, schema, cache_dir=workdir / "cache")  # bad data fails here, before joining
    print(f"{role} {kit.participant}: {len(data)} rows of {args.data} match the schema", flush=True)
    node_config: dict[str, Any] = {
        "data-path": str(Path(args.data).resolve()),
        "schema-path": str(Path(args.schema).resolve()),
        "workdir": str(workdir),
        "role": role,
    }
    for flag, key_name in (
        ("dataset_id", "dataset-id"),
        ("budget_epsilon", "budget-epsilon"),
        ("budget_delta", "budget-delta"),
        ("declared_size", "declared-size"),
    ):
        if getattr(args, flag, None) is not None:
            node_config[key_name] = getattr(args, flag)
    node = SuperNode(
        workdir, superlink=args.superlink, root_certificates=kit.ca_cert, private_key=key, node_config=node_config
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


def _server_state(workdir: str) -> dict[str, Any]:
    path = Path(workdir) / _STATE
    if not path.is_file():
        raise ConfigError(
            "no running server here", where=str(path), fix="start it with `fedguard server start --workdir DIR`"
        )
    return dict(json.loads(path.read_text(encoding="utf-8")))


def cmd_run_start(args: argparse.Namespace) -> int:
    from common.config import load_config
    from common.kit import verify_kit
    from server.runs import run_logs, start_run, wait_for_run

    state = _server_state(args.server_workdir)
    cfg = load_config(args.config)  # refuse a bad config before anything is submitted
    store = Path(args.store or Path(args.server_workdir) / "runs.db").resolve()
    root = Path(__file__).resolve().parents[1]
    kit = verify_kit(state["kit"], None)
    evaluator = next((n.fingerprint for n in kit.nodes if n.role == "evaluator"), "")
    run_id = start_run(
        state["address"],
        Path(state["ca_cert"]),
        root,
        Path(args.config),
        store,
        Path(state["flwr_home"]),
        evaluator_key=evaluator,
    )
    print(f"submitted run {cfg.name!r} as Flower run {run_id}; run store {store}", flush=True)
    if not args.follow:
        return 0
    status = wait_for_run(
        run_id, state["address"], Path(state["ca_cert"]), Path(state["flwr_home"]), timeout=args.timeout
    )
    print(run_logs(run_id, state["address"], Path(state["ca_cert"]), Path(state["flwr_home"])))
    print(f"run {run_id}: {status.status}")
    return 0 if status.succeeded else 1


def cmd_run_status(args: argparse.Namespace) -> int:
    from server.runs import run_status

    state = _server_state(args.server_workdir)
    st = run_status(args.run_id, state["address"], Path(state["ca_cert"]), Path(state["flwr_home"]))
    print(json.dumps(st.raw) if args.json else f"run {st.run_id}: {st.status} ({st.elapsed:.0f}s) {st.details}")
    return 0


def cmd_run_stop(args: argparse.Namespace) -> int:
    from server.runs import stop_run

    state = _server_state(args.server_workdir)
    stop_run(args.run_id, state["address"], Path(state["ca_cert"]), Path(state["flwr_home"]))
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
    kit = verify_kit(state["kit"], None)
    node = next((n for n in kit.nodes if n.name == args.name), None)
    if node is None:
        raise ConfigError(f"no enrolled node named {args.name!r}", where=state["kit"])
    superlink = SuperLink(
        Path(args.server_workdir), TlsFiles(kit.ca_cert, kit.server_cert, kit.server_key), port=state["port"]
    )  # type: ignore[arg-type]
    superlink.local_host = state["address"].rsplit(":", 1)[0]
    superlink.unregister_node(node.public_key_file)
    print(f"node {args.name} ({node.fingerprint}) unregistered: it can no longer join")
    return 0


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
    ss.add_argument("--ca-fingerprint", help="the federation CA's SHA-256 fingerprint, if you have it out of band")
    ss.add_argument("--timeout", type=float, default=90.0)
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
        if role == "client":
            p.add_argument("--dataset-id", help="your name for this dataset: the ledger's key")
            p.add_argument("--budget-epsilon", type=float)
            p.add_argument("--budget-delta", type=float)
            p.add_argument("--declared-size", type=int, help="public size used as the FedAvg weight")
        p.set_defaults(func=lambda a: cmd_node_start(a, role))

    node_parser(client_sub, "client")
    ev = sub.add_parser("evaluator", help="the evaluator node (central held-out set)")
    node_parser(ev.add_subparsers(dest="evaluator_command", required=True), "evaluator")

    rs = run_sub.add_parser("start", help="submit a run to the server")
    rs.add_argument("--config", required=True)
    rs.add_argument("--server-workdir", required=True)
    rs.add_argument("--store", help="run store (default: <server workdir>/runs.db)")
    rs.add_argument("--follow", action="store_true", help="wait for the run and print its log")
    rs.add_argument("--timeout", type=float, default=3600.0)
    rs.set_defaults(func=cmd_run_start)
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

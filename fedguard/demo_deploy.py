"""``fedguard demo`` as a real deployment: a throw-away federation of separate processes on 127.0.0.1.

Provisions a federation (CA, server certificate, one key per node), starts the SuperLink with TLS
and node authentication, one SuperNode + FedGuard executor per client and one evaluator, submits
the run through Flower's control API, signed with the federation's run-signing key, and follows
it in the run store; everything is stopped at the end, whatever happens. Each node runs under an
owner policy that lets the demo's sensitive columns be used for noised fairness counts and its
coarsened resource figures be sent. With ``secure_aggregation = "secagg"`` (``--secure-agg``) the same
federation runs threshold secure aggregation: nothing else to set up, the keys are made per round
on the nodes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from client.supernode import SuperNode
from common.config import RunConfig
from common.evaluation import calibration_note
from common.he_custody import keygen, write_bundle
from common.kit import RUN_SIGNING_KEY, Federation, NodeSpec, verify_kit
from common.run_signing import load_signing_key, sign_run
from common.secagg import describe_trust
from fedguard.provisioning import ProvisionResult, init_federation
from fedguard.simulate import prepare_partitions
from server.grid_io import Progress
from server.runs import RunError, recorded_end, run_logs, run_status, start_run, wait_for_run
from server.store import RunStore
from server.superlink import SuperLink, TlsFiles


def _follow(store_path: Path, flower_run: int, seen: set[tuple[str, int]], progress: Progress) -> int | None:
    """Print rounds and evaluations as the ServerApp records them; the FedGuard run id once known.

    Only the run of this Flower run: a demo folder's store keeps earlier demos' runs, and "the
    latest run" is the previous demo's until this run's ServerApp writes its first row."""
    if not store_path.exists():
        return None
    with RunStore(store_path) as store:
        run = store.run_by_flower_id(flower_run)
        if run is None:
            return None
        run_id = int(run["run_id"])
        for r in store.rounds(run_id):
            if ("round", r["round"]) not in seen:
                seen.add(("round", r["round"]))
                progress(f"  round {r['round']}: {r['accepted']}/{r['sampled']} accepted")
        for rnd, m in store.evaluations(run_id).items():
            if ("eval", rnd) not in seen:
                seen.add(("eval", rnd))
                progress(f"  round {rnd}: held-out accuracy {m['accuracy']:.3f}{calibration_note(m)} (evaluator node)")
    return run_id


def _homomorphic(run_cfg: RunConfig, kits: ProvisionResult, deploy_dir: Path, progress: Progress) -> RunConfig:
    """The evaluator makes the HE key (it never reaches the server) and seals it to every node."""
    from fedguard.he_cli import read_recipients

    federation, recipients, _ = read_recipients(kits.server_kit, ca_fingerprint=kits.ca_fingerprint)
    bundle = keygen(federation, {r.name: r.public_key for r in recipients}, max_clients=100, bound=100.0)
    server_bundle = deploy_dir / "server" / "he"
    write_bundle(bundle, deploy_dir / "evaluator", server_bundle)
    evaluator = next(r.fingerprint for r in recipients if r.role == "evaluator")
    progress(
        f"homomorphic mode: the evaluator made CKKS context {bundle.fingerprint[:16]}… and sealed it to "
        f"{len(recipients)} node keys; the server holds only the public context ({server_bundle})"
    )
    he_cfg = run_cfg.homomorphic.model_copy(
        update={"context_fingerprint": bundle.fingerprint, "bundle": str(server_bundle), "evaluator_key": evaluator}
    )
    return run_cfg.model_copy(update={"secure_aggregation": "homomorphic", "homomorphic": he_cfg})


def deployed_demo(
    cfg: RunConfig, workdir: Path, progress: Progress = print, timeout: float = 1200, homomorphic: bool = False
) -> tuple[Path, int]:
    """Run ``cfg`` on real processes; return the run store and the FedGuard run id."""
    workdir = workdir.resolve()
    run_cfg = prepare_partitions(cfg, workdir, progress)
    sim_dir = workdir / "partitions"
    deploy_dir = workdir / "deployment"
    if deploy_dir.exists():
        shutil.rmtree(deploy_dir)  # a throw-away federation: fresh kits, ledgers and node state
    n = run_cfg.simulation.num_clients
    names = [f"org-{i}" for i in range(n)]
    federation = Federation(
        name="fedguard-demo",
        nodes=[NodeSpec(name=name, organisation=f"Demo organisation {i}") for i, name in enumerate(names)]
        + [NodeSpec(name="evaluator", organisation="Demo review board", role="evaluator")],
    )
    kits = init_federation(federation, deploy_dir / "kits", generate_node_keys=True)
    server_kit = verify_kit(kits.server_kit, kits.ca_fingerprint)
    if homomorphic:
        run_cfg = _homomorphic(run_cfg, kits, deploy_dir, progress)
    for line in describe_trust(run_cfg):  # secagg: the mode, t, and who could learn what with whom
        progress(line)
    progress(f"provisioned a throw-away federation (CA {kits.ca_fingerprint[:23]}...) in {deploy_dir / 'kits'}")
    superlink = SuperLink(
        deploy_dir / "server",
        TlsFiles(server_kit.ca_cert, server_kit.server_cert, server_kit.server_key),  # type: ignore[arg-type]
        run_store=workdir / "runs.db",  # the demo's store outlives its throw-away deployment
    )
    policy = deploy_dir / "policy.toml"
    sensitive = ", ".join(f'"{c}"' for c in run_cfg.data.schema_.sensitive)
    policy.write_text(
        "# the demo owners' policy (see `fedguard client inspect`): noised fairness counts over these\n"
        "# columns, and coarsened time/energy figures for the run's cost report\n"
        f'fairness_columns = [{sensitive}]\nallow_values = ["resource-figures"]\n'
    )
    nodes: list[SuperNode] = []
    try:
        superlink.start(timeout=120)
        progress(f"SuperLink up on {superlink.address} (TLS, node authentication, loopback only)")
        for enrolled in server_kit.nodes:
            superlink.register_node(enrolled.public_key_file, enrolled.name)
        for name in [*names, "evaluator"]:
            kit = verify_kit(kits.node_kits[name], kits.ca_fingerprint)
            data = (
                run_cfg.data.evaluation_path
                if name == "evaluator"
                else sim_dir / f"partition-{names.index(name)}.parquet"
            )
            node = SuperNode(
                deploy_dir / name,
                superlink=superlink.address,
                root_certificates=kit.ca_cert,
                private_key=kit.node_private_key or kits.node_kits[name] / "node.key",
                node_config={
                    "data-path": str(data),
                    "workdir": str(deploy_dir / name),
                    "dataset-id": f"demo-{name}",
                    "budget-epsilon": run_cfg.simulation.budget_for(0),  # the demo's owners (fedguard.demo)
                    "role": "evaluator" if name == "evaluator" else "client",
                    "run-signing-pub-path": str(kit.run_signing_public_key),
                    "policy-path": "default" if name == "evaluator" else str(policy),
                    "federation": kit.federation,
                    "node-name": name,
                },
            )
            node.spawn()
            nodes.append(node)
        progress(f"starting {n} client nodes and the evaluator (each a SuperNode + FedGuard executor)...")
        for node in nodes:
            node.wait_ready(timeout=240)
        progress("all nodes joined; submitting the run")
        run_file = deploy_dir / "run.toml"
        run_file.write_text(run_cfg.to_toml(), encoding="utf-8")
        store_path = workdir / "runs.db"
        token = sign_run(run_cfg.to_json(), load_signing_key(kits.admin_dir / RUN_SIGNING_KEY))
        evaluator = next(n.fingerprint for n in server_kit.nodes if n.role == "evaluator")
        flower_run = start_run(
            superlink.address,
            server_kit.ca_cert,
            None,  # ship the installed FedGuard
            run_file,
            store_path,
            superlink.flwr_home,
            evaluator_key=evaluator,
            run_signature=token,
        )
        seen: set[tuple[str, int]] = set()
        where = (superlink.address, server_kit.ca_cert, superlink.flwr_home)
        try:
            status = wait_for_run(
                flower_run,
                *where,
                timeout=timeout,
                on_poll=lambda: _follow(store_path, flower_run, seen, progress),
                ended=recorded_end(store_path, flower_run),
            )
        except RunError:  # still working at the deadline
            status = run_status(flower_run, *where)
        run_id = _follow(store_path, flower_run, seen, progress)
        if not status.succeeded or run_id is None:
            progress(run_logs(flower_run, superlink.address, server_kit.ca_cert, superlink.flwr_home)[-3000:])
            raise RuntimeError(f"the demo run ended {status.status}: {status.details or 'no run recorded'}")
        return store_path, run_id
    finally:
        for node in nodes:
            node.stop()
        superlink.stop()

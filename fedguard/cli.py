"""``fedguard`` — one CLI, grouped by role. User mistakes print a FedGuard error, never a trace."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from common.errors import FedGuardError
from fedguard.control_cli import add_commands as add_control_commands
from fedguard.deploy import add_commands as add_deployment_commands
from fedguard.deploy import add_signing_args
from fedguard.evaluate import add_command as add_evaluate_command
from fedguard.fairness_sweep import add_command as add_fairness_command
from fedguard.json_output import json_mode, print_json
from fedguard.privacy_audit import add_command as add_privacy_command
from fedguard.provision import add_client_init, add_provision_commands
from fedguard.schema_cli import add_parser as add_schema_parser
from fedguard.tracking import add_mlflow_argument

if TYPE_CHECKING:
    from client.ledger import DatasetSummary
    from common.config import RunConfig


def _print_summary(store_path: Path, run_id: int, as_json: bool) -> None:
    """A run as the operator must read it: metrics per round, who took part or refused (by node name, with
    the reason), each node's ε as the privacy report states it, δ in total, and warnings — a node that
    never contributed, a constant or skewed final model — so "finished" never stands over a useless run."""
    from common.evaluation import calibration_note, loss_note
    from server.run_health import round_outcomes, round_summary, run_health
    from server.store import RunStore

    health = run_health(store_path, run_id)
    with RunStore(store_path) as store:
        evals = store.evaluations(run_id)
    outcomes = round_outcomes(health)
    if as_json:
        print_json(
            json.dumps(
                {
                    "run_id": run_id,
                    "status": health.status,
                    "error": health.error,
                    "store": str(store_path),
                    "final": health.final_metrics,
                    # keyed by the SuperLink id (as before); names and tallies under "nodes"
                    "epsilon_per_node": {n.node_id: n.epsilon for n in health.nodes if n.epsilon is not None},
                    "delta_total": health.delta_total,
                    "ledger_run_key": health.ledger_run_key,
                    "nodes": [n.view() for n in health.nodes],
                    "findings": [f.model_dump() for f in health.final_findings],
                    "warnings": health.warnings,
                    "evaluations": evals,
                }
            )
        )
        return
    warned = f" WITH {len(health.warnings)} WARNING(S)" if health.warnings else ""
    print(f"\nrun {run_id} {health.status}{warned}" + (f": {health.failure}" if health.failure else ""))
    for line in (health.error or "").splitlines()[1:]:  # the fix, as the failed command printed it
        print(f"  {line}")
    for rnd in sorted(set(evals) | set(outcomes)):
        m = evals.get(rnd)
        score = (
            f"accuracy {m['accuracy']:.3f}{calibration_note(m)}  {loss_note(m)}  macro-F1 {m['macro_f1']:.3f}"
            if m
            else "not evaluated"
        )
        nodes = f"; {round_summary(outcomes[rnd])}" if rnd in outcomes else ""
        print(f"  round {rnd}: {score}{nodes}")
    for n in health.nodes:
        eps = n.privacy
        delta = f" (δ {n.delta_total:.3g})" if n.delta_total is not None else ""
        print(f"  {n.name}: {eps}{delta}; {n.tally}")
    if health.delta_total is not None:
        print(
            f"  δ in total (every release of the run: DP-SGD and, where sent, the fairness counts): "
            f"{health.delta_total:.3g}"
        )
    if health.ledger_run_key:
        print(f"  nodes' ledgers key this run as {health.ledger_run_key} (`fedguard client budget` shows it)")
    for w in health.warnings:
        print(f"WARNING: {w}")
    print(f"run store: {store_path}")


def cmd_simulate(args: argparse.Namespace) -> int:
    from common.config import load_config
    from fedguard.simulate import simulate
    from fedguard.tracking import checked_args, log_after_run

    cfg = load_config(args.config)
    checked_args(args)  # --mlflow-uri: MLflow installed and the store usable, before the run
    workdir = Path(args.workdir or Path(args.config).with_suffix("").name + "-sim")
    t0 = time.perf_counter()
    if not args.json:  # a bar on a terminal; with --json (or not a terminal) plain progress lines only
        from common.progress import attach_terminal

        attach_terminal(sys.stdout)
    result = simulate(cfg, workdir, Path(args.store) if args.store else None, ray_address=args.ray_address)
    _end_simulation(workdir, result.store_path, result.run_id, cfg, args.json, t0)
    log_after_run(args, result.store_path, result.run_id, progress=print if not args.json else _to_stderr)
    return 0


def _end_simulation(workdir: Path, store_path: Path, run_id: int, cfg: RunConfig, as_json: bool, t0: float) -> None:
    """How ``simulate`` and ``run resume`` end: the summary, the reports, where refusals are explained."""
    _print_summary(store_path, run_id, as_json)
    paths = _write_reports(workdir, store_path, run_id, cfg, quiet=as_json)
    if not as_json:
        _point_to_node_files(workdir, store_path, run_id)
        print(f"wall time {time.perf_counter() - t0:.0f}s")
        print("\n".join(paths))


def _point_to_node_files(workdir: Path, store_path: Path, run_id: int) -> None:
    """Where the simulated nodes' own records are: refusal details (the server only hears the reason's class
    and a log id) and each node's privacy budget, as the node's owner would read them."""
    from server.run_health import run_health

    where = workdir.resolve() / "partitions"
    nodes = run_health(store_path, run_id).nodes
    refused = [n.name for n in nodes if n.count("refused")]
    if refused:
        print(f"refusal details (by node log id): {', '.join(str(where / n / 'node.log') for n in refused)}")
    if nodes:
        print(f"a node's privacy budget: fedguard client budget --workdir {where / nodes[0].name} (likewise each node)")


def _to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def cmd_demo(args: argparse.Namespace) -> int:
    from fedguard.demo import demo_config, fresh_demo_ledger, write_demo_data
    from fedguard.simulate import simulate

    workdir = Path(args.workdir).resolve()
    t0 = time.perf_counter()
    data = write_demo_data(workdir, model=args.model)
    if args.model == "minilm-lora":
        print(f"FedGuard demo: tweet source (Android or iPhone) with pretrained MiniLM + LoRA under DP → {data}")
    else:
        print(f"FedGuard demo: income above the median from the General Social Survey (gss_wages) → {data}")
    cfg = demo_config(data, rounds=args.rounds, clients=args.clients, epsilon=args.epsilon, model=args.model)
    sensitive = cfg.data.schema_.sensitive
    print(
        f"{cfg.simulation.num_clients} clients × {cfg.rounds} rounds, DP-SGD target ε={cfg.dp.target_epsilon}, "
        f"δ={cfg.dp.delta:g}" + (f"; sensitive attributes {sensitive} are never model inputs" if sensitive else "")
    )
    if args.simulate and args.he:
        raise FedGuardError(
            "--he needs real nodes: each opens the HE context sealed to its own key", fix="drop --simulate"
        )
    if args.he and args.secure_agg:
        raise FedGuardError("--he and --secure-agg are two aggregation modes", fix="choose one of them")
    if args.secure_agg:
        cfg = cfg.model_copy(update={"secure_aggregation": "secagg"})
    if args.simulate:
        fresh_demo_ledger(workdir)
        result = simulate(cfg, workdir)
        store_path, run_id = result.store_path, result.run_id
    else:
        from fedguard.demo_deploy import deployed_demo

        store_path, run_id = deployed_demo(cfg, workdir, homomorphic=args.he)
    _print_summary(store_path, run_id, args.json)
    paths = _write_reports(workdir, store_path, run_id, cfg, quiet=args.json)
    if not args.json:
        print(f"demo finished in {time.perf_counter() - t0:.0f}s")
        print("\n".join(paths))
    if args.serve:
        serve_dashboard(workdir, store_path, args.control_port)
    return 0


def _write_reports(workdir: Path, store_path: Path, run_id: int, cfg: RunConfig, *, quiet: bool) -> list[str]:
    """Write the run's privacy, fairness (when the schema names sensitive columns) and cost reports as HTML
    into ``workdir``; unless ``quiet``, print the final model's fairness findings and the cost summary.
    Returns the lines naming the reports, for the caller to print last."""
    from server import cost_report, fairness_report, privacy_report
    from server.store import RunStore

    privacy_path = workdir / f"privacy-report-run-{run_id}.html"
    privacy = privacy_report.build_privacy_report(store_path, run_id)
    privacy_path.write_text(privacy_report.render(privacy, "html"), encoding="utf-8")
    # Without sensitive attributes there is nothing to audit, so no fairness report; nor without a scored round.
    audited, gap = False, cfg.data.schema_.no_audit_reason()
    if cfg.data.schema_.sensitive:
        with RunStore(store_path) as store:
            audited = bool(store.audits(run_id))
        if not audited and not quiet:
            why = gap or "no round's model was audited (the held-out set was never scored)"
            print(f"no fairness report: {why}")
    fairness = fairness_report.fairness_report_from_store(store_path, run_id) if audited else None
    fair_path = workdir / f"fairness-report-run-{run_id}.html"
    if fairness is not None:
        fair_path.write_text(fairness_report.render(fairness, "html"), encoding="utf-8")
    cost_path = workdir / f"cost-report-run-{run_id}.html"
    cost_path.write_text(
        cost_report.render(cost_report.build_cost_report(store_path, run_id), "html"), encoding="utf-8"
    )
    if not quiet:
        if fairness is not None:
            last = max((r.round for r in fairness.rounds), default=0)
            current = [f for f in fairness.findings if f.last_seen_round == last]
            print(f"fairness findings for the final model ({len(current)}; full history in the report):")
            for f in current:
                print(f"  [{f.severity}]{' (federated view)' if f.view == 'federated' else ''} {f.message}")
        for line in cost_report.summary_lines(store_path, run_id):
            print(line)
    model = final_model_lines(store_path, run_id)
    return (
        model
        + ([f"fairness report: {fair_path}"] if fairness is not None else [])
        + [
            f"privacy report: {privacy_path}",
            f"cost report: {cost_path}",
        ]
    )


def final_model_lines(store_path: Path, run_id: int) -> list[str]:
    """Where the run's released model is, so its user can score it on any file without guessing the name
    (the mode is the recorded run's: the demo's config gains homomorphic mode only when it is deployed)."""
    from server.checkpoint import checkpoint_dir
    from server.store import RunStore

    final = sorted(checkpoint_dir(store_path, run_id).glob("round-*.ckpt"))[-1:]
    if final:
        return [f"final model: {final[0]} (score it on any file: fedguard evaluate --model {final[0]} ...)"]
    with RunStore(store_path) as store:
        mode = json.loads(store.run(run_id)["config_json"]).get("secure_aggregation")
    if mode == "homomorphic":
        return ["final model: none on the server (homomorphic aggregation: only the key holders, the nodes and "
                "the evaluator, can decrypt it)"]  # fmt: skip
    return []


def serve_dashboard(workdir: Path, store_path: Path, port: int) -> None:
    """Keep the demo's dashboard up (HTTPS, read-only: the throw-away federation is gone) until Ctrl-C."""
    import threading

    from common.kit import ADMIN_DIR, fingerprint_cert, verify_kit
    from fedguard.deploy import _wait_for_signal
    from server.control.app import create_app
    from server.control.serve import ControlServer, self_signed
    from server.control.service import ControlService
    from server.control.users import ControlError
    from server.superlink import SuperLinkError, local_name

    service = ControlService(workdir, store_path)
    kit_dir = workdir / "deployment" / "kits" / "server"
    if kit_dir.is_dir():  # a deployed demo: serve with its server certificate (signed by the demo's CA)
        admin_ca = kit_dir.parent / ADMIN_DIR / "ca.crt"  # the demo is its own admin: pin the kit to its CA
        if not admin_ca.is_file():
            raise FedGuardError(
                "the demo's admin CA is missing: its server kit cannot be pinned",
                where=str(admin_ca),
                fix="run `fedguard demo` again (it provisions a fresh federation)",
            )
        kit = verify_kit(kit_dir, fingerprint_cert(admin_ca))
        cert, key, ca = kit.server_cert, kit.server_key, str(kit.ca_cert)
        whose = "the demo federation's own CA"
    else:
        cert, key = self_signed(workdir / "dashboard-tls")
        ca, whose = str(cert), "a certificate the demo made for itself"
    try:
        service.users.revoke("demo-reviewer")  # the previous demo's token stops working
    except ControlError:
        pass
    _, token = service.users.add("demo-reviewer", "reviewer")
    try:
        name = local_name(Path(cert), "127.0.0.1")  # a name the certificate carries, for the printed URL
    except SuperLinkError:
        name = "127.0.0.1"
    server = ControlServer(create_app(service), cert, key, host="127.0.0.1", port=port, name=name)  # type: ignore[arg-type]
    server.start()
    try:
        print(f"\ndashboard: {server.url}/  (your browser will warn: {whose}, {ca})")
        print(f"reviewer token (shown once): {token}")
        print(f"API: curl --cacert {ca} -H 'Authorization: Bearer <token>' {server.url}/api/runs")
        print("Ctrl-C stops the dashboard", flush=True)
        _wait_for_signal(threading.Event())
    finally:
        server.stop()
        print("dashboard stopped")


def cmd_run_plan(args: argparse.Namespace) -> int:
    from common import records as R
    from common.config import federation_warning, load_config
    from fedguard.simulate import plan
    from server.planning import plan_table

    cfg = load_config(args.config)
    workdir = Path(args.workdir or Path(args.config).with_suffix("").name + "-sim")
    plans = plan(cfg, workdir)
    if args.json:
        rows = [
            {
                "node_id": p.node_id,
                "name": p.name,
                "status": p.status,
                "reason": p.reason,
                **p.values,
                "warning": federation_warning(cfg, [p.values[R.SAMPLE_RATE]]) if p.status == "planned" else None,
            }
            for p in plans
        ]
        print_json(json.dumps(rows))
    else:
        print(plan_table(plans, cfg))
    short = [p for p in plans if not p.affordable]
    if short and not args.json:
        print(f"{len(short)} node(s) cannot take part in this run as planned; they would refuse their rounds")
    return 0


def cmd_run_resume(args: argparse.Namespace) -> int:
    from fedguard.simulate import simulate
    from server.app import resume_point

    if args.server_workdir:  # a deployed run: submit the continuation to this host's SuperLink
        from fedguard.deploy import cmd_run_resume as resume_deployed

        return resume_deployed(args)
    store = _existing_store(args.store or "fedguard-demo/runs.db").resolve()
    cfg, ckpt = resume_point(store, args.run_id)
    t0 = time.perf_counter()
    workdir = Path(args.workdir) if args.workdir else store.parent
    result = simulate(cfg, workdir, store, resume=ckpt)
    _end_simulation(workdir, result.store_path, result.run_id, cfg, args.json, t0)
    return 0


class _NodeLedger(NamedTuple):
    path: Path
    markers: Path
    #: For a ledger the node shares with others on its host: the datasets that are its own; else None (all).
    own_datasets: set[str] | None


def _ledger_paths(args: argparse.Namespace) -> _NodeLedger:
    """A node's ledger: ``--ledger``, else ``<workdir>/ledger.db``, else the one ledger the node's own markers
    name (a node started with a ``ledger-path`` elsewhere: simulated nodes share ``partitions/ledger.db``)."""
    from client.ledger import marked_ledgers

    workdir = Path(args.workdir)
    markers = workdir / "ledger-markers"
    own = workdir / "ledger.db"
    if args.ledger or own.exists():
        return _NodeLedger(Path(args.ledger) if args.ledger else own, markers, None)
    named = marked_ledgers(markers)
    if len(named) == 1:
        ledger, datasets = named.popitem()
        return _NodeLedger(ledger, markers, datasets)
    return _NodeLedger(own, markers, None)


def _open_ledger(paths: _NodeLedger):  # type: ignore[no-untyped-def]
    """The resolved ledger, opened; a clear error where there is none."""
    from client.ledger import Ledger

    if not paths.path.exists():
        raise FedGuardError(
            "no privacy ledger here",
            where=str(paths.path),
            fix="pass the node's --workdir (or --ledger PATH); a node creates its ledger on its first DP round",
        )
    return Ledger(paths.path, paths.markers)


def cmd_client_budget(args: argparse.Namespace) -> int:
    from client.ledger import summary_dict

    paths = _ledger_paths(args)
    if args.json:
        print(json.dumps([summary_dict(s) for s in _budget_summaries(paths)]))
        return 0
    print("\n".join(_budget_table(paths)))
    return 0


def _budget_summaries(paths: _NodeLedger) -> list[DatasetSummary]:
    """The node's datasets in its ledger (only its own where the ledger is shared with other nodes)."""
    only = paths.own_datasets
    with _open_ledger(paths) as ledger:
        return [s for s in ledger.summaries() if only is None or s.dataset_id in only]


def _budget_table(paths: _NodeLedger) -> list[str]:
    from common.privacy import eps_text

    summaries = _budget_summaries(paths)
    lines = [f"{'dataset':40s} {'releases':>8} {'pending':>7} {'spent ε':>8} {'budget ε':>8} {'remaining':>9}  δ"]
    for s in summaries:
        budget = f"{s.budget.epsilon:8.3f}" if s.budget else f"{'-':>8}"
        remaining = f"{s.remaining:9.3f}" if s.remaining is not None else f"{'-':>9}"
        counts = f"{s.releases:8d} {s.pending:7d} {s.epsilon:8.3f}"
        lines.append(
            f"{s.dataset_id[-40:]:40s} {counts} {budget} {remaining}  {s.delta:g}{_selection_share(s.extra_delta)}"
        )
        # Per run, the ε the node reported to that run's server (the privacy report's and `fedguard runs`' ε)
        # and the run's δ total, its count releases' group selection included (as the server shows it).
        lines += [
            f"  run {r.run_id}: {r.releases} release(s), ε this run {eps_text(r.epsilon)} "
            f"at δ={r.delta + r.extra_delta:.3g}"
            + (f" (accountant δ {r.delta:g} + group selection {r.extra_delta:g})" if r.extra_delta else "")
            for r in s.runs
        ]
    return lines


def _selection_share(extra_delta: float) -> str:
    """The part of a dataset's δ its count releases' group selection spent (the accountant gets the rest)."""
    return f" ({extra_delta:g} of it by group selection)" if extra_delta else ""


def cmd_client_inspect(args: argparse.Namespace) -> int:
    """What the node's owner needs at a glance: the policy in force, budgets, recent decisions."""
    from client.admission import read_requests
    from common.policy import NodePolicy, describe, load_policy

    workdir = Path(args.workdir)
    if not workdir.is_dir():
        raise FedGuardError(
            "no node work directory here", where=str(workdir), fix="pass the --workdir of `client start`"
        )
    started = workdir / "node-start.json"
    info = json.loads(started.read_text(encoding="utf-8")) if started.is_file() else {}
    source, role = info.get("policy", "default"), info.get("role", "client")
    policy = NodePolicy.default_for(role) if source == "default" else load_policy(source)
    print(f"policy ({'built-in defaults for a ' + role if source == 'default' else source}):")
    for line in describe(policy):
        print(f"  {line}")
    print("\nprivacy budget:")
    paths = _ledger_paths(args)
    if paths.path.exists():
        for line in _budget_table(paths):
            print(f"  {line}")
    else:
        print("  no ledger yet (nothing released)")
    entries = [e for e in read_requests(workdir) if e.get("purpose") != "role"]
    print(f"\nlast {min(args.last, len(entries))} of {len(entries)} request(s):")
    for e in entries[-args.last :]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"]))
        rnd = f" round {e['round']}" if e.get("round") is not None else ""
        verdict = "accepted" if e["accepted"] else f"REFUSED {e['code']}: {e['reason']}"
        key = f" (ledger key {e['ledger_run']})" if e.get("ledger_run") else ""  # logs before 2026-12-05 lack it
        print(f"  {when} run {e['flower_run']} {e['run_name']!r}{key} {e['purpose']}{rnd}: {verdict}")
    return 0


def cmd_ledger_export(args: argparse.Namespace) -> int:
    key = Path(args.key) if args.key else Path(args.workdir) / "node.key"
    if not key.is_file():
        raise FedGuardError(
            "node key not found",
            where=str(key),
            fix="pass --key with the node's private key, or create one with `fedguard client init --workdir DIR`",
        )
    paths = _ledger_paths(args)
    with _open_ledger(paths) as ledger:  # a shared ledger: this node signs for its own datasets only
        doc = ledger.export(key.read_bytes(), paths.own_datasets)
    out = Path(args.out)
    out.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    print(f"signed ledger export written to {out} (key {doc['export']['public_key_fingerprint']})")  # type: ignore[index]
    return 0


def cmd_ledger_verify(args: argparse.Namespace) -> int:
    from common.ledger_export import verify_export
    from common.privacy import eps_text

    body = verify_export(args.file, args.fingerprint)
    print(f"{args.file}: signature valid ({body.public_key_fingerprint}); ε recomputed with Opacus:")
    for ds in body.datasets:
        print(
            f"  {ds.dataset_id}: {len(ds.releases)} release(s), ε={eps_text(ds.epsilon)} at δ={ds.delta:g}"
            f"{_selection_share(ds.extra_delta)} [{ds.accountant}]"
        )
    return 0


def cmd_ledger_backup(args: argparse.Namespace) -> int:
    with _open_ledger(_ledger_paths(args)) as ledger:
        dest = ledger.backup(args.out)
    print(f"ledger backed up to {dest}")
    return 0


def cmd_ledger_restore(args: argparse.Namespace) -> int:
    from client.ledger import restore

    ledger, markers, _ = _ledger_paths(args)
    summaries = restore(ledger, args.file, markers)
    print(f"ledger restored from {args.file} to {ledger}: {len(summaries)} dataset(s)")
    return 0


def _emit(text: str, out: str | None, what: str) -> int:
    if out:
        Path(out).write_text(text, encoding="utf-8")
        print(f"{what} written to {out}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_report_privacy(args: argparse.Namespace) -> int:
    from server.privacy_report import build_privacy_report, render

    report = build_privacy_report(_existing_store(args.store), args.run_id)
    return _emit(render(report, args.format), args.out, "privacy report")


def cmd_report_fairness(args: argparse.Namespace) -> int:
    from server.fairness_report import fairness_report_from_store, render
    from server.mitigation_report import load_sweep

    sweep = load_sweep(args.sweep) if args.sweep else None
    text = render(fairness_report_from_store(_existing_store(args.store), args.run_id, sweep), args.format)
    return _emit(text, args.out, "fairness report")


def cmd_report_cost(args: argparse.Namespace) -> int:
    from server.cost_report import build_cost_report, render

    report = build_cost_report(_existing_store(args.store), args.run_id)
    return _emit(render(report, args.format), args.out, "cost report")


def _existing_store(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        nearby = sorted(str(q) for q in Path.cwd().glob("*/runs.db"))
        fix = (
            f"pass --store with one of the run stores here: {', '.join(nearby[:5])}"
            if nearby
            else "pass --store PATH: `fedguard simulate` writes <workdir>/runs.db (by default <config>-sim/runs.db), "
            "`fedguard demo` fedguard-demo/runs.db, a deployed server <server workdir>/runs.db"
        )
        raise FedGuardError("run store not found", where=str(p), fix=fix)
    return p


def cmd_config_check(args: argparse.Namespace) -> int:
    from common.config import load_config

    cfg = load_config(args.config)
    print(f"{args.config}: valid (config hash {cfg.digest()[:16]})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """The built-in models: which for which data (rows per node), and the recipe a config gets."""
    import textwrap

    from client.training import auto_grad_sample_mode
    from common.config import MODEL_GUIDANCE, PRETRAINED_INSTALL, default_model, recipe_for
    from common.models import MODELS
    from common.pretrained import pretrained_available

    defaults = {"tabular": default_model("tabular"), "text": default_model("text")}
    rows = []
    for name, spec in MODELS.items():
        recipe = recipe_for(name, spec.task)
        train, server = recipe["train"], recipe["server.optimizer"]
        rows.append(
            {
                "name": name,
                "task": spec.task,
                "default": defaults[spec.task] == name,
                "available": not spec.pretrained or pretrained_available(),
                "summary": spec.summary,
                "when": MODEL_GUIDANCE.get(name, ""),
                "recipe": {
                    "batch_size": train["batch_size"],
                    "learning_rate": train["learning_rate"],
                    "optimizer": train["optimizer"],
                    "local_epochs": train["local_epochs"],
                    "rounds": recipe["run"]["rounds"],
                    "server_optimizer": server["name"],
                    "ema_decay": server.get("ema_decay", 0.0),
                    "calibration": recipe.get("evaluation", {}).get("calibration", "none"),
                },
                "grad_sample_mode": auto_grad_sample_mode(name),
            }
        )
    if args.json:
        print(json.dumps(rows))
        return 0
    print(
        f"A config that names no model gets {defaults['tabular']} for tabular data and {defaults['text']} for "
        "text" + ("" if pretrained_available() else f" ({PRETRAINED_INSTALL} makes it minilm-lora)") + ";\n"
        "a config gets its model's recipe below for every [train] field it leaves out (explicit values win),\n"
        "and a config that sets no `rounds` runs the recipe's (what the benchmark trained)."
    )
    for r in rows:
        rc = r["recipe"]
        tags = (["default for " + r["task"]] if r["default"] else []) + ([] if r["available"] else ["not installed"])
        print(f"\n{r['name']}  ({r['task']}{''.join(', ' + t for t in tags)}): {r['summary']}")
        print(
            f"  recipe: batch size {rc['batch_size']}, learning rate {rc['learning_rate']:g} ({rc['optimizer']}), "
            f"{rc['local_epochs']} local epoch{'s' if rc['local_epochs'] != 1 else ''}, {rc['rounds']} rounds, "
            f"server {rc['server_optimizer']}"
            + (
                f", releasing the moving average of the rounds' models (decay {rc['ema_decay']:g})"
                if rc["ema_decay"]
                else ""
            )
            + ("; decisions prior-calibrated by the evaluator" if rc["calibration"] == "prior" else "")
            + f"; DP engine {r['grad_sample_mode']}"
        )
        print(textwrap.fill(r["when"], width=100, initial_indent="  when: ", subsequent_indent="        "))
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from server.store import RunStore

    store_path = _existing_store(args.store)
    if args.run_id is not None:
        _print_summary(store_path, args.run_id, args.json)
        return 0
    from server.run_health import run_health

    with RunStore(store_path) as store:
        runs = store.runs()
    health = {int(r["run_id"]): run_health(store_path, int(r["run_id"])) for r in runs}
    if args.json:
        print(
            json.dumps(
                [
                    {k: r[k] for k in ("run_id", "name", "status", "config_hash")}
                    | {"error": health[int(r["run_id"])].error, "warnings": health[int(r["run_id"])].warnings}
                    for r in runs
                ]
            )
        )
    for r in runs if not args.json else []:
        h = health[int(r["run_id"])]
        acc = f"accuracy {h.final_metrics['accuracy']:.3f}" if "accuracy" in h.final_metrics else "not evaluated"
        warn = f"  WARNING: {'; '.join(h.flags)}" if h.flags else ""
        why = f"  ({h.failure})" if h.failure else ""
        print(f"{r['run_id']:4d}  {r['status']:9s}  {r['name']}  {acc}{why}{warn}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedguard", description="Privacy-preserving federated training")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run a complete DP federation offline on real data")
    d.add_argument("--workdir", default="fedguard-demo", help="where data, partitions and the run store go")
    d.add_argument("--rounds", type=int, default=3)
    d.add_argument(
        "--model",
        default="ft-transformer",
        help="ft-transformer: income from survey data (default); minilm-lora: pretrained MiniLM + LoRA on tweets",
    )
    d.add_argument("--clients", type=int, default=3)
    d.add_argument("--epsilon", type=float, default=8.0, help="target ε per client for the whole run")
    d.add_argument("--json", action="store_true", help="print the summary as JSON")
    d.add_argument(
        "--simulate",
        action="store_true",
        help="use Flower's simulation engine (one process) instead of real server and node processes",
    )
    d.add_argument(
        "--he",
        action="store_true",
        help="homomorphic aggregation: clients send CKKS-encrypted updates, the server only sums ciphertexts",
    )
    d.add_argument(
        "--secure-agg",
        action="store_true",
        help="threshold secure aggregation (SecAgg+): no single party, server included, can read an update",
    )
    d.add_argument(
        "--serve", action="store_true", help="afterwards keep the dashboard up (HTTPS) and print a reviewer token"
    )
    d.add_argument("--control-port", type=int, default=8443, help="with --serve: the dashboard's port (0: any free)")
    d.set_defaults(func=cmd_demo, streams_progress=True)

    s = sub.add_parser("simulate", help="run a federation from a config on Flower's simulation engine")
    s.add_argument("--config", required=True, help="run config TOML")
    s.add_argument("--workdir", help="where partitions and node caches go (default: <config>-sim)")
    s.add_argument("--store", help="run store path (default: <workdir>/runs.db)")
    s.add_argument(
        "--ray-address",
        help="attach to a running Ray cluster (auto, or HEAD:6379) instead of a private local one; "
        "see deploy/ray/README.md",
    )
    s.add_argument("--json", action="store_true")
    add_mlflow_argument(s)
    s.set_defaults(func=cmd_simulate, streams_progress=True)

    c = sub.add_parser("config", help="configuration tools")
    csub = c.add_subparsers(dest="config_command", required=True)
    cc = csub.add_parser("check", help="validate a run config")
    cc.add_argument("config")
    cc.set_defaults(func=cmd_config_check)

    m = sub.add_parser("models", help="built-in models: which for which data size, and their recipes")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    r = sub.add_parser("runs", help="list runs in a run store, or show one")
    r.add_argument("run_id", nargs="?", type=int)
    r.add_argument("--store", default="fedguard-demo/runs.db")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_runs)

    run = sub.add_parser("run", help="plan and manage runs")
    runsub = run.add_subparsers(dest="run_command", required=True)
    rp = runsub.add_parser("plan", help="ask every node what a run would cost its privacy budget")
    rp.add_argument("--config", required=True)
    rp.add_argument("--workdir", help="simulation folder (default: <config>-sim)")
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(func=cmd_run_plan, streams_progress=True)
    rr = runsub.add_parser("resume", help="continue a crashed or stopped run from its last complete round")
    rr.add_argument("run_id", type=int)
    rr.add_argument("--store", help="run store (default: fedguard-demo/runs.db; deployed: <server workdir>/runs.db)")
    rr.add_argument("--workdir", help="simulation folder holding the partitions (default: the store's folder)")
    rr.add_argument("--server-workdir", help="a deployed run: the running server's workdir (submits to its SuperLink)")
    rr.add_argument("--follow", action="store_true", help="deployed: wait for the run and print its log")
    rr.add_argument("--timeout", type=float, default=3600.0)
    add_signing_args(rr)
    rr.add_argument("--json", action="store_true")
    rr.set_defaults(func=cmd_run_resume, streams_progress=True)

    add_provision_commands(sub)

    cl = sub.add_parser("client", help="node-side tools (run next to the private data)")
    clsub = cl.add_subparsers(dest="client_command", required=True)
    add_client_init(clsub)

    def node_dirs(q: argparse.ArgumentParser) -> None:
        q.add_argument("--workdir", required=True, help="the node's work directory")
        q.add_argument("--ledger", help="ledger file (default: <workdir>/ledger.db)")

    b = clsub.add_parser("budget", help="privacy budget spent and remaining per dataset")
    node_dirs(b)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_client_budget)
    ci = clsub.add_parser("inspect", help="the node's policy, privacy budget and the runs it accepted or refused")
    node_dirs(ci)
    ci.add_argument("--last", type=int, default=20, help="how many recent requests to show")
    ci.set_defaults(func=cmd_client_inspect)
    lg = clsub.add_parser("ledger", help="export, verify, back up or restore the privacy ledger")
    lgsub = lg.add_subparsers(dest="ledger_command", required=True)
    le = lgsub.add_parser("export", help="write a node-signed export a reviewer can recompute ε from")
    node_dirs(le)
    le.add_argument("--key", help="the node's private key (default: <workdir>/node.key from `client init`)")
    le.add_argument("--out", required=True)
    le.set_defaults(func=cmd_ledger_export)
    lv = lgsub.add_parser("verify", help="check an export's signature and recompute its ε")
    lv.add_argument("file")
    lv.add_argument("--fingerprint", help="expected node key fingerprint (SHA256:...)")
    lv.set_defaults(func=cmd_ledger_verify)
    lb = lgsub.add_parser("backup", help="write a consistent copy of the ledger")
    node_dirs(lb)
    lb.add_argument("--out", required=True)
    lb.set_defaults(func=cmd_ledger_backup)
    lr = lgsub.add_parser("restore", help="install a backup (refused if older than the node's history)")
    node_dirs(lr)
    lr.add_argument("--file", required=True)
    lr.set_defaults(func=cmd_ledger_restore)

    add_deployment_commands(sub, clsub, runsub)
    add_control_commands(sub)

    add_evaluate_command(sub)
    add_schema_parser(sub)
    add_privacy_command(sub)
    add_fairness_command(sub)

    rep = sub.add_parser("report", help="reports for reviewers")
    repsub = rep.add_subparsers(dest="report_command", required=True)
    for name, text, func in (
        ("privacy", "the privacy report of a run", cmd_report_privacy),
        ("fairness", "the fairness report of a run (per-group metrics, findings)", cmd_report_fairness),
        ("cost", "the cost report of a run (time, bytes, energy, emissions per round and node)", cmd_report_cost),
    ):
        rep = repsub.add_parser(name, help=text)
        rep.add_argument("run_id", type=int)
        rep.add_argument("--store", default="fedguard-demo/runs.db")
        rep.add_argument("--format", choices=["html", "json", "md"], default="html")
        rep.add_argument("--out", help="write to this file (default: stdout)")
        if name == "fairness":
            rep.add_argument(
                "--sweep", help="a `fedguard fairness sweep` JSON: adds its options as a Pareto chart and a table"
            )
        rep.set_defaults(func=func)
    _describe_commands(p)
    return p


def _describe_commands(parser: argparse.ArgumentParser) -> None:
    """``fedguard X --help`` starts with what X does: a command without a description of its own gets the
    one-line help its parent lists it with (it showed only usage and options)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if not sub.description and (text := helps.get(name)):
                    sub.description = f"{text[:1].upper()}{text[1:]}."
                _describe_commands(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # a command that runs a federation prints progress as it goes: with --json, stdout is its JSON only
        with json_mode(getattr(args, "streams_progress", False) and bool(getattr(args, "json", False))):
            return int(args.func(args))
    except FedGuardError as exc:
        print(f"fedguard: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedguard: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`fedguard runs | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's recipe: no error at exit flush
        return 141  # 128 + SIGPIPE, what a shell reports for a tool stopped by a closed pipe


if __name__ == "__main__":
    sys.exit(main())

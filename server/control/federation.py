"""The control service's only door to the federation: list and revoke nodes, start and stop runs.

The service never proxies Flower's control or runtime API: it calls these few operations, which
go through FedGuard's own wrappers (``server.runs``, ``server.superlink``) on the loopback
SuperLink. ``Federation`` is a protocol so the service can also run without a SuperLink (the
demo's dashboard after the federation stopped) and so tests can hand it a recorder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from server.control.errors import NotFound


@dataclass(frozen=True)
class NodeView:
    """An enrolled node as the dashboard shows it: who it is (kit) and whether it is connected (SuperLink)."""

    name: str
    role: str
    organisation: str
    fingerprint: str
    node_id: int | None
    status: str  # online | offline | registered | unregistered | unknown
    online_at: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Federation(Protocol):
    """What the control service may do to the federation."""

    #: The run-signing public key pinned in the kits: admin signatures are checked against it.
    verify_key_path: Path

    def nodes(self) -> list[NodeView]: ...

    def revoke_node(self, name: str) -> NodeView: ...

    def start_run(self, config_path: Path, token: str) -> int:
        """Submit a validated, signed run config; return Flower's run id."""
        ...

    def stop_run(self, flower_run_id: int) -> None: ...


class UnknownNode(NotFound):
    """``revoke_node`` was given a name the kit does not enroll."""

    code = "unknown-node"


class SuperLinkFederation:
    """The real federation: the kit's enrolled nodes and the SuperLink ``fedguard server start`` runs."""

    def __init__(self, kit: Any, superlink: Any, store_path: Path) -> None:
        self.kit = kit  # common.kit.Kit (the server kit)
        self.superlink = superlink  # server.superlink.SuperLink, started
        self.store_path = Path(store_path).resolve()
        self.verify_key_path = Path(kit.run_signing_public_key)

    def nodes(self) -> list[NodeView]:
        registry = self.superlink._registry()  # fingerprint → {node_id, name}: written at registration
        flower = {str(n.get("node-id")): n for n in self.superlink.list_nodes()}
        out = []
        for node in self.kit.nodes:
            reg = registry.get(node.fingerprint) or next(
                (v for v in registry.values() if v.get("name") == node.name), None
            )
            node_id = int(reg["node_id"]) if reg else None
            info = flower.get(str(node_id), {}) if node_id is not None else {}
            out.append(
                NodeView(
                    name=node.name,
                    role=node.role,
                    organisation=node.organisation,
                    fingerprint=node.fingerprint,
                    node_id=node_id,
                    status=str(info.get("status", "unregistered" if node_id is None else "unknown")),
                    online_at=info.get("online-at") if info.get("online-at") not in (None, "N/A") else None,
                )
            )
        return out

    def revoke_node(self, name: str) -> NodeView:
        node = next((n for n in self.kit.nodes if n.name == name), None)
        if node is None:
            raise UnknownNode(f"no enrolled node named {name!r}", where=str(self.kit.path))
        before = next((v for v in self.nodes() if v.name == name), None)
        self.superlink.unregister_node(node.public_key_file)
        return NodeView(
            node.name,
            node.role,
            node.organisation,
            node.fingerprint,
            before.node_id if before else None,
            "unregistered",
        )

    def start_run(self, config_path: Path, token: str) -> int:
        from server.runs import start_run

        evaluator = next((n.fingerprint for n in self.kit.nodes if n.role == "evaluator"), "")
        return start_run(
            self.superlink.address,
            self.kit.ca_cert,
            None,  # ship the installed FedGuard
            config_path,
            self.store_path,
            self.superlink.flwr_home,
            evaluator_key=evaluator,
            run_signature=token,
        )

    def stop_run(self, flower_run_id: int) -> None:
        from server.runs import stop_run

        stop_run(flower_run_id, self.superlink.address, self.kit.ca_cert, self.superlink.flwr_home)

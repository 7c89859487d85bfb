"""Throwaway federation material for tests that start real Flower processes, made with ``fedguard.provisioning``.

One provisioning run gives the federation CA, a SuperLink certificate for 127.0.0.1/localhost and an
EC P-384 OpenSSH key pair per node (generated here, demo-style). ``common.kit.federation`` requires exactly one
evaluator, so one is enrolled and left unused. Extra helpers make what refusal tests need: a key the
SuperLink never registered, and an unrelated CA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.kit import Federation, NodeSpec
from fedguard.provisioning import init_federation, init_node_keys

_EVALUATOR = "evaluator-unused"


@dataclass(frozen=True)
class NodeKey:
    private: Path  # OpenSSH private key (0600)
    public: Path  # OpenSSH public key (.pub)


@dataclass(frozen=True)
class TlsMaterial:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    nodes: dict[str, NodeKey]


def make_tls_material(directory: Path, node_names: list[str], federation: str = "deploy-test") -> TlsMaterial:
    """A provisioned federation under ``directory``: CA, loopback server certificate, one key per node."""
    specs = [NodeSpec(name=n, organisation="test") for n in node_names]
    specs.append(NodeSpec(name=_EVALUATOR, organisation="test", role="evaluator"))
    result = init_federation(Federation(name=federation, nodes=specs), Path(directory), generate_node_keys=True)
    server = result.server_kit
    return TlsMaterial(
        ca_cert=server / "ca.crt",
        server_cert=server / "server.crt",
        server_key=server / "server.key",
        nodes={
            n: NodeKey(private=result.node_kits[n] / "node.key", public=result.node_kits[n] / "node.pub")
            for n in node_names
        },
    )


def make_unregistered_key(directory: Path) -> NodeKey:
    """A valid node key pair that no SuperLink has registered."""
    identity = init_node_keys(Path(directory))
    return NodeKey(private=identity.private_key, public=identity.public_key)


def make_other_ca(directory: Path) -> Path:
    """The CA certificate of an unrelated federation (does not sign the test SuperLink's certificate)."""
    return make_tls_material(Path(directory), ["someone"], federation="other-federation").ca_cert

"""Homomorphic rounds on the real ClientApp (clients and evaluator) and the server's real checks, in process.

Real CKKS contexts, real sealing to real node keys, real reply signatures; only the transport is
skipped (messages go straight to the ClientApp). The deployment test runs the same over TLS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from client.app import app as client_app
from client.he_node import template
from common import he
from common import records as R
from common.config import RunConfig
from common.he_custody import flatten_state, keygen, load_server_bundle, trainable_keys, write_bundle
from common.kit import fingerprint_public_key
from common.reply_signing import sign_reply
from server.rounds.base import Federation
from server.rounds.homomorphic import EncryptedGlobal, HomomorphicRounds, aggregate_content
from server.scoring import Scorer
from tests.helpers import make_tabular, node_context, node_keypair, tabular_config

pytestmark = [pytest.mark.usefixtures("server_identity"), pytest.mark.timeout(300)]

EVALUATOR, CLIENTS = 99, {"alpha": 11, "beta": 12}


def _key(path: Path) -> bytes:
    private, public = node_keypair()
    path.write_bytes(private)
    return public


@pytest.fixture
def fed(tmp_path: Path) -> dict:
    """Two clients and an evaluator with their own keys; the evaluator's keygen; a run config pinning it."""
    pubs = {name: _key(tmp_path / f"{name}.key") for name in [*CLIENTS, "judge"]}
    bundle = keygen("fed", {n: p.decode() for n, p in pubs.items()}, max_clients=10, bound=100.0)
    write_bundle(bundle, tmp_path / "judge", tmp_path / "server-he")
    cfg = tabular_config(
        secure_aggregation="homomorphic",
        homomorphic={
            "context_fingerprint": bundle.fingerprint,
            "bundle": str(tmp_path / "server-he"),
            "evaluator_key": fingerprint_public_key(pubs["judge"].decode()),
        },
        fairness={"federated_counts": False},
    )
    data = {}
    for i, name in enumerate([*CLIENTS, "judge"]):
        data[name] = tmp_path / f"{name}.csv"
        make_tabular(400, seed=i).to_csv(data[name], index=False)
    ctx = {
        name: node_context(
            data[name],
            tmp_path / name,
            auth_key_path=str(tmp_path / f"{name}.key"),
            federation="fed",
            node_name=name,
            # public FedAvg weights w = declared / server.max_weight: 0.05 and 0.08
            **({"role": "evaluator"} if name == "judge" else {"declared_size": 50_000 + 30_000 * i}),
        )
        for i, name in enumerate([*CLIENTS, "judge"])
    }
    node_keys = {**{CLIENTS[n]: pubs[n] for n in CLIENTS}, EVALUATOR: pubs["judge"]}
    # The protocol's view of the federation; messages go straight to the ClientApp, so no grid or store.
    federation = Federation(
        None, cfg, None, 1, 1, base(cfg), signed=True, evaluator_key="", meter=None, progress=print,  # type: ignore[arg-type]
        rng=np.random.default_rng(0), node_keys=node_keys, scorer=Scorer(cfg, EVALUATOR),
    )  # fmt: skip
    rounds = HomomorphicRounds(federation, template(cfg))
    return {"cfg": cfg, "ctx": ctx, "keys": node_keys, "rounds": rounds, "tmp": tmp_path, "secret": bundle}


def base(cfg: RunConfig) -> dict:
    return {R.RUN_CONFIG: cfg.to_json(), R.RUN_UID: "run-he"}


def initial(fed: dict) -> EncryptedGlobal:
    msg = Message(RecordDict({R.CONFIG: ConfigRecord({**base(fed["cfg"]), R.ROUND: 0})}), EVALUATOR, "query.he_init")
    reply = client_app(msg, fed["ctx"]["judge"])
    assert R.REFUSAL not in reply.content, reply.content
    return EncryptedGlobal(reply.content[R.ARRAYS], str(reply.content[R.HE][R.HE_SIGNATURE]))


def train_messages(fed: dict, glob: EncryptedGlobal, rnd: int, nodes: list[int]) -> tuple[list[Message], list]:
    fed["rounds"].glob = glob
    return fed["rounds"].configure_train(rnd, nodes)


def add_replies(fed: dict, replies: list[Message]) -> tuple[list, he.CiphertextSum, list]:
    """A fresh round's intake: each reply through the protocol's payload check and running sum."""
    rounds = fed["rounds"]
    rounds.configure_train(1, [])
    outcomes = [rounds.accept(r) for r in replies]
    return outcomes, rounds.total, rounds.accepted


def train_round(fed: dict, glob: EncryptedGlobal) -> tuple[list[Message], list[Message]]:
    messages, skipped = train_messages(fed, glob, 1, list(CLIENTS.values()))
    assert not skipped
    return messages, [client_app(msg, fed["ctx"][name]) for msg, name in zip(messages, CLIENTS, strict=True)]


def ask_evaluator(fed: dict, content: RecordDict) -> Message:
    return client_app(Message(content, EVALUATOR, "query.he_aggregate"), fed["ctx"]["judge"])


def resign(msg: Message, reply: Message, key: Path, arrays: list[bytes]) -> Message:
    """A client that sends other ciphertexts and signs them with its own key (it passes signature checks)."""
    content = RecordDict({k: v for k, v in reply.content.items() if k != R.SIGNATURE})
    content[R.ARRAYS] = he.blobs_to_record(arrays)
    sign_reply(content, key.read_bytes(), int(msg.metadata.run_id), 1, msg.metadata.message_id)
    return Message(content, reply_to=msg)


def test_a_round_decrypts_to_the_plaintext_weighted_fedavg(fed: dict) -> None:
    glob = initial(fed)
    _, replies = train_round(fed, glob)
    outcomes, total, accepted = add_replies(fed, replies)
    assert [o.status for o in outcomes] == ["accepted", "accepted"]
    config = {**base(fed["cfg"]), R.ROUND: 1, R.HE_EVALUATOR_KEY: fed["keys"][EVALUATOR].decode()}
    reply = ask_evaluator(fed, aggregate_content(glob, total.result(), accepted, fed["keys"], config, 2))
    assert R.REFUSAL not in reply.content, reply.content
    assert R.EVALUATION in reply.content and reply.content[R.EVALUATION]["accuracy"] > 0
    # Reference: decrypt each update on its own (the test holds the key) and average by weight.
    secret = he.load_secret_context(fed["secret"].secret_context)
    state = template(fed["cfg"])
    n = int(flatten_state(state, trainable_keys(state)).size)
    parts = [he.decrypt_sum(secret, he.record_to_blobs(r.content[R.ARRAYS]), n) for r in replies]
    weights = np.array([w for _, w in parts])
    assert weights == pytest.approx([0.05, 0.08])
    reference = sum(m * w for m, w in parts) / weights.sum()
    old, _ = he.decrypt_sum(secret, he.record_to_blobs(glob.record), n)
    new, _ = he.decrypt_sum(secret, he.record_to_blobs(reply.content[R.ARRAYS]), n)
    # FedAvg: global + weighted mean update. Decryptions are rounded to 1e-7 before anything else, so
    # a mean over Σw = 0.13 is exact to ~(0.5e-7·k)/Σw per coordinate, far below the DP noise.
    tolerance = 4 * 0.5e-7 * len(parts) / weights.sum()
    assert np.abs((new - old) - reference).max() < tolerance


def test_malformed_and_foreign_key_updates_never_reach_the_model(fed: dict) -> None:
    glob = initial(fed)
    (_, to_b), (a, b) = train_round(fed, glob)
    tmp = fed["tmp"]
    blobs = he.record_to_blobs(b.content[R.ARRAYS])
    truncated = resign(to_b, b, tmp / "beta.key", [blobs[0][:-100], *blobs[1:]])
    outcomes, _, accepted = add_replies(fed, [a, truncated])
    assert [o.status for o in outcomes] == ["accepted", "rejected"] and len(accepted) == 1
    assert "encrypted update refused" in str(outcomes[1].reason)
    # Under a foreign key (same parameters): the server cannot tell, the evaluator's bound does.
    foreign = keygen("fed", {"x": _key(tmp / "x.key").decode()}, max_clients=10, bound=100.0)
    other = he.load_secret_context(foreign.secret_context)
    n = sum(v.size for k, v in template(fed["cfg"]).items() if k in trainable_keys(template(fed["cfg"])))
    garbage = he.encrypt_update(other, np.full(n, 0.01), 0.5, bound=100.0)
    forged = resign(to_b, b, tmp / "beta.key", garbage)
    outcomes, total, accepted = add_replies(fed, [a, forged])
    assert [o.status for o in outcomes] == ["accepted", "accepted"]
    config = {**base(fed["cfg"]), R.ROUND: 1, R.HE_EVALUATOR_KEY: fed["keys"][EVALUATOR].decode()}
    reply = ask_evaluator(fed, aggregate_content(glob, total.result(), accepted, fed["keys"], config, 2))
    assert reply.content[R.REFUSAL][R.REFUSAL_CODE] == "he-aggregate-refused"


def test_a_homomorphic_reply_gets_the_same_record_and_metric_checks_as_a_plaintext_one(fed: dict) -> None:
    """NaN or undeclared values in an encrypted reply never reach the run store (one validator for every mode)."""
    glob = initial(fed)
    (to_a, _), (a, _) = train_round(fed, glob)
    key = fed["tmp"] / "alpha.key"

    def altered(**records: object) -> Message:
        content = RecordDict({k: v for k, v in a.content.items() if k != R.SIGNATURE})
        for name, record in records.items():
            content[name] = record
        sign_reply(content, key.read_bytes(), int(to_a.metadata.run_id), 1, to_a.metadata.message_id)
        return Message(content, reply_to=to_a)

    nan = MetricRecord({**dict(a.content[R.METRICS]), R.EPSILON: float("nan")})
    undeclared = ConfigRecord({"rows": "alice,42,positive"})
    extra_metric = MetricRecord({**dict(a.content[R.METRICS]), "exact-count": 417})
    extra_he = ConfigRecord({**dict(a.content[R.HE]), "note": "x"})
    outcomes, _, accepted = add_replies(
        fed, [altered(metrics=nan), altered(leak=undeclared), altered(metrics=extra_metric), altered(he=extra_he)]
    )
    assert [o.status for o in outcomes] == ["rejected"] * 4 and not accepted
    reasons = [str(o.reason) for o in outcomes]
    assert "invalid metrics.epsilon=nan" in reasons[0]
    assert "unexpected records" in reasons[1] and "leak" in reasons[1]
    assert "metrics keys outside the reply allow-list: ['exact-count']" in reasons[2]
    assert "he keys outside the reply allow-list: ['note']" in reasons[3]
    # The unaltered reply passes the same checks.
    outcomes, _, accepted = add_replies(fed, [a])
    assert outcomes[0].status == "accepted" and len(accepted) == 1


def test_one_clients_ciphertext_passed_off_as_the_aggregate_is_refused(fed: dict) -> None:
    glob = initial(fed)
    _, (a, b) = train_round(fed, glob)
    outcomes, total, accepted = add_replies(fed, [a, b])
    config = {**base(fed["cfg"]), R.ROUND: 1, R.HE_EVALUATOR_KEY: fed["keys"][EVALUATOR].decode()}
    lone = he.record_to_blobs(a.content[R.ARRAYS])
    # ... to the evaluator, as the sum: it recomputes the sum from the signed updates
    reply = ask_evaluator(fed, aggregate_content(glob, lone, accepted, fed["keys"], config, 2))
    assert reply.content[R.REFUSAL][R.REFUSAL_CODE] == "he-aggregate-refused"
    # ... to a client, as the next global model: only what the evaluator signed is decrypted
    fake = EncryptedGlobal(a.content[R.ARRAYS], glob.signature)
    (msg,), _ = train_messages(fed, fake, 2, [CLIENTS["alpha"]])
    reply = client_app(msg, fed["ctx"]["alpha"])
    assert reply.content[R.REFUSAL][R.REFUSAL_CODE] == "global-model-signature-invalid"


def test_a_context_other_than_the_signed_one_is_refused_before_training(fed: dict) -> None:
    glob = initial(fed)
    cfg = fed["cfg"]
    other = cfg.model_copy(
        update={"homomorphic": cfg.homomorphic.model_copy(update={"context_fingerprint": "sha256:" + "0" * 64})}
    )
    msg = Message(
        RecordDict(
            {
                R.ARRAYS: glob.record,
                R.CONFIG: ConfigRecord(
                    {
                        R.RUN_CONFIG: other.to_json(),
                        R.RUN_UID: "run-he",
                        R.ROUND: 1,
                        R.HE_GLOBAL_SIGNATURE: glob.signature,
                        R.HE_EVALUATOR_KEY: fed["keys"][EVALUATOR].decode(),
                        R.HE_SEALED_CONTEXT: load_server_bundle(fed["tmp"] / "server-he").sealed["alpha"],
                    }
                ),
            }
        ),
        CLIENTS["alpha"],
        "train",
    )
    reply = client_app(msg, fed["ctx"]["alpha"])
    assert reply.content[R.REFUSAL][R.REFUSAL_CODE] == "he-context-fingerprint-mismatch"
    assert not (fed["tmp"] / "alpha" / "ledger.db").exists()  # nothing was trained or spent

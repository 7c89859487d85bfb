"""The node's privacy facade: every DP release this node makes goes through one ``NodePrivacy``.

Like Opacus's ``PrivacyEngine`` (one obvious entry point, validation before work), each release
runs the same steps in the same order:

1. **plan**: σ for the run from the node's own size and the target ε (``common.privacy``, the one
   place σ is computed), calibrated once per run and reused while the size is unchanged;
2. **owner policy**: the owner's ``policy.toml`` rules that need σ and ε (``client.admission``);
3. **reserve**: the release is written to the ledger as *pending* in the same ``BEGIN IMMEDIATE``
   transaction as the budget check (``client.ledger``), so an overspend is refused here;
4. **release**: train with DP-SGD under the DP integrity guards (``client.dp_guards``: per-sample
   coverage, clipping, the noise actually added against the planned σ, every trainable tensor
   moved, the frozen base unchanged), or noise the fairness counts;
5. **confirm**: the release is marked confirmed. If step 4 fails — a crash, or a failed guard
   (``DPIntegrityError``, refused as ``dp-integrity``) — it stays pending and still counts as
   spent: a crash can only over-count, never under-count, and a refused update is never sent.

A refusal at steps 1–3 happens before any training or noise and leaves the ledger as it was.
Planning (``query.plan``) runs steps 1–2 and reads the ledger without writing to it.

The plan also says, before any budget is spent, when the run's model is not expected to learn from
this node's number of rows (``common.config.small_data_warning``: the from-scratch text model under
DP at a few thousand rows), and what to change.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, RecordDict

from client.admission import check_policy
from client.ledger import Budget, Ledger, Release
from client.node import NodeSettings, new_log_id, node_logger
from client.training import LocalResult, resolve_grad_sample_mode, train_local
from common import records as R
from common.config import RunConfig, small_data_warning
from common.data import Encoded
from common.fairness import Counts, NoisyCounts, noisy_counts
from common.policy import Purpose
from common.privacy import DPPlan, History, counts_mechanism, counts_release, epsilon_spent, group_privacy, plan_dp

#: Where a run's (n, σ) calibration is kept between messages (Flower's per-run node state).
_DP_STATE = "fedguard-dp"


@dataclass
class Spend:
    """What one release cost, as the ledger recomputes it."""

    release_id: str
    epsilon_total: float  # the dataset's whole history (all runs) including this release
    epsilon_run: float = 0.0  # this run's releases on this dataset; set once the release is confirmed
    selection_delta: float = 0.0  # δ the group selection of this run's count releases added (the ledger's sum)


class NodePrivacy:
    """Plan, check, reserve, release and confirm the DP releases of one run on this node.

    ``state`` is the run's node state (``Context.state``): it keeps σ's calibration across rounds.
    ``run_id`` keys this run's releases in the ledger.
    """

    def __init__(self, cfg: RunConfig, settings: NodeSettings, state: RecordDict, run_id: str) -> None:
        self.cfg = cfg
        self.settings = settings
        self.state = state
        self.run_id = run_id

    @property
    def budget(self) -> Budget:
        return Budget(self.settings.budget_epsilon, self.settings.budget_delta)

    # -- 1. plan --------------------------------------------------------------
    def count_release(self) -> History:
        """The federated-fairness counts release this run asks for after its last round, if any."""
        return counts_release(self.cfg.fairness.count_noise_multiplier) if self.cfg.wants_federated_counts else []

    def mitigation_releases(self) -> History:
        """The releases the run's fairness mitigation asks of this node: reweighing's group × label counts
        (once), or fairfed's / qfedavg's counts of the global model (every round); none for thresholds."""
        m = self.cfg.mitigation
        one = counts_release(m.noise_multiplier)
        if m.node_releases_per_round:
            return one * self.cfg.rounds
        return one if m.label_counts_release else []

    def other_releases(self) -> History:
        """Every release of the run besides its DP-SGD rounds: σ is calibrated for all of them together."""
        return self.mitigation_releases() + self.count_release()

    def earlier_calibration(self) -> tuple[int, float] | None:
        """This run's (n, σ) calibration on this node, if it already made one."""
        rec = self.state.get(_DP_STATE)
        if not isinstance(rec, ConfigRecord):
            return None
        n, sigma = rec.get("planned-n"), rec.get("planned-sigma")
        return (int(n), float(sigma)) if isinstance(n, int | float) and isinstance(sigma, int | float) else None

    def plan(self, n_train: int) -> DPPlan:
        """σ for this run; calibrated once per run and node (≈1 s), reused while the size is unchanged.

        σ covers the whole run: its DP-SGD rounds composed with the counts and mitigation releases, if any.
        """
        cfg = self.cfg
        earlier = self.earlier_calibration()
        same = earlier is not None and earlier[0] == n_train
        plan = plan_dp(
            n_train,
            cfg.dp,
            batch_size=cfg.train.logical_batch_size(n_train),
            local_epochs=cfg.train.local_epochs,
            rounds=cfg.rounds,
            noise_multiplier=earlier[1] if same and earlier else None,
            also=self.other_releases(),
            outside_delta=self.planned_selection(),
        )
        self.state[_DP_STATE] = ConfigRecord({"planned-n": n_train, "planned-sigma": plan.noise_multiplier})
        return plan

    def warn_if_too_small(self, n_train: int) -> str | None:
        """Print and log the plan's warning when the model will not learn from ``n_train`` rows."""
        warning = small_data_warning(self.cfg, n_train)
        if warning:
            print(f"[{self.settings.workdir.name}] WARNING: {warning}", flush=True)
            node_logger(self.settings.workdir).warning("DP plan: %s", warning)
        return warning

    def planned_run(self, plan: DPPlan) -> History:
        """Every release the run would make on this node: its DP-SGD rounds, mitigation and fairness counts."""
        per_round = (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
        return [per_round] * self.cfg.rounds + self.other_releases()

    def planned_selection(self) -> float:
        """δ the run's count releases would add by their group selection (each noises counts, thresholded)."""
        return len(self.other_releases()) * self.cfg.fairness.count_selection_delta

    @property
    def accountant_delta(self) -> float:
        """The δ every release of the run is accounted at: ``dp.delta`` less the planned group selection, so
        the run's δ total (what its reports state) is ``dp.delta`` (``DPPlan.delta`` is the same)."""
        return self.cfg.dp.delta - self.planned_selection()

    # -- 2. owner policy ------------------------------------------------------
    def admit(self, purpose: Purpose, plan: DPPlan) -> float:
        """Check the owner's σ and ε rules against ``plan``; return the whole run's planned ε."""
        eps_run = epsilon_spent(self.planned_run(plan), plan.delta, plan.accountant)
        check_policy(self.cfg, self.settings, purpose, plan=plan, epsilon_run=eps_run)
        return eps_run

    def preview(self, n_train: int) -> dict[str, float | int]:
        """What the planned run would cost this dataset (``query.plan``): nothing is reserved or spent."""
        s = self.settings
        plan = self.plan(n_train)
        eps_run = self.admit("plan", plan)
        self.warn_if_too_small(n_train)
        planned = self.planned_run(plan)
        with Ledger(s.ledger_path, s.marker_dir) as ledger:
            ledger.check_continuity(s.dataset_id)
            spent = ledger.would_spend(s.dataset_id, [], s.budget_delta, plan.accountant)
            after = ledger.would_spend(s.dataset_id, planned, s.budget_delta, plan.accountant, self.planned_selection())
        round_h = [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)]
        return {
            R.NOISE_MULTIPLIER: plan.noise_multiplier,
            R.SAMPLE_RATE: plan.sample_rate,
            R.PLAN_STEPS: plan.steps_per_round,
            R.DELTA: plan.delta,
            R.PLAN_EPSILON_ROUND: epsilon_spent(round_h, plan.delta, plan.accountant),
            R.PLAN_EPSILON_RUN: eps_run,
            R.EPSILON_TOTAL: spent,
            R.PLAN_EPSILON_AFTER: after,
            R.BUDGET_EPSILON: s.budget_epsilon,
            R.BUDGET_DELTA: s.budget_delta,
            R.PLAN_AFFORDABLE: int(after <= s.budget_epsilon),
        }

    # -- 3 and 5. reserve, then confirm ---------------------------------------
    @contextmanager
    def _reserved(self, release: Release, delta: float) -> Iterator[Spend]:
        """Reserve ``release`` (the budget check and the pending row in one transaction), yield, confirm.

        BudgetExceeded (nothing recorded) propagates before the body runs. If the body raises,
        the release stays pending: it was counted from the moment it was reserved.
        """
        s = self.settings
        with Ledger(s.ledger_path, s.marker_dir) as ledger:
            spend = Spend(release.message_id, ledger.reserve(release, self.budget))
            yield spend
            ledger.confirm(release.message_id)
            spend.epsilon_run = epsilon_spent(ledger.history(s.dataset_id, self.run_id), delta, release.accountant)
            spend.selection_delta = sum(
                float(r["extra_delta"]) for r in ledger.releases(s.dataset_id) if r["run_id"] == self.run_id
            )

    def _release(
        self,
        round_: int,
        message_id: str | None,
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
        max_grad_norm: float,
        accountant: str,
        mechanism: str = "dp-sgd",
        extra_delta: float = 0.0,
    ) -> Release:
        """The ledger row of one release of this run; a message without an id (built in-process,
        never by Flower) is still a new release."""
        return Release(
            dataset_id=self.settings.dataset_id,
            run_id=self.run_id,
            round=round_,
            message_id=message_id or f"local-{new_log_id()}",
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            delta=delta,
            max_grad_norm=max_grad_norm,
            accountant=accountant,
            mechanism=mechanism,
            extra_delta=extra_delta,
        )

    # -- 4. the releases ------------------------------------------------------
    def train(
        self,
        model: torch.nn.Module,
        data: Encoded,
        device: torch.device,
        *,
        round_: int,
        message_id: str | None,
        record_weights: torch.Tensor | None = None,
    ) -> tuple[LocalResult, dict[str, float | int]]:
        """Train ``model`` in place on ``data``; with DP, as one planned, checked and reserved release.

        ``record_weights`` (≤ 1, reweighing) scale each record's clipped gradient. Returns the training
        result and the accounting values the reply carries (none without DP).
        """
        cfg, s = self.cfg, self.settings
        if not cfg.dp.enabled:
            log = node_logger(s.workdir)
            return train_local(
                model, data, cfg, None, device, log=log, label=f"round {round_}", weights=record_weights
            ), {}
        first = self.earlier_calibration() is None
        plan = self.plan(len(data))
        self.admit("train", plan)
        if first:
            print(f"[{s.workdir.name}] {plan.describe()}", flush=True)
            node_logger(s.workdir).info("%s; grad_sample_mode=%s", plan.describe(), resolve_grad_sample_mode(cfg))
            self.warn_if_too_small(len(data))
        release = self._release(
            round_,
            message_id,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps_per_round,
            delta=plan.delta,
            max_grad_norm=plan.max_grad_norm,
            accountant=plan.accountant,
        )
        # Recorded (and the budget checked) before any training: a crash from here on over-counts.
        with self._reserved(release, plan.delta) as spend:
            # DPIntegrityError: stays pending. Steps done / total go to the node log as it trains.
            result = train_local(
                model,
                data,
                cfg,
                plan,
                device,
                log=node_logger(s.workdir),
                label=f"round {round_}",
                weights=record_weights,
            )
        if result.guards is not None:
            g = result.guards
            node_logger(s.workdir).info(
                "round %d: DP integrity guards passed (%d steps, %d trainable and %d frozen tensors, "
                "noise ratio %.4f) in %.1f ms",
                round_,
                g.steps,
                g.parameters,
                g.frozen,
                g.noise_ratio,
                g.seconds * 1e3,
            )
        return result, {
            R.EPSILON: spend.epsilon_run,
            R.DELTA: plan.delta,
            R.NOISE_MULTIPLIER: plan.noise_multiplier,
            R.SAMPLE_RATE: plan.sample_rate,
            R.MAX_GRAD_NORM: plan.max_grad_norm,
            R.EPSILON_TOTAL: spend.epsilon_total,
            R.BUDGET_EPSILON: s.budget_epsilon,
            R.BUDGET_DELTA: s.budget_delta,
            **self._unit_values(spend.epsilon_total),
            **self.selection_values(spend),
        }

    def release_counts(
        self,
        counts: Counts,
        *,
        round_: int,
        message_id: str | None,
        min_group_size: int,
        mitigation: bool = False,
    ) -> tuple[NoisyCounts, Spend]:
        """Noise a node's counts as one Gaussian release (q = 1), reserved before the noise is drawn.

        ``mitigation``: a release for ``[mitigation]`` (its own z; ledger mechanism ``gaussian-mitigation``),
        else the federated-fairness counts after the last round. Its ``epsilon_run`` composes the run's
        releases at the run's accountant δ (``accountant_delta``), like every round's; the group selection
        adds the rest of ``dp.delta``. The owner's budget δ checks the budget and states the dataset's total
        (``epsilon_total``).
        """
        fc = self.cfg.fairness
        z = self.cfg.mitigation.noise_multiplier if mitigation else fc.count_noise_multiplier
        mechanism = counts_mechanism(z, len(counts))
        release = self._release(
            round_,
            message_id,
            noise_multiplier=mechanism.noise_multiplier,
            sample_rate=1.0,
            steps=1,
            delta=self.accountant_delta,  # one δ for every release of a run: its ε composes with the rounds'
            max_grad_norm=mechanism.sensitivity,  # the L2 sensitivity: one cell per table
            accountant=self.cfg.dp.accountant,
            mechanism="gaussian-mitigation" if mitigation else "gaussian-counts",
            extra_delta=fc.count_selection_delta,  # the released groups' selection: the ledger counts it in δ
        )
        with self._reserved(release, self.accountant_delta) as spend:
            noisy = noisy_counts(counts, z, min_group_size=min_group_size, selection_delta=fc.count_selection_delta)
        return noisy, spend

    def selection_values(self, spend: Spend) -> dict[str, float]:
        """δ the run's count releases added so far (absent when it made none): the run's δ total adds it."""
        if not spend.selection_delta:
            return {}
        return {R.SELECTION_DELTA_RUN: spend.selection_delta}

    def _unit_values(self, eps_total: float) -> dict[str, float | int]:
        """Group privacy for a unit (a patient) contributing up to k records, if the schema declares units."""
        s = self.settings
        if not s.schema.privacy_unit:
            return {}
        k = s.schema.max_records_per_unit
        eps_unit, delta_unit = group_privacy(eps_total, s.budget_delta, k)
        return {R.UNIT_CAP: k, R.UNIT_EPSILON: eps_unit, R.UNIT_DELTA: delta_unit}

"""Fairness mitigation under DP: the arithmetic, from noised counts or public priors only.

Nothing here sees a record. Nodes release Gaussian-noised counts (``common.fairness.counts``,
charged to their ledgers); these functions turn them into

- **reweighing** weights ``w(a, y) = P(a)·P(y) / P(a, y)`` (Kamiran & Calders 2012), raised to the
  config's ``strength`` and scaled so the largest is 1: a node multiplies each record's *clipped*
  gradient by its weight, so one record still moves the sum by at most the clipping norm and
  DP-SGD's accounting is unchanged;
- **fairfed** multipliers (Ezzeldin et al. 2023): each round a node whose local gap (from its noised
  counts of the global model) is further from the federation's gets less weight, by step β;
- **qfedavg** multipliers in the spirit of q-FFL (Li et al. 2020): weight ∝ (noised error rate)^q, so
  nodes the model serves worst count more. It reweighs FedAvg; it does not use q-FFL's Lipschitz
  normalisation.

A group's counts are ``[tp, fp, fn, tn]`` as everywhere in ``common.fairness``; label counts are the
table of a perfect predictor (positives in ``tp``, negatives in ``tn``), so the same release, sum and
size threshold serve both.
"""

from __future__ import annotations

from collections.abc import Mapping

from common.fairness.metrics import OVERALL, Counts

#: Smallest count or rate a noised value is clipped to before dividing (noise can make it ≤ 0).
_FLOOR = 1.0
_MIN_ERROR = 0.01

#: group → class index (as a string: JSON keys) → weight in (0, 1].
WeightTable = dict[str, dict[str, float]]


def label_table(counts: Counts, attribute: str) -> dict[str, tuple[float, float]]:
    """group → (negatives, positives) of ``attribute`` from summed label counts (noise clipped at 1)."""
    out = {}
    for group, (tp, fp, fn, tn) in counts.get(attribute, {}).items():
        out[group] = (max(_FLOOR, float(fp + tn)), max(_FLOOR, float(tp + fn)))
    return out


def reweighing_weights(table: Mapping[str, tuple[float, float]], strength: float) -> WeightTable:
    """``(P(a)·P(y) / P(a, y))**strength`` per group and class, scaled so the largest weight is 1.

    ``table``: group → (mass of class 0, mass of class 1): counts, or probabilities (public priors).
    """
    if not table:
        return {}
    total = sum(a + b for a, b in table.values())
    by_class = [sum(row[c] for row in table.values()) for c in (0, 1)]
    raw = {
        group: {str(c): ((row[0] + row[1]) * by_class[c] / (total * row[c])) ** strength for c in (0, 1)}
        for group, row in table.items()
    }
    top = max(w for row in raw.values() for w in row.values())
    return {g: {c: w / top for c, w in row.items()} for g, row in raw.items()}


def priors_table(priors: Mapping[str, float], classes: list[str]) -> dict[str, tuple[float, float]]:
    """group → (P(a, class 0), P(a, class 1)) from public priors keyed ``"group|label"``."""
    out: dict[str, list[float]] = {}
    for key, p in priors.items():
        group, label = key.split("|")
        out.setdefault(group, [0.0, 0.0])[classes.index(label)] += p
    return {g: (max(a, 1e-9), max(b, 1e-9)) for g, (a, b) in out.items()}


def fallback_weight(weights: WeightTable) -> float:
    """The weight of a record whose group is not in the table (suppressed or unseen): the table's mean."""
    values = [w for row in weights.values() for w in row.values()]
    return sum(values) / len(values) if values else 1.0


# --------------------------------------------------------------------------------------------
# Per-round views of one node's noised counts of the global model


def _rate(num: float, den: float) -> float | None:
    return None if den < _FLOOR else min(1.0, max(0.0, num / den))


def accuracy(counts: Counts) -> float | None:
    """Noised accuracy on the node's validation split (None when its all-rows table was suppressed)."""
    cells = counts.get(OVERALL, {}).get(OVERALL)
    if not cells:
        return None
    tp, fp, fn, tn = (max(0.0, float(c)) for c in cells)
    return _rate(tp + tn, tp + fp + fn + tn)


def gap(counts: Counts, attribute: str, constraint: str) -> float | None:
    """The attribute's demographic-parity difference (or equalized-odds difference) from counts.

    None when fewer than two groups are left (a node's small groups never leave it).
    """
    rows = [[max(0.0, float(c)) for c in cells] for cells in counts.get(attribute, {}).values()]
    if constraint == "demographic_parity":
        rates = [r for tp, fp, fn, tn in rows if (r := _rate(tp + fp, tp + fp + fn + tn)) is not None]
        return max(rates) - min(rates) if len(rates) >= 2 else None
    tpr = [r for tp, _, fn, _ in rows if (r := _rate(tp, tp + fn)) is not None]
    fpr = [r for _, fp, _, tn in rows if (r := _rate(fp, fp + tn)) is not None]
    diffs = [max(v) - min(v) for v in (tpr, fpr) if len(v) >= 2]
    return max(diffs) if diffs else None


def fairfed_step(
    multipliers: Mapping[str, float],
    local: Mapping[str, Counts],
    merged: Counts,
    attribute: str,
    constraint: str,
    beta: float,
) -> dict[str, float]:
    """One FairFed update of the nodes' aggregation multipliers from this round's noised counts.

    ``Δ_k = |F_global − F_k|`` (F: the gap; a node without two released groups uses accuracy, as FairFed
    does when the local metric is undefined), then ``m_k ← max(0, m_k − β·(Δ_k − mean Δ))``; new nodes
    start at 1. All at 0 (an extreme β) falls back to equal multipliers.
    """
    glob_gap, glob_acc = gap(merged, attribute, constraint), accuracy(merged)
    deltas: dict[str, float] = {}
    for node, counts in local.items():
        g = gap(counts, attribute, constraint)
        if g is not None and glob_gap is not None:
            deltas[node] = abs(glob_gap - g)
        elif (a := accuracy(counts)) is not None and glob_acc is not None:
            deltas[node] = abs(glob_acc - a)
    out = dict(multipliers)
    if not deltas:
        return out
    mean = sum(deltas.values()) / len(deltas)
    for node, d in deltas.items():
        out[node] = max(0.0, out.get(node, 1.0) - beta * (d - mean))
    if all(out[n] == 0.0 for n in deltas):
        out.update(dict.fromkeys(deltas, 1.0))
    return out


def qfedavg_multipliers(local: Mapping[str, Counts], q: float) -> dict[str, float]:
    """``err_k**q`` per node, scaled to mean 1 (err: noised error rate, at least 1%); a node without an
    all-rows table gets the mean of the others."""
    errors = {n: 1.0 - a for n, c in local.items() if (a := accuracy(c)) is not None}
    if not errors:
        return dict.fromkeys(local, 1.0)
    raw = {n: max(_MIN_ERROR, e) ** q for n, e in errors.items()}
    mean = sum(raw.values()) / len(raw)
    out = {n: w / mean for n, w in raw.items()}
    return {n: out.get(n, 1.0) for n in local}

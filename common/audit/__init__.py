"""Empirical privacy auditing: a measured ε lower bound and membership-inference metrics.

Pure math on scores and guesses (no training, no I/O): ``one_run`` is the Steinke–Nasr–Jagielski
one-run bound, ``mia`` the membership-inference view. The audit federation that produces the
scores lives in ``fedguard.privacy_audit``.
"""

from common.audit.mia import MIAResult, mia_metrics
from common.audit.one_run import AuditBound, epsilon_lower_bound, guess_from_scores, p_value

__all__ = ["AuditBound", "MIAResult", "epsilon_lower_bound", "guess_from_scores", "mia_metrics", "p_value"]

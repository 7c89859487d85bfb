"""Deprecated location: the evaluation code lives in ``common.evaluation`` (shared with the evaluator node)."""

from common.evaluation import evaluate

__all__ = ["evaluate"]

"""Shared fixtures; helpers live in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_tabular


@pytest.fixture
def tabular_csv(tmp_path: Path) -> Path:
    path = tmp_path / "data.csv"
    make_tabular().to_csv(path, index=False)
    return path

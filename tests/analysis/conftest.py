"""Fixtures: small seeded attention archives, written through the real store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

# analysis_helpers is importable through pytest's `pythonpath` setting (pyproject.toml).
from analysis_helpers import build_archive, make_layout, make_weights


@pytest.fixture(params=["zarr", "h5"])
def fmt(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def small(tmp_path: Path, fmt: str) -> tuple[Any, dict]:
    w = make_weights(seed=1)
    return build_archive(tmp_path / f"a.{fmt}", w, make_layout()), w

"""Fixtures of the store tests: one conformance suite runs over both formats."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

# tests/ has no packages; make the shared helpers importable by their unique name.
sys.path.insert(0, os.path.dirname(__file__))
from store_testlib import DEC, FORMATS  # noqa: E402

from attnscope.store import SideLayout, TokenLayout  # noqa: E402


@pytest.fixture
def layout() -> TokenLayout:
    return TokenLayout(
        encoder=SideLayout.from_lengths({"text": 5, "image": 4}),
        decoder=SideLayout.from_lengths({"action": DEC}),
    )


@pytest.fixture(params=sorted(FORMATS))
def fmt(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def path(tmp_path, fmt) -> str:
    return str(tmp_path / FORMATS[fmt])


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)

"""Fixtures of the store tests: one conformance suite runs over both formats."""

from __future__ import annotations

import numpy as np
import pytest

from attnscope.store import SideLayout, TokenLayout

from .store_testlib import DEC, FORMATS


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

"""Fixtures shared by the capture tests: a small reference model and its batches."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from attnscope.capture import Transformer

from .ref_data import batches


@pytest.fixture
def small_model() -> Transformer:
    """32 wide, 4 heads, 2 + 2 layers, seed 0."""
    torch.manual_seed(0)
    return Transformer(32, 16, 4, 2, 2).eval()


@pytest.fixture
def make_batches() -> Callable[..., list]:
    """``make_batches(n, b, seed=0, enc=ENC, dec=DEC)``: n ``(enc, dec)`` batches of b samples."""
    return batches

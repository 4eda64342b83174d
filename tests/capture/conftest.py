"""Fixtures shared by the capture tests: a small reference model and its batches."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from attnscope.capture import Transformer
from attnscope.capture.synthetic import synthetic_batches

ENC = {"text": 5, "robot0_eef_pos": 1, "agentview_image": 4}
DEC = {"text": 3, "traj": 4}


@pytest.fixture
def small_model() -> Transformer:
    """32 wide, 4 heads, 2 + 2 layers, seed 0."""
    torch.manual_seed(0)
    return Transformer(32, 16, 4, 2, 2).eval()


@pytest.fixture
def make_batches() -> Callable[..., list]:
    """``make_batches(n, b, seed=0, enc=ENC, dec=DEC)``: n ``(enc, dec)`` batches of b samples."""

    def make(n: int = 3, b: int = 2, seed: int = 0, enc: dict = ENC, dec: dict = DEC) -> list:
        return list(synthetic_batches(n, b, 32, enc=enc, dec=dec, seed=seed))

    return make

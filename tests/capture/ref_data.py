"""The small reference model's token layout and batches, shared by the capture tests."""

from __future__ import annotations

from attnscope.capture.synthetic import synthetic_batches

ENC = {"text": 5, "robot0_eef_pos": 1, "agentview_image": 4}
DEC = {"text": 3, "traj": 4}


def batches(n: int = 3, b: int = 2, seed: int = 0, enc: dict = ENC, dec: dict = DEC) -> list:
    """n ``(enc, dec)`` batches of b samples for a 32-wide model."""
    return list(synthetic_batches(n, b, 32, enc=enc, dec=dec, seed=seed))

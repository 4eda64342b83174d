"""Seeded attention data and archive builders shared by the analysis tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from attnscope.store import ArchiveWriter, open_archive
from attnscope.store.layout import SideLayout, TokenLayout


def softmax_block(
    rng: np.random.Generator, shape: tuple[int, ...], *, causal: bool = False, sharp: float = 2.0
) -> np.ndarray:
    """Random attention rows ``(..., T, S)`` that sum to 1 (optionally causal)."""
    z = rng.standard_normal(shape) * sharp
    if causal:
        t, s = shape[-2], shape[-1]
        mask = np.arange(s)[None, :] > np.arange(t)[:, None] + (s - t)
        z = np.where(mask, -np.inf, z)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def make_weights(
    seed: int = 0, n: int = 6, h: int = 4, s_len: int = 12, t_len: int = 10, layers: int = 1
) -> dict[str, list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    enc = [{"self_attention": softmax_block(rng, (n, h, s_len, s_len))} for _ in range(layers)]
    dec = [
        {
            "self_attention": softmax_block(rng, (n, h, t_len, t_len), causal=True),
            "cross_attention": softmax_block(rng, (n, h, t_len, s_len)),
        }
        for _ in range(layers)
    ]
    return {"encoder": enc, "decoder": dec}


def make_layout(s_len: int = 12, t_len: int = 10) -> TokenLayout:
    return TokenLayout(
        encoder=SideLayout.from_lengths({"text": s_len - 5, "agentview_image": 5}),
        decoder=SideLayout.from_lengths({"bos": 1, "action": t_len - 1}),
    )


def build_archive(
    path: Path, weights: dict, layout: TokenLayout, dtype: str = "float32", **kw: Any
) -> Any:
    """Write ``weights`` batch by batch through ArchiveWriter and reopen it."""
    n = (
        next(iter(weights["encoder"][0].values())).shape[0]
        if weights.get("encoder")
        else next(iter(weights["decoder"][0].values())).shape[0]
    )
    with ArchiveWriter.create(path, layout, dtype=dtype, **kw) as w:
        for i in range(0, n, 2):
            w.append(
                {
                    st: [{k: v[i : i + 2] for k, v in layer.items()} for layer in layers]
                    for st, layers in weights.items()
                }
            )
    return open_archive(path)

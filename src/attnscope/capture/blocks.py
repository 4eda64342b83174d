"""Attention weights recomputed from Q and K in blocks of query rows.

Long contexts (docs/capture.md, "Query blocks"): a layer whose weights ``(B, H, T, S)``
would exceed :data:`BLOCK_BYTES` runs its output through the fused kernel, and its
weights are recomputed here ``rows`` query rows at a time and streamed to the archive
block by block. Peak extra memory is then one block of one layer: ``B * H * rows * S``
scores (float32) plus their softmax, whatever T is.

Default block size: the largest number of rows whose float32 scores fit in
:data:`BLOCK_BYTES` (64 MiB), rounded down to a multiple of the archive's chunk rows so
each block writes whole chunks. 64 MiB keeps the block's matrix products large enough
to run at full speed (on 2 CPU cores, blocks of 16 to 64 MiB recompute at the same
rate; below 4 MiB per-call overhead shows) while a block and its copies (scores,
softmax, stored dtype, host copy) stay well under 1 GiB at any T.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from attnscope.errors import ConfigError

__all__ = ["BLOCK_BYTES", "block_rows", "check_block", "softmax_blocks"]

#: float32 scores of one block of query rows (all heads, all samples of the batch)
BLOCK_BYTES = 64 * 1024 * 1024


def check_block(query_block: object) -> int | None:
    """``query_block`` as given to capture: ``None`` (automatic) or rows >= 1."""
    if query_block is None:
        return None
    if isinstance(query_block, bool) or not isinstance(query_block, int) or query_block < 1:
        raise ConfigError(
            f"query_block is {query_block!r}; expected a number of query rows >= 1, or None "
            "for blocks of about 64 MiB"
        )
    return int(query_block)


def block_rows(b: int, h: int, t: int, s: int, query_block: int | None) -> int:
    """Rows per block for weights ``(b, h, t, s)``: ``t`` (one block) when they fit the budget."""
    if query_block is not None:
        return min(t, query_block)
    if b * h * t * s * 4 <= BLOCK_BYTES:
        return t
    return max(1, min(t, BLOCK_BYTES // max(1, b * h * s * 4)))


def softmax_blocks(
    q: Tensor,
    k: Tensor,
    *,
    scale: float,
    rows: int,
    causal: bool = False,
    mask: Tensor | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(r0, softmax(q k^T * scale + mask)[:, :, r0:r0 + rows])`` block by block.

    ``q``: ``(B, H, T, d)``; ``k``: ``(B, H, S, d)``; ``causal``: query ``i`` sees keys
    ``<= i``; ``mask``: additive float or boolean (True = attend), broadcastable to
    ``(B, H, T, S)``. Same dtype and operation order as an explicit softmax path.
    """
    t, s = q.shape[-2], k.shape[-2]
    kt = k.transpose(-2, -1)
    for r0 in range(0, t, rows):
        r1 = min(t, r0 + rows)
        scores = (q[:, :, r0:r1] @ kt) * scale  # (B, H, rb, S)
        if causal:
            row = torch.arange(r0, r1, device=q.device)[:, None]
            later = torch.arange(s, device=q.device) > row  # (rb, S): keys after the query
            scores = scores.masked_fill(later, float("-inf"))
        if mask is not None:
            m = mask if mask.shape[-2] == 1 else mask[..., r0:r1, :]
            if m.dtype == torch.bool:
                scores = scores.masked_fill(~m, float("-inf"))
            else:
                scores = scores + m
        yield r0, scores.softmax(dim=-1)

"""Reading an archive array block by block, as analysis needs it: whole samples,
aligned to the array's sample chunks, densified when the array is sparse."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from attnscope.analysis._engine import BlockTokens, densify_topk
from attnscope.contracts import KIND_AXES

__all__ = [
    "sample_slices",
    "read_block",
    "read_tokens",
    "key_mask",
    "dense_block",
    "sparse_causal",
    "iter_array_blocks",
    "detect_causal",
    "query_rows",
]


def sample_slices(arr: Any, max_bytes: int) -> list[slice]:
    """Slices of whole samples, ~``max_bytes`` of float32 each, on sample-chunk bounds."""
    n, h, t, s = arr.shape
    per_sample = max(1, h * t * s * 4)  # analysed as float32
    chunk_n = max(1, int(arr.chunks[0]) if arr.chunks else 1)
    per = max(1, max_bytes // per_sample)
    per = max(chunk_n, (per // chunk_n) * chunk_n)
    return [slice(i, min(i + per, n)) for i in range(0, n, per)]


def read_block(arr: Any, sl: slice) -> Any:
    """A dense block, or ``(values, indices, residual)`` for sparse arrays."""
    if getattr(arr, "is_sparse", False):
        v, i, r = arr.topk_arrays(sl)
        return (np.asarray(v), np.asarray(i), np.asarray(r))
    return np.asarray(arr[sl])


def read_tokens(arr: Any, sl: slice) -> BlockTokens | None:
    """The masks (ragged archives) and per-sample labels of samples ``sl`` of ``arr``;
    None when the archive has neither (every token real, the layout's labels). Query
    masks and labels are those of the stored rows (``arr.query_rows``, a row policy)."""
    a = arr.archive
    qs, ks = KIND_AXES[(arr.stack, arr.kind)]
    lay = a.layout
    rows = query_rows(arr)
    masks = (a.masks(qs, sl), a.masks(ks, sl)) if a.ragged else (None, None)
    if rows is not None and masks[0] is not None:
        masks = (masks[0][:, rows], masks[1])
    ql = a.labels(qs, sl) if getattr(lay, qs) is not None else None
    if rows is not None and ql is not None:
        ql = [[lab[r] for r in rows] for lab in ql]
    kl = a.labels(ks, sl) if getattr(lay, ks) is not None else None
    if masks[0] is None and ql is None and kl is None:
        return None
    return BlockTokens(masks[0], masks[1], ql, kl)


def query_rows(arr: Any) -> np.ndarray | None:
    """Original query rows ``arr`` stores (a capture row policy), None: every row."""
    rows = getattr(arr, "query_rows", None)
    return None if rows is None else np.asarray(rows, dtype=np.int64)


def key_mask(arr: Any, sl: slice) -> np.ndarray | None:
    """``(n, S)`` bool real keys of samples ``sl`` of ``arr`` (ragged archives), else None."""
    if not getattr(arr.archive, "ragged", False):
        return None
    return np.asarray(arr.archive.masks(KIND_AXES[(arr.stack, arr.kind)][1], sl), dtype=bool)


def sparse_causal(arr: Any) -> bool:
    """:func:`detect_causal` for sparse arrays (what densifying needs), False for dense ones:
    compute it once per array, not per block."""
    return detect_causal(arr) if getattr(arr, "is_sparse", False) else False


def dense_block(
    arr: Any, sl: slice, *, causal: bool | None = None, kmask: np.ndarray | None = None
) -> np.ndarray:
    """Samples ``sl`` of ``arr`` as a dense ``(n, H, T, S)`` block.

    Sparse arrays are densified: the residual goes to the real (``kmask``, read from a
    ragged archive when not given), causally allowed keys only. ``causal`` is
    :func:`detect_causal` of the array; callers reading many blocks compute it once and
    pass it in (None detects it here, re-reading the first samples).
    """
    b = read_block(arr, sl)
    if isinstance(b, tuple):
        if causal is None:
            causal = detect_causal(arr)
        if kmask is None:
            kmask = key_mask(arr, sl)
        b = densify_topk(*b, arr.shape[-1], causal=causal, kmask=kmask, rows=query_rows(arr))
    return b


def iter_array_blocks(
    arr: Any, *, max_bytes: int
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """``(dense (n, H, T, S) block, (n, T, S) real cells or None)`` of one array (sparse
    arrays densified over each sample's real keys; cells only for ragged archives)."""
    ragged = bool(getattr(arr.archive, "ragged", False))
    causal = sparse_causal(arr)
    qs, _ks = KIND_AXES[(arr.stack, arr.kind)]
    for sl in sample_slices(arr, max_bytes):
        km = key_mask(arr, sl)
        b = dense_block(arr, sl, causal=causal, kmask=km)
        cells = None
        if ragged and km is not None:
            qm = np.asarray(arr.archive.masks(qs, sl), dtype=bool)
            rows = query_rows(arr)
            if rows is not None:
                qm = qm[:, rows]
            cells = qm[:, :, None] & km[:, None, :]
        yield b, cells


def detect_causal(arr: Any) -> bool:
    """Self-attention with an all-zero upper triangle (every head).

    Looks at the first sample, or in ragged archives at the first samples up to 16,
    needing one with at least two real tokens: a one-token sample proves nothing. An
    array keeping some query rows (a row policy) is causal when every kept row ``r``
    has zeros past key ``r``; when no kept row has a later key (e.g. only the last row)
    nothing proves it, and it counts as not causal.
    """
    n, h, t, s = arr.shape
    rows = query_rows(arr)
    if rows is not None:
        upper = np.arange(s)[None, :] > rows[:, None]
        if arr.kind != "self_attention" or n == 0 or not upper.any():
            return False
        b = read_block(arr, slice(0, min(n, 16)))
        x = densify_topk(b[0], b[1], None, s) if isinstance(b, tuple) else b
        return bool(not np.any(np.asarray(x)[..., upper]))
    if arr.kind != "self_attention" or n == 0 or t != s or t < 2:
        return False
    ragged = bool(getattr(arr.archive, "ragged", False))
    sl = slice(0, min(n, 16) if ragged else 1)
    if ragged:
        qs, _ks = KIND_AXES[(arr.stack, arr.kind)]
        if not (arr.archive.masks(qs, sl).sum(axis=1) >= 2).any():
            return False
    b = read_block(arr, sl)
    if isinstance(b, tuple):
        x = densify_topk(b[0], b[1], None, s)
    else:
        x = b
    upper = np.triu(np.ones((t, s), dtype=bool), 1)
    return bool(not np.any(np.asarray(x)[..., upper]))

"""Per-sample id arrays (``_sample_ids/<key>``, shape ``(N,)``): creating and reading them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from attnscope.contracts import SAMPLE_IDS
from attnscope.store.backends.base import ArrayHandle, Backend

__all__ = ["id_array", "read_ids"]

#: samples per chunk of an id array that grows with the appends
ID_CHUNK = 4096


def id_array(
    b: Backend, key: str, dtype: np.dtype, capacity: int, hint: int, *, shared: bool
) -> ArrayHandle:
    """The id array ``key``, created if needed.

    A pre-sized archive (``capacity``: sample-range writers) gets it at full size, in
    chunks that divide ``hint`` (the attention arrays' sample chunks), so that concurrent
    range writers never resize it nor share a chunk of it (as the token arrays,
    :class:`~attnscope.store.tokens.SideStore`). ``shared``: another writer may create it
    at the same time; then its array is used.
    """
    path = f"{SAMPLE_IDS}/{key}"
    if b.has(path):
        return b.get_array(path)
    n, cs = (capacity, math.gcd(ID_CHUNK, hint or 1)) if capacity else (0, ID_CHUNK)
    try:
        return b.create_array(path, (n,), (cs,), dtype, dims=("sample",), compressor="none")
    except Exception:  # noqa: BLE001 - a concurrent range writer created it meanwhile
        if not shared or not b.has(path):
            raise
        return b.get_array(path)


def read_ids(
    b: Backend, keys: Sequence[str], start: int, n: int
) -> dict[str, np.ndarray] | None:
    """Ids ``keys`` of samples ``[start, start + n)``; None when one is not stored."""
    out = {}
    for key in keys:
        path = f"{SAMPLE_IDS}/{key}"
        if not b.has(path):
            return None
        h = b.get_array(path)
        if h.shape[0] < start + n:
            return None
        out[key] = h.read((slice(start, start + n),))
    return out

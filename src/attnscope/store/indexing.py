"""Basic numpy indexing of ``(N, H, T, S)`` arrays, turned into a box to read plus the
index to apply to what was read."""

from __future__ import annotations

from typing import Any

import numpy as np

from attnscope.contracts import DIMS
from attnscope.errors import SelectionError

__all__ = ["norm_index"]


def norm_index(key: Any, shape: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[Any, ...]]:
    """Basic numpy index -> (bounding box of step-1 slices, index to apply to the box)."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = next(j for j, k in enumerate(key) if k is Ellipsis)
        fill = len(shape) - (len(key) - 1)
        key = key[:i] + (slice(None),) * fill + key[i + 1 :]
    if len(key) > len(shape):
        raise SelectionError(f"too many indices: got {len(key)} for dims {DIMS}")
    key = key + (slice(None),) * (len(shape) - len(key))
    box, post = [], []
    for k, n, dim in zip(key, shape, DIMS):
        if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            i = int(k) + n if k < 0 else int(k)
            if not 0 <= i < n:
                raise SelectionError(f"{dim} index {int(k)} out of range for {n} {dim}s")
            box.append(slice(i, i + 1))
            post.append(0)
        elif isinstance(k, slice):
            start, stop, step = k.indices(n)
            rng = range(start, stop, step)
            if len(rng) == 0:
                box.append(slice(0, 0))
                post.append(slice(None))
            elif step > 0:
                box.append(slice(start, rng[-1] + 1))
                post.append(slice(None, None, step))
            else:
                box.append(slice(rng[-1], rng[0] + 1))
                post.append(slice(None, None, step))
        else:
            raise SelectionError(
                f"unsupported index {k!r} for {dim}: use ints, slices or '...' (basic indexing)"
            )
    return tuple(box), tuple(post)

"""Checks of appended weights: finite, non-negative, rows summing to 1 (fast paths)."""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from attnscope.errors import ConfigError, ValidationError

__all__ = ["finite_nonneg", "row_sums", "check_weights", "check_tolerance"]

# Largest bit pattern of a finite, non-negative float of each width (+Inf's pattern - 1).
_MAX_OK_BITS = {2: 0x7BFF, 4: 0x7F7FFFFF, 8: 0x7FEFFFFFFFFFFFFF}
_F16_LUT: np.ndarray | None = None
_SLAB_BYTES = 256 * 1024  # float32 scratch per slab: stays in L2


def check_tolerance(tolerance: Any, what: str = "tolerance") -> float:
    """``tolerance`` as a float, refusing NaN, Inf and negatives (a NaN passes every row)."""
    try:
        tol = float(tolerance)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what} must be a number >= 0, got {tolerance!r}") from e
    if isinstance(tolerance, bool) or not math.isfinite(tol) or tol < 0:
        raise ConfigError(f"{what} must be a finite number >= 0, got {tolerance!r}")
    return tol


def finite_nonneg(w: np.ndarray) -> bool:
    """True if every element is finite and >= 0 (``-0.0`` reports False), in one pass.

    Reads the raw bits as unsigned ints: a max-reduction over them is ~100x faster than
    ``np.isfinite`` + ``w < 0`` on float16.
    """
    lim = _MAX_OK_BITS.get(w.dtype.itemsize)
    if lim is None or w.dtype.kind != "f" or w.size == 0:
        return bool(np.isfinite(w).all() and not (w < 0).any())
    u = np.ascontiguousarray(w).view(f"u{w.dtype.itemsize}")
    return int(u.max()) <= lim


def f16_lut() -> np.ndarray:
    """float32 value of every float16 bit pattern (256 KiB, built once)."""
    global _F16_LUT
    if _F16_LUT is None:
        _F16_LUT = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
        _F16_LUT = _F16_LUT.astype(np.float32)
    return _F16_LUT


def row_sums(w: np.ndarray) -> np.ndarray:
    """float32 sums of the last axis, shape ``w.shape[:-1]``.

    float32 input: one BLAS matrix-vector product with ones. 16-bit and float64 input:
    converted to float32 in L2-sized slabs of whole rows into one reused buffer (torch's
    vectorised half->float copy when torch is already loaded, else a 256 KiB lookup
    table), each slab summed by BLAS. numpy's own float16 casts and float16 reductions
    run at ~0.5 GB/s; this runs at several GB/s and allocates nothing per row.
    """
    s = w.shape[-1]
    rows = int(np.prod(w.shape[:-1]))
    x = np.ascontiguousarray(w).reshape(rows, s)
    ones = np.ones(s, dtype=np.float32)
    if x.dtype == np.float32 or rows == 0 or s == 0:
        return (x.astype(np.float32, copy=False) @ ones).reshape(w.shape[:-1])
    out = np.empty(rows, dtype=np.float32)
    step = max(1, _SLAB_BYTES // (4 * s))
    buf = np.empty((min(step, rows), s), dtype=np.float32)
    torch = sys.modules.get("torch") if x.dtype == np.float16 else None
    if torch is not None:
        tbuf, tx = torch.from_numpy(buf), torch.from_numpy(x)
    lut = f16_lut() if x.dtype == np.float16 and torch is None else None
    u = x.view(np.uint16) if lut is not None else None
    for a in range(0, rows, step):
        b = min(rows, a + step)
        t = buf[: b - a]
        if torch is not None:
            tbuf[: b - a].copy_(tx[a:b])
        elif u is not None:
            np.take(lut, u[a:b], out=t)
        else:
            np.copyto(t, x[a:b], casting="unsafe")
        np.matmul(t, ones, out=out[a:b])
    return out.reshape(w.shape[:-1])


def check_weights(
    name: str,
    w: np.ndarray,
    tol: float,
    *,
    first_sample: int = 0,
    rows_le_one: bool = False,
    rows: np.ndarray | None = None,
) -> None:
    """Raise :class:`ValidationError` naming the first bad row of ``w`` ``(B, H, T, S)``.

    Rows must be finite, >= 0 and sum to 1 within ``tol`` (``<= 1 + tol`` when
    ``rows_le_one``: kept top-k weights). ``first_sample`` numbers the batch's samples.
    ``rows``: ``(B, T)`` bool, the real query rows; padded rows (all zeros) are not summed.
    """

    def where(mask: np.ndarray) -> str:
        i = np.argwhere(mask)[0]
        return f"sample {first_sample + int(i[0])}, head {int(i[1])}, query row {int(i[2])}"

    # One cheap pass over the raw bits: every weight finite and >= 0 iff the largest
    # bit pattern is below +Inf's (sign bit clear, exponent not all ones). Only when
    # that fails (or on -0.0) do the slower exact checks run to locate the problem.
    if not finite_nonneg(w):
        finite = np.isfinite(w)
        if not finite.all():
            bad = ~finite.all(axis=-1)
            kind = "NaN" if np.isnan(w).any() else "Inf"
            raise ValidationError(f"{name}: {kind} weight at {where(bad)}; nothing was written")
        neg = w < 0
        if neg.any():
            raise ValidationError(
                f"{name}: negative weight at {where(neg.any(axis=-1))}; attention weights "
                f"must be >= 0; nothing was written"
            )
    sums = row_sums(w)
    off = (sums > 1 + tol) if rows_le_one else (np.abs(sums - 1) > tol)
    if rows is not None:
        off &= rows[:, None, :]
    if off.any():
        i = tuple(np.argwhere(off)[0])
        raise ValidationError(
            f"{name}: row at {where(off)} sums to {float(sums[i]):.6g}, expected "
            f"{'<= 1' if rows_le_one else '1'} within {tol:g}; pass validate=False to "
            f"store unnormalised weights; nothing was written"
        )

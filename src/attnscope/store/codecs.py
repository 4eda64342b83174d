"""Logical dtype <-> stored dtype, and the one tensor -> numpy converter.

Zarr has no bfloat16 (zarr-python #2656): a bfloat16 archive stores the raw 16 bits as
uint16 and readers get float32 back.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from attnscope.contracts import COMPRESSOR_LEVELS, COMPRESSORS
from attnscope.errors import ConfigError, InputError

__all__ = [
    "check_level",
    "storage_dtype",
    "read_dtype",
    "to_bf16_bits",
    "from_bf16_bits",
    "encode",
    "decode",
    "is_half",
    "as_numpy",
]


def check_level(compressor: str, level: Any) -> int | None:
    """The compression level to use: ``level`` checked against the compressor's range,
    or its default (:data:`attnscope.contracts.COMPRESSOR_LEVELS`) when None."""
    if compressor not in COMPRESSORS:
        raise ConfigError(f"unknown compressor {compressor!r}; expected one of {COMPRESSORS}")
    rng = COMPRESSOR_LEVELS.get(compressor)
    if rng is None:
        if level is not None:
            raise ConfigError(f"compressor {compressor!r} takes no level, got level={level!r}")
        return None
    if level is None:
        return rng[2]
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
        raise ConfigError(f"level must be an int, got {level!r}")
    if not rng[0] <= int(level) <= rng[1]:
        raise ConfigError(
            f"level {level} is out of range for {compressor!r}: expected {rng[0]}..{rng[1]}"
        )
    return int(level)


def storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype stored on disk for a logical archive dtype."""
    return np.dtype({"float16": "float16", "float32": "float32", "bfloat16": "uint16"}[dtype])


def read_dtype(dtype: str) -> np.dtype:
    """The numpy dtype readers get for a logical archive dtype."""
    return np.dtype("float16" if dtype == "float16" else "float32")


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    u = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return (u >> np.uint32(16)).astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    return (b.astype(np.uint32) << np.uint32(16)).view(np.float32)


def encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """Weights -> what is stored for logical ``dtype``."""
    if dtype == "bfloat16":
        return to_bf16_bits(x)
    return np.asarray(x, dtype=dtype)


def decode(x: np.ndarray, dtype: str) -> np.ndarray:
    """What is stored for logical ``dtype`` -> weights (:func:`read_dtype`)."""
    if dtype == "bfloat16":
        return from_bf16_bits(x)
    return x


def is_half(x: Any) -> bool:
    """Whether ``x`` (numpy or torch) holds 16-bit floats (looser row-sum tolerance)."""
    return any(s in str(getattr(x, "dtype", "")) for s in ("float16", "bfloat16", "half"))


def as_numpy(x: Any, what: str = "weights") -> np.ndarray:
    """numpy view of a numpy array or (duck-typed, never imported) torch tensor.

    The dtype is kept (float16 stays float16) except bfloat16, which numpy lacks: float32.
    """
    if hasattr(x, "detach"):
        t = x.detach()
        if "bfloat16" in str(getattr(t, "dtype", "")):
            t = t.float()
        return t.cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise InputError(f"{what}: expected a numpy array or torch tensor, got {type(x).__name__}")

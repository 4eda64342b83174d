"""store.validation: the fused checks of appended weights and the tolerance rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attnscope.errors import ConfigError, ValidationError
from attnscope.store import ArchiveWriter
from attnscope.store import validation as V

from .store_testlib import make_batch, softmax


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_fused_checks_match_numpy(rng, dtype):
    x = softmax(rng, (3, 2, 7, 31)).astype(dtype)
    assert V.finite_nonneg(x)
    np.testing.assert_allclose(
        V.row_sums(x),
        x.astype(np.float64).sum(-1),
        rtol=0,
        atol=1e-5 if dtype != np.float16 else 2e-3,
    )
    for bad in (np.nan, np.inf, -np.inf, -1e-3):
        y = x.copy()
        y[1, 0, 3, 5] = bad
        assert not V.finite_nonneg(y)
    y = x.copy()
    y[0, 0, 0, 0] = -0.0  # -0.0 is not negative: the exact fallback accepts it
    assert not V.finite_nonneg(y)
    assert not (y < 0).any() and np.isfinite(y).all()


def test_row_sums_without_torch_lookup_table(rng, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)
    x = softmax(rng, (2, 3, 600, 33)).astype(np.float16)  # several slabs
    np.testing.assert_allclose(V.row_sums(x), x.astype(np.float64).sum(-1), atol=2e-3)
    lut = V.f16_lut()
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ok = np.isfinite(bits.view(np.float16))
    np.testing.assert_array_equal(lut[ok], bits[ok].view(np.float16).astype(np.float32))


def test_tolerance_zero_is_honoured(tmp_path, layout, rng) -> None:
    batch = make_batch(rng, 2)
    name = "encoder/0/self_attention"
    batch[name] = batch[name].astype(np.float64)
    batch[name][0, 0, 0] *= 1.0005
    with ArchiveWriter.create(tmp_path / "t.zarr", layout, dtype="float32", tolerance=0.0) as w:
        with pytest.raises(ValidationError, match="sample 0"):
            w.append(batch)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1e-3, "x", None, True])
def test_check_tolerance_refuses_nan_inf_negative(bad) -> None:
    with pytest.raises(ConfigError, match="tolerance must be"):
        V.check_tolerance(bad)


@pytest.mark.parametrize("good", [0, 0.0, 1e-3, 2])
def test_check_tolerance_accepts_finite_non_negative(good) -> None:
    assert V.check_tolerance(good) == float(good)


def test_create_refuses_nan_tolerance(tmp_path, layout) -> None:
    with pytest.raises(ConfigError, match="finite number >= 0, got nan"):
        ArchiveWriter.create(tmp_path / "t.zarr", layout, tolerance=math.nan)
    assert not (tmp_path / "t.zarr").exists()

"""The write fast paths: fused validation, in-memory chunk tails, batched/threaded writes."""

from __future__ import annotations

import numpy as np
import pytest
from store_testlib import softmax

from attnscope.errors import ValidationError
from attnscope.store import ArchiveWriter, SideLayout, TokenLayout, open_archive, verify
from attnscope.store import archive as A

NAME = "encoder/0/self_attention"


def _lay(t: int) -> TokenLayout:
    return TokenLayout(encoder=SideLayout.from_lengths({"tok": t}))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_fused_checks_match_numpy(rng, dtype):
    x = softmax(rng, (3, 2, 7, 31)).astype(dtype)
    assert A._finite_nonneg(x)
    np.testing.assert_allclose(
        A._row_sums(x),
        x.astype(np.float64).sum(-1),
        rtol=0,
        atol=1e-5 if dtype != np.float16 else 2e-3,
    )
    for bad in (np.nan, np.inf, -np.inf, -1e-3):
        y = x.copy()
        y[1, 0, 3, 5] = bad
        assert not A._finite_nonneg(y)
    y = x.copy()
    y[0, 0, 0, 0] = -0.0  # -0.0 is not negative: the exact fallback accepts it
    assert not A._finite_nonneg(y)
    assert not (y < 0).any() and np.isfinite(y).all()


def test_row_sums_without_torch_lookup_table(rng, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)
    x = softmax(rng, (2, 3, 600, 33)).astype(np.float16)  # several slabs
    np.testing.assert_allclose(A._row_sums(x), x.astype(np.float64).sum(-1), atol=2e-3)
    lut = A._f16_lut()
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ok = np.isfinite(bits.view(np.float16))
    np.testing.assert_array_equal(lut[ok], bits[ok].view(np.float16).astype(np.float32))


@pytest.mark.parametrize("what", ["nan", "neg", "sum", "negzero"])
def test_validation_messages_unchanged(path, rng, what):
    x = softmax(rng, (4, 2, 8, 8)).astype(np.float16)
    if what == "nan":
        x[2, 1, 3, 0] = np.nan
    elif what == "neg":
        x[2, 1, 3, 0] = -0.25
    elif what == "sum":
        x[2, 1, 3, :] = 0.5
    else:
        x[2, 1, 3, 0] = -0.0
    with ArchiveWriter.create(path, _lay(8)) as w:
        if what == "negzero":
            assert w.append({NAME: x}) == 4
            return
        with pytest.raises(ValidationError, match="sample 2, head 1, query row 3"):
            w.append({NAME: x})
        assert w.committed == 0


@pytest.mark.parametrize("compressor", ["zstd", "none", "blosc-lz4"])
def test_partial_chunk_tails_roundtrip_and_resume(path, rng, compressor):
    # chunk_samples=4 and odd batch sizes: every append ends inside a chunk, so the
    # in-memory tail is prepended (and, after reopening, read back from disk instead).
    sizes = [3, 5, 2, 7, 1, 4, 6]
    batches = [softmax(rng, (b, 2, 16, 16)).astype(np.float16) for b in sizes]
    with ArchiveWriter.create(path, _lay(16), compressor=compressor, chunk_samples=4) as w:
        for x in batches[:4]:
            buf = x.copy()
            w.append({NAME: buf}, sample_ids={"i": np.arange(len(x))})
            buf[...] = 0  # the caller reuses its buffer: the writer must have copied
    with ArchiveWriter.open(path) as w:
        for x in batches[4:]:
            w.append({NAME: x}, sample_ids={"i": np.arange(len(x))})
    want = np.concatenate(batches)
    with open_archive(path) as a:
        assert a.n_samples == sum(sizes)
        np.testing.assert_array_equal(a[NAME][:], want)
        np.testing.assert_array_equal(
            a.sample_ids["i"], np.concatenate([np.arange(b) for b in sizes])
        )
    assert verify(path).ok


def test_many_arrays_many_chunks_hdf5_threaded(tmp_path, rng):
    """Pool-encoded direct chunks: plain zstd frames, in the right place, for 6 arrays."""
    import h5py
    import numcodecs

    path = str(tmp_path / "t.h5")
    names = [f"encoder/{i}/self_attention" for i in range(6)]
    data = {n: softmax(rng, (5, 4, 256, 256)).astype(np.float16) for n in names}
    with ArchiveWriter.create(path, _lay(256)) as w:
        w.append({n: x[:2] for n, x in data.items()})
        w.append({n: x[2:] for n, x in data.items()})
    with open_archive(path) as a:
        for n in names:
            np.testing.assert_array_equal(a[n][:], data[n])
    with h5py.File(path, "r") as f:
        ds = f[names[3]]
        assert "32015" in ds._filters  # carries the registered zstd filter id
        assert ds.chunks == (1, 4, 256, 256)  # one sample per chunk in HDF5
        _mask, raw = ds.id.read_direct_chunk((3, 0, 0, 0))
        assert raw[:4] == b"\x28\xb5\x2f\xfd"  # a standard zstd frame (hdf5plugin's 32015)
        got = np.frombuffer(numcodecs.Zstd().decode(raw), np.float16).reshape(ds.chunks)
        np.testing.assert_array_equal(got, data[names[3]][3:4])

"""Dask and xarray views (store/views.py), checked with xarray's own sel/mean/where
against numpy on the archive's arrays."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from attnscope.errors import MissingExtraError, SelectionError
from attnscope.store import ArchiveWriter, SideLayout, TokenLayout, open_archive

from .store_testlib import make_batch

pytest.importorskip("xarray")
pytest.importorskip("dask")

L = 6
KEPT = {"encoder/1/self_attention": [0, 2]}  # layer 1 keeps heads 0 and 2 of 3


def _soft(rng: np.random.Generator, b: int, h: int, mask: np.ndarray) -> np.ndarray:
    x = np.where(mask[:, None, None, :], rng.random((b, h, L, L)) + 0.05, 0)
    return (x / x.sum(-1, keepdims=True)).astype(np.float32)


@pytest.fixture
def ragged(path, rng):
    """Two layers of encoder self-attention, a right- and a left-padded batch, each
    sample's labels and ids stored, sample ids ``row``."""
    lay = TokenLayout(encoder=SideLayout.from_lengths({"text": L}))
    masks = [np.array([[1, 1, 1, 0, 0, 0], [1] * 6], bool),
             np.array([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1], [1] * 6], bool)]
    with ArchiveWriter.create(path, lay, max_lengths={"encoder": L}, dtype="float32",
                              heads=KEPT) as w:
        start = 0
        for m in masks:
            b = len(m)
            labels = [[f"s{start + i}.{j}" if ok else "" for j, ok in enumerate(row)]
                      for i, row in enumerate(m)]
            w.append({"encoder/0/self_attention": _soft(rng, b, 3, m),
                      "encoder/1/self_attention": _soft(rng, b, 2, m)},
                     masks={"encoder": m},
                     tokens={"encoder": {"labels": labels,
                                         "ids": np.arange(b * L).reshape(b, L) + 10 * start}},
                     sample_ids={"row": np.arange(start, start + b) + 100})
            start += b
    return path


def _numpy_masked(a, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """``(weights (N, H, T, S) with NaN where padded, mask (N, T, S))`` of one layer."""
    w = a["encoder", layer][...].astype(np.float64)
    m = a.masks("encoder")
    mask = m[:, :, None] & m[:, None, :]
    return np.where(mask[:, None], w, np.nan), mask


@pytest.mark.filterwarnings("ignore:Mean of empty slice")  # numpy's, on padded query rows
def test_dataset_has_layer_dim_valid_names_and_matches_numpy(ragged):
    with open_archive(ragged) as a:
        ds = a.to_xarray()
        assert set(ds.data_vars) == {"attention", "mask"}
        assert ds.attention.dims == ("layer", "sample", "head", "query", "key")
        assert ds.attention.chunks is not None  # lazy: dask-backed
        assert ds["layer"].values.tolist() == [0, 1] and ds["head"].values.tolist() == [0, 1, 2]
        assert ds["sample_row"].values.tolist() == [100, 101, 102, 103, 104]
        for layer in (0, 1):
            want, mask = _numpy_masked(a, layer)
            np.testing.assert_array_equal(ds.mask.values, mask)
            for pos, h in enumerate(a.heads["encoder", layer]):
                got = ds.attention.sel(layer=layer, head=h)
                np.testing.assert_allclose(got.values, want[:, pos])
                # xarray's mean skips NaN: the mean over the real queries only
                np.testing.assert_allclose(got.mean("query").values,
                                           np.nanmean(want[:, pos], axis=1), rtol=1e-6)
        # a head layer 1 did not keep is NaN there, not another head's weights
        assert bool(ds.attention.sel(layer=1, head=1).isnull().all())
        rows = ds.attention.sel(layer=0).sum("key").where(ds.mask.any("key"))
        np.testing.assert_allclose(rows.values[~np.isnan(rows.values)], 1.0, rtol=1e-5)


def test_unmasked_keeps_stored_zeros_and_where_mask_matches(ragged):
    with open_archive(ragged) as a:
        raw = a.to_xarray(masked=False)
        stored = a["encoder", 0][...]
        np.testing.assert_array_equal(raw.attention.sel(layer=0).values, stored)
        masked = a.to_xarray()
        xr_where = raw.attention.where(raw.mask).sel(layer=0)
        np.testing.assert_array_equal(xr_where.values, masked.attention.sel(layer=0).values)
        # padded zeros drag an unmasked mean down; the masked mean does not
        m = a.masks("encoder")
        real_q = m.sum(1)
        want = stored[:, 0].sum(1) / real_q[:, None]  # mean over real queries (pads are 0)
        got = masked.attention.sel(layer=0, head=0).mean("query").values
        np.testing.assert_allclose(np.where(m, got, 0), np.where(m, want, 0), rtol=1e-5)


def test_per_sample_token_coordinates(ragged):
    with open_archive(ragged) as a:
        ds = a.to_xarray("encoder", "self")
        assert ds["query_token"].dims == ("sample", "query")
        assert ds["key_token"].dims == ("sample", "key")
        for i in range(a.n_samples):
            labels, ids = a.tokens("encoder", i)
            assert ds["query_token"].values[i].tolist() == labels
            assert ds["key_token"].values[i].tolist() == labels
            np.testing.assert_array_equal(ds["key_token_id"].values[i], ids)
        # select by token with xarray's where: sample 3's query "s3.4", every head of layer 0
        # (drop=True needs a computed condition: the token coordinates are lazy)
        got = ds.attention.sel(layer=0).where((ds.query_token == "s3.4").compute(), drop=True)
        assert got.sizes["sample"] == 1 and got.sizes["query"] == 1
        keys = a.masks("encoder", 3)  # sample 3's real keys; its padded keys read NaN
        np.testing.assert_array_equal(got.values[0, :, 0],
                                      np.where(keys, a["encoder", 0][3, :, 4], np.nan))


def test_encoder_decoder_needs_stack_and_kind(path, layout, rng):
    with ArchiveWriter.create(path, layout, dtype="float32") as w:
        w.append(make_batch(rng, 2, layers=2))
    with open_archive(path) as a:
        with pytest.raises(SelectionError, match=r"decoder/self_attention.*decoder/cross_"):
            a.to_xarray()
        with pytest.raises(SelectionError, match=r"matches \['decoder/self_attention'"):
            a.to_xarray("decoder")
        with pytest.raises(SelectionError, match="every layer"):
            a.to_xarray("decoder/0/cross_attention")
        with pytest.raises(SelectionError, match="nothing stored"):
            a.to_xarray("encoder", "cross")
        ds = a.to_xarray("decoder", "cross")
        assert ds.attrs["kind"] == "cross_attention" and ds.sizes["key"] == len(
            layout.encoder.labels)
        assert bool(ds.mask.all())  # not ragged: every token real, nothing masked
        np.testing.assert_array_equal(ds.attention.sel(layer=1).values,
                                      a["decoder", 1, "cross"][...])


@pytest.mark.parametrize("module", ["xarray", "dask"])
def test_missing_extra_is_one_line(ragged, monkeypatch, module):
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import` now fails, as uninstalled
    with open_archive(ragged) as a:
        with pytest.raises(MissingExtraError) as e:
            a.to_xarray()
        msg = str(e.value)
        assert "\n" not in msg and "pip install 'attnscope[dask]'" in msg and module in msg
        if module == "dask":
            with pytest.raises(MissingExtraError, match=r"attnscope\[dask\]"):
                a.to_dask("encoder/0/self_attention")

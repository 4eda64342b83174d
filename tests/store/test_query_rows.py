"""Archives that keep only some query rows (``query_rows``, a capture row policy)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attnscope.contracts import QUERY_ROWS
from attnscope.errors import ConfigError, ShapeError
from attnscope.store import ArchiveWriter, SideLayout, TokenLayout, info, open_archive, verify

LAYOUT = TokenLayout(
    encoder=SideLayout.from_lengths({"a": 3, "b": 2}),
    decoder=SideLayout.from_lengths({"text": 2, "traj": 4}),
)
ROWS = {"decoder": [2, 5]}


def _softmax(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    e = np.exp(rng.standard_normal(shape))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def _batch(rng: np.random.Generator, b: int = 2) -> dict[str, np.ndarray]:
    return {
        "encoder/0/self_attention": _softmax(rng, (b, 2, 5, 5)),
        "decoder/0/self_attention": _softmax(rng, (b, 2, 2, 6)),
        "decoder/0/cross_attention": _softmax(rng, (b, 2, 2, 5)),
    }


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
@pytest.mark.parametrize("sparse", [None, 3])
def test_round_trip_keeps_rows_attrs_and_metadata(tmp_path, suffix, sparse) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / f"a{suffix}"
    batches = [_batch(rng) for _ in range(2)]
    with ArchiveWriter.create(path, LAYOUT, dtype="float32", query_rows=ROWS,
                              sparse_topk=sparse) as w:  # fmt: skip
        for b in batches:
            w.append(b)
    with open_archive(path) as a:
        assert a.metadata[QUERY_ROWS] == ROWS
        assert a.query_rows("encoder/0/self_attention") is None
        for name in ("decoder/0/self_attention", "decoder/0/cross_attention"):
            assert a.query_rows(name).tolist() == ROWS["decoder"]
            assert a[name].shape[2] == 2
            np.testing.assert_array_equal(a[name].query_index(), ROWS["decoder"])
            if sparse is None:
                want = np.concatenate([b[name] for b in batches])
                np.testing.assert_array_equal(a[name][:], want)
        np.testing.assert_array_equal(a["encoder/0/self_attention"].query_index(), np.arange(5))
    assert verify(path).ok
    d = info(path)
    assert d[QUERY_ROWS] == ROWS
    arrays = {x["name"]: x for x in d["arrays"]}
    assert arrays["decoder/0/cross_attention"][QUERY_ROWS] == ROWS["decoder"]
    assert arrays["encoder/0/self_attention"][QUERY_ROWS] is None


def test_a_batch_with_all_rows_is_refused_naming_the_kept_count(tmp_path) -> None:
    rng = np.random.default_rng(0)
    with ArchiveWriter.create(tmp_path / "a.zarr", LAYOUT, query_rows=ROWS) as w:
        bad = {"decoder/0/self_attention": _softmax(rng, (2, 2, 6, 6))}
        with pytest.raises(ShapeError, match=r"T \(query\) length 6 does not match the 2 "
                                             r"decoder rows this archive keeps"):  # fmt: skip
            w.append(bad)
        assert w.committed == 0


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ({"decoder": [5, 2]}, r"ascending unique rows in \[0, 6\), got \[5, 2\]"),
        ({"decoder": [2, 6]}, r"ascending unique rows in \[0, 6\)"),
        ({"decoder": []}, r"ascending unique rows"),
        ({"middle": [1]}, r"no such side"),
        ({"decoder": "last"}, r"must be row indices"),
        ({}, r"non-empty mapping"),
    ],
)
def test_bad_query_rows_are_refused_before_anything_is_written(tmp_path, rows, match) -> None:
    with pytest.raises(ConfigError, match=match):
        ArchiveWriter.create(tmp_path / "a.zarr", LAYOUT, query_rows=rows)
    assert not (tmp_path / "a.zarr").exists()


def test_ragged_kept_rows_take_the_masks_of_those_rows(tmp_path) -> None:
    rng = np.random.default_rng(1)
    path = tmp_path / "r.zarr"
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)  # decoder lengths 4 and 2 of max 6
    x = _softmax(rng, (2, 2, 2, 4))
    x[1, :, :, 2:] = 0
    x /= x.sum(-1, keepdims=True)
    with ArchiveWriter.create(path, LAYOUT, query_rows={"decoder": [1, 5]},
                              max_lengths={"decoder": 6}, dtype="float32") as w:  # fmt: skip
        w.append({"decoder/0/self_attention": x}, masks={"decoder": mask})
    with open_archive(path) as a:
        arr = a["decoder/0/self_attention"]
        assert arr.shape == (2, 2, 2, 6)
        np.testing.assert_array_equal(arr.valid(0)[0], [True, False])  # row 5 is padding
        np.testing.assert_array_equal(arr.valid(1)[1], [1, 1, 0, 0, 0, 0])
        got = arr[:]
        np.testing.assert_array_equal(got[0, :, 0, :4], x[0, :, 0])
        assert not got[:, :, 1].any()  # row 5: padding in both samples, zeroed
        assert not got[1, :, :, 2:].any()
    assert verify(path).ok


def test_archives_without_the_key_read_as_full_rows(tmp_path) -> None:
    """An archive written before row policies: no root key, no array attribute."""
    import zarr

    rng = np.random.default_rng(2)
    path = tmp_path / "old.zarr"
    with ArchiveWriter.create(path, LAYOUT) as w:
        w.append({"decoder/0/self_attention": _softmax(rng, (2, 2, 6, 6))})
    g = zarr.open_group(str(path), mode="r+")
    meta = dict(g.attrs["attnscope"])
    meta.pop(QUERY_ROWS)
    g.attrs["attnscope"] = meta
    assert QUERY_ROWS not in json.dumps(dict(g["decoder/0/self_attention"].attrs))
    with open_archive(path) as a:
        assert a.query_rows("decoder/0/self_attention") is None
        np.testing.assert_array_equal(a["decoder/0/self_attention"].query_index(), np.arange(6))
        assert a.metadata.get(QUERY_ROWS) is None
    assert verify(path).ok
    with ArchiveWriter.open(path) as w:  # and it resumes as a full-row archive
        w.append({"decoder/0/self_attention": _softmax(rng, (1, 2, 6, 6))})


def test_xarray_view_names_the_kept_rows(tmp_path) -> None:
    pytest.importorskip("xarray")
    pytest.importorskip("dask")
    rng = np.random.default_rng(3)
    path = tmp_path / "x.zarr"
    batch = _batch(rng)
    with ArchiveWriter.create(path, LAYOUT, dtype="float32", query_rows=ROWS) as w:
        w.append(batch)
    with open_archive(path) as a:
        ds = a.to_xarray("decoder", "cross")
        assert list(ds["query"].values) == ROWS["decoder"]  # the original positions
        assert ds["query_token"].values.tolist() == [["traj[0]", "traj[3]"]] * 2
        assert list(ds["query_segment"].values) == ["traj", "traj"]
        np.testing.assert_array_equal(ds.attention.sel(layer=0).values,
                                      batch["decoder/0/cross_attention"])
        assert ds.mask.shape == (2, 2, 5) and bool(ds.mask.all())
        assert a.to_xarray("encoder").sizes["query"] == 5


def test_xarray_query_segments_count_the_kept_rows(tmp_path) -> None:
    pytest.importorskip("xarray")
    pytest.importorskip("dask")
    rng = np.random.default_rng(4)
    path = tmp_path / "x.zarr"
    rows = [1, 2, 5]  # text = 0..1, traj = 2..5: one kept text row, two kept traj rows
    full = _softmax(rng, (2, 2, 6, 5))
    enc = _softmax(rng, (2, 2, 5, 5))
    with ArchiveWriter.create(path, LAYOUT, dtype="float32", query_rows={"decoder": rows}) as w:
        w.append({"decoder/0/cross_attention": full[:, :, rows], "encoder/0/self_attention": enc})
    with open_archive(path) as a:
        da = a.to_xarray("decoder").attention.sel(layer=0)
        segs = json.loads(da.attrs["query_segments"])
        assert segs == [["text", 0, 1], ["traj", 1, 3]]
        for seg, start, stop in segs:
            part = da.isel(query=slice(start, stop))
            assert set(part["query_segment"].values) == {seg}
            pos = part["query"].values  # the original positions, inside the segment
            orig = LAYOUT.decoder.segment(seg)
            assert len(pos) and ((pos >= orig.start) & (pos < orig.stop)).all()
            np.testing.assert_array_equal(part.values, full[:, :, pos])
        assert json.loads(da.attrs["key_segments"]) == [["a", 0, 3], ["b", 3, 5]]
        enc_segs = json.loads(a.to_xarray("encoder").attrs["query_segments"])
        assert enc_segs == [["a", 0, 3], ["b", 3, 5]]  # every row kept: the layout's positions
    with ArchiveWriter.create(tmp_path / "k.zarr", LAYOUT, query_rows={"decoder": [3, 4]}) as w:
        w.append({"decoder/0/cross_attention": full[:, :, [3, 4]]})
    with open_archive(tmp_path / "k.zarr") as a:  # a segment without a kept row is left out
        ds = a.to_xarray()
        assert json.loads(ds.attrs["query_segments"]) == [["traj", 0, 2]]

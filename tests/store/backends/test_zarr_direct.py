"""Zarr direct chunk writes: files zarr itself reads back bit-identically.

``ZarrBackend.write_many`` encodes whole chunks itself (numcodecs Zstd or raw bytes) and
writes them as chunk files for a ``LocalStore``; every test here compares against plain
``zarr.open_array(...)[...]`` and against the same writes made through zarr's own path.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr

from attnscope.errors import ArchiveCorruptError
from attnscope.store import ArchiveWriter, SideLayout, TokenLayout, open_archive, verify
from attnscope.store.backends import zarr_store as Z

from ..store_testlib import softmax

NAME = "encoder/0/self_attention"


def _lay(t: int) -> TokenLayout:
    return TokenLayout(encoder=SideLayout.from_lengths({"tok": t}))


def _data(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return rng.standard_normal(shape).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dt)


def _boxes(shape: tuple[int, ...], chunks: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """Whole chunks, a box ending mid-chunk, one starting mid-chunk, and inner-dim boxes."""
    n = shape[0]
    full = tuple(slice(0, d) for d in shape[1:])
    a = min(2 * chunks[0], n - 1)
    boxes = [
        (slice(0, a),) + full,  # whole chunks (edge chunks on inner dims)
        (slice(a, n - 1),) + full,  # ends inside the last chunk (may be empty)
        (slice(n - 1, n),) + full,  # the last sample: merged into the stored chunk
    ]
    if len(shape) > 1 and shape[1] > 1:
        inner = (slice(1, 2),) + tuple(slice(0, d) for d in shape[2:])
        boxes.append((slice(1, n),) + inner)  # a partial box across every sample chunk
    return boxes


def _write(path: str, shape, chunks, dtype, compressor, boxes, datas, *, direct: bool):
    b = Z.ZarrBackend(path, "w")
    try:
        h = b.create_array(
            "a/x",
            shape,
            chunks,
            np.dtype(dtype),
            dims=tuple("abcd"[: len(shape)]),
            compressor=compressor,
        )
        g = b.create_array(
            "a/y",
            shape,
            chunks,
            np.dtype(dtype),
            dims=tuple("abcd"[: len(shape)]),
            compressor=compressor,
        )
        if not direct:
            h._direct = g._direct = None
        for sel, d in zip(boxes, datas):
            b.write_many([(h, sel, d), (g, sel, d[::-1].copy() if d.shape[0] > 1 else d)])
        return h._direct, g._direct
    finally:
        b.close()


CASES = [
    # shape, chunks, dtype
    ((130, 8, 29, 29), (64, 8, 29, 29), "float16"),  # guide model, several samples/chunk
    ((5, 2, 10, 7), (2, 1, 4, 7), "float32"),  # edge chunks on dims 0 and 2
    ((6, 3, 9, 8), (1, 1, 9, 8), "uint16"),  # bfloat16 bits
    ((7, 2, 5, 3), (4, 2, 5, 3), "int16"),  # top-k indices
    ((7, 2, 5, 3), (3, 2, 2, 3), "int32"),
    ((9, 2, 5), (4, 2, 5), "float32"),  # sparse residual
    ((300,), (128,), "int64"),  # sample ids
]


@pytest.mark.parametrize("compressor", ["zstd", "none", "blosc-lz4", "blosc-zstd"])
@pytest.mark.parametrize("shape,chunks,dtype", CASES)
def test_direct_writes_read_back_identically(tmp_path, rng, shape, chunks, dtype, compressor):
    boxes = _boxes(shape, chunks)
    datas = [_data(rng, tuple(s.stop - s.start for s in sel), dtype) for sel in boxes]
    want = np.zeros(shape, dtype)
    for sel, d in zip(boxes, datas):
        want[sel] = d
    direct = str(tmp_path / "direct.zarr")
    plain = str(tmp_path / "plain.zarr")
    plans = _write(direct, shape, chunks, dtype, compressor, boxes, datas, direct=True)
    _write(plain, shape, chunks, dtype, compressor, boxes, datas, direct=False)
    # The direct path is taken exactly for the codecs it implements.
    assert all((p is not None) == (compressor in ("zstd", "none")) for p in plans)
    for arr in ("a/x", "a/y"):
        got = zarr.open_array(os.path.join(direct, arr), mode="r")[...]
        ref = zarr.open_array(os.path.join(plain, arr), mode="r")[...]
        assert got.dtype == np.dtype(dtype)
        assert got.tobytes() == ref.tobytes()
        if arr == "a/x":
            assert got.tobytes() == want.tobytes()

    # The same chunk files exist on both sides (every chunk is written) and no temp files.
    def files(root: str) -> set[str]:
        return {
            os.path.relpath(os.path.join(r, f), root)
            for r, _d, fs in os.walk(root)
            for f in fs
            if not f.endswith(".json")
        }

    assert files(direct) == files(plain)
    assert not any(f.endswith(".partial") for f in files(direct))


def test_direct_zstd_blob_matches_zarr_codec_config(tmp_path, rng):
    """The blob is a zstd frame with the level the array metadata names, then its crc32c."""
    import google_crc32c
    import numcodecs

    path = str(tmp_path / "z.zarr")
    b = Z.ZarrBackend(path, "w")
    h = b.create_array("x", (4, 3, 5), (2, 3, 5), np.dtype("float16"), dims=("a", "b", "c"))
    md = zarr.open_array(os.path.join(path, "x"), mode="r").metadata.to_dict()
    assert [c["name"] for c in md["codecs"]] == ["bytes", "zstd", "crc32c"]
    assert md["codecs"][0]["configuration"] == {"endian": "little"}
    conf = md["codecs"][1]["configuration"]
    assert h._direct.codec.get_config() == numcodecs.Zstd(**conf).get_config()
    x = _data(rng, (4, 3, 5), "float16")
    b.write_many([(h, (slice(0, 4), slice(0, 3), slice(0, 5)), x)])
    b.close()
    raw = open(os.path.join(path, "x", "c", "1", "0", "0"), "rb").read()
    assert raw[-4:] == google_crc32c.value(raw[:-4]).to_bytes(4, "little")
    got = np.frombuffer(numcodecs.Zstd().decode(raw[:-4]), np.float16).reshape(2, 3, 5)
    np.testing.assert_array_equal(got, x[2:])


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_zip_store_uses_zarr_path(tmp_path, rng):
    path = str(tmp_path / "run.zarr.zip")
    x = softmax(rng, (5, 2, 6, 6)).astype(np.float16)
    with ArchiveWriter.create(path, _lay(6)) as w:
        w.append({NAME: x[:3]})
        assert w._nodes[NAME].handles[""]._direct is None
        w.append({NAME: x[3:]})
    with open_archive(path) as a:
        np.testing.assert_array_equal(a[NAME][:], x)


@pytest.mark.parametrize("compressor", ["zstd", "none", "blosc-lz4"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_archive_dense_roundtrip_resume_and_plain_zarr(tmp_path, rng, compressor, dtype):
    path = str(tmp_path / "run.zarr")
    sizes = [3, 5, 2, 8, 1]
    xs = [softmax(rng, (b, 2, 16, 16)) for b in sizes]
    ids = [np.arange(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]
    kw = {"compressor": compressor, "chunk_samples": 4, "dtype": dtype}
    with ArchiveWriter.create(path, _lay(16), **kw) as w:
        for x, i in zip(xs[:3], ids[:3]):
            w.append({NAME: x}, sample_ids={"step": i, "zero": np.zeros_like(i)})
    with ArchiveWriter.open(path) as w:  # first append merges into the stored chunk
        for x, i in zip(xs[3:], ids[3:]):
            w.append({NAME: x}, sample_ids={"step": i, "zero": np.zeros_like(i)})
        handle = w._nodes[NAME].handles[""]
        assert (handle._direct is not None) == (compressor != "blosc-lz4")
        assert all(h._direct is not None for h in w._id_handles.values())
    n = sum(sizes)
    with open_archive(path) as a:
        got = a[NAME][:]
        stored = zarr.open_array(os.path.join(path, *NAME.split("/")), mode="r")[:n]
        if dtype == "bfloat16":
            assert stored.dtype == np.uint16
        else:
            np.testing.assert_array_equal(stored, got)
        np.testing.assert_allclose(got, np.concatenate(xs), atol=1e-2 if dtype != "float32" else 0)
        step = zarr.open_array(os.path.join(path, "_sample_ids", "step"), mode="r")[:n]
        np.testing.assert_array_equal(step, np.arange(n))
    rep = verify(path)
    assert rep.ok, rep.problems


def test_archive_sparse_roundtrip_plain_zarr(tmp_path, rng):
    path = str(tmp_path / "run.zarr")
    xs = [softmax(rng, (b, 2, 9, 9)) for b in (3, 4)]
    with ArchiveWriter.create(path, _lay(9), sparse_topk=3, dtype="float32") as w:
        for x in xs:
            w.append({NAME: x})
    with open_archive(path) as a:
        v, i, r = a[NAME].topk_arrays(slice(None))
    base = os.path.join(path, *NAME.split("/"))
    np.testing.assert_array_equal(zarr.open_array(os.path.join(base, "values"), mode="r")[:7], v)
    np.testing.assert_array_equal(zarr.open_array(os.path.join(base, "indices"), mode="r")[:7], i)
    np.testing.assert_array_equal(zarr.open_array(os.path.join(base, "residual"), mode="r")[:7], r)
    assert i.dtype == np.int16 and r.dtype == np.float32
    assert verify(path).ok


def test_verify_detects_deleted_direct_chunk(tmp_path, rng):
    path = str(tmp_path / "run.zarr")
    x = softmax(rng, (6, 2, 8, 8)).astype(np.float16)
    with ArchiveWriter.create(path, _lay(8), chunk_samples=2) as w:
        w.append({NAME: x})
        assert w._nodes[NAME].handles[""]._direct is not None
    assert verify(path).ok
    os.remove(os.path.join(path, *NAME.split("/"), "c", "1", "0", "0", "0"))
    rep = verify(path)
    assert not rep.ok
    assert f"{NAME}: 1 chunk(s) missing" in rep.problems[0]


def test_all_zero_chunk_is_written_and_verifies(tmp_path):
    """An all-fill chunk is stored anyway: verify's "missing chunk = damage" still holds."""
    path = str(tmp_path / "run.zarr")
    b = Z.ZarrBackend(path, "w")
    h = b.create_array("x", (4, 3), (2, 3), np.dtype("int32"), dims=("a", "b"))
    b.write_many([(h, (slice(0, 4), slice(0, 3)), np.zeros((4, 3), np.int32))])
    b.close()
    assert os.path.exists(os.path.join(path, "x", "c", "0", "0"))
    assert os.path.exists(os.path.join(path, "x", "c", "1", "0"))
    np.testing.assert_array_equal(zarr.open_array(os.path.join(path, "x"))[:], 0)


def test_corrupt_chunk_under_partial_write_raises(tmp_path):
    from attnscope.errors import ArchiveCorruptError

    path = str(tmp_path / "run.zarr")
    b = Z.ZarrBackend(path, "w")
    h = b.create_array("x", (4, 3), (2, 3), np.dtype("int32"), dims=("a", "b"))
    b.write_many([(h, (slice(0, 4), slice(0, 3)), np.ones((4, 3), np.int32))])
    with open(os.path.join(path, "x", "c", "0", "0"), "wb") as fh:
        fh.write(b"garbage")
    with pytest.raises(ArchiveCorruptError, match="does not decode"):
        b.write_many([(h, (slice(1, 2), slice(0, 3)), np.zeros((1, 3), np.int32))])
    b.close()


def test_single_thread_pool_fallback(tmp_path, rng, monkeypatch):
    monkeypatch.setattr(Z, "ENCODE_THREADS", 1)
    path = str(tmp_path / "run.zarr")
    x = softmax(rng, (7, 2, 8, 8)).astype(np.float16)
    with ArchiveWriter.create(path, _lay(8), chunk_samples=4) as w:
        w.append({NAME: x[:5]})
        w.append({NAME: x[5:]})
    with open_archive(path) as a:
        np.testing.assert_array_equal(a[NAME][:], x)


@pytest.mark.parametrize("compressor", ["zstd", "blosc-lz4"])
def test_all_zero_chunk_after_resume_is_stored(tmp_path, compressor):
    """top-k = all keys: the residual is all zero; resumed writers must still store it."""
    path = str(tmp_path / "run.zarr")
    x = np.full((2, 1, 2, 2), 0.5, np.float32)
    kw = {"sparse_topk": 2, "dtype": "float32", "chunk_samples": 2, "compressor": compressor}
    with ArchiveWriter.create(path, _lay(2), **kw) as w:
        w.append({NAME: x})
    with ArchiveWriter.open(path) as w:
        w.append({NAME: x})
    rep = verify(path)
    assert rep.ok, rep.problems


def test_archive_written_before_checksums_still_reads(tmp_path, rng, monkeypatch):
    """Zarr archives from before the crc32c codec (bytes + zstd only) read and resume."""
    path = str(tmp_path / "old.zarr")
    x = softmax(rng, (6, 2, 8, 8)).astype(np.float16)
    orig = Z._codecs
    with monkeypatch.context() as m:
        m.setattr(Z, "_codecs", lambda *a: orig(*a)[:-1])  # no Crc32cCodec
        with ArchiveWriter.create(path, _lay(8)) as w:
            w.append({NAME: x[:4]})
    md = zarr.open_array(os.path.join(path, NAME), mode="r").metadata.to_dict()
    assert [c["name"] for c in md["codecs"]] == ["bytes", "zstd"]
    with ArchiveWriter.open(path) as w:
        assert w._nodes[NAME].handles[""]._direct.crc is False
        w.append({NAME: x[4:]})
    with open_archive(path) as a:
        np.testing.assert_allclose(a[NAME][...], x, atol=1e-3)
    assert verify(path).ok


def test_small_read_checks_its_chunks_without_listing_the_array(tmp_path, rng):
    path = str(tmp_path / "s.zarr")
    x = softmax(rng, (80, 2, 8, 8)).astype(np.float16)  # 80 chunks > Z.SMALL_READ_CHUNKS
    with ArchiveWriter.create(path, _lay(8), chunk_samples=1) as w:
        w.append({NAME: x})
    os.remove(os.path.join(path, *NAME.split("/"), "c", "4", "0", "0", "0"))
    with open_archive(path) as a:
        arr = a[NAME]
        np.testing.assert_array_equal(arr[1, 0], x[1, 0])  # its own chunk is there
        handle = arr._parts[""]
        assert handle._stored is None  # no listing for a one-chunk read
        with pytest.raises(ArchiveCorruptError, match=r"chunk \(4, 0, 0, 0\) is missing"):
            arr[4]
        with pytest.raises(ArchiveCorruptError, match=r"chunk \(4, 0, 0, 0\) is missing"):
            arr[...]  # large enough to list
        assert handle._stored is not None

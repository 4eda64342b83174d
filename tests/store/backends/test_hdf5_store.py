"""store.backends.hdf5_store: files other tools read (h5py + hdf5plugin); old files still read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attnscope.store import ArchiveWriter, open_archive, verify

from ..store_testlib import make_batch

NAME = "decoder/0/cross_attention"


@pytest.mark.parametrize("compressor", ["zstd", "none", "blosc-zstd", "blosc-lz4"])
def test_plain_h5py_with_hdf5plugin_reads_what_attnscope_reads(tmp_path, layout, rng, compressor):
    import h5py
    import hdf5plugin

    path = str(tmp_path / "x.h5")
    with ArchiveWriter.create(path, layout, compressor=compressor) as w:
        w.append(make_batch(rng, 3, layers=2))
    with open_archive(path) as a:
        ours = {n: a[n][...] for n in a.arrays}
        n = a.n_samples
    with h5py.File(path, "r") as f:  # what any h5py user does after `import hdf5plugin`
        for name, want in ours.items():
            ds = f[name]
            assert ds.fletcher32
            if compressor == "zstd":
                assert str(hdf5plugin.ZSTD_ID) in ds._filters
            np.testing.assert_array_equal(ds[:n], want)
            assert json.loads(ds.attrs["dimension_names"]) == ["sample", "head", "query", "key"]


def _old_style(path: str, compressor: str) -> None:
    """Rewrite a fresh archive the way attnscope wrote HDF5 before Fletcher32: datasets
    declaring the filter id only, chunks encoded by numcodecs and written directly, an
    ``attnscope_codec`` attribute, and root metadata without the array list."""
    import h5py
    import numcodecs

    if compressor == "zstd":
        codec, kw = numcodecs.Zstd(level=1), {"compression": 32015, "compression_opts": (1,)}
    else:
        codec = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=1)
        kw = {"compression": 32001, "compression_opts": (2, 2, 0, 0, 5, 1, 1)}
    with h5py.File(path, "r+") as f:
        meta = json.loads(f.attrs["attnscope"])
        for key in ("arrays", "batch_size"):
            meta.pop(key)
        f.attrs["attnscope"] = json.dumps(meta)
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        for name in names:
            if name.startswith("_commits"):
                continue
            old = f[name]
            data, attrs = old[...], dict(old.attrs)
            shape, chunks, dtype = old.shape, old.chunks, old.dtype
            del f[name]
            ds = f.create_dataset(
                name,
                shape=shape,
                chunks=chunks,
                dtype=dtype,
                maxshape=(None, *shape[1:]),
                fillvalue=0,
                **kw,
            )
            for k, v in attrs.items():
                ds.attrs[k] = v
            ds.attrs["attnscope_codec"] = compressor
            for i in range(0, shape[0], chunks[0]):
                if i >= 3:  # samples past the committed ones were never written
                    break
                block = np.ascontiguousarray(data[i : i + chunks[0]])
                offset = (i,) + (0,) * (len(shape) - 1)
                ds.id.write_direct_chunk(offset, bytes(codec.encode(block)), 0)


@pytest.mark.parametrize("compressor", ["zstd", "blosc-lz4"])
def test_archive_written_before_checksums_still_reads_and_resumes(
    tmp_path, layout, rng, compressor
):
    path = str(tmp_path / "old.h5")
    first = make_batch(rng, 3, layers=1)
    with ArchiveWriter.create(path, layout, compressor=compressor) as w:
        w.append(first)
    with open_archive(path) as a:
        want = {n: a[n][...] for n in a.arrays}
    _old_style(path, compressor)
    with open_archive(path) as a:
        assert a.missing_arrays() == []
        for n, x in want.items():
            np.testing.assert_array_equal(a[n][...], x)
    rep = verify(path)
    assert rep.ok, rep.problems
    assert any("array list not recorded" in note for note in rep.notes)
    with ArchiveWriter.open(path) as w:
        w.append(make_batch(rng, 2, layers=1))
    with open_archive(path) as a:
        assert a.n_samples == 5
        np.testing.assert_array_equal(a[NAME][:3], want[NAME])
    assert verify(path).ok


def test_side_arrays_shared_by_batches_carry_no_fletcher32(tmp_path) -> None:
    """A torn rewrite of a multi-sample chunk by the next batch must not make the committed
    samples in that chunk unreadable (it would, with a whole-chunk checksum)."""
    import h5py

    from attnscope.store import SideLayout, TokenLayout

    lay = TokenLayout(encoder=SideLayout.from_lengths({"text": 4}))
    name = "encoder/0/self_attention"
    p = str(tmp_path / "a.h5")
    with ArchiveWriter.create(p, lay, max_lengths={"encoder": 4}) as w:
        w.append({name: np.full((4, 1, 4, 4), 0.25, np.float32)},
                 tokens={"encoder": {"labels": [["a"] * 4] * 4, "ids": np.ones((4, 4), int)}},
                 sample_ids={"step": np.arange(4)})
    with h5py.File(p, "r") as f:
        assert f[name].fletcher32 and f[name].chunks[0] == 1  # attention keeps its checksum
        ds = f["_tokens/encoder/mask"]
        assert ds.chunks[0] > 1 and not ds.fletcher32
        for sub in ("ids", "label_spans", "labels/main"):
            assert not f[f"_tokens/encoder/{sub}"].fletcher32
        assert not f["_sample_ids/step"].fletcher32
        off = ds.id.get_chunk_info(0).byte_offset
    raw = bytearray(open(p, "rb").read())
    raw[off + 100 * 4] ^= 1  # uncommitted sample 100 of the shared chunk, torn
    open(p, "wb").write(raw)
    with open_archive(p) as a:
        assert a.n_samples == 4
        assert a.masks("encoder").all()


def test_append_open_that_writes_nothing_leaves_the_file_byte_for_byte(tmp_path, layout, rng):
    from attnscope.store.backends.hdf5_store import HDF5Backend

    path = tmp_path / "run.h5"
    with ArchiveWriter.create(path, layout) as w:
        w.append(make_batch(rng, 2, layers=1))
    with open(path, "r+b") as fh:  # the write flag a killed writer leaves in the superblock
        fh.seek(20)
        fh.write(b"\x01")
    before = path.read_bytes()
    ArchiveWriter.open(path).close()  # e.g. a resume refused once the writer is open
    HDF5Backend(str(path), "a").close()
    assert path.read_bytes() == before
    with ArchiveWriter.open(path) as w:  # a real append still writes
        w.append(make_batch(rng, 1, layers=1))
    assert verify(path).n_samples == 3


def test_a_failed_write_abandons_the_file_at_its_last_commit(tmp_path, layout, rng):
    import errno

    from attnscope.store.backends.hdf5_store import HDF5Backend

    path = tmp_path / "run.h5"
    w = ArchiveWriter.create(path, layout)
    w.append(make_batch(rng, 2, layers=1))
    backend = w._backend
    assert isinstance(backend, HDF5Backend)
    err = OSError(errno.ENOSPC, "No space left on device", str(path))
    with pytest.raises(OSError) as e, backend.writing():
        raise RuntimeError(f"Unable to flush file (file write failed: errno = 28, {err})")
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(OSError, match="No space left"):  # every later write refused
        w.append(make_batch(rng, 2, layers=1))
    with pytest.raises(OSError, match="No space left"):
        w.close()  # the final flush reports it too; the file is closed all the same
    rep = verify(path)
    assert rep.ok and rep.n_samples == 2

"""Trust in reads (both formats): a committed chunk that is missing or damaged raises
ArchiveCorruptError on every reader path, never reads back as zeros or wrong numbers."""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import numpy as np
import pytest

from attnscope.errors import ArchiveCorruptError, ArchiveError, ConfigError
from attnscope.store import (
    ArchiveWriter,
    check_structure,
    info,
    open_archive,
    parse_array_name,
    verify,
)
from attnscope.store.integrity import structure_problems

from .store_testlib import make_batch

NAME = "decoder/0/cross_attention"


@pytest.fixture
def five(path, layout, rng):
    """An archive of 5 samples in two batches (HDF5 then holds room for 6)."""
    with ArchiveWriter.create(path, layout) as w:
        w.append(make_batch(rng, 3, layers=1))
        w.append(make_batch(rng, 2, layers=1))
    return path


def _edit_commit(path: str, fmt: str, n: int) -> None:
    if fmt == "zarr":
        p = os.path.join(path, "_commits", "main", "zarr.json")
        doc = json.load(open(p))
        doc["attributes"]["attnscope"].update(committed=n, stop=n)
        json.dump(doc, open(p, "w"))
    else:
        import h5py

        with h5py.File(path, "r+") as f:
            f["_commits/main"][1:3] = [n, n]  # start, stop, committed, ...: stop and count


def _chunk_location(path: str, fmt: str, name: str) -> tuple[str, int, int]:
    """(file, byte offset, size) of the first chunk of array ``name``."""
    if fmt == "zarr":
        d = os.path.join(path, *name.split("/"), "c")
        while os.path.isdir(d):
            d = os.path.join(d, sorted(os.listdir(d))[0])
        return d, 0, os.path.getsize(d)
    import h5py

    with h5py.File(path, "r") as f:
        ci = f[name].id.get_chunk_info(0)
        return path, ci.byte_offset, ci.size


def _flip_byte(path: str, fmt: str, name: str) -> None:
    file, off, size = _chunk_location(path, fmt, name)
    with open(file, "r+b") as fh:
        fh.seek(off + size // 2)
        b = fh.read(1)
        fh.seek(off + size // 2)
        fh.write(bytes([b[0] ^ 0x10]))


def _every_reader_path(path: str, name: str = NAME) -> list[str]:
    """Run each reader path; return the messages of the ArchiveCorruptErrors raised."""
    msgs = []
    with open_archive(path) as a:
        arr = a[name]
        for read in (
            lambda: arr[...],
            lambda: [b for _s, b in arr.iter_blocks()],
            lambda: np.asarray(arr),
            lambda: a.to_dask(name).compute(),
            lambda: a.to_xarray(*parse_array_name(name)[::2]).attention.values,
        ):
            with pytest.raises(ArchiveCorruptError) as e:
                read()
            msgs.append(str(e.value))
    return msgs


def test_missing_committed_chunk_raises_on_every_reader_path(five, fmt):
    pytest.importorskip("dask")
    pytest.importorskip("xarray")
    if fmt == "zarr":
        d = os.path.join(five, *NAME.split("/"), "c")
        os.remove(os.path.join(d, *sorted(os.listdir(d))[:1], "0", "0", "0"))
    else:
        _edit_commit(five, fmt, 6)  # sample 5 was never written: its chunk is unallocated
    for msg in _every_reader_path(five):
        assert NAME in msg and "is missing although its samples are committed" in msg
        assert "\n" not in msg
    rep = verify(five)
    assert not rep.ok and "chunk(s) missing" in rep.problems[0]


def test_flipped_byte_fails_its_checksum_on_every_reader_path(five, fmt):
    pytest.importorskip("dask")
    pytest.importorskip("xarray")
    _flip_byte(five, fmt, NAME)
    for msg in _every_reader_path(five):
        assert f"array {NAME!r} chunk (0, 0, 0, 0) does not decode" in msg
        assert "\n" not in msg
    rep = verify(five)
    assert not rep.ok and rep.problems[0].startswith(f"{NAME}: data unreadable")


def test_flipped_byte_in_uncompressed_chunk_is_caught(path, layout, rng, fmt):
    with ArchiveWriter.create(path, layout, compressor="none") as w:
        w.append(make_batch(rng, 2, layers=1))
    _flip_byte(path, fmt, NAME)
    with open_archive(path) as a, pytest.raises(ArchiveCorruptError, match="does not decode"):
        a[NAME][0]


def test_sparse_topk_arrays_refuse_damaged_chunks(path, layout, rng, fmt):
    with ArchiveWriter.create(path, layout, sparse_topk=2) as w:
        w.append(make_batch(rng, 3, layers=1))
    _flip_byte(path, fmt, f"{NAME}/values")
    with open_archive(path) as a:
        with pytest.raises(ArchiveCorruptError, match="values' chunk"):
            a[NAME].topk_arrays()
        with pytest.raises(ArchiveCorruptError):
            a[NAME][0]


def test_hdf5_commit_record_edited_upward_is_refused(tmp_path, layout, rng):
    # HDF5 keeps one sample per chunk, so every claimed sample needs its own chunk. (Zarr
    # with several samples per chunk: see test_verify_detects_lost_commit_coverage.)
    path = str(tmp_path / "up.h5")
    with ArchiveWriter.create(path, layout) as w:
        w.append(make_batch(rng, 3, layers=1))
        w.append(make_batch(rng, 2, layers=1))
    _edit_commit(path, "hdf5", 40)
    with open_archive(path) as a:
        assert a.n_samples == 40
        with pytest.raises(ArchiveCorruptError, match="40 are committed"):
            a[NAME]
    rep = verify(path)
    assert not rep.ok and "40 are committed" in rep.problems[0]


def test_deleted_array_fails_verify_and_reads(five, fmt):
    if fmt == "zarr":
        shutil.rmtree(os.path.join(five, *NAME.split("/")))
    else:
        import h5py

        with h5py.File(five, "r+") as f:
            del f[NAME]
    rep = verify(five)
    assert not rep.ok
    assert f"{NAME}: listed in the root metadata but missing from storage" in rep.problems[0]
    with open_archive(five) as a:
        assert NAME not in a.arrays and a.missing_arrays() == [NAME]
        with pytest.raises(ArchiveCorruptError, match="missing from storage"):
            a[NAME]


@pytest.mark.parametrize("tol", [math.nan, math.inf, -1.0])
def test_verify_refuses_a_tolerance_that_passes_everything(five, tol):
    with pytest.raises(ConfigError, match="tolerance must be a finite number >= 0"):
        verify(five, tolerance=tol)


def test_verify_with_zero_tolerance_still_checks_rows(path, layout, rng):
    w = make_batch(rng, 2, layers=1)
    w["encoder/0/self_attention"][0, 0, 0] *= 3  # a row summing to 3
    with ArchiveWriter.create(path, layout, validate=False, normalized=True) as wr:
        wr.append(w)
    rep = verify(path, tolerance=0.5)
    assert not rep.ok and re.search(r"row sums to (3|2\.99)", rep.problems[0])


def _junk_array_metadata(path: str, fmt: str) -> None:
    if fmt == "zarr":
        with open(os.path.join(path, *NAME.split("/"), "zarr.json"), "w") as fh:
            fh.write("{not json")
    else:
        import h5py

        with h5py.File(path, "r+") as f:
            f[NAME].attrs["attnscope"] = "{not json"


def _read_all(path: str) -> None:
    with open_archive(path) as a:
        for n in a.arrays:
            a[n][...]


def _truncate(path: str, fmt: str, size: int) -> None:
    target = path if fmt == "hdf5" else os.path.join(path, "zarr.json")
    with open(target, "r+b") as fh:
        fh.truncate(size)


@pytest.mark.parametrize(
    "damage",
    ["junk array metadata", "empty file", "header only", "half the file"],
)
def test_damaged_archive_is_one_line_archive_corrupt_error(five, fmt, damage):
    if damage == "junk array metadata":
        _junk_array_metadata(five, fmt)
    else:
        size = {"empty file": 0, "header only": 96}.get(damage)
        if size is None:
            size = os.path.getsize(five if fmt == "hdf5" else os.path.join(five, "zarr.json")) // 2
        _truncate(five, fmt, size)
    for call in (
        lambda: _read_all(five),
        lambda: info(five),
        lambda: verify(five),
        lambda: ArchiveWriter.open(five).close(),
    ):
        try:
            rep = call()
        except ArchiveCorruptError as e:
            assert "\n" not in str(e) and repr(five) in str(e) or NAME in str(e)
        else:  # verify may open and report the damage instead
            assert hasattr(rep, "ok") and not rep.ok, damage
    # The refused resume left no lock behind.
    assert not os.path.exists(five + ".attnscope-locks")


def test_hdf5_open_in_h5py_by_the_same_process_reads(tmp_path, layout, rng):
    import h5py

    path = str(tmp_path / "held.h5")
    with ArchiveWriter.create(path, layout) as w:
        w.append(make_batch(rng, 2, layers=1))
    with h5py.File(path, "r") as held:  # default locking flags, unlike attnscope's
        with open_archive(path) as a:
            assert a[NAME][...].shape[0] == 2
        assert held.attrs["attnscope"]
        with pytest.raises(ArchiveError, match="already open in this process"):
            ArchiveWriter.open(path)
    with ArchiveWriter.open(path) as w:  # closed again: resumes
        assert w.committed == 2


# --- the structural check of the data commands (store/integrity.py) ----------------------


def _set_commit(path: str, fmt: str, start: int, stop: int, n: int) -> None:
    if fmt == "zarr":
        p = os.path.join(path, "_commits", "main", "zarr.json")
        doc = json.load(open(p))
        doc["attributes"]["attnscope"].update(start=start, committed=n, stop=stop)
        json.dump(doc, open(p, "w"))
    else:
        import h5py

        with h5py.File(path, "r+") as f:
            f["_commits/main"][:3] = [start, stop, n]  # start, stop, committed, ...


def _drop_array(path: str, fmt: str, name: str) -> None:
    if fmt == "zarr":
        shutil.rmtree(os.path.join(path, *name.split("/")))
    else:
        import h5py

        with h5py.File(path, "r+") as f:
            del f[name]


def _drop_last_chunk(path: str, fmt: str, name: str) -> None:
    """Remove the chunk holding the last committed sample (sample 4) of ``name``."""
    if fmt == "zarr":
        d = os.path.join(path, *name.split("/"), "c")
        with open_archive(path) as a:
            cs = a[name].chunks[0]
        os.remove(os.path.join(d, str(4 // cs), "0", "0", "0"))
    else:  # HDF5 cannot delete a chunk: claim a sample whose chunk was never written
        _set_commit(path, fmt, 0, 6, 6)


DAMAGE = {
    "negative commit count": (
        lambda p, f: _set_commit(p, f, 0, 5, -3),
        "commit record 'main' is inconsistent: start=0 stop=5 committed=-3",
    ),
    "commit stop before start": (
        lambda p, f: _set_commit(p, f, 4, 2, 0),
        "commit record 'main' is inconsistent",
    ),
    "commit raised past the arrays": (
        lambda p, f: _set_commit(p, f, 0, 40, 40),
        "samples but 40 are committed",
    ),
    "deleted array": (
        lambda p, f: _drop_array(p, f, NAME),
        f"{NAME}: listed in the root metadata but missing from storage",
    ),
    "missing chunk inside the committed samples": (
        lambda p, f: _drop_last_chunk(p, f, NAME),
        "chunk(s) missing or truncated inside the committed samples",
    ),
}


@pytest.fixture
def five_ids(path, layout, rng):
    """Five samples in two batches, with per-sample ids."""
    with ArchiveWriter.create(path, layout) as w:
        for i, b in enumerate((3, 2)):
            ids = {"input_sha256_0": np.arange(b, dtype=np.uint64) + 10 * i}
            w.append(make_batch(rng, b, layers=1), sample_ids=ids)
    return path


@pytest.mark.parametrize("every_chunk", [True, False])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_check_structure_refuses_what_verify_rejects(five_ids, fmt, damage, every_chunk):
    break_it, expect = DAMAGE[damage]
    break_it(five_ids, fmt)
    rep = verify(five_ids, check_data=False)
    assert not rep.ok and any(expect in p for p in rep.problems), rep.problems
    with open_archive(five_ids) as a:
        got = structure_problems(a, every_chunk=every_chunk)
        assert got.problems and all("\n" not in p for p in got.problems)
        assert set(got.problems) <= set(rep.problems)  # verify reports the same lines
        with pytest.raises(ArchiveCorruptError) as e:
            check_structure(a, every_chunk=every_chunk)
    msg = str(e.value)
    assert "\n" not in msg and repr(five_ids) in msg and "attnscope verify" in msg


def test_check_structure_passes_an_intact_archive_reading_no_chunk(five_ids, fmt):
    with open_archive(five_ids) as a:
        before = a._backend.chunk_reads
        check_structure(a)
        assert not structure_problems(a).problems
        assert a._backend.chunk_reads == before  # listings and attributes only
    assert verify(five_ids).ok


def test_check_structure_refuses_a_ragged_archive_without_masks(path, layout, rng, fmt):
    with ArchiveWriter.create(path, layout, max_lengths={"encoder": 9}) as w:
        b = make_batch(rng, 2, layers=1)
        w.append(b, masks={"encoder": np.ones((2, 9), dtype=bool)})
    _drop_array(path, fmt, "_tokens/encoder/mask")
    with open_archive(path) as a, pytest.raises(ArchiveCorruptError, match="mask"):
        check_structure(a)


def test_a_chunk_missing_inside_is_left_to_the_read_when_not_every_chunk(tmp_path, layout, rng):
    path = str(tmp_path / "run.zarr")  # Zarr: one file per chunk, so one can be deleted
    with ArchiveWriter.create(path, layout, chunk_samples=1) as w:
        w.append(make_batch(rng, 3, layers=1))
    d = os.path.join(path, *NAME.split("/"), "c")
    os.remove(os.path.join(d, "1", "0", "0", "0"))  # sample 1 of 3
    with open_archive(path) as a:
        check_structure(a, every_chunk=False)  # one lookup per array: the last sample's
        with pytest.raises(ArchiveCorruptError, match="chunk\\(s\\) missing"):
            check_structure(a)
        with pytest.raises(ArchiveCorruptError, match="is missing although"):
            a[NAME][1]

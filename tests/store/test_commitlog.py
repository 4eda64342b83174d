"""The commit log (store/commitlog.py): every commit binds the regions it wrote, so damage
that checksums cannot see (a chunk moved, a count raised or lowered, side data or
attributes edited) is refused by ``verify`` and by the cheap record check; a killed
batch that rewrote a shared chunk is not damage."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from attnscope.errors import ArchiveCorruptError
from attnscope.store import ArchiveWriter, SideLayout, TokenLayout, open_archive
from attnscope.store.commitlog import check_records, verify_log
from attnscope.store.meta import open_backend
from attnscope.store.verify import verify

from .store_testlib import make_batch

NAME = "encoder/0/self_attention"


def _archive(path: str, layout: TokenLayout, rng, *, n=(3, 3, 2), **kw) -> str:
    with ArchiveWriter.create(path, layout, **kw) as w:
        for i, b in enumerate(n):
            w.append(make_batch(rng, b, layers=1), sample_ids={"k": np.arange(b) + 10 * i})
    return path


def _records(path: str, fmt: str) -> dict:
    b = open_backend(path, fmt, "r")
    try:
        return b.read_records()
    finally:
        b.close()


def _cheap_check(path: str, fmt: str) -> None:
    b = open_backend(path, fmt, "r")
    try:
        check_records(path, b)
    finally:
        b.close()


def _edit_record(path: str, fmt: str, **fields: int) -> None:
    if fmt == "zarr":
        p = os.path.join(path, "_commits", "main", "zarr.json")
        doc = json.load(open(p))
        doc["attributes"]["attnscope"].update(fields)
        json.dump(doc, open(p, "w"))
        return
    import h5py

    order = ("start", "stop", "committed", "batches", "since")
    with h5py.File(path, "r+") as f:
        for k, v in fields.items():
            f["_commits/main"][order.index(k)] = v


def test_every_commit_writes_one_document_and_the_chain_verifies(path, fmt, layout, rng):
    _archive(path, layout, rng)
    rec = _records(path, fmt)["main"]
    assert (rec["committed"], rec["batches"], rec["since"]) == (8, 3, 0)
    assert len(rec["chain"]) == 64
    rep = verify(path)
    assert rep.ok, rep.problems
    assert not any("no commit log" in n for n in rep.notes)


def test_resumed_writer_continues_the_chain(path, fmt, layout, rng):
    _archive(path, layout, rng, n=(3,))
    with ArchiveWriter.open(path) as w:
        w.append(make_batch(rng, 2, layers=1), sample_ids={"k": np.arange(2)})
    rec = _records(path, fmt)["main"]
    assert (rec["committed"], rec["batches"]) == (5, 2)
    assert verify(path).ok


@pytest.mark.parametrize("n", [6, 9])
def test_raised_commit_is_refused_by_the_cheap_check_and_verify(path, fmt, layout, rng, n):
    # 6: inside data an already stored chunk holds (Zarr); 9: past every chunk
    _archive(path, layout, rng, chunk_samples=4)
    _edit_record(path, fmt, committed=n, stop=n)
    with pytest.raises(ArchiveCorruptError, match="last commit ends at sample 8"):
        _cheap_check(path, fmt)
    assert not verify(path).ok


def test_lowered_commit_is_refused(path, fmt, layout, rng):
    _archive(path, layout, rng)
    _edit_record(path, fmt, committed=6, stop=6)
    with pytest.raises(ArchiveCorruptError, match="claims 6 samples"):
        _cheap_check(path, fmt)
    _edit_record(path, fmt, committed=6, stop=6, batches=2)  # consistent-looking lowering
    with pytest.raises(ArchiveCorruptError, match="hash chain"):
        _cheap_check(path, fmt)
    rep = verify(path)
    assert not rep.ok and any("hash chain" in p for p in rep.problems), rep.problems


def test_negative_count_is_refused(path, fmt, layout, rng):
    _archive(path, layout, rng)
    _edit_record(path, fmt, committed=-3)
    with pytest.raises(ArchiveCorruptError, match="-3"):
        _cheap_check(path, fmt)


def _swap_first_chunks(path: str, fmt: str, name: str) -> None:
    """Exchange the stored bytes of chunks (0, ...) and (1, ...) of ``name``: each is a
    valid chunk with a valid checksum, in the other's place."""
    if fmt == "zarr":
        c = os.path.join(path, *name.split("/"), "c")
        a, b = os.path.join(c, "0", "0", "0", "0"), os.path.join(c, "1", "0", "0", "0")
        os.rename(a, a + ".x")
        os.rename(b, a)
        os.rename(a + ".x", b)
        return
    import h5py

    with h5py.File(path, "r+") as f:
        ds = f[name]
        o0, o1 = (0,) * ds.ndim, (1,) + (0,) * (ds.ndim - 1)
        m0, d0 = ds.id.read_direct_chunk(o0)
        m1, d1 = ds.id.read_direct_chunk(o1)
        ds.id.write_direct_chunk(o0, d1, m1)
        ds.id.write_direct_chunk(o1, d0, m0)


def test_swapped_chunks_are_detected(path, fmt, layout, rng):
    _archive(path, layout, rng, chunk_samples=2)
    assert verify(path).ok
    _swap_first_chunks(path, fmt, NAME)
    with open_archive(path) as a:  # each chunk alone is valid; the read checks its place
        with pytest.raises(ArchiveCorruptError, match="differs from what commit 0"):
            a[NAME][0:2]
    rep = verify(path)
    assert not rep.ok
    assert any(NAME in p and "digest mismatch" in p for p in rep.problems), rep.problems


def test_edited_sample_ids_and_heads_attribute_are_detected(path, fmt, layout, rng):
    _archive(path, layout, rng)
    if fmt == "zarr":
        import zarr

        g = zarr.open_group(path, mode="r+")
        g["_sample_ids/k"][1] = 99
        attrs = dict(g[NAME].attrs["attnscope"])
        attrs["heads"] = [3, 2, 1, 0]
        g[NAME].attrs["attnscope"] = attrs
    else:
        import h5py

        with h5py.File(path, "r+") as f:
            f["_sample_ids/k"][1] = 99
            attrs = json.loads(f[NAME].attrs["attnscope"])
            attrs["heads"] = [3, 2, 1, 0]
            f[NAME].attrs["attnscope"] = json.dumps(attrs)
    rep = verify(path)
    assert any("_sample_ids/k" in p for p in rep.problems), rep.problems
    assert any(NAME in p and "attributes" in p for p in rep.problems), rep.problems


def test_flipped_mask_byte_of_a_ragged_archive_is_detected(path, fmt, rng):
    lay = TokenLayout(encoder=SideLayout.from_lengths({"text": 6}))
    w8 = rng.random((3, 2, 6, 6)).astype(np.float32)
    w8 /= w8.sum(-1, keepdims=True)
    with ArchiveWriter.create(path, lay, max_lengths={"encoder": 6}) as w:
        w.append({NAME: w8}, masks={"encoder": np.ones((3, 6), bool)})
    assert verify(path).ok
    mask = "_tokens/encoder/mask"
    if fmt == "zarr":
        import zarr

        zarr.open_group(path, mode="r+")[mask][1, 2] = 0
    else:
        import h5py

        with h5py.File(path, "r+") as f:
            f[mask][1, 2] = 0
    rep = verify(path)
    assert any(mask in p for p in rep.problems), rep.problems


def test_killed_batch_that_rewrote_a_shared_chunk_is_not_damage(path, fmt, layout, rng):
    """Chunks of 4 samples: the second batch rewrites chunk 0 (committed samples 0-2 plus
    its own), then dies before its commit; samples 0-2 are intact and verify agrees."""
    with ArchiveWriter.create(path, layout, chunk_samples=4) as w:
        w.append(make_batch(rng, 3, layers=1))
        w._backend.write_commit = lambda *a, **k: (_ for _ in ()).throw(OSError("killed"))
        with pytest.raises(OSError, match="killed"):
            w.append(make_batch(rng, 3, layers=1))
    with open_archive(path) as a:
        assert a.n_samples == 3
    rep = verify(path)
    assert rep.ok, rep.problems


def test_record_without_a_log_still_reads_and_resumes_with_one(tmp_path, layout, rng):
    """A record written before the log (no batches/chain): verify notes it; a resumed
    writer starts its log at the committed count."""
    path = str(tmp_path / "old.zarr")
    _archive(path, layout, rng, n=(3,))
    p = os.path.join(path, "_commits", "main", "zarr.json")
    doc = json.load(open(p))
    doc["attributes"]["attnscope"] = {"start": 0, "stop": 3, "committed": 3}
    json.dump(doc, open(p, "w"))
    shutil.rmtree(os.path.join(path, "_commits", "main", "00000000"))
    rep = verify(path)
    assert rep.ok and any("no commit log" in n for n in rep.notes)
    with ArchiveWriter.open(path) as w:
        w.append(make_batch(rng, 2, layers=1), sample_ids={"k": np.arange(2)})
    rec = _records(path, "zarr")["main"]
    assert (rec["since"], rec["batches"], rec["committed"]) == (3, 1, 5)
    assert verify(path).ok


def test_verify_log_reports_a_missing_array_region():
    rec = {"start": 0, "stop": 2, "committed": 2, "batches": 1, "since": 0}
    doc = {"v": 1, "rid": "main", "seq": 0, "start": 0, "stop": 2, "prev": "", "attrs": {},
           "regions": [["gone", [[0, 2]], "0" * 16]]}  # fmt: skip
    from attnscope.store.commitlog import chain_of

    rec["chain"] = chain_of(doc)

    def read_box(name, sel):
        raise KeyError(name)

    problems = verify_log("x", "main", rec, lambda r, s: doc, read_box, lambda n: {})
    assert problems and "gone [0:2]: cannot be read" in problems[0]


def test_deleted_main_record_is_refused(path, fmt, layout, rng):
    _archive(path, layout, rng)
    if fmt == "zarr":
        shutil.rmtree(os.path.join(path, "_commits", "main"))
    else:
        import h5py

        with h5py.File(path, "r+") as f:
            del f["_commits/main"]
    with pytest.raises(ArchiveCorruptError, match="'main' is missing"):
        _cheap_check(path, fmt)
    assert not verify(path).ok


def test_a_read_fetches_only_the_log_documents_of_its_samples(tmp_path, layout, rng, monkeypatch):
    """64 commits: reading samples 40-41 reads about log2(64) documents, not 64."""
    path = str(tmp_path / "many.zarr")
    with ArchiveWriter.create(path, layout, chunk_samples=1) as w:
        for _ in range(64):
            w.append(make_batch(rng, 1, layers=1))
    from attnscope.store.backends.zarr_store import ZarrBackend

    reads = []
    real = ZarrBackend.read_log
    def read_log(self, rid, seq):
        reads.append(seq)
        return real(self, rid, seq)

    monkeypatch.setattr(ZarrBackend, "read_log", read_log)
    with open_archive(path) as a:
        a[NAME][40:42]
    assert 0 < len(set(reads)) <= 9, reads  # binary search + the two documents read

"""Crash safety, concurrent writers and verify on damaged archives, for both formats."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from attnscope.errors import (
    ArchiveCorruptError,
    ArchiveLockedError,
    ArchiveNotFoundError,
    ConfigError,
)
from attnscope.store import ArchiveWriter, open_archive, verify

from .store_testlib import DEC, ENC, H, make_batch, softmax

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {here!r})
    from store_testlib import softmax
    from attnscope.store import ArchiveWriter, SideLayout, TokenLayout

    path, die_at = sys.argv[1], int(sys.argv[2])
    lay = TokenLayout(encoder=SideLayout.from_lengths({{"tok": 64}}))
    w = ArchiveWriter.create(path, lay, chunk_samples=4)
    b = 0
    if die_at >= 0:
        # Die exactly between a batch's data and its commit record: the torn batch.
        real = w._backend.write_commit
        def commit(*a, **k):
            if b == die_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        w._backend.write_commit = commit
    while True:
        x = softmax(np.random.default_rng(b), (6, 4, 64, 64))
        n = w.append({{"encoder/0/self_attention": x}}, sample_ids={{"batch": np.full(6, b)}})
        print(n, flush=True)
        b += 1
    """
)


def expected(n_batches: int) -> np.ndarray:
    return np.concatenate(
        [softmax(np.random.default_rng(b), (6, 4, 64, 64)) for b in range(n_batches)]
    )


def run_child(path: str, die_at: int) -> subprocess.Popen:
    code = CHILD.format(here=os.path.dirname(__file__))
    return subprocess.Popen(
        [sys.executable, "-c", code, path, str(die_at)], stdout=subprocess.PIPE, text=True
    )


def check_after_crash(path: str, min_batches: int) -> None:
    with open_archive(path) as a:
        n = a.n_samples
        assert n % 6 == 0 and n >= 6 * min_batches
        got = a["encoder/0/self_attention"][:].astype(np.float32)
        np.testing.assert_allclose(got, expected(n // 6), atol=1e-3)
        np.testing.assert_array_equal(a.sample_ids["batch"], np.repeat(np.arange(n // 6), 6))
    assert verify(path).ok
    # The dead writer's lock is stale; appending resumes right after the committed samples.
    with ArchiveWriter.open(path, mode="a") as w:
        assert w.committed == n
        x = softmax(np.random.default_rng(n // 6), (6, 4, 64, 64))
        assert (
            w.append({"encoder/0/self_attention": x}, sample_ids={"batch": np.full(6, n // 6)})
            == n + 6
        )
    with open_archive(path) as a:
        np.testing.assert_allclose(
            a["encoder/0/self_attention"][:].astype(np.float32), expected(n // 6 + 1), atol=1e-3
        )
    assert verify(path).ok


def test_kill_between_data_and_commit_hides_torn_batch(path):
    proc = run_child(path, die_at=3)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert out.split() == ["6", "12", "18"]
    check_after_crash(path, 3)


def test_sigkill_at_random_point_mid_run_keeps_committed(path):
    proc = run_child(path, die_at=-1)
    seen = 0
    for line in proc.stdout:  # type: ignore[union-attr]
        seen = int(line)
        if seen >= 30:
            break
    proc.send_signal(signal.SIGKILL)  # somewhere inside a later batch
    proc.wait(timeout=30)
    check_after_crash(path, seen // 6)


# -- concurrent writers ------------------------------------------------------------------


def test_disjoint_range_writers_write_concurrently(tmp_path, layout, rng):
    path = str(tmp_path / "multi.zarr")
    name = "encoder/0/self_attention"
    ArchiveWriter.create(
        path, layout, capacity=8, arrays={name: (H, ENC, ENC)}, chunk_samples=2
    ).close()
    data = softmax(rng, (8, H, ENC, ENC))
    w1 = ArchiveWriter.open(path, sample_range=(0, 4))
    w2 = ArchiveWriter.open(path, sample_range=(4, 8))
    with pytest.raises(ArchiveLockedError, match=r"holds samples \[0, 4\]"):
        ArchiveWriter.open(path, sample_range=(2, 6))
    with pytest.raises(ArchiveLockedError, match="whole archive"):
        ArchiveWriter.open(path)
    with pytest.raises(ConfigError, match="exceeds the archive capacity 8"):
        ArchiveWriter.open(path, sample_range=(8, 10))
    w2.append({name: data[4:6]})
    with open_archive(path) as a:
        assert a.n_samples == 0  # samples 4..5 exist but 0..3 do not yet
    w1.append({name: data[0:4]})
    with open_archive(path) as a:
        assert a.n_samples == 6
    w2.append({name: data[6:8]})
    w1.close()
    w2.close()
    with open_archive(path) as a:
        assert a.n_samples == 8
        np.testing.assert_allclose(a[name][:].astype(np.float32), data, atol=1e-3)
    assert verify(path).ok


def test_range_writer_must_fit_capacity_and_chunks(tmp_path, layout):
    path = str(tmp_path / "multi.zarr")
    name = "encoder/0/self_attention"
    ArchiveWriter.create(
        path, layout, capacity=8, arrays={name: (H, ENC, ENC)}, chunk_samples=4
    ).close()
    with pytest.raises(ConfigError, match="not aligned to the 4-sample chunks"):
        ArchiveWriter.open(path, sample_range=(2, 6))
    with pytest.raises(ConfigError, match="exceeds the archive capacity 8"):
        ArchiveWriter.open(path, sample_range=(4, 12))


def test_hdf5_refuses_range_writers(tmp_path, layout, rng):
    path = str(tmp_path / "x.h5")
    ArchiveWriter.create(path, layout).close()
    with pytest.raises(ConfigError, match="Zarr directory"):
        ArchiveWriter.open(path, sample_range=(0, 4))


# -- verify on damaged archives ----------------------------------------------------------


@pytest.fixture
def good(path, layout, rng):
    with ArchiveWriter.create(path, layout, chunk_samples=2) as w:
        w.append(make_batch(rng, 3, layers=1))
        w.append(make_batch(rng, 3, layers=1))
    assert verify(path).ok
    return path


def test_verify_missing_and_foreign(tmp_path, fmt):
    with pytest.raises(ArchiveNotFoundError):
        verify(str(tmp_path / "nope.zarr"))
    foreign = tmp_path / ("foreign.h5" if fmt == "hdf5" else "foreign.bin")
    foreign.write_bytes(b"not an archive at all" * 10)
    with pytest.raises(ArchiveCorruptError):
        verify(str(foreign))
    if fmt == "zarr":
        import zarr

        zarr.open_group(str(tmp_path / "other.zarr"), mode="w").create_array(
            "x", shape=(2,), dtype="i4"
        )
        with pytest.raises(ArchiveCorruptError, match="not an attnscope archive"):
            verify(str(tmp_path / "other.zarr"))
    else:
        import h5py

        with h5py.File(tmp_path / "other.h5", "w") as f:
            f["x"] = [1, 2]
        with pytest.raises(ArchiveCorruptError, match="not an attnscope archive"):
            verify(str(tmp_path / "other.h5"))


def test_verify_detects_deleted_chunk(good, fmt):
    if fmt == "zarr":
        os.remove(os.path.join(good, "decoder", "0", "cross_attention", "c", "1", "0", "0", "0"))
        with open_archive(good) as a:  # plain zarr would silently read zeros here
            with pytest.raises(ArchiveCorruptError, match=r"chunk \(1, 0, 0, 0\) is missing"):
                a["decoder/0/cross_attention"][2]
    else:
        import h5py

        # HDF5 cannot drop one chunk; recreate the dataset without chunk 1 instead.
        with h5py.File(good, "r+") as f:
            ds = f["decoder/0/cross_attention"]
            attrs = dict(ds.attrs)
            dcpl = ds.id.get_create_plist()
            cs = ds.chunks[0]  # one sample per chunk in HDF5: drop sample 2's chunk
            n_chunks = -(-ds.shape[0] // cs)
            keep = [
                (i, ds.id.read_direct_chunk((i * cs, 0, 0, 0)))
                for i in range(n_chunks)
                if not i * cs <= 2 < (i + 1) * cs
            ]
            shape, chunks = ds.shape, ds.chunks
            del f["decoder/0/cross_attention"]
            new = h5py.Dataset(
                h5py.h5d.create(
                    f["decoder/0"].id,
                    b"cross_attention",
                    h5py.h5t.py_create(np.float16),
                    h5py.h5s.create_simple(shape, (h5py.h5s.UNLIMITED,) + shape[1:]),
                    dcpl,
                )
            )
            for k, v in attrs.items():
                new.attrs[k] = v
            for i, (mask, raw) in keep:
                new.id.write_direct_chunk((i * cs, 0, 0, 0), raw, mask)
            del chunks
    rep = verify(good)
    assert not rep.ok
    assert "decoder/0/cross_attention: 1 chunk(s) missing" in rep.problems[0]
    assert "(samples 2.." in rep.summary()


def test_verify_detects_truncated_file(good, fmt):
    if fmt == "hdf5":
        size = os.path.getsize(good)
        with open(good, "r+b") as fh:
            fh.truncate(size // 2)
        try:
            rep = verify(good)
        except ArchiveCorruptError as e:
            assert "truncated" in str(e) or "HDF5" in str(e)
        else:
            assert not rep.ok and ("truncated" in rep.summary() or "unreadable" in rep.summary())
    else:
        chunk = os.path.join(good, "encoder", "0", "self_attention", "c", "0", "0", "0", "0")
        with open(chunk, "r+b") as fh:
            fh.truncate(10)
        rep = verify(good)
        assert not rep.ok and "encoder/0/self_attention: data unreadable" in rep.problems[0]


def test_verify_detects_edited_metadata(good, fmt):
    def edit(fn):
        if fmt == "zarr":
            p = os.path.join(good, "zarr.json")
            doc = json.load(open(p))
            doc["attributes"]["attnscope"] = fn(doc["attributes"]["attnscope"])
            json.dump(doc, open(p, "w"))
        else:
            import h5py

            with h5py.File(good, "r+") as f:
                f.attrs["attnscope"] = json.dumps(fn(json.loads(f.attrs["attnscope"])))

    def shrink_layout(meta):
        meta["layout"]["encoder"] = {"segments": [["text", 0, 7]]}
        return meta

    edit(shrink_layout)
    rep = verify(good)
    assert not rep.ok
    assert any("key length 9 != 7 tokens of the encoder layout" in p for p in rep.problems)

    def future(meta):
        meta["schema_version"] = 99
        return meta

    edit(future)
    with pytest.raises(ArchiveCorruptError, match="schema_version 99"):
        verify(good)


def test_verify_detects_bad_values_written_without_validation(path, layout):
    w = np.full((2, H, DEC, ENC), 1 / ENC, np.float32)
    w[1, 2, 3, 4] = np.nan
    with ArchiveWriter.create(path, layout, validate=False) as wr:
        wr.append({"decoder/0/cross_attention": w})
    rep = verify(path)  # rows are not checked, NaN still is
    assert not rep.ok
    assert rep.problems[0] == "decoder/0/cross_attention: sample 1, head 2, row 3: NaN/Inf weight"


def test_verify_detects_lost_commit_coverage(good, fmt):
    # Commit claims more samples than the arrays hold (e.g. arrays restored from backup).
    if fmt == "zarr":
        p = os.path.join(good, "_commits", "main", "zarr.json")
        doc = json.load(open(p))
        doc["attributes"]["attnscope"]["committed"] = 40
        doc["attributes"]["attnscope"]["stop"] = 40
        json.dump(doc, open(p, "w"))
    else:
        import h5py

        with h5py.File(good, "r+") as f:
            f["_commits/main"][1:3] = [40, 40]  # stop and committed
    rep = verify(good)
    assert not rep.ok and "40 are committed" in rep.problems[0]


def test_copy_of_archive_verifies(good, tmp_path):
    dst = str(tmp_path / ("copy" + os.path.splitext(good)[1]))
    (shutil.copytree if os.path.isdir(good) else shutil.copy)(good, dst)
    assert verify(dst).ok


def test_info_of_an_empty_folder_names_what_is_there(tmp_path):
    from attnscope.store import info

    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    note = info(empty)["note"]
    assert "empty folder" in note and "lock" not in note
    (empty / ".attnscope-locks").mkdir()
    assert "only the lock folder of a writer" in info(empty)["note"]

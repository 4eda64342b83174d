"""Regressions from the review: overwrite safety, lock hygiene, tolerance 0, HDF5 chunks."""

from __future__ import annotations

import gc
import json
import os

import numpy as np
import pytest
from store_testlib import make_batch

from attnscope.errors import ArchiveLockedError, ConfigError, ValidationError
from attnscope.store import ArchiveWriter, open_archive


def test_overwrite_refuses_a_directory_that_is_not_an_archive(tmp_path, layout) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("important")
    with pytest.raises(ConfigError, match="not an attnscope archive"):
        ArchiveWriter.create(precious, layout, overwrite=True)
    assert (precious / "thesis.txt").read_text() == "important"


def test_overwrite_refuses_a_foreign_h5_file(tmp_path, layout) -> None:
    foreign = tmp_path / "notes.h5"
    foreign.write_bytes(b"not hdf5")
    with pytest.raises(ConfigError, match="not an attnscope archive"):
        ArchiveWriter.create(foreign, layout, overwrite=True)
    assert foreign.read_bytes() == b"not hdf5"


def test_overwrite_replaces_an_archive(path, layout, rng) -> None:
    with ArchiveWriter.create(path, layout) as w:
        w.append(make_batch(rng, 3))
    with ArchiveWriter.create(path, layout, overwrite=True) as w:
        w.append(make_batch(rng, 2))
    with open_archive(path) as a:
        assert a.n_samples == 2


def test_dropped_writer_releases_its_lock(path, layout, rng) -> None:
    w = ArchiveWriter.create(path, layout)
    w.append(make_batch(rng, 2))
    del w
    gc.collect()
    with ArchiveWriter.open(path) as w2:  # would be ArchiveLockedError if the lock leaked
        assert w2.committed == 2


def test_live_writer_still_blocks_a_second(path, layout) -> None:
    with ArchiveWriter.create(path, layout), pytest.raises(ArchiveLockedError):
        ArchiveWriter.open(path)


def test_torn_lock_record_does_not_block_forever(path, layout, rng) -> None:
    with ArchiveWriter.create(path, layout) as w:
        w.append(make_batch(rng, 2))
        lock_file = w._lease.file
    # a crash between creating the lock file and writing its JSON
    os.makedirs(os.path.dirname(lock_file), exist_ok=True)
    with open(lock_file, "w") as fh:
        fh.write('{"pid": 12')
    with ArchiveWriter.open(path) as w2:
        assert w2.committed == 2
        with open(w2._lease.file) as fh:
            assert json.load(fh)["pid"] == os.getpid()


def test_tolerance_zero_is_honoured(tmp_path, layout, rng) -> None:
    batch = make_batch(rng, 2)
    name = "encoder/0/self_attention"
    batch[name] = batch[name].astype(np.float64)
    batch[name][0, 0, 0] *= 1.0005
    with ArchiveWriter.create(tmp_path / "t.zarr", layout, dtype="float32", tolerance=0.0) as w:
        with pytest.raises(ValidationError, match="sample 0"):
            w.append(batch)


def test_hdf5_keeps_one_sample_per_chunk(tmp_path, layout, rng) -> None:
    path = tmp_path / "c.h5"
    with ArchiveWriter.create(path, layout) as w:
        w.append(make_batch(rng, 3))
    with open_archive(path) as a:
        assert all(a[n].chunks[0] == 1 for n in a.arrays())
    with pytest.warns(UserWarning, match="chunk_samples=4 ignored"):
        ArchiveWriter.create(tmp_path / "d.h5", layout, chunk_samples=4).close()

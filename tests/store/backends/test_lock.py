"""store.backends.lock: writer leases, stale and torn records, no debris after a clean close."""

from __future__ import annotations

import gc
import json
import os

import pytest

from attnscope.errors import ArchiveLockedError
from attnscope.store import ArchiveWriter
from attnscope.store.backends.lock import Lease, lock_dir

from ..store_testlib import make_batch


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


def test_clean_close_leaves_no_lock_folder(path, layout, rng, fmt) -> None:
    inside = fmt == "zarr"
    with ArchiveWriter.create(path, layout) as w:
        w.append(make_batch(rng, 2))
        assert os.path.isdir(lock_dir(path, inside=inside))
    assert not os.path.exists(lock_dir(path, inside=inside))
    with ArchiveWriter.open(path) as w:
        w.append(make_batch(rng, 1))
    assert not os.path.exists(lock_dir(path, inside=inside))
    assert not os.path.exists(path + ".attnscope-locks")


def test_folder_stays_while_another_lease_holds_it(tmp_path) -> None:
    archive = str(tmp_path / "x.zarr")
    a = Lease(archive, (0, 4), inside=False).acquire()
    b = Lease(archive, (4, 8), inside=False).acquire()
    a.release()
    assert os.path.exists(b.file)
    b.release()
    assert not os.path.exists(lock_dir(archive, inside=False))
    c = Lease(archive, None, inside=False).acquire()  # a fresh folder after removal
    assert os.path.exists(c.file)
    c.release()


def test_a_lock_deleted_by_hand_stops_the_writer_keeping_its_commits(path, layout, rng) -> None:
    w = ArchiveWriter.create(path, layout)
    w.append(make_batch(rng, 2))
    os.remove(w._lease.file)  # "delete it if that writer is gone", while it is not
    with pytest.raises(ArchiveLockedError, match="lease .* is gone"):
        w.append(make_batch(rng, 2))
    try:
        w.close()  # the error may be raised again here (Zarr's committer thread) or not
    except ArchiveLockedError:
        pass
    with ArchiveWriter.open(path) as w2:  # nothing of the refused batch; resume works
        assert w2.committed == 2


def test_release_never_deletes_another_writers_record(path, layout) -> None:
    w = ArchiveWriter.create(path, layout)
    file = w._lease.file
    with open(file) as fh:
        other = {**json.load(fh), "token": "someone-else"}
    with open(file, "w") as fh:
        json.dump(other, fh)  # the lock now names another writer
    w.close()
    with open(file) as fh:
        assert json.load(fh)["token"] == "someone-else"

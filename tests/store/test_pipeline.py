"""The write pipeline (store/pipeline.py): submitted batches are written and committed in
order, in groups, with a bounded amount of data in flight; errors reach the caller; a
kill while several batches are in flight loses nothing committed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from attnscope.errors import ConfigError
from attnscope.store import ArchiveWriter, open_archive
from attnscope.store.pipeline import coalesce
from attnscope.store.verify import verify

from .store_testlib import concat, make_batch

MiB = 1 << 20


def _gate_writes(monkeypatch) -> threading.Event:
    """Every group write waits for the returned event (the disk is 'slow')."""
    gate = threading.Event()
    real = ArchiveWriter._write_group

    def slow(self, group):
        assert gate.wait(timeout=60)
        real(self, group)

    monkeypatch.setattr(ArchiveWriter, "_write_group", slow)
    return gate


def test_submitted_batches_equal_appended_ones(tmp_path, fmt, layout, rng):
    batches = [make_batch(rng, b) for b in (3, 5, 2, 4, 1)]
    ref, got = str(tmp_path / f"ref.{fmt}"), str(tmp_path / f"got.{fmt}")
    with ArchiveWriter.create(ref, layout, format=fmt) as w:
        for b in batches:
            w.append(b)
    with ArchiveWriter.create(got, layout, format=fmt, workers=3) as w:
        for b in batches:
            w.submit(b)
        assert w.flush() == 15
    with open_archive(ref) as a, open_archive(got) as b:
        assert a.n_samples == b.n_samples == 15
        for name in a.arrays:
            np.testing.assert_array_equal(a[name][:], b[name][:])
    assert verify(got).ok


def test_batches_queued_together_commit_as_one_group(tmp_path, layout, rng, monkeypatch):
    gate = _gate_writes(monkeypatch)
    batches = [make_batch(rng, 2) for _ in range(6)]
    path = str(tmp_path / "g.zarr")
    with ArchiveWriter.create(path, layout, chunk_samples=4) as w:
        for b in batches:
            w.submit(b)  # the first group holds batch 0; the rest queue behind it
        assert w.committed == 0
        gate.set()
        w.flush()
        records = w._backend.read_records()["main"]
    assert records["committed"] == 12
    assert records["batches"] == 2  # two commits for six batches
    with open_archive(path) as a:
        for name, want in concat(batches).items():
            np.testing.assert_allclose(a[name][:], want, atol=1e-3)
    assert verify(path).ok


def test_bytes_in_flight_stay_under_the_bound(tmp_path, layout, rng, monkeypatch):
    gate = _gate_writes(monkeypatch)
    batch = make_batch(rng, 64)  # ~0.2 MiB of float16 per batch
    nbytes = sum(x.astype(np.float16).nbytes for x in batch.values())
    bound_mb = 2.5 * nbytes / MiB  # room for two batches, not three
    w = ArchiveWriter.create(str(tmp_path / "b.zarr"), layout, inflight_mb=bound_mb)
    done = threading.Event()

    def produce():
        for _ in range(3):
            w.submit(batch)
        done.set()

    t = threading.Thread(target=produce)
    t.start()
    t.join(timeout=2.0)
    assert not done.is_set()  # the third batch waits: two are in flight, the disk is held
    assert w._pipe.peak_bytes <= bound_mb * MiB
    gate.set()
    t.join(timeout=60)
    assert done.is_set()
    w.close()
    assert w._pipe.peak_bytes <= bound_mb * MiB
    with open_archive(str(tmp_path / "b.zarr")) as a:
        assert a.n_samples == 192


def test_write_error_reaches_the_caller_and_keeps_what_was_committed(tmp_path, fmt, layout, rng,
                                                                     monkeypatch):  # fmt: skip
    real = ArchiveWriter._write_group
    calls = [0]

    def failing(self, group):
        for batch in group:
            calls[0] += 1
            if calls[0] == 3:
                raise OSError(28, "No space left on device")
            real(self, [batch])

    monkeypatch.setattr(ArchiveWriter, "_write_group", failing)
    path = str(tmp_path / f"e.{fmt}")
    w = ArchiveWriter.create(path, layout, format=fmt)
    w.submit(make_batch(rng, 2))
    w.submit(make_batch(rng, 2))
    with pytest.raises(OSError, match="No space"):
        w.submit(make_batch(rng, 2))  # HDF5 writes here (in the caller's thread)
        w.flush()  # Zarr: the committer thread's error
    with pytest.raises(OSError, match="No space"):  # the writer stays failed
        w.submit(make_batch(rng, 2))
    w.close()  # raised already: closing does not raise it again
    with open_archive(path) as a:
        assert a.n_samples == 4
    assert verify(path).ok


def test_an_error_never_raised_is_raised_by_close(tmp_path, layout, rng, monkeypatch):
    monkeypatch.setattr(ArchiveWriter, "_write_group",
                        lambda self, g: (_ for _ in ()).throw(OSError(5, "I/O error")))  # fmt: skip
    w = ArchiveWriter.create(str(tmp_path / "c.zarr"), layout)
    w.submit(make_batch(rng, 2))
    with pytest.raises(OSError, match="I/O error"):
        w.close()


@pytest.mark.parametrize("bad", [{"workers": 0}, {"workers": -2}, {"workers": 1.5},
                                 {"inflight_mb": 0}, {"level": 23}, {"level": -8},
                                 {"compressor": "none", "level": 3},
                                 {"compressor": "blosc-lz4", "level": 10}])  # fmt: skip
def test_bad_run_options_are_refused_before_anything_is_written(tmp_path, layout, bad):
    path = tmp_path / "x.zarr"
    with pytest.raises(ConfigError):
        ArchiveWriter.create(str(path), layout, **bad)
    assert not path.exists()


def test_coalesce_merges_a_box_with_the_next_that_continues_it():
    class H:
        name = "a"

    h = H()
    a = np.arange(6 * 2).reshape(6, 2)
    b = np.arange(100, 100 + 5 * 2).reshape(5, 2)  # starts with the tail of a: samples 4-5
    full = (slice(0, 2),)
    out = coalesce([(h, (slice(0, 6), *full), a), (h, (slice(4, 9), *full), b)])
    assert len(out) == 1
    _, sel, data = out[0]
    assert (sel[0].start, sel[0].stop) == (0, 9)
    np.testing.assert_array_equal(data, np.concatenate([a[:4], b]))
    apart = coalesce([(h, (slice(0, 2), *full), a[:2]), (h, (slice(5, 6), *full), a[:1])])
    assert len(coalesce([(h, (slice(0, 2), *full), a[:2]), (h, (slice(2, 4), *full), a[:2])])) == 2
    assert len(apart) == 2  # a gap: two boxes


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from store_testlib import make_batch
    from attnscope.store import ArchiveWriter, SideLayout, TokenLayout
    from attnscope.store.commitlog import LogState

    layout = TokenLayout(encoder=SideLayout.from_lengths({{"text": 5, "image": 4}}),
                         decoder=SideLayout.from_lengths({{"action": 4}}))
    rng = np.random.default_rng(7)
    batches = [make_batch(rng, 3) for _ in range(10)]
    import threading
    real, real_group = LogState.commit, ArchiveWriter._write_group
    commits, submitted = [0], threading.Event()

    def commit(self, *a, **k):
        commits[0] += 1
        if commits[0] == 2:  # the second group's data is written, its record is not
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *a, **k)

    def write_group(self, group):  # the first group waits: the rest pile up behind it
        submitted.wait(timeout=60)
        real_group(self, group)

    LogState.commit, ArchiveWriter._write_group = commit, write_group
    w = ArchiveWriter.create({path!r}, layout, format={fmt!r}, chunk_samples=2)
    for b in batches:
        w.submit(b)
        if w._pipe.inline:  # HDF5 writes in the caller's thread: nothing waits
            submitted.set()
    submitted.set()
    w.close()
    """
)


def test_kill_while_several_batches_are_in_flight_loses_nothing_committed(tmp_path, fmt, layout):
    """Zarr: the second group commit (of the nine batches queued behind the first) is
    killed after its data; HDF5 (written in the caller's thread): the second commit."""
    path = str(tmp_path / f"k.{fmt}")
    tests = os.path.dirname(__file__)
    script = KILL_SCRIPT.format(tests=tests, path=path, fmt=fmt)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    rng = np.random.default_rng(7)
    batches = [make_batch(rng, 3) for _ in range(10)]
    with open_archive(path) as a:
        n = a.n_samples
        assert n % 3 == 0 and 0 < n < 30  # two commits (of one or more batches each)
        for name, want in concat(batches).items():
            np.testing.assert_allclose(a[name][:n], want[:n], atol=1e-3)
    assert verify(path).ok
    with ArchiveWriter.open(path) as w:  # resume: the rest of the batches
        for b in batches[n // 3 :]:
            w.submit(b)
    with open_archive(path) as a:
        assert a.n_samples == 30
        for name, want in concat(batches).items():
            np.testing.assert_allclose(a[name][:], want, atol=1e-3)
    assert verify(path).ok


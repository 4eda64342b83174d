"""Camera frames stored with the samples (``_frames/<camera>``), for both formats."""

from __future__ import annotations

import numpy as np
import pytest

from attnscope.errors import ConfigError, SelectionError, ShapeError
from attnscope.store import ArchiveWriter, open_archive, verify
from attnscope.store.attach import attach_frames

from .store_testlib import make_batch


def frames_of(seed: int, b: int, h: int = 6, w: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def test_frames_round_trip(path, layout, rng):
    with ArchiveWriter.create(path, layout) as w:
        for i in range(3):
            w.append(make_batch(rng, 4), frames={"agentview": frames_of(i, 4),
                                                 "wrist": frames_of(10 + i, 4, 3, 3)})
    with open_archive(path) as a:
        assert a.cameras() == ["agentview", "wrist"]
        for i in range(12):
            got = a.frame("agentview", i)
            assert got.dtype == np.uint8 and got.shape == (6, 5, 3)
            np.testing.assert_array_equal(got, frames_of(i // 4, 4)[i % 4])
        np.testing.assert_array_equal(a.frame("wrist", 5), frames_of(11, 4, 3, 3)[1])
        assert a.frame("nope", 0) is None
        with pytest.raises(SelectionError, match="out of range"):
            a.frame("agentview", 12)
    assert verify(path).ok


def test_old_archive_has_no_frames(path, layout, rng):
    with ArchiveWriter.create(path, layout) as w:
        w.append(make_batch(rng, 2))
    with open_archive(path) as a:
        assert a.cameras() == [] and a.frame("agentview", 0) is None


def test_frames_must_match_every_batch(path, layout, rng):
    with ArchiveWriter.create(path, layout) as w:
        w.append(make_batch(rng, 2), frames={"cam": frames_of(0, 2)})
        with pytest.raises(ShapeError, match="same cameras"):
            w.append(make_batch(rng, 2))
        with pytest.raises(ShapeError, match="expected 2"):
            w.append(make_batch(rng, 2), frames={"cam": frames_of(0, 3)})
        with pytest.raises(ShapeError, match="the archive stores"):
            w.append(make_batch(rng, 2), frames={"cam": frames_of(0, 2, 4, 4)})
        with pytest.raises(ShapeError, match="uint8"):
            w.append(make_batch(rng, 2), frames={"cam": frames_of(0, 2).astype(np.float32)})
        with pytest.raises(ConfigError, match="camera name"):
            w.append(make_batch(rng, 2), frames={"a/b": frames_of(0, 2)})
        assert w.committed == 2  # refused batches wrote nothing


def test_crash_before_commit_hides_frames(path, layout, rng):
    w = ArchiveWriter.create(path, layout)
    w.append(make_batch(rng, 2), frames={"cam": frames_of(0, 2)})
    real = w._backend.write_commit

    def die(*a, **k):
        raise KeyboardInterrupt("killed between data and commit")

    w._backend.write_commit = die
    with pytest.raises(KeyboardInterrupt):
        w.append(make_batch(rng, 2), frames={"cam": frames_of(1, 2)})
    w._backend.write_commit = real
    w.close()
    with open_archive(path) as a:
        assert a.n_samples == 2
        np.testing.assert_array_equal(a.frame("cam", 1), frames_of(0, 2)[1])
        with pytest.raises(SelectionError):
            a.frame("cam", 2)  # the torn batch's frame is not visible
    with ArchiveWriter.open(path, mode="a") as w:
        w.append(make_batch(rng, 2), frames={"cam": frames_of(2, 2)})
    with open_archive(path) as a:
        np.testing.assert_array_equal(a.frame("cam", 3), frames_of(2, 2)[1])


def test_attach_frames_to_committed_samples(path, layout, rng, monkeypatch):
    with ArchiveWriter.create(path, layout) as w:
        w.append(make_batch(rng, 3))
    # a crash before the camera is marked complete hides it
    real_open = ArchiveWriter.open

    def open_then_die(*a, **k):
        w = real_open(*a, **k)
        w._backend.set_attrs = lambda *a, **k: (_ for _ in ()).throw(OSError("killed"))
        return w

    monkeypatch.setattr(ArchiveWriter, "open", open_then_die)
    with pytest.raises(OSError):
        attach_frames(path, "cam", frames_of(0, 3))
    monkeypatch.setattr(ArchiveWriter, "open", real_open)
    with open_archive(path) as a:
        assert a.cameras() == [] and a.frame("cam", 0) is None
    attach_frames(path, "cam", frames_of(1, 3))
    with open_archive(path) as a:
        np.testing.assert_array_equal(a.frame("cam", 2), frames_of(1, 3)[2])
    with pytest.raises(ConfigError, match="already stores"):
        attach_frames(path, "cam", frames_of(1, 3))
    with pytest.raises(ShapeError, match="expected 3"):
        attach_frames(path, "other", frames_of(1, 2))

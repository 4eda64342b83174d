"""A main (whole-archive) writer resumed after sample-range writers: it never overwrites
their committed samples, and every writer's labels stay readable."""

from __future__ import annotations

import os

import numpy as np
import pytest

from attnscope.errors import ConfigError
from attnscope.store import ArchiveWriter, SideLayout, TokenLayout, open_archive, verify

NAME = "encoder/0/self_attention"
LAYOUT = TokenLayout(encoder=SideLayout.from_lengths({"text": 4}))


def _x(n: int, col: int = -1) -> np.ndarray:
    x = np.full((n, 1, 4, 4), 0.25, np.float32)
    if col >= 0:
        x[...] = 0
        x[..., col] = 1
    return x


def _tok(n: int, tag: str) -> dict:
    return {"encoder": {"labels": [[f"{tag}{i}"] * 4 for i in range(n)]}}


def _create(tmp_path, capacity: int) -> str:
    p = os.path.join(tmp_path, "a.zarr")
    ArchiveWriter.create(p, LAYOUT, capacity=capacity, arrays={NAME: (1, 4, 4)},
                         chunk_samples=4).close()
    return p


def test_main_writer_refuses_to_overwrite_a_later_committed_range(tmp_path) -> None:
    p = _create(tmp_path, 16)
    with ArchiveWriter.open(p, sample_range=(8, 16)) as w:
        w.append({NAME: _x(8, col=0)})
    with ArchiveWriter.open(p, sample_range=(0, 4)) as w:
        w.append({NAME: _x(4)})
    with ArchiveWriter.open(p) as w:
        assert w.committed == 4
        with pytest.raises(ConfigError, match=r"sample_range \[8, 16\)") as e:
            w.append({NAME: _x(8)})
        assert "\n" not in str(e.value) and "8..11" in str(e.value)
        assert w.committed == 4
        w.append({NAME: _x(4)})  # exactly up to the range: fine
    with open_archive(p) as a:
        assert a.n_samples == 16
        np.testing.assert_array_equal(a[NAME][8:16], _x(8, col=0))
        np.testing.assert_array_equal(a[NAME][4:8], _x(4))
    assert verify(p).ok


def test_labels_of_range_and_main_writers_all_read_after_main_append(tmp_path) -> None:
    p = _create(tmp_path, 8)
    with ArchiveWriter.open(p, sample_range=(0, 4)) as w:
        w.append({NAME: _x(4)}, tokens=_tok(4, "A"))
    with ArchiveWriter.open(p, sample_range=(4, 8)) as w:
        w.append({NAME: _x(4)}, tokens=_tok(4, "B"))
    for tag in ("C", "D"):  # the second main append resumes past its own samples
        with ArchiveWriter.open(p) as w:
            w.append({NAME: _x(2)}, tokens=_tok(2, tag))
    with open_archive(p) as a:
        assert a.n_samples == 12
        got = [row[0] for row in a.labels("encoder")]
    assert got == ["A0", "A1", "A2", "A3", "B0", "B1", "B2", "B3", "C0", "C1", "D0", "D1"]
    assert verify(p).ok

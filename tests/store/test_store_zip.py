"""A ``.zarr.zip`` archive: one file to ship; written, reopened for append, read, verified."""

from __future__ import annotations

import numpy as np
import pytest

from attnscope.store import ArchiveWriter, open_archive, verify

from .store_testlib import concat, make_batch


@pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")  # zip appends rewritten chunks
def test_zip_archive_round_trip_and_append(tmp_path, layout, rng) -> None:
    path = tmp_path / "run.zarr.zip"
    batches = [make_batch(rng, 3), make_batch(rng, 2)]
    with ArchiveWriter.create(path, layout) as w:
        w.append(batches[0])
    with ArchiveWriter.open(path) as w:
        w.append(batches[1])
    want = concat(batches)
    with open_archive(path) as a:
        assert a.format == "zarr" and a.n_samples == 5
        for name, x in want.items():
            np.testing.assert_allclose(a[name][:].astype(np.float32), x, atol=1e-3)
    assert verify(path).ok

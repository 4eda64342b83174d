"""Lazy reads: a single-head selection on a multi-hundred-MB archive touches one chunk."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from attnscope.store import ArchiveWriter, SideLayout, TokenLayout, open_archive

T, H, N, B = 512, 8, 64, 16  # 64 x 8 x 512 x 512 float16 = 256 MiB


def _rchar() -> int | None:
    try:
        with open("/proc/self/io") as fh:
            for line in fh:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@pytest.fixture(scope="module", params=["zarr", "hdf5"])
def big(request, tmp_path_factory):
    path = str(
        tmp_path_factory.mktemp("big") / ("big.zarr" if request.param == "zarr" else "big.h5")
    )
    lay = TokenLayout(encoder=SideLayout.from_lengths({"tok": T}))
    with ArchiveWriter.create(path, lay, compressor="none", validate=False) as w:
        for b in range(N // B):
            x = np.empty((B, H, T, T), np.float16)
            for i in range(B):
                for h in range(H):
                    x[i, h] = (b * B + i) * 16 + h  # every (sample, head) matrix distinct
            w.append({"encoder/0/self_attention": x})
    yield path
    import shutil

    (shutil.rmtree if os.path.isdir(path) else os.remove)(path)


def test_single_head_read_touches_one_chunk(big):
    with open_archive(big) as a:
        arr = a["encoder/0/self_attention"]
        assert arr.nbytes == N * H * T * T * 2 >= 256 * 2**20
        assert arr.chunks == (1, 1, T, T)
        backend = a._backend
        before, r0 = backend.chunk_reads, _rchar()
        m = arr[37, 5]
        after, r1 = backend.chunk_reads, _rchar()
        assert m.shape == (T, T) and np.all(m == 37 * 16 + 5)
        assert after - before == 1
        if r0 is not None:  # bytes actually read by this process: one 512 KiB chunk + slack
            assert r1 - r0 < 2 * 2**20
        before = backend.chunk_reads
        rows = arr[12, 2, 100:110]
        assert rows.shape == (10, T) and np.all(rows == 12 * 16 + 2)
        assert backend.chunk_reads - before == 1
        before = backend.chunk_reads
        whole = arr[3]
        assert whole.shape == (H, T, T) and backend.chunk_reads - before == H


def test_store_import_is_light():
    code = (
        "import sys, attnscope.store as s; "
        "bad = [m for m in ('torch', 'h5py', 'dask', 'xarray') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

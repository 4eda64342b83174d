"""A capture killed before its first commit resumes (``capture(resume=True)``) or is
overwritten, whatever file operation the kill fell before (the writer's full kill-point
scan is ``tests/store/test_writer_kill_points.py``; here the capture's own paths)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from attnscope.capture import Transformer
from attnscope.capture.job import capture
from attnscope.store import open_archive, verify
from attnscope.store.meta import INPUT_HASH_KEYS

from .ref_data import batches, reference_weights

# A capture that dies by SIGKILL right before the first rename (or link) of a file whose
# temporary path contains argv[2]: every file of a Zarr archive is written to a
# ``*.partial`` file first and renamed into place.
CHILD = textwrap.dedent(
    """
    import os, signal, sys, torch
    sys.path.insert(0, {here!r})
    from ref_data import batches
    from attnscope.capture import Transformer
    from attnscope.capture.job import capture

    def killing(real):
        def op(src, *a, **k):
            if sys.argv[2] in os.fspath(src):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, *a, **k)
        return op
    os.replace, os.link = killing(os.replace), killing(os.link)
    torch.manual_seed(0)
    m = Transformer(32, 16, 4, 2, 2).eval()
    capture(m, batches(3), sys.argv[1], progress=False)
    """
)


def _killed_capture(path, where: str) -> None:
    code = CHILD.format(here=os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-c", code, str(path), where],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(32, 16, 4, 2, 2).eval()


def _complete(path) -> None:
    ref = reference_weights(_model(), batches(3))
    with open_archive(path) as a:
        assert a.n_samples == 6 and sorted(a.arrays) == sorted(ref)
        for name, want in ref.items():
            np.testing.assert_allclose(a[name][:], want, atol=1e-3, err_msg=name)
        assert set(INPUT_HASH_KEYS) <= set(a.sample_ids)
    assert verify(path).ok


@pytest.mark.parametrize(
    "where",
    [
        "run.zarr/zarr.",  # the root zarr.json: the lock folder and a zarr.*.partial left
        "input_sha256_1/zarr.",  # the first batch's input-hash id arrays half created
    ],
    ids=["root-metadata", "sample-id-arrays"],
)
def test_capture_killed_before_its_first_commit_resumes_or_is_overwritten(tmp_path, where):
    path = tmp_path / "run.zarr"
    _killed_capture(path, where)
    if where.startswith("run"):  # no root metadata: our lock folder and a *.partial file
        names = sorted(os.listdir(path))
        assert names[0] == ".attnscope-locks" and names[1:] and names[1].endswith(".partial")
    else:  # an archive with the first batch's nodes half made, nothing committed
        with open_archive(path) as a:
            assert a.n_samples == 0
    copy = tmp_path / "copy.zarr"
    shutil.copytree(path, copy)
    s = capture(_model(), batches(3), path, resume=True, progress=False)
    assert s.committed == 6 and s.samples == 6
    _complete(path)
    s = capture(_model(), batches(3), copy, overwrite=True, progress=False)
    assert s.committed == 6
    _complete(copy)

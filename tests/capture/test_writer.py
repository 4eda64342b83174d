"""The writer thread: bytes counted in the stored dtype, write errors one line and resumable."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from click.testing import CliRunner

from attnscope.capture.job import capture
from attnscope.capture.writer import storage_error, stored_nbytes
from attnscope.cli import cli
from attnscope.errors import CaptureError
from attnscope.store import ArchiveWriter, open_archive


def _expected_bytes(path, itemsize: int) -> int:
    with open_archive(path) as a:
        return sum(int(np.prod(a[n].shape)) * itemsize for n in a.arrays)


@pytest.mark.parametrize(("dtype", "itemsize"), [("float16", 2), ("bfloat16", 2), ("float32", 4)])
def test_bytes_and_mb_per_s_count_the_stored_dtype(
    small_model, make_batches, tmp_path, dtype, itemsize
) -> None:
    path = tmp_path / f"{dtype}.zarr"
    s = capture(small_model, make_batches(2), path, dtype=dtype, progress=False)
    # bfloat16 reaches the store as a float32 numpy copy; it must not count twice
    assert s.bytes == _expected_bytes(path, itemsize)
    assert s.mb_per_s == pytest.approx(s.bytes / 1e6 / s.seconds)


def test_sparse_bytes_count_values_and_indices(small_model, make_batches, tmp_path) -> None:
    s = capture(small_model, make_batches(1), tmp_path / "sp.zarr", topk=2, progress=False)
    with open_archive(tmp_path / "sp.zarr") as a:
        n_rows = sum(int(np.prod(a[n].shape[:3])) for n in a.arrays)
    assert s.bytes == n_rows * 2 * (2 + 2)  # k=2 float16 values + k=2 int16 indices per row


def test_stored_nbytes_of_tensors_and_pairs() -> None:
    import torch

    t = torch.zeros(2, 3, 4, 5, dtype=torch.bfloat16)
    pair = (
        torch.zeros(2, 3, 4, 2, dtype=torch.float16),
        torch.zeros(2, 3, 4, 2, dtype=torch.int16),
    )
    assert stored_nbytes({"a": t, "b": pair}) == 240 + 96 + 96


def _disk_full_after(monkeypatch, n_ok: int) -> None:
    """The store's write pipeline fails with ENOSPC on the batch after the first ``n_ok``
    (batches written one by one, whatever groups the pipeline forms)."""
    real = ArchiveWriter._write_group
    calls = [0]

    def write_group(self, group):
        for batch in group:
            calls[0] += 1
            if calls[0] > n_ok:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(self, [batch])

    monkeypatch.setattr(ArchiveWriter, "_write_group", write_group)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_disk_full_says_committed_samples_are_safe_and_resume_continues(
    small_model, make_batches, tmp_path, monkeypatch, suffix
) -> None:
    path = tmp_path / f"full{suffix}"
    data = make_batches(4)
    _disk_full_after(monkeypatch, 2)
    with pytest.raises(CaptureError) as info:
        capture(small_model, data, path, progress=False)
    msg = str(info.value)
    assert "disk full" in msg and "the 4 samples committed before are safe" in msg
    assert "--resume" in msg and "\n" not in msg
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == 28
    monkeypatch.undo()
    with open_archive(path) as a:
        assert a.n_samples == 4
    s = capture(small_model, data, path, resume=True, progress=False)
    assert s.samples == 4 and s.committed == 8


def test_cli_disk_full_is_one_line(tmp_path, monkeypatch) -> None:
    import json

    cfg = tmp_path / "model.json"
    model = {
        "embed_dim": 32,
        "context_length": 16,
        "num_heads": 4,
        "num_encoder_layers": 1,
        "num_decoder_layers": 1,
        "enc_modalities": {"text": 4},
        "dec_modalities": {"act": 3},
    }
    cfg.write_text(json.dumps(model))
    _disk_full_after(monkeypatch, 1)
    res = CliRunner().invoke(cli, ["capture", "--config", str(cfg), "--batches", "3",
                                   "--batch-size", "2", "--out", str(tmp_path / "f.zarr"),
                                   "--no-progress"])  # fmt: skip
    assert res.exit_code == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("Error: CaptureError: disk full")
    assert "the 2 samples committed before are safe" in lines[0]


@pytest.mark.parametrize(
    ("code", "what", "free"),
    [
        (errno.ENOSPC, "disk full", True),
        (errno.EDQUOT, "disk quota exceeded", True),
        (errno.EROFS, "read-only file system", False),
        (errno.EPERM, "operation not permitted", False),
        (errno.ELOOP, "symbolic link loop", False),
        (errno.ENOTDIR, "not a folder", False),
        (errno.EIO, "input/output error", False),
    ],
)
def test_storage_error_says_what_the_errno_means(code, what, free) -> None:
    for committed in (0, 4):
        msg = str(storage_error(OSError(code, os.strerror(code)), "run.zarr", committed))
        assert what in msg.split(" while ")[0] and f"[Errno {code}]" in msg and "\n" not in msg
        assert ("free space" in msg) is free, msg
        assert ("the 4 samples committed before are safe" in msg) is bool(committed)


class _ClientError(Exception):
    """The shape of botocore's ClientError: an error code in ``response``."""

    def __init__(self, code: str) -> None:
        super().__init__(f"An error occurred ({code})")
        self.response = {"Error": {"Code": code}}


def _raised_from(err: OSError, cause: BaseException) -> OSError:
    err.__cause__ = cause
    return err


@pytest.mark.parametrize(
    ("err", "what"),
    [
        (FileNotFoundError("The specified bucket does not exist"),
         "bucket 'lab' no longer exists"),
        (_raised_from(OSError("Forbidden"), _ClientError("ExpiredToken")),
         "access to the storage was refused mid-run"),
        (PermissionError("The AWS Access Key Id you provided does not exist"),
         "access to the storage was refused mid-run"),
    ],
)  # fmt: skip
def test_storage_error_on_object_storage_names_the_cause(err, what) -> None:
    msg = str(storage_error(err, "s3://lab/run.zarr", 4))
    assert msg.startswith(what) and "'s3://lab/run.zarr'" in msg and "\n" not in msg
    assert "[Errno" not in msg and "the 4 samples committed before are safe" in msg
    # the same errors on a local path keep their errno's meaning
    assert not str(storage_error(err, "run.zarr", 4)).startswith(what)


# Runs the CLI in a child process whose HDF5 file stops growing at the n-th append: the
# file-size limit (RLIMIT_FSIZE) is set to the file's size, so HDF5's C code fails to write
# with EFBIG as it fails with ENOSPC on a full disk (tried on a 5 MiB tmpfs: the same, with
# "disk full"). A full disk still lets a file grow sparsely, which the store uses to make a
# half-flushed file open again; the limit does not, so it is lifted when the writer closes.
# A crash of h5py would take the child, not pytest.
_DISK_FILLS = """
import os, resource, signal, sys
from attnscope.cli import cli
from attnscope.store import ArchiveWriter

real, calls = ArchiveWriter.submit, [0]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, EFBIG

def submit(self, *a, **k):
    calls[0] += 1
    if calls[0] == int(sys.argv[1]) + 1:
        self.flush()  # the batches before are committed; this one meets the limit
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(self.path), hard))
    return real(self, *a, **k)

def close(self):
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    real_close(self)

hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
real_close = ArchiveWriter.close
ArchiveWriter.submit, ArchiveWriter.close = submit, close
cli.main(sys.argv[2:], prog_name="attnscope")
"""


def test_hdf5_write_failure_is_one_line_in_capture_and_resume(tmp_path) -> None:
    import json
    import subprocess
    import sys

    from attnscope.store import verify

    cfg = tmp_path / "model.json"
    cfg.write_text(json.dumps({
        "embed_dim": 32, "context_length": 16, "num_heads": 4, "num_encoder_layers": 1,
        "num_decoder_layers": 1, "enc_modalities": {"text": 4}, "dec_modalities": {"act": 3},
    }))  # fmt: skip
    out = tmp_path / "f.h5"
    args = ["capture", "--config", str(cfg), "--batches", "3", "--batch-size", "2", "--out",
            str(out), "--no-progress", "--device", "cpu"]  # fmt: skip
    for n_ok, extra in ((1, []), (0, ["--resume"])):
        res = subprocess.run([sys.executable, "-c", _DISK_FILLS, str(n_ok), *args, *extra],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 1 and len(lines) == 1, res.stderr[-3000:]
        assert lines[0].startswith("Error: CaptureError: file too large"), lines
        assert "the 2 samples committed before are safe: raise the limit" in lines[0]
        assert "--resume" in lines[0]
        rep = verify(out)
        assert rep.ok and rep.n_samples == 2, rep.problems
    res = CliRunner().invoke(cli, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    with open_archive(out) as a:
        assert a.n_samples == 6

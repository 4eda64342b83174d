"""Multi-process capture (``capture/shard.py``): ranks start in any order, a killed rank
rejoins after the checks a resume runs, and one rank's crash never touches another's
committed samples."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

from attnscope.capture import Transformer
from attnscope.capture.job import capture
from attnscope.errors import ConfigError
from attnscope.store import info, open_archive, verify

from .ref_data import batches, reference_weights

HERE = os.path.dirname(__file__)
# One rank in a subprocess; {inject} patches it before it captures. Batches 0-1 are
# rank 0's, 2-3 rank 1's (samples 0-3 and 4-7).
RANK = textwrap.dedent(
    """
    import os, signal, sys, time, torch
    sys.path.insert(0, {here!r})
    from ref_data import batches
    from attnscope.capture import Transformer
    from attnscope.capture.job import capture
    {inject}
    torch.manual_seed(0)
    m = Transformer(32, 16, 4, 2, 2).eval()
    capture(m, batches(4), sys.argv[1], rank=int(sys.argv[2]), world_size=2, progress=False,
            wait_s=60)
    print("done", flush=True)
    """
)
# rank 1 dies right after its first batch is committed
KILL_AFTER_COMMIT = """
from attnscope.store import writer as W
_submit = W.ArchiveWriter.submit
def submit(self, *a, **k):
    _submit(self, *a, **k)
    self.flush()  # committed
    os.kill(os.getpid(), signal.SIGKILL)
W.ArchiveWriter.submit = submit
"""
# rank 0 holds its create-time lease 3 s longer: rank 1 sees the arrays meanwhile
SLOW_RELEASE = """
from attnscope.store.backends import lock as _lock
_release = _lock.Lease.release
def release(self):
    if self.range is None and self.held:
        time.sleep(3)
    _release(self)
_lock.Lease.release = release
"""


def _rank(path, rank: int, inject: str) -> subprocess.Popen:
    code = RANK.format(here=HERE, inject=inject)
    return subprocess.Popen([sys.executable, "-c", code, str(path), str(rank)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(32, 16, 4, 2, 2).eval()


def _run(path, rank: int, data=None, **kw):
    return capture(_model(), batches(4) if data is None else data, path, rank=rank,
                   world_size=2, progress=False, wait_s=60, **kw)  # fmt: skip


def _equals_reference(path, n: int) -> None:
    ref = reference_weights(_model(), batches(4))
    with open_archive(path) as a:
        assert a.n_samples == n
        for name, want in ref.items():
            np.testing.assert_allclose(a[name][:], want[:n], atol=1e-3, err_msg=name)
    assert verify(path).ok


def test_rank_that_sees_the_arrays_before_the_create_lease_is_released_waits(tmp_path):
    path = tmp_path / "mp.zarr"
    rank0 = _rank(path, 0, SLOW_RELEASE)
    try:
        s = _run(path, 1)  # polls from the start: sees the arrays during rank 0's delay
    finally:
        out, err = rank0.communicate(timeout=120)
    assert rank0.returncode == 0 and out.split() == ["done"], err[-2000:]
    assert s.samples == 4
    _equals_reference(path, 8)


def test_killed_rank_keeps_the_others_samples_and_rejoins_after_the_resume_checks(tmp_path):
    path = tmp_path / "mp.zarr"
    rank1 = _rank(path, 1, KILL_AFTER_COMMIT)
    done: list = []
    t = threading.Thread(target=lambda: done.append(_run(path, 0)))
    t.start()
    rank1.communicate(timeout=120)
    t.join(timeout=120)
    assert rank1.returncode == -signal.SIGKILL and done and done[0].samples == 4
    # rank 1's kill touched nothing of rank 0: its samples read, verify and info pass
    with open_archive(path) as a:
        assert a.commits["range-0-4"][2] == 4 and a.commits["range-4-8"][2] == 2
    _equals_reference(path, 6)
    assert info(path)["n_samples"] == 6
    # a rejoining rank runs the checks of a resume, refused in one line naming the rank
    for kw, what in (
        ({"data": batches(4, seed=1)}, "rank 1: resume: batch 2's inputs differ"),
        ({"data": batches(8, b=1)}, "rank 1: resume: batch size differs"),
        ({"heads": [0, 1]}, "rank 1: resume: heads differ"),
        ({"dtype": "float32"}, "rank 1: resume: dtype differs"),
    ):
        with pytest.raises(ConfigError, match=what) as e:
            _run(path, 1, **kw)
        assert "\n" not in str(e.value)
    torch.manual_seed(1)  # other weights
    other = Transformer(32, 16, 4, 2, 2).eval()
    with pytest.raises(ConfigError, match="rank 1: resume: model weights differ"):
        capture(other, batches(4), path, rank=1, world_size=2, progress=False, wait_s=60)
    _equals_reference(path, 6)  # refused runs wrote nothing
    # the restarted rank rejoins at once and writes only its uncommitted batch
    s = _run(path, 1)
    assert s.samples == 2 and s.committed == 4
    _equals_reference(path, 8)


# rank 0 dies while creating the archive: its root metadata is written, no array is listed
KILL_IN_CREATE = """
def killing(real):
    def op(src, *a, **k):
        if "self_attention/zarr." in os.fspath(src):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, *a, **k)
    return op
os.replace, os.link = killing(os.replace), killing(os.link)
"""


def test_rank_0_killed_while_creating_the_archive_creates_it_again(tmp_path):
    path = tmp_path / "mp.zarr"
    rank0 = _rank(path, 0, KILL_IN_CREATE)
    rank0.communicate(timeout=120)
    assert rank0.returncode == -signal.SIGKILL
    with open_archive(path) as a:  # what the kill left: metadata, nothing listed or committed
        assert a.metadata["arrays"] == [] and a.n_samples == 0
    assert _run(path, 0).samples == 4  # made again, then its range
    assert _run(path, 1).samples == 4
    _equals_reference(path, 8)


class _Loader:
    """Batches with a len() that are not a list (like a DataLoader): never read ahead."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def _ragged(lengths: list[int]) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in lengths:
        ids = torch.randint(3, 100, (2, n), generator=g)
        mask = torch.ones_like(ids)
        mask[1, n - 2 :] = 0  # sample 1 padded
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _no_max_model():
    """A text model without maximum positions or tokenizer (as T5): a ragged archive's
    maximum then comes from the first batch, which differs between ranks."""
    from .hf_models import make

    model = make("distilbert")
    model.config.max_position_embeddings = 10**9  # what capture reads as "no maximum"
    return model


def test_ragged_ranks_agree_on_rank_0s_maximum_without_max_length(tmp_path) -> None:
    # rank 0's first batch has 7 tokens, rank 1's has 4: rank 1 takes rank 0's maximum
    data = _ragged([7, 5, 4, 6])
    path = tmp_path / "mp.zarr"
    for rank in (0, 1):
        capture(_no_max_model(), _Loader(data), path, rank=rank, world_size=2, dtype="float32",
                progress=False, wait_s=60)  # fmt: skip
    one = tmp_path / "one.zarr"
    capture(_no_max_model(), data, one, max_length=7, dtype="float32", progress=False)
    assert verify(path).ok
    with open_archive(path) as a, open_archive(one) as b:
        assert a.metadata["max_lengths"] == {"encoder": 7} and a.n_samples == 8
        np.testing.assert_array_equal(a.masks("encoder"), b.masks("encoder"))
        for name in b.arrays():
            np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)


def test_ragged_rank_with_a_batch_longer_than_rank_0s_maximum_is_refused(tmp_path) -> None:
    from attnscope.errors import ShapeError

    data = _ragged([5, 5, 4, 9])
    path = tmp_path / "mp.zarr"
    _kw = dict(world_size=2, dtype="float32", progress=False, wait_s=60)
    capture(_no_max_model(), _Loader(data), path, rank=0, **_kw)
    with pytest.raises(ShapeError) as e:
        capture(_no_max_model(), _Loader(data), path, rank=1, **_kw)
    msg = str(e.value)
    assert "\n" not in msg and "batch 3 has 9 encoder tokens" in msg
    assert "maximum of 5" in msg and "every rank takes from rank 0's archive" in msg
    with open_archive(path) as a:  # rank 1's batch before it stays committed
        assert a.commits["range-4-8"][2] == 2 and a.n_samples == 6
    assert verify(path).ok


def test_fixed_length_archive_and_ragged_rank_cannot_agree(tmp_path) -> None:
    data = _ragged([5, 5, 4, 6])
    for b in data[:2]:  # rank 0's batches carry no padding mask: a fixed-length archive
        del b["attention_mask"]
    path = tmp_path / "mp.zarr"
    _kw = dict(world_size=2, dtype="float32", progress=False, wait_s=60)
    capture(_no_max_model(), _Loader(data), path, rank=0, **_kw)
    with pytest.raises(ConfigError, match="rank 1: the ranks cannot agree on the token layout"):
        capture(_no_max_model(), _Loader(data), path, rank=1, **_kw)
    with open_archive(path) as a:
        assert a.n_samples == 4


def test_a_world_size_that_does_not_match_the_shards_found_is_refused(tmp_path) -> None:
    path = tmp_path / "mp.zarr"
    _run(path, 0)
    _run(path, 1)
    # 4 batches over 4 ranks: rank 1 runs batch 1, samples [2, 4) of rank 0's shard [0, 4)
    with pytest.raises(ConfigError, match="world size does not match") as e:
        capture(_model(), batches(4), path, rank=1, world_size=4, progress=False, wait_s=60)
    assert "\n" not in str(e.value) and "shard [0, 4) of another rank" in str(e.value)
    _equals_reference(path, 8)


def test_two_processes_given_the_same_rank_are_refused(tmp_path) -> None:
    from attnscope.errors import ArchiveLockedError
    from attnscope.store import ArchiveWriter

    path = tmp_path / "mp.zarr"
    _run(path, 0)
    with ArchiveWriter.open(path, sample_range=(4, 8)):  # a live rank 1 holds its shard
        with pytest.raises(ArchiveLockedError, match="rank 1: .*two processes given rank 1"):
            _run(path, 1)
    assert _run(path, 1).samples == 4  # once that process is gone, rank 1 runs
    _equals_reference(path, 8)

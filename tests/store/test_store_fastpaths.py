"""The write fast paths: validation messages, in-memory chunk tails, batched writes."""

from __future__ import annotations

import numpy as np
import pytest

from attnscope.errors import ValidationError
from attnscope.store import ArchiveWriter, SideLayout, TokenLayout, open_archive, verify

from .store_testlib import softmax

NAME = "encoder/0/self_attention"


def _lay(t: int) -> TokenLayout:
    return TokenLayout(encoder=SideLayout.from_lengths({"tok": t}))


@pytest.mark.parametrize("what", ["nan", "neg", "sum", "negzero"])
def test_validation_messages_unchanged(path, rng, what):
    x = softmax(rng, (4, 2, 8, 8)).astype(np.float16)
    if what == "nan":
        x[2, 1, 3, 0] = np.nan
    elif what == "neg":
        x[2, 1, 3, 0] = -0.25
    elif what == "sum":
        x[2, 1, 3, :] = 0.5
    else:
        x[2, 1, 3, 0] = -0.0
    with ArchiveWriter.create(path, _lay(8)) as w:
        if what == "negzero":
            assert w.append({NAME: x}) == 4
            return
        with pytest.raises(ValidationError, match="sample 2, head 1, query row 3"):
            w.append({NAME: x})
        assert w.committed == 0


@pytest.mark.parametrize("compressor", ["zstd", "none", "blosc-lz4"])
def test_partial_chunk_tails_roundtrip_and_resume(path, rng, compressor):
    # chunk_samples=4 and odd batch sizes: every append ends inside a chunk, so the
    # in-memory tail is prepended (and, after reopening, read back from disk instead).
    sizes = [3, 5, 2, 7, 1, 4, 6]
    batches = [softmax(rng, (b, 2, 16, 16)).astype(np.float16) for b in sizes]
    with ArchiveWriter.create(path, _lay(16), compressor=compressor, chunk_samples=4) as w:
        for x in batches[:4]:
            buf = x.copy()
            w.append({NAME: buf}, sample_ids={"i": np.arange(len(x))})
            buf[...] = 0  # the caller reuses its buffer: the writer must have copied
    with ArchiveWriter.open(path) as w:
        for x in batches[4:]:
            w.append({NAME: x}, sample_ids={"i": np.arange(len(x))})
    want = np.concatenate(batches)
    with open_archive(path) as a:
        assert a.n_samples == sum(sizes)
        np.testing.assert_array_equal(a[NAME][:], want)
        np.testing.assert_array_equal(
            a.sample_ids["i"], np.concatenate([np.arange(b) for b in sizes])
        )
    assert verify(path).ok

"""Ragged archives (schema 2): padding masks, per-sample tokens, bad input, empty folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from attnscope.errors import (
    ArchiveCorruptError,
    ArchiveNotFoundError,
    AttnscopeError,
    ConfigError,
    SelectionError,
    ShapeError,
)
from attnscope.store import (
    ArchiveWriter,
    SideLayout,
    TokenLayout,
    format_info,
    holds_no_data,
    info,
    open_archive,
    verify,
)
from attnscope.store.backends.lock import LOCK_DIR_NAME

ENC = "encoder/0/self_attention"
L = 8


def lay(n: int = L) -> TokenLayout:
    return TokenLayout(encoder=SideLayout.from_lengths({"text": n}))


def soft(rng: np.random.Generator, b: int, lb: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Softmax rows over the real keys of each sample; padded query rows are not zero
    (what a model produces) and the writer must zero them."""
    x = rng.random((b, 2, lb, lb)).astype(np.float32) + 0.05
    if mask is not None:
        x = np.where(mask[:, None, None, :], x, 0)
    return x / x.sum(-1, keepdims=True)


def labels_of(mask: np.ndarray, tag: str) -> list[list[str]]:
    return [
        [f"{tag}{i}.{j}" if m else "[PAD]" for j, m in enumerate(row)] for i, row in enumerate(mask)
    ]


def write_two_batches(path: str, rng: np.random.Generator) -> dict:
    """A right-padded batch of length 5 and a left-padded batch of length 8."""
    m1 = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    m2 = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1], [1] * 8], bool)
    w1, w2 = soft(rng, 2, 5, m1), soft(rng, 3, 8, m2)
    ids1, ids2 = np.arange(10).reshape(2, 5), np.arange(24).reshape(3, 8) + 100
    with ArchiveWriter.create(path, lay(), max_lengths={"encoder": L}) as w:
        w.append(
            {ENC: w1},
            masks={"encoder": m1},
            tokens={"encoder": {"labels": labels_of(m1, "a"), "ids": ids1}},
        )
        w.append(
            {ENC: w2},
            masks={"encoder": m2},
            tokens={"encoder": {"labels": labels_of(m2, "b"), "ids": ids2}},
        )
    return {"w": [w1, w2], "m": [m1, m2], "ids": [ids1, ids2]}


def test_roundtrip_masks_tokens_and_zeroed_padding(path, rng):
    got = write_two_batches(path, rng)
    m1, m2 = got["m"]
    with open_archive(path) as a:
        assert a.ragged and a.schema_version == 2 and a.n_samples == 5
        assert a.metadata["max_lengths"] == {"encoder": L}
        full = np.zeros((5, L), bool)
        full[:2, :5] = m1
        full[2:] = m2
        np.testing.assert_array_equal(a.masks("encoder"), full)
        np.testing.assert_array_equal(a.masks("encoder", 3), m2[1])
        np.testing.assert_array_equal(a.lengths("encoder"), full.sum(1))
        arr = a[ENC]
        assert arr.shape == (5, 2, L, L)
        x = arr[...].astype(np.float32)
        cells = full[:, None, :, None] & full[:, None, None, :]
        assert not np.any(x[~np.broadcast_to(cells, x.shape)])  # padding stored as zeros
        np.testing.assert_allclose(x[0, :, :3, :3], got["w"][0][0, :, :3, :3], atol=1e-3)
        np.testing.assert_allclose(x[2], got["w"][1][0] * cells[2], atol=1e-3)
        q, k = arr.valid(3)
        np.testing.assert_array_equal(q, m2[1])
        np.testing.assert_array_equal(k, m2[1])
        labels, ids = a.tokens("encoder", 0)
        assert labels == labels_of(m1, "a")[0] + ["", "", ""]
        np.testing.assert_array_equal(ids, [0, 1, 2, 3, 4, -1, -1, -1])
        labels, ids = a.tokens("encoder", 3)
        assert labels == labels_of(m2, "b")[1]
        np.testing.assert_array_equal(ids, got["ids"][1][1])
        assert a.sample_layout(4).encoder.labels == tuple(labels_of(m2, "b")[2])
        assert a.sample_layout(4).encoder.segments == a.layout.encoder.segments
        assert a.token_fields() == {"encoder": ["mask", "ids", "labels"]}
    assert verify(path).ok
    d = info(path)
    assert d["ragged"] and d["tokens"] == {"encoder": ["mask", "ids", "labels"]}
    assert "ragged" in format_info(d)


def test_labels_readable_without_attnscope(path, fmt, rng):
    write_two_batches(path, rng)
    if fmt == "zarr":
        import zarr

        g = zarr.open_group(path, mode="r")
        spans, blob = g["_tokens/encoder/label_spans"][:], g["_tokens/encoder/labels/main"][:]
        mask = g["_tokens/encoder/mask"][:5]
    else:
        import h5py
        import hdf5plugin  # noqa: F401 - registers zstd for the other datasets

        with h5py.File(path, "r") as f:
            spans, blob = f["_tokens/encoder/label_spans"][:], f["_tokens/encoder/labels/main"][:]
            mask = f["_tokens/encoder/mask"][:5]
    first = json.loads(blob[spans[0, 0] : spans[0, 1]].tobytes())
    assert first == ["a0.0", "a0.1", "a0.2", "[PAD]", "[PAD]"]
    assert mask.dtype == np.uint8 and mask[1].sum() == 5


def test_resume_keeps_appending_labels(path, rng):
    write_two_batches(path, rng)
    m = np.ones((1, 4), bool)
    with ArchiveWriter.open(path) as w:
        w.append(
            {ENC: soft(rng, 1, 4)},
            masks={"encoder": m},
            tokens={"encoder": {"labels": [["x", "y", "z", "w"]], "ids": np.ones((1, 4), int)}},
        )
    with open_archive(path) as a:
        assert a.n_samples == 6
        assert a.tokens("encoder", 5)[0] == ["x", "y", "z", "w", "", "", "", ""]
        assert a.tokens("encoder", 1)[0] == [f"a1.{j}" for j in range(5)] + [""] * 3
    assert verify(path).ok


def test_default_mask_is_the_batch_length(path, rng):
    with ArchiveWriter.create(path, lay(), max_lengths={"encoder": L}) as w:
        w.append({ENC: soft(rng, 2, 3)})
    with open_archive(path) as a:
        np.testing.assert_array_equal(a.lengths("encoder"), [3, 3])
        assert a.tokens("encoder", 0) == (None, None)
        assert a.sample_layout(0) == a.layout


def test_sparse_ragged_keeps_real_rows_only(tmp_path, rng):
    path = str(tmp_path / "s.zarr")
    m = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
    with ArchiveWriter.create(path, lay(), max_lengths={"encoder": L}, sparse_topk=2) as w:
        w.append({ENC: soft(rng, 2, 4, m)}, masks={"encoder": m})
    with open_archive(path) as a:
        v, i, r = a[ENC].topk_arrays()
        assert not r[0, :, 3:].any() and not v[0, :, 3:].any()
        assert np.all(r[1, :, :4] > 0) and not r[1, :, 4:].any()
    assert verify(path).ok


def test_v1_archives_read_as_every_token_real(path, rng):
    with ArchiveWriter.create(path, lay()) as w:
        w.append({ENC: soft(rng, 2, L)}, tokens={"encoder": {"labels": [list("abcdefgh")] * 2}})
    with open_archive(path) as a:
        assert a.schema_version == 1 and not a.ragged
        assert a.masks("encoder").all() and a.masks("encoder").shape == (2, L)
        np.testing.assert_array_equal(a.lengths("encoder"), [L, L])
        assert a.tokens("encoder", 1) == (list("abcdefgh"), None)


def test_v1_archive_written_the_old_way(tmp_path, rng):
    """An archive whose root metadata has no max_lengths key (written before schema 2)."""
    path = str(tmp_path / "old.zarr")
    with ArchiveWriter.create(path, lay()) as w:
        w.append({ENC: soft(rng, 3, L)})
        meta = dict(w._meta)
        meta.pop("max_lengths")
        w._backend.write_root_meta(meta)
    with open_archive(path) as a:
        assert "max_lengths" not in a.metadata and not a.ragged
        assert a.masks("encoder").all() and a[ENC].valid(2)[0].all()
        assert a.tokens("encoder", 0) == (None, None)
    assert verify(path).ok


BAD = [
    (
        "longer than the maximum",
        lambda r: ({ENC: soft(r, 1, L + 2)}, {}),
        ShapeError,
        r"10 encoder tokens.*max_lengths\['encoder'\] = 8.*2 committed",
    ),
    (
        "mask shape",
        lambda r: ({ENC: soft(r, 1, 4)}, {"masks": {"encoder": np.ones((1, 5), bool)}}),
        ShapeError,
        r"masks\['encoder'\].*\(1, 4\).*\(1, 5\)",
    ),
    (
        "mask batch size",
        lambda r: ({ENC: soft(r, 2, 4)}, {"masks": {"encoder": np.ones((1, 4), bool)}}),
        ShapeError,
        r"masks\['encoder'\]",
    ),
    (
        "empty sample",
        lambda r: ({ENC: soft(r, 1, 4)}, {"masks": {"encoder": np.zeros((1, 4), bool)}}),
        ShapeError,
        "no real token",
    ),
    (
        "label count",
        lambda r: ({ENC: soft(r, 1, 4)}, {"tokens": {"encoder": {"labels": [["a", "b", "c"]]}}}),
        ShapeError,
        r"has 3 labels, expected the batch's 4",
    ),
    (
        "label samples",
        lambda r: ({ENC: soft(r, 1, 4)}, {"tokens": {"encoder": {"labels": [list("abcd")] * 2}}}),
        ShapeError,
        "holds 2 samples",
    ),
    (
        "tokens side",
        lambda r: ({ENC: soft(r, 1, 4)}, {"tokens": {"decoder": {"labels": [list("abcd")]}}}),
        SelectionError,
        r"side 'decoder'.*\['encoder'\]",
    ),
    (
        "mask side",
        lambda r: ({ENC: soft(r, 1, 4)}, {"masks": {"image": np.ones((1, 4), bool)}}),
        SelectionError,
        "side 'image'",
    ),
    (
        "ids shape",
        lambda r: ({ENC: soft(r, 1, 4)}, {"tokens": {"encoder": {"ids": np.ones((1, 3), int)}}}),
        ShapeError,
        r"ids'\] must have shape",
    ),
    (
        "token key",
        lambda r: ({ENC: soft(r, 1, 4)}, {"tokens": {"encoder": {"words": [["a"]]}}}),
        AttnscopeError,
        "some of",
    ),
    (
        "fields change",
        lambda r: ({ENC: soft(r, 1, 4)}, {}),
        ShapeError,
        "differ from those of the 2 samples",
    ),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_clear_error_and_keeps_committed(path, rng, case):
    _name, make, exc, pattern = case
    m = np.ones((2, 6), bool)
    with ArchiveWriter.create(path, lay(), max_lengths={"encoder": L}) as w:
        w.append(
            {ENC: soft(rng, 2, 6)},
            masks={"encoder": m},
            tokens={"encoder": {"labels": [list("abcdef")] * 2}},
        )
        weights, kw = make(rng)
        if "tokens" not in kw and _name != "fields change":
            kw["tokens"] = {
                "encoder": {"labels": [list("abcd")] * len(next(iter(weights.values())))}
            }
        with pytest.raises(exc, match=pattern):
            w.append(weights, **kw)
        assert w.committed == 2
        # the writer still works after a refused batch
        w.append({ENC: soft(rng, 1, 3)}, tokens={"encoder": {"labels": [list("xyz")]}})
    with open_archive(path) as a:
        assert a.n_samples == 3 and a.tokens("encoder", 2)[0][:3] == list("xyz")
    assert verify(path).ok


def test_fixed_archives_refuse_masks_and_other_lengths(path, rng):
    with ArchiveWriter.create(path, lay()) as w:
        w.append({ENC: soft(rng, 1, L)})
        with pytest.raises(ConfigError, match="max_lengths"):
            w.append({ENC: soft(rng, 1, L)}, masks={"encoder": np.ones((1, L), bool)})
        with pytest.raises(ShapeError, match="archive holds.*max_lengths"):
            w.append({ENC: soft(rng, 1, 5)})
        assert w.committed == 1


@pytest.mark.parametrize(
    "max_lengths, pattern",
    [
        ({"encoder": 9}, "layout has 8 tokens"),
        ({"decoder": 8}, "no decoder side"),
        ({"image": 8}, "unknown side"),
        ({"encoder": 0}, ">= 1"),
        ({}, "non-empty"),
    ],
)
def test_max_lengths_are_checked(path, max_lengths, pattern):
    with pytest.raises(ConfigError, match=pattern):
        ArchiveWriter.create(path, lay(), max_lengths=max_lengths)
    assert not os.path.exists(path) or holds_no_data(path)


def _lock_only(path: str, fmt: str) -> None:
    if fmt == "zarr":
        os.makedirs(os.path.join(path, LOCK_DIR_NAME))
    else:
        os.makedirs(path + LOCK_DIR_NAME)


def test_lock_only_folder_is_an_empty_archive(path, fmt, rng):
    _lock_only(path, fmt)
    assert holds_no_data(path)
    rep = verify(path)
    assert rep.ok and rep.n_samples == 0 and "holds no committed data" in rep.notes[0]
    d = info(path)
    assert d["n_samples"] == 0 and "re-run capture" in d["note"]
    assert "empty archive" in format_info(d)
    with pytest.raises(ArchiveNotFoundError, match="holds no committed data"):
        ArchiveWriter.open(path)
    with pytest.raises(ArchiveNotFoundError, match="holds no committed data"):
        open_archive(path)
    with ArchiveWriter.open_or_create(path, lay(), max_lengths={"encoder": L}) as w:
        w.append({ENC: soft(rng, 2, 5)})
    with ArchiveWriter.open_or_create(path, lay()) as w:  # now it resumes
        assert w.committed == 2
        w.append({ENC: soft(rng, 1, 6)})
    with open_archive(path) as a:
        assert a.n_samples == 3 and a.ragged
        np.testing.assert_array_equal(a.lengths("encoder"), [5, 5, 6])


def test_range_writers_store_tokens(tmp_path, rng):
    path = str(tmp_path / "r.zarr")
    ArchiveWriter.create(
        path,
        lay(),
        max_lengths={"encoder": L},
        capacity=8,
        chunk_samples=4,
        arrays={ENC: (2, L, L)},
    ).close()
    for a0 in (4, 0):  # the second range first: blobs are per writer
        with ArchiveWriter.open(path, sample_range=(a0, a0 + 4)) as w:
            w.append(
                {ENC: soft(rng, 4, 3 + a0 // 4)},
                tokens={"encoder": {"labels": [[f"s{a0 + i}"] * (3 + a0 // 4) for i in range(4)]}},
            )
    with open_archive(path) as a:
        assert a.n_samples == 8
        np.testing.assert_array_equal(a.lengths("encoder"), [3] * 4 + [4] * 4)
        assert a.tokens("encoder", 6)[0][:4] == ["s6"] * 4
        assert [lab[0] for lab in a.labels("encoder")] == [f"s{i}" for i in range(8)]
    assert verify(path).ok


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from attnscope.store import ArchiveWriter, SideLayout, TokenLayout

    path = sys.argv[1]
    lay = TokenLayout(encoder=SideLayout.from_lengths({"t": 8}))
    w = ArchiveWriter.create(path, lay, max_lengths={"encoder": 8})
    def batch(b):
        x = np.full((2, 1, 4 + b, 4 + b), 1 / (4 + b), np.float32)
        return {"encoder/0/self_attention": x}, {"encoder": {"labels": [[f"b{b}"] * (4 + b)] * 2}}
    for b in range(2):
        wts, tok = batch(b)
        w.append(wts, tokens=tok)
    real = w._backend.write_commit
    def commit(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    w._backend.write_commit = commit
    wts, tok = batch(3)
    w.append(wts, tokens=tok)
    """
)


def test_kill_before_commit_hides_masks_and_tokens(path):
    proc = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with open_archive(path) as a:
        assert a.n_samples == 4
        np.testing.assert_array_equal(a.lengths("encoder"), [4, 4, 5, 5])
        assert [x[0] for x in a.labels("encoder")] == ["b0", "b0", "b1", "b1"]
    assert verify(path).ok
    with ArchiveWriter.open(path) as w:  # resumes over the torn batch's bytes
        w.append(
            {ENC: np.full((1, 1, 2, 2), 0.5, np.float32)},
            tokens={"encoder": {"labels": [["z", "z"]]}},
        )
    with open_archive(path) as a:
        assert a.n_samples == 5 and a.tokens("encoder", 4)[0][:2] == ["z", "z"]
        assert a.tokens("encoder", 3)[0][:5] == ["b1"] * 5


def test_v1_root_carrying_max_lengths_is_corrupt(path, rng):
    """Schema 1 is never ragged; a v1 root with max_lengths would be read as ragged."""
    with ArchiveWriter.create(path, lay()) as w:
        w.append({ENC: soft(rng, 2, L)})
        meta = dict(w._meta)
        assert meta["schema_version"] == 1
        meta["max_lengths"] = {"encoder": L}
        w._backend.write_root_meta(meta)
    with pytest.raises(ArchiveCorruptError, match="schema_version 1 .*max_lengths") as e:
        open_archive(path)
    assert "\n" not in str(e.value)

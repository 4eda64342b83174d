"""Sparse (top-k) ragged archives: the residual goes to each sample's real keys only, so the
rebuilt rows sum to 1 over real keys and every consumer (analyze, statistics_json, timeline,
diff, rollout) sees the same exact mean; detect_causal is read once per array; a timeline
sample whose query group is all padding is skipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from attnscope.analysis import analyze, densify_topk, statistics_json, timeline
from attnscope.analysis import blocks as B
from attnscope.analysis import rollout as R
from attnscope.analysis.diff import diff_archives
from attnscope.analysis.rollout import dense_block, rollout_archive
from attnscope.store import ArchiveWriter, SideLayout, TokenLayout, open_archive

MASK = np.array(
    [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=bool
)


def _weights(seed: int = 0, heads: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n, s = MASK.shape
    x = np.zeros((n, heads, s, s), dtype=np.float32)
    for i in range(n):
        r = np.flatnonzero(MASK[i])
        z = rng.random((heads, len(r), len(r))).astype(np.float32) + 0.05
        x[i][:, r[:, None], r[None, :]] = z / z.sum(-1, keepdims=True)
    return x


def _write(path: Path, x: np.ndarray, layout: TokenLayout | None = None, **kw) -> Path:
    layout = layout or TokenLayout(encoder=SideLayout.from_lengths({"text": MASK.shape[1]}))
    with ArchiveWriter.create(
        path, layout, dtype="float32", sparse_topk=1, max_lengths={"encoder": MASK.shape[1]},
    ) as w:
        for i in range(len(x)):  # one sample per batch: several blocks at a small max_bytes
            w.append(
                {f"encoder/{j}/self_attention": x[i : i + 1] for j in (0, 1)},
                masks={"encoder": MASK[i : i + 1]},
                **{k: {n: v[i : i + 1] for n, v in ids.items()} for k, ids in kw.items()},
            )
    return path


def _reference(x: np.ndarray) -> np.ndarray:
    """Top-1 kept, the residual spread uniformly over the row's other real keys."""
    out = np.zeros(x.shape, dtype=np.float64)
    for i in range(len(x)):
        r = np.flatnonzero(MASK[i])
        for h in range(x.shape[1]):
            for q in r:
                row = x[i, h, q].astype(np.float64)
                top = int(np.argmax(row))
                others = [k for k in r if k != top]
                out[i, h, q, others] = (1.0 - row[top]) / len(others)
                out[i, h, q, top] = row[top]
    return out


def _sparse(path: Path) -> tuple[object, np.ndarray, np.ndarray]:
    x = _weights()
    a = open_archive(_write(path, x))
    if getattr(a, "mode", "dense") != "sparse":
        pytest.skip("store has no sparse mode")
    return a, x, _reference(x)


def test_densify_topk_residual_never_lands_on_padded_keys() -> None:
    vals = np.array([0.6, 0.6, 0, 0], np.float32).reshape(1, 1, 4, 1)
    idx = np.zeros((1, 1, 4, 1), np.int64)
    res = np.array([0.4, 0.4, 0, 0], np.float32).reshape(1, 1, 4)
    km = np.array([[1, 1, 0, 0]], bool)
    d = densify_topk(vals, idx, res, 4, kmask=km)
    np.testing.assert_allclose(d[0, 0, :2], [[0.6, 0.4, 0, 0]] * 2, atol=1e-7)
    d = densify_topk(vals, idx, res, 4, causal=True, kmask=km)  # causal AND real
    np.testing.assert_allclose(d[0, 0, 0], [0.6, 0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(d[0, 0, 1], [0.6, 0.4, 0, 0], atol=1e-7)


def test_dense_rows_sum_to_one_over_real_keys(tmp_path: Path) -> None:
    a, _x, ref = _sparse(tmp_path / "s.zarr")
    arr = a.attention("encoder/0/self_attention")
    d = dense_block(arr, slice(0, len(MASK)))
    for i in range(len(MASK)):
        r = np.flatnonzero(MASK[i])
        np.testing.assert_allclose(d[i][:, r][:, :, r].sum(-1), 1.0, atol=1e-5)
        assert not d[i][:, r][:, :, ~MASK[i]].any()  # nothing on padded keys
        np.testing.assert_allclose(d[i][:, r][:, :, r], ref[i][:, r][:, :, r], atol=1e-6)
    blocks = [b for b, _c in B.iter_array_blocks(arr, max_bytes=1)]
    got = np.concatenate(blocks)
    for i in range(len(MASK)):
        r = np.flatnonzero(MASK[i])
        np.testing.assert_allclose(got[i][:, r][:, :, r], ref[i][:, r][:, :, r], atol=1e-6)


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.where(p > 0, p, 1))).sum(-1)


def test_head_stats_mean_and_entropy_match_numpy(tmp_path: Path) -> None:
    a, _x, ref = _sparse(tmp_path / "s.zarr")
    analyze(a, tmp_path / "out", topk=1, progress=False)
    hs = pd.read_parquet(tmp_path / "out" / "head_stats.parquet")
    hs = hs[hs.layer == 0]
    for i in range(len(MASK)):
        r = np.flatnonzero(MASK[i])
        for h in range(ref.shape[1]):
            sub = ref[i, h][np.ix_(r, r)]
            row = hs[(hs["sample"] == i) & (hs.head_index == h)].iloc[0]
            assert row["mean"] == pytest.approx(1.0 / len(r), rel=1e-5)
            assert row["mean"] == pytest.approx(sub.mean(), rel=1e-5)
            assert row["entropy_mean"] == pytest.approx(_entropy(sub).mean(), rel=1e-4)


def test_statistics_json_mean_is_exact_on_sparse_ragged(tmp_path: Path) -> None:
    a, _x, ref = _sparse(tmp_path / "s.zarr")
    doc = statistics_json(a)
    cells = np.concatenate(
        [ref[i][:, MASK[i]][:, :, MASK[i]].ravel() for i in range(len(MASK))]
    )
    got = doc["encoder"][0]
    assert got["mean"] == pytest.approx(cells.mean(), rel=1e-5)
    assert got["std"] == pytest.approx(cells.std(), rel=1e-4)


def test_diff_of_identical_sparse_ragged_archives_is_zero(tmp_path: Path) -> None:
    a, _x, ref = _sparse(tmp_path / "a.zarr")
    b = _write(tmp_path / "b.zarr", _weights())
    df = pd.read_parquet(diff_archives(a, b, tmp_path / "out"))
    assert (df.js.abs() < 1e-7).all()
    s0 = df[(df["sample"] == 0) & (df.head_index == 0) & (df.layer == 0)].iloc[0]
    r = np.flatnonzero(MASK[0])
    assert s0.entropy_a == pytest.approx(_entropy(ref[0, 0][np.ix_(r, r)]).mean(), rel=1e-4)


def test_causal_detected_once_per_array(tmp_path: Path, monkeypatch) -> None:
    a, _x, _ref = _sparse(tmp_path / "a.zarr")
    b = _write(tmp_path / "b.zarr", _weights())
    calls: list[str] = []
    real = B.detect_causal

    def counting(arr):  # type: ignore[no-untyped-def]
        calls.append(f"{arr.archive.path}:{arr.name}")
        return real(arr)

    monkeypatch.setattr(B, "detect_causal", counting)
    monkeypatch.setattr(R, "detect_causal", counting, raising=False)
    rollout_archive(a, tmp_path / "ro", max_bytes=1)
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 2
    calls.clear()
    diff_archives(a, b, tmp_path / "df", max_bytes=1)
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 4


def test_timeline_skips_a_sample_whose_query_group_is_padding(tmp_path: Path) -> None:
    layout = TokenLayout(encoder=SideLayout.from_lengths({"head": 3, "tail": 2}))
    x = _weights()
    ids = {"episode": np.zeros(len(MASK), np.int64), "step": np.arange(len(MASK))}
    path = _write(tmp_path / "t.zarr", x, layout, sample_ids=ids)
    t = timeline(path, tmp_path / "out", query="tail", arrays=["encoder/0"])
    df = pd.read_parquet(t)
    # samples 0 and 3 have tail tokens 3, 4 both padded: no rows; the others are written
    assert sorted(set(df["sample"])) == [1, 2]
    s2 = df[(df["sample"] == 2) & (df.head_index == 0)].set_index("key_segment")["mass"]
    a = open_archive(path)
    w = dense_block(a.attention("encoder/0/self_attention"), slice(2, 3))[0, 0]
    assert s2["head"] == pytest.approx(w[3, :3].sum(), rel=1e-5)  # only tail token 3 is real
    assert s2.sum() == pytest.approx(1.0, rel=1e-5)

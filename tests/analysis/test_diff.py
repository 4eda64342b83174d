"""Archive diff: identical archives diff to zero, a planted change shows up only where it is,
with the JS value of a direct numpy computation; mismatched layouts are refused."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from analysis_helpers import build_archive, make_layout, make_weights, softmax_block
from hypothesis import given, settings
from hypothesis import strategies as st

from attnscope.analysis import diff_archives, js_rows, load_table
from attnscope.errors import ConfigError
from attnscope.store import ArchiveWriter, SideLayout, TokenLayout, open_archive


def _js_reference(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    p, q = p.astype(np.float64), q.astype(np.float64)
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.where(a > 0, a * np.log(np.where(a > 0, a, 1) / np.where(b > 0, b, 1)), 0).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def _entropy(p: np.ndarray) -> np.ndarray:
    p = p.astype(np.float64)
    return -(p * np.log(np.where(p > 0, p, 1))).sum(-1)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 9))
def test_js_rows_matches_reference_and_stays_in_range(seed: int, s: int) -> None:
    rng = np.random.default_rng(seed)
    p = softmax_block(rng, (5, s), sharp=4.0)
    q = softmax_block(rng, (5, s), sharp=4.0)
    p[0] = 0
    p[0, 0] = 1  # one-hot row: zeros inside
    got = js_rows(p, q)
    np.testing.assert_allclose(got, _js_reference(p, q), atol=1e-7)
    assert (got >= 0).all() and (got <= np.log(2) + 1e-12).all()
    assert (js_rows(p, p) == 0).all()


def test_disjoint_rows_reach_ln2() -> None:
    assert js_rows(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(np.log(2))


def test_identical_archives_diff_to_exactly_zero(small: tuple, tmp_path: Path) -> None:
    a, w = small
    b = build_archive(tmp_path / "b.zarr", w, make_layout())
    df = pd.read_parquet(diff_archives(a, b, tmp_path / "out"))
    assert len(df) == 3 * 6 * 4  # arrays x samples x 4 heads
    mean = pd.read_parquet(tmp_path / "out" / "mean_head_diff.parquet")
    assert len(mean) == 3 * 6 and "head_index" not in mean.columns  # the head mean, apart
    for d in (df, mean):
        assert (d["js"] == 0).all() and (d["entropy_change"] == 0).all()
        assert (d["max_abs_diff"] == 0).all()
    assert set(df["head_index"]) == {0, 1, 2, 3}
    assert df["archive_fingerprint"].unique().tolist() == [a.identity()["fingerprint"]]
    assert df["archive_fingerprint_b"].unique().tolist() == [b.identity()["fingerprint"]]
    load_table(tmp_path / "out", "diff", archive=a)  # current for A


def test_planted_change_shows_only_there(tmp_path: Path) -> None:
    w = make_weights(seed=4, layers=2)
    a = build_archive(tmp_path / "a.zarr", w, make_layout())
    w2 = copy.deepcopy(w)
    rng = np.random.default_rng(7)
    changed = softmax_block(rng, (6, 10, 12))
    w2["decoder"][1]["cross_attention"][:, 2] = changed  # head 2 of decoder/1/cross_attention
    b = build_archive(tmp_path / "b.h5", w2, make_layout())
    diff_archives(a, b, tmp_path / "out")
    df = load_table(tmp_path / "out", "diff", archive=a, with_mean_head=True)
    here = (df["stack"] == "decoder") & (df["layer"] == 1) & (df["kind"] == "cross_attention")
    touched = here & df["head_index"].isin([2, -1])
    assert (df.loc[~touched, "js"] == 0).all()
    assert (df.loc[~touched, "entropy_change"] == 0).all()
    assert (df.loc[touched, "js"] > 0).all()
    old = w["decoder"][1]["cross_attention"]
    got = df[here & (df["head_index"] == 2)].sort_values("sample")
    np.testing.assert_allclose(got["js"], _js_reference(old[:, 2], changed).mean(-1), rtol=1e-5)
    np.testing.assert_allclose(
        got["entropy_change"],
        (_entropy(changed) - _entropy(old[:, 2])).mean(-1), atol=1e-5,
    )
    mean = df[here & (df["head_index"] == -1)].sort_values("sample")
    new = w2["decoder"][1]["cross_attention"]
    np.testing.assert_allclose(
        mean["js"], _js_reference(old.mean(1), new.mean(1)).mean(-1), rtol=1e-4
    )


def _ragged(path: Path, mask: np.ndarray) -> Path:
    layout = TokenLayout(encoder=SideLayout.from_lengths({"text": 4}))
    x = np.zeros((2, 1, 4, 4), dtype=np.float32)
    for i in range(2):
        r = np.flatnonzero(mask[i])
        x[i, 0][np.ix_(r, r)] = 1 / len(r)
    with ArchiveWriter.create(path, layout, dtype="float32", max_lengths={"encoder": 4}) as wr:
        wr.append({"encoder/0/self_attention": x}, masks={"encoder": mask})
    return path


def test_ragged_rows_pool_real_queries_only(tmp_path: Path) -> None:
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=bool)
    a = _ragged(tmp_path / "a.zarr", mask)
    layout = TokenLayout(encoder=SideLayout.from_lengths({"text": 4}))
    y = np.zeros((2, 1, 4, 4), dtype=np.float32)
    y[0, 0, :3, 0] = 1.0  # sample 0: one-hot on token 0 instead of uniform over 3
    y[1, 0] = 0.25
    with ArchiveWriter.create(tmp_path / "b.zarr", layout, dtype="float32",
                              max_lengths={"encoder": 4}) as wr:
        wr.append({"encoder/0/self_attention": y}, masks={"encoder": mask})
    df = pd.read_parquet(diff_archives(a, tmp_path / "b.zarr", tmp_path / "out"))
    s0 = df[(df["sample"] == 0) & (df["head_index"] == 0)].iloc[0]
    assert s0.n_queries == 3
    u = np.full(3, 1 / 3)
    assert s0.js == pytest.approx(_js_reference(u, np.array([1.0, 0, 0])), rel=1e-5)
    assert s0.entropy_change == pytest.approx(-np.log(3), rel=1e-5)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda w: w["encoder"][0].update(self_attention=w["encoder"][0]["self_attention"][:4]),
         "sample count: A has 6, B has 4"),
        (lambda w: w["decoder"][0].pop("cross_attention"),
         r"arrays: only in A \['decoder/0/cross_attention'\]"),
    ],
)
def test_mismatched_arrays_refused(tmp_path: Path, mutate, match: str) -> None:
    w = make_weights(seed=1)
    a = build_archive(tmp_path / "a.zarr", w, make_layout())
    w2 = copy.deepcopy(w)
    mutate(w2)
    if "sample count" in match:  # every array must keep one sample count
        for st_ in w2.values():
            for layer in st_:
                for k in layer:
                    layer[k] = layer[k][:4]
    b = build_archive(tmp_path / "b.zarr", w2, make_layout())
    with pytest.raises(ConfigError, match=match) as e:
        diff_archives(a, b, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "diff.parquet").exists()


def test_mismatched_shape_refused(tmp_path: Path) -> None:
    a = build_archive(tmp_path / "a.zarr", make_weights(seed=1), make_layout())
    b = build_archive(tmp_path / "b.zarr", make_weights(seed=1, t_len=9),
                      make_layout(t_len=9))
    want = r"decoder/0/self_attention differs in shape \(H, T, S\): A \(4, 10, 10\), B \(4, 9, 9\)"
    with pytest.raises(ConfigError, match=want):
        diff_archives(a, b, tmp_path / "out")


def test_mismatched_heads_refused(tmp_path: Path) -> None:
    w = make_weights(seed=1)
    a = build_archive(tmp_path / "a.zarr", w, make_layout())
    names = open_archive(a.path).arrays
    b = build_archive(tmp_path / "b.zarr", w, make_layout(), heads={n: [0, 1, 2, 5] for n in names})
    assert open_archive(b.path).heads["encoder/0/self_attention"] == (0, 1, 2, 5)
    with pytest.raises(ConfigError, match=r"differs in heads: A \[0, 1, 2, 3\], B \[0, 1, 2, 5\]"):
        diff_archives(a, b, tmp_path / "out")


def test_mismatched_segments_refused(tmp_path: Path) -> None:
    w = make_weights(seed=1)
    a = build_archive(tmp_path / "a.zarr", w, make_layout())
    other = TokenLayout(
        encoder=SideLayout.from_lengths({"text": 6, "agentview_image": 6}),
        decoder=make_layout().decoder,
    )
    b = build_archive(tmp_path / "b.zarr", w, other)
    with pytest.raises(ConfigError, match="differ in encoder segments"):
        diff_archives(a, b, tmp_path / "out")


def test_mismatched_masks_refused(tmp_path: Path) -> None:
    a = _ragged(tmp_path / "a.zarr", np.array([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=bool))
    b = _ragged(tmp_path / "b.zarr", np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=bool))
    with pytest.raises(ConfigError, match="encoder token mask of sample 1: A has 4 real tokens"):
        diff_archives(a, b, tmp_path / "out")


def test_right_against_left_padded_masks_name_the_position(tmp_path: Path) -> None:
    a = _ragged(tmp_path / "a.zarr", np.array([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=bool))
    b = _ragged(tmp_path / "b.zarr", np.array([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=bool))
    with pytest.raises(ConfigError) as e:
        diff_archives(a, b, tmp_path / "out")
    msg = str(e.value)
    assert "encoder token mask of sample 0: both have 3 real tokens, but at different " in msg
    assert "first at position 0 (A real, B padding)" in msg and "\n" not in msg

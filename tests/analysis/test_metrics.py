"""Every block metric against a direct numpy computation."""

from __future__ import annotations

import numpy as np
import pytest
from analysis_helpers import softmax_block
from hypothesis import given, settings
from hypothesis import strategies as st

from attnscope.analysis import (
    as_float32,
    densify_topk,
    head_similarity_cosine,
    head_similarity_js,
    mean_distance,
    normalized_entropy,
    row_entropy,
    row_max,
    segment_mass,
    sink_score,
    top_k_pairs,
    top_k_pairs_block,
)
from attnscope.errors import ConfigError, ShapeError, ValidationError


def _entropy_direct(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(x > 0, x * np.log(x), 0.0).sum(-1)


def test_entropy_of_one_hot_is_zero_and_uniform_is_log_n() -> None:
    b = np.zeros((1, 2, 3, 7), np.float32)
    b[..., 2] = 1
    b[0, 1] = 1 / 7
    ent = row_entropy(b)
    np.testing.assert_allclose(ent[0, 0], 0, atol=1e-6)
    np.testing.assert_allclose(ent[0, 1], np.log(7), rtol=1e-5)
    np.testing.assert_allclose(normalized_entropy(b)[0, 1], 1, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    t=st.integers(1, 9),
    s=st.integers(1, 9),
    sharp=st.floats(0.1, 8),
)
def test_entropy_matches_numpy_and_is_at_most_log_n(
    seed: int, t: int, s: int, sharp: float
) -> None:
    b = softmax_block(np.random.default_rng(seed), (2, 3, t, s), sharp=sharp)
    ent = row_entropy(b)
    assert ent.shape == (2, 3, t)
    np.testing.assert_allclose(ent, _entropy_direct(b), atol=2e-5)
    assert np.all(ent <= np.log(s) + 1e-5)
    assert np.all(ent >= 0)


def test_causal_normalisation_uses_allowed_keys() -> None:
    b = softmax_block(np.random.default_rng(0), (1, 2, 6, 6), causal=True)
    ne = normalized_entropy(b, causal=True)
    assert np.isnan(ne[..., 0]).all()  # first row can see one key only
    direct = _entropy_direct(b)[..., 1:] / np.log(np.arange(2, 7))
    np.testing.assert_allclose(ne[..., 1:], direct, rtol=1e-4)
    # a uniform causal row is 1 after normalisation, not log(q+1)/log(S)
    u = np.tril(np.ones((6, 6), np.float32))
    u /= u.sum(-1, keepdims=True)
    np.testing.assert_allclose(
        normalized_entropy(u[None, None], causal=True)[0, 0, 1:], 1, rtol=1e-5
    )


def test_row_max_distance_sink_match_numpy() -> None:
    b = softmax_block(np.random.default_rng(3), (2, 3, 5, 7))
    np.testing.assert_array_equal(row_max(b), b.max(-1))
    d = np.abs(np.arange(5)[:, None] - np.arange(7)[None, :])
    np.testing.assert_allclose(mean_distance(b), (b * d).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(sink_score(b), b[..., 0])
    np.testing.assert_allclose(sink_score(b, [0, 3]), b[..., 0] + b[..., 3], rtol=1e-6)
    with pytest.raises(ConfigError, match="out of range"):
        sink_score(b, 7)


def test_segment_mass_rows_sum_to_one_and_match_loop() -> None:
    b = softmax_block(np.random.default_rng(4), (2, 3, 6, 8))
    qid = np.array([0, 0, 1, 1, 1, 2])
    kid = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    m = segment_mass(b, qid, kid, 3, 2)
    assert m.shape == (2, 3, 3, 2)
    np.testing.assert_allclose(m.sum(-1), 1, rtol=1e-5)
    for i in range(3):
        for j in range(2):
            direct = b[:, :, qid == i][..., kid == j].sum(-1).mean(-1)
            np.testing.assert_allclose(m[:, :, i, j], direct, rtol=1e-5)
    with pytest.raises(ShapeError, match="lengths"):
        segment_mass(b, qid[:-1], kid, 3, 2)


def test_head_similarity_js_and_cosine_match_direct() -> None:
    b = softmax_block(np.random.default_rng(5), (2, 3, 4, 6))
    js = head_similarity_js(b)
    x = b.astype(np.float64)
    for a in range(3):
        for c in range(3):
            m = (x[:, a] + x[:, c]) / 2
            kl = lambda p, q: (p * np.log(p / q)).sum(-1)  # noqa: E731
            direct = (0.5 * kl(x[:, a], m) + 0.5 * kl(x[:, c], m)).mean(-1)
            np.testing.assert_allclose(js[:, a, c], direct, atol=1e-5)
    assert np.all(js <= np.log(2) + 1e-6)
    cos = head_similarity_cosine(b)
    f = x.reshape(2, 3, -1)
    direct = (
        np.einsum("nad,ncd->nac", f, f)
        / np.linalg.norm(f, axis=-1)[:, :, None]
        / np.linalg.norm(f, axis=-1)[:, None, :]
    )
    np.testing.assert_allclose(cos, direct, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), t=st.integers(1, 8), s=st.integers(1, 8), data=st.data())
def test_top_k_agrees_with_argsort(seed: int, t: int, s: int, data: st.DataObject) -> None:
    rng = np.random.default_rng(seed)
    # quantised weights force ties; order must be weight desc, flat index asc
    b = (rng.integers(0, 4, size=(2, 2, t, s)) / 4).astype(np.float32)
    k = data.draw(st.integers(1, t * s))
    q, kk, w = top_k_pairs_block(b, k)
    for i in range(2):
        for h in range(2):
            order = np.argsort(-b[i, h].ravel(), kind="stable")[:k]
            np.testing.assert_array_equal(q[i, h], order // s)
            np.testing.assert_array_equal(kk[i, h], order % s)
            np.testing.assert_array_equal(w[i, h], b[i, h].ravel()[order])


def test_top_k_pairs_matrix_and_bad_k() -> None:
    m = np.arange(12, dtype=np.float32).reshape(3, 4)
    q, k, w = top_k_pairs(m, 3)
    assert list(zip(q, k, w)) == [(2, 3, 11), (2, 2, 10), (2, 1, 9)]
    with pytest.raises(ConfigError, match="expected 1 <= k <= 12"):
        top_k_pairs(m, 13)
    with pytest.raises(ConfigError):
        top_k_pairs(m, 0)
    with pytest.raises(ShapeError):
        top_k_pairs(m[None], 1)
    bad = m.copy()
    bad[:] = np.nan
    with pytest.raises(ValidationError, match="NaN"):
        top_k_pairs(bad, 2)


def test_block_shape_is_checked() -> None:
    with pytest.raises(ShapeError, match=r"\(n, H, T, S\)"):
        row_entropy(np.ones((3, 3), np.float32))


def test_float16_conversion_is_exact_including_subnormals() -> None:
    raw = np.arange(65536, dtype=np.uint16).view(np.float16)
    np.testing.assert_array_equal(as_float32(raw), raw.astype(np.float32))
    out = np.empty(raw.shape, np.float32)
    assert as_float32(raw, out=out) is out


def test_densify_topk_keeps_top_values_and_row_sums() -> None:
    b = softmax_block(np.random.default_rng(6), (1, 2, 4, 6))
    idx = np.argsort(-b, axis=-1)[..., :2]
    vals = np.take_along_axis(b, idx, -1)
    res = 1 - vals.sum(-1)
    d = densify_topk(vals, idx, res, 6)
    np.testing.assert_allclose(d.sum(-1), 1, rtol=1e-5)
    np.testing.assert_array_equal(np.take_along_axis(d, idx, -1), vals)
    np.testing.assert_array_equal(d.max(-1), b.max(-1))


def test_float16_conversion_is_exact_for_every_bit_pattern() -> None:
    # The shift path (non-negative finite blocks) and the table fallback (any block with
    # a negative, inf or NaN value) both give numpy's own float16 -> float32 value.
    from attnscope.analysis.metrics import _f16_into

    bits = np.arange(0x7C00, dtype=np.uint16)  # every non-negative finite float16
    out = np.empty(bits.shape, dtype=np.float32)
    _f16_into(bits, out)
    np.testing.assert_array_equal(out, bits.view(np.float16).astype(np.float32))
    every = np.arange(65536, dtype=np.uint16)
    out = np.empty(every.shape, dtype=np.float32)
    _f16_into(every, out)
    want = every.view(np.float16).astype(np.float32)
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))  # NaN payloads too

"""Attention rollout (Abnar & Zuidema 2020): hand-computed small cases, archives, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from analysis_helpers import build_archive, make_layout, make_weights

from attnscope.analysis import (
    StaleTableError,
    attention_rollout,
    encoder_decoder_rollout,
    load_table,
    residual_attention,
    rollout_archive,
    sample_rollout,
)
from attnscope.errors import AttnscopeError, SelectionError, ShapeError
from attnscope.store import ArchiveWriter, SideLayout, TokenLayout

ENC_SELF = ("encoder", "self_attention")
DEC_SELF = ("decoder", "self_attention")
CROSS = ("decoder", "cross_attention")


def _matrix(df: pd.DataFrame, sample: int, stack: str, kind: str) -> np.ndarray:
    sel = df[(df["sample"] == sample) & (df["stack"] == stack) & (df["kind"] == kind)]
    return sel.pivot(index="query", columns="key", values="score").to_numpy()


def test_identity_attention_rolls_out_to_identity() -> None:
    np.testing.assert_array_equal(attention_rollout([np.eye(4)] * 3), np.eye(4))


def test_two_layers_three_tokens_by_hand() -> None:
    a0 = np.array([[1.0, 0, 0], [1, 0, 0], [1, 0, 0]])  # everyone reads token 0
    a1 = np.full((3, 3), 1 / 3)  # uniform
    # Ã0 = [[1,0,0],[.5,.5,0],[.5,0,.5]], Ã1 = 2/3 on the diagonal, 1/6 off it; R = Ã1 Ã0
    want = np.array([[5 / 6, 1 / 12, 1 / 12], [7 / 12, 1 / 3, 1 / 12], [7 / 12, 1 / 12, 1 / 3]])
    np.testing.assert_allclose(attention_rollout([a0, a1]), want, atol=1e-12)


def test_uniform_attention_mixes_geometrically() -> None:
    n, layers = 4, 3
    u = np.full((n, n), 1 / n)
    # Ã = (I + U) / 2 with U idempotent: Ã^L = 2^-L I + (1 - 2^-L) U
    want = 0.5**layers * np.eye(n) + (1 - 0.5**layers) * u
    np.testing.assert_allclose(attention_rollout([u] * layers), want, atol=1e-12)


def test_residual_renormalises_rows_and_refuses_non_square() -> None:
    r = residual_attention(np.array([[2.0, 2.0], [0.0, 0.0]]))  # drifted row, empty row
    np.testing.assert_allclose(r, [[0.75, 0.25], [0.0, 1.0]])
    with pytest.raises(ShapeError, match="square"):
        residual_attention(np.ones((2, 3)) / 3)


def test_cross_attention_continuation_by_hand() -> None:
    enc = [np.array([[0.0, 1.0], [0.0, 1.0]])]  # both encoder tokens read token 1
    dec = [np.array([[1.0, 0.0], [0.5, 0.5]])]  # causal
    cross = [np.eye(2)]  # decoder token i reads encoder output i
    r_e, r_dd, r_de = encoder_decoder_rollout(enc, dec, cross)
    np.testing.assert_allclose(r_e, [[0.5, 0.5], [0.0, 1.0]])
    # Ã_dec = [[1, 0], [.25, .75]]; after cross: R_dd = Ã/2, R_de = C R_e / 2
    np.testing.assert_allclose(r_dd, [[0.5, 0.0], [0.125, 0.375]])
    np.testing.assert_allclose(r_de, [[0.25, 0.25], [0.0, 0.5]])
    np.testing.assert_allclose(r_dd.sum(1) + r_de.sum(1), 1.0)


def _tiny_enc_dec(path: Path) -> object:
    layout = TokenLayout(
        encoder=SideLayout.from_lengths({"text": 1, "agentview_image": 1}),
        decoder=SideLayout.from_lengths({"action": 2}),
    )
    enc = np.array([[[[0.0, 1.0], [0.0, 1.0]]]], dtype=np.float32)  # (1, 1, 2, 2)
    dec = np.array([[[[1.0, 0.0], [0.5, 0.5]]]], dtype=np.float32)
    cross = np.eye(2, dtype=np.float32)[None, None]
    with ArchiveWriter.create(path, layout, dtype="float32") as w:
        w.append({
            "encoder/0/self_attention": enc,
            "decoder/0/self_attention": dec,
            "decoder/0/cross_attention": cross,
        })
    return path


def test_archive_table_matches_hand_computation(tmp_path: Path) -> None:
    arc = _tiny_enc_dec(tmp_path / "t.zarr")
    df = load_table(rollout_archive(arc, tmp_path / "out").parent, "rollout", archive=arc)
    np.testing.assert_allclose(_matrix(df, 0, *CROSS), [[0.25, 0.25], [0.0, 0.5]])
    np.testing.assert_allclose(_matrix(df, 0, *DEC_SELF), [[0.5, 0.0], [0.125, 0.375]])
    np.testing.assert_allclose(_matrix(df, 0, *ENC_SELF), [[0.5, 0.5], [0.0, 1.0]])
    row = df[(df["stack"] == "decoder") & (df["kind"] == "cross_attention")].iloc[1]
    assert (row.query_label, row.key_label) == ("action[0]", "agentview_image")
    assert (row.query_segment, row.key_segment) == ("action", "agentview_image")
    assert set(df["layer"]) == {0}


def test_random_archive_rows_sum_to_one_and_match_memory(small: tuple, tmp_path: Path) -> None:
    arc, w = small
    df = pd.read_parquet(rollout_archive(arc, tmp_path / "out"))
    enc = df[(df["stack"] == "encoder")].groupby(["sample", "query"]).score.sum()
    np.testing.assert_allclose(enc, 1.0, atol=1e-5)
    dec = df[df["stack"] == "decoder"].groupby(["sample", "query"]).score.sum()
    np.testing.assert_allclose(dec, 1.0, atol=1e-5)
    x = w["encoder"][0]["self_attention"][3].mean(0)
    np.testing.assert_allclose(_matrix(df, 3, *ENC_SELF), attention_rollout([x]), atol=1e-6)
    mats = sample_rollout(arc, 3)
    np.testing.assert_allclose(_matrix(df, 3, *CROSS), mats[CROSS][0], atol=1e-6)
    assert df["archive_fingerprint"].unique().tolist() == [arc.identity()["fingerprint"]]


def test_heads_selection_averages_only_those_heads(tmp_path: Path) -> None:
    w = make_weights(seed=3, layers=2)
    arc = build_archive(tmp_path / "h.zarr", w, make_layout())
    got = sample_rollout(arc, 1, heads=[2])[ENC_SELF][0]
    want = attention_rollout([layer["self_attention"][1, 2] for layer in w["encoder"]])
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(SelectionError, match="not all stored"):
        sample_rollout(arc, 1, heads=[9])


def test_decoder_only_archive_gets_its_own_rollout(tmp_path: Path) -> None:
    w = make_weights(seed=2, layers=2)
    dec_only = {"decoder": [{"self_attention": lay["self_attention"]} for lay in w["decoder"]]}
    layout = TokenLayout(decoder=make_layout().decoder)
    arc = build_archive(tmp_path / "d.zarr", dec_only, layout)
    mats = sample_rollout(arc, 0)
    assert set(mats) == {DEC_SELF}
    want = attention_rollout([lay["self_attention"][0].mean(0) for lay in w["decoder"]])
    np.testing.assert_allclose(mats[DEC_SELF][0], want, atol=1e-6)
    assert np.allclose(np.triu(mats[DEC_SELF][0], 1), 0)  # causal stays causal


def test_padded_tokens_are_left_out(tmp_path: Path) -> None:
    layout = TokenLayout(encoder=SideLayout.from_lengths({"text": 4}))
    mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=bool)  # right and left padding
    rng = np.random.default_rng(0)
    x = np.zeros((2, 2, 4, 4), dtype=np.float32)
    for i in range(2):
        r = np.flatnonzero(mask[i])
        z = rng.random((2, 3, 3)).astype(np.float32)
        x[i][:, r[:, None], r[None, :]] = z / z.sum(-1, keepdims=True)
    with ArchiveWriter.create(tmp_path / "r.zarr", layout, dtype="float32",
                              max_lengths={"encoder": 4}) as wr:
        wr.append({"encoder/0/self_attention": x, "encoder/1/self_attention": x[:, ::-1]},
                  masks={"encoder": mask})
    df = pd.read_parquet(rollout_archive(tmp_path / "r.zarr", tmp_path / "out"))
    for i in range(2):
        r = np.flatnonzero(mask[i])
        sel = df[df["sample"] == i]
        assert set(sel["query"]) == set(r) and set(sel["key"]) == set(r)
        sub = [x[i].mean(0)[np.ix_(r, r)], x[i, ::-1].mean(0)[np.ix_(r, r)]]
        np.testing.assert_allclose(_matrix(df, i, *ENC_SELF), attention_rollout(sub), atol=1e-6)


def test_missing_layer_refused_in_one_line(tmp_path: Path) -> None:
    layout = TokenLayout(encoder=SideLayout.from_lengths({"text": 3}))
    x = np.full((1, 1, 3, 3), 1 / 3, dtype=np.float32)
    with ArchiveWriter.create(tmp_path / "m.zarr", layout, dtype="float32") as wr:
        wr.append({"encoder/0/self_attention": x, "encoder/2/self_attention": x})
    with pytest.raises(SelectionError, match="lacks encoder/1/self_attention") as e:
        rollout_archive(tmp_path / "m.zarr", tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "rollout.parquet").exists()


def test_depth_from_model_config_catches_missing_last_layer(tmp_path: Path) -> None:
    layout = TokenLayout(encoder=SideLayout.from_lengths({"text": 3}))
    x = np.full((1, 1, 3, 3), 1 / 3, dtype=np.float32)
    with ArchiveWriter.create(tmp_path / "m.zarr", layout, dtype="float32",
                              model_config={"num_encoder_layers": 2}) as wr:
        wr.append({"encoder/0/self_attention": x})
    with pytest.raises(AttnscopeError, match="lacks encoder/1/self_attention"):
        rollout_archive(tmp_path / "m.zarr", tmp_path / "out")


def test_cross_attention_without_encoder_refused(tmp_path: Path) -> None:
    w = make_weights(seed=1)
    no_enc = {"decoder": w["decoder"]}
    arc = build_archive(tmp_path / "x.zarr", no_enc, make_layout())
    with pytest.raises(SelectionError, match=r"lacks encoder/\*/self_attention"):
        rollout_archive(arc, tmp_path / "out")


def test_stale_rollout_table_detected(small: tuple, tmp_path: Path) -> None:
    arc, _ = small
    rollout_archive(arc, tmp_path / "out", samples=[0])
    other = build_archive(tmp_path / "other.zarr", make_weights(seed=9), make_layout())
    with pytest.raises(StaleTableError):
        load_table(tmp_path / "out", "rollout", archive=other)


def test_bad_sample_refused(small: tuple, tmp_path: Path) -> None:
    arc, _ = small
    with pytest.raises(SelectionError, match="out of range"):
        rollout_archive(arc, tmp_path / "out", samples=[99])

"""Diff and rollout figures: the drawn data is B - A (symmetric limits, diverging colormap),
rollout heatmaps carry the sample's labels; the `diff` / `rollout` commands end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from analysis_helpers import build_archive, make_layout, make_weights
from click.testing import CliRunner

from attnscope.analysis import rollout_archive
from attnscope.cli import cli
from attnscope.errors import SelectionError
from attnscope.render import plot_diff, plot_diff_summary, plot_rollout
from attnscope.render.compare import DIFF_CMAP, prepare_diff, prepare_rollout


@pytest.fixture
def pair(tmp_path: Path) -> tuple:
    w = make_weights(seed=5)
    a = build_archive(tmp_path / "a.zarr", w, make_layout())
    w["encoder"][0]["self_attention"][:, 1] = np.eye(12, dtype=np.float32)
    b = build_archive(tmp_path / "b.zarr", w, make_layout())
    return a, b, w


def test_diff_figure_data_is_b_minus_a(pair: tuple) -> None:
    a, b, _ = pair
    xa, xb = a.attention("encoder/0/self_attention"), b.attention("encoder/0/self_attention")
    want = np.eye(12) - np.asarray(xa[2, 1])
    p = prepare_diff(xa, xb, head_idx=1, batch_idx=2)
    np.testing.assert_allclose(p.data, want, atol=1e-6)
    assert p.vmin == -p.vmax == pytest.approx(-np.abs(want).max(), rel=1e-6)
    fig = plot_diff(xa, xb, head_idx=1, batch_idx=2)
    (im,) = fig.axes[0].images
    np.testing.assert_allclose(im.get_array(), want, atol=1e-6)
    assert im.get_cmap().name.startswith(DIFF_CMAP)
    assert im.norm.vmin == -im.norm.vmax
    assert fig.axes[0].get_xticklabels()[0].get_text() == "text[0]"


def test_diff_of_unchanged_head_is_zero(pair: tuple) -> None:
    a, b, _ = pair
    xa, xb = a.attention("encoder/0/self_attention"), b.attention("encoder/0/self_attention")
    p = prepare_diff(xa, xb, head_idx=0, batch_idx=0)
    assert (p.data == 0).all() and p.vmax > 0


def test_diff_summary_puts_the_change_in_its_cell(pair: tuple, tmp_path: Path) -> None:
    from attnscope.analysis import diff_archives, load_table

    a, b, _ = pair
    per_head = pd.read_parquet(diff_archives(a, b, tmp_path / "d"))
    fig = plot_diff_summary(per_head, stack="encoder", kind="self_attention")
    assert np.asarray(fig.axes[0].images[0].get_array()).shape == (1, 4)  # 4 heads
    df = load_table(tmp_path / "d", "diff", with_mean_head=True)
    fig = plot_diff_summary(df, stack="encoder", kind="self_attention")
    data = np.asarray(fig.axes[0].images[0].get_array())
    assert data.shape == (1, 5)  # one layer x (4 heads + mean)
    assert data[0, 1] > 0 and data[0, 4] > 0 and (data[0, [0, 2, 3]] == 0).all()


def test_rollout_figure_has_the_sample_labels(pair: tuple, tmp_path: Path) -> None:
    a, _, _ = pair
    rollout_archive(a, tmp_path / "t", samples=[1])
    p = prepare_rollout(pd.read_parquet(tmp_path / "t" / "rollout.parquet"), sample=1)
    assert p.data.shape == (10, 12)  # decoder tokens x encoder tokens (the default)
    assert p.rows.labels[0] == "bos" and p.cols.labels[-1] == "agentview_image[4]"
    assert p.cols.boundaries == (7,)
    fig = plot_rollout(tmp_path / "t", sample=1, stack="encoder", kind="self_attention",
                       archive=a)
    data = np.asarray(fig.axes[0].images[0].get_array())
    np.testing.assert_allclose(data.sum(1), 1.0, atol=1e-5)
    with pytest.raises(SelectionError, match="no sample 0"):
        prepare_rollout(pd.read_parquet(tmp_path / "t" / "rollout.parquet"), sample=0)


def test_cli_diff_end_to_end(pair: tuple, tmp_path: Path) -> None:
    a, b, _ = pair
    out = tmp_path / "cmp"
    res = CliRunner().invoke(cli, ["diff", str(a.path), str(b.path), "--out", str(out),
                                   "--figures", "--heads", "1"])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out / "diff.parquet")
    assert (df[df["js"] > 0]["head_index"] == 1).all()
    assert (pd.read_parquet(out / "mean_head_diff.parquet")["js"] > 0).any()
    assert (out / "diff" / "encoder-L00-self_attention-s0000-h01.png").exists()
    assert (out / "diff" / "encoder-L00-self_attention-s0000-havg.png").exists()
    assert (out / "diff" / "summary-js-encoder-self_attention.png").exists()


def test_cli_diff_refuses_mismatch_in_one_line(tmp_path: Path) -> None:
    a = build_archive(tmp_path / "a.zarr", make_weights(seed=1), make_layout())
    b = build_archive(tmp_path / "b.zarr", make_weights(seed=1, n=4), make_layout())
    res = CliRunner().invoke(cli, ["diff", str(a.path), str(b.path), "--out",
                                   str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "sample count: A has 6, B has 4" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_cli_rollout_end_to_end(pair: tuple, tmp_path: Path) -> None:
    a, _, _ = pair
    out = tmp_path / "r"
    res = CliRunner().invoke(cli, ["rollout", str(a.path), "--out", str(out), "--samples",
                                   "0-1", "--figures"])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out / "rollout.parquet")
    assert set(df["sample"]) == {0, 1}
    for name in ("decoder-cross_attention", "decoder-self_attention", "encoder-self_attention"):
        assert (out / "rollout" / f"{name}-s0001.png").exists()


def test_diff_and_rollout_speak_model_head_ids(kept_heads_archive, tmp_path: Path) -> None:
    """Heads 0 and 3 kept: the diff of head 3 is of the second stored head, its file h03
    and title 'head 3'; rollout over head 3 averages that head only; head 1 is refused."""
    import shutil

    from attnscope.analysis.rollout import sample_rollout
    from attnscope.render.compare import render_diff
    from attnscope.store import open_archive

    b_path = tmp_path / "b.zarr"
    shutil.copytree(kept_heads_archive, b_path)
    with open_archive(kept_heads_archive) as a, open_archive(b_path) as b:
        xa = a.attention("encoder", 0, "self_attention")
        p = prepare_diff(xa, b.attention("encoder", 0, "self_attention"), head_idx=3)
        assert (p.data == 0).all()
        fig = plot_diff(xa, b.attention("encoder", 0, "self_attention"), head_idx=3)
        assert "head 3" in fig.axes[0].get_title()
        with pytest.raises(SelectionError, match=r"head_idx 1 is not a stored head"):
            prepare_diff(xa, xa, head_idx=1)
        files = render_diff(a, b, tmp_path / "d", heads=[3], arrays=["encoder/0/self_attention"])
        assert [f.name for f in files] == ["encoder-L00-self_attention-s0000-h03.png"]
    one = sample_rollout(kept_heads_archive, 0, heads=[3])[("encoder", "self_attention")][0]
    with open_archive(kept_heads_archive) as a:
        mats = [np.asarray(a.attention("encoder", i, "self_attention")[0, 1], dtype=np.float64)
                for i in a.layers["encoder"]]
    from attnscope.analysis.rollout import attention_rollout

    np.testing.assert_allclose(one, attention_rollout(mats), atol=1e-6)
    with pytest.raises(SelectionError, match=r"\[0, 3\]"):
        sample_rollout(kept_heads_archive, 0, heads=[1])

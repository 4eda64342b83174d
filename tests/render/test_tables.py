import numpy as np
import pandas as pd
import pytest

from attnscope.errors import InputError, SelectionError
from attnscope.render import plot_head_metric, plot_segment_mass, plot_top_pairs
from attnscope.render.tables import prepare_segment_mass, prepare_top_pairs


@pytest.fixture
def head_stats(rng):
    rows = [
        dict(stack=st, layer=lyr, kind="self_attention", sample=s, head=h,
             entropy_mean=float(rng.random()))
        for st in ("encoder", "decoder") for lyr in range(3) for s in range(2) for h in range(4)
    ]
    return pd.DataFrame(rows)


@pytest.fixture
def segment_mass(rng):
    segs = ["text", "robot0_eef_pos", "agentview_image"]
    rows = [
        dict(stack="encoder", layer=0, kind="self_attention", sample=0, head=h,
             query_segment=q, key_segment=k, mass=float(rng.random()))
        for h in range(2) for q in segs for k in segs
    ]
    return pd.DataFrame(rows)


def test_entropy_heatmap_is_layer_by_head_mean_over_samples(head_stats, tmp_path):
    head_stats.to_parquet(tmp_path / "head_stats.parquet")
    fig = plot_head_metric(tmp_path / "head_stats.parquet", stack="decoder", kind="self_attention")
    ax = fig.axes[0]
    want = (head_stats[head_stats["stack"] == "decoder"]
            .groupby(["layer", "head"]).entropy_mean.mean().unstack().to_numpy())
    np.testing.assert_allclose(ax.images[0].get_array(), want)
    assert ax.get_xlabel() == "head" and ax.get_ylabel() == "layer"
    assert ax.images[0].get_clim() == pytest.approx((want.min(), want.max()))
    assert len(fig.axes) == 2


def test_segment_mass_keeps_sequence_order_and_averages_heads(segment_mass):
    pv = prepare_segment_mass(segment_mass, stack="encoder", layer=0, kind="self_attention")
    assert list(pv.index) == ["text", "robot0_eef_pos", "agentview_image"]
    fig = plot_segment_mass(segment_mass, stack="encoder", layer=0, head=1)
    sel = segment_mass[segment_mass["head"] == 1]
    img = fig.axes[0].images[0].get_array()
    assert img[0, 2] == pytest.approx(
        sel[(sel.query_segment == "text") & (sel.key_segment == "agentview_image")].mass.item())
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == list(pv.index)


def test_top_pairs_sorted_with_labels():
    df = pd.DataFrame(dict(stack="encoder", layer=0, kind="self_attention", sample=0, head=0,
                           query=[0, 1, 2], key=[2, 0, 1], weight=[0.2, 0.9, 0.5],
                           query_label=["a", "b", "c"], key_label=["c", "a", "b"]))
    tp = prepare_top_pairs(df, k=2)
    assert tp.pair.tolist() == ["b -> a", "c -> b"]
    fig = plot_top_pairs(df, k=2)
    bars = fig.axes[0].patches
    assert [b.get_width() for b in bars] == pytest.approx([0.9, 0.5])


def test_unknown_selection_and_missing_column(segment_mass):
    with pytest.raises(SelectionError, match=r"layer 7 not in the table; valid values: \[0\]"):
        plot_segment_mass(segment_mass, stack="encoder", layer=7)
    with pytest.raises(InputError, match="no 'mass' column"):
        plot_segment_mass(segment_mass.drop(columns="mass"), stack="encoder", layer=0)


def test_segment_mass_uses_average_head_rows_when_present(segment_mass):
    avg = segment_mass[segment_mass["head"] == 0].assign(head=-1, mass=0.5)
    df = pd.concat([segment_mass, avg])
    pv = prepare_segment_mass(df, stack="encoder", layer=0, kind="self_attention")
    assert (pv.to_numpy() == 0.5).all()


def test_missing_column_names_column_and_table(segment_mass):
    with pytest.raises(InputError, match="table 'segment_mass' has no 'query_segment' column"):
        prepare_segment_mass(segment_mass.rename(columns={"query_segment": "q_segment"}),
                             stack="encoder", layer=0, kind="self_attention")


def test_unknown_metric_lists_the_head_stats_metrics(head_stats):
    with pytest.raises(InputError, match="unknown head metric 'entropy'.*'entropy_mean'"):
        plot_head_metric(head_stats, stack="encoder", kind="self_attention", metric="entropy")


def test_every_table_figure_renders_from_analyze_output(small_archive, tmp_path):
    """Tables written by ``analyze`` feed every table figure: a renamed column fails here."""
    from attnscope.analysis import analyze
    from attnscope.render import render_archive
    from attnscope.render.tables import METRICS

    analyze(small_archive, tmp_path / "tables", topk=3, progress=False)
    paths = render_archive(small_archive, tmp_path / "figs", what=["tables"],
                           tables_dir=tmp_path / "tables", progress=False)
    names = sorted(p.name for p in paths)
    assert len(names) == 3 + 2 * 9  # entropy per (stack, kind); mass and pairs per array
    assert "segment_mass-decoder-L02-cross_attention.png" in names
    assert "top_pairs-encoder-L00-self_attention.png" in names
    hs = pd.read_parquet(tmp_path / "tables" / "head_stats.parquet")
    for metric in METRICS:  # every numeric head_stats column is a drawable metric
        fig = plot_head_metric(hs, stack="decoder", kind="cross_attention", metric=metric)
        assert fig.axes[0].images[0].get_array().shape == (3, 5)  # 3 layers x (4 heads + avg)

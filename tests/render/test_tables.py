import numpy as np
import pandas as pd
import pytest

from attnscope.errors import InputError, SelectionError
from attnscope.render import plot_head_metric, plot_segment_mass, plot_top_pairs
from attnscope.render.tables import prepare_segment_mass, prepare_top_pairs


@pytest.fixture
def head_stats(rng):
    rows = [
        dict(stack=st, layer=lyr, kind="self_attention", sample=s, head_index=h,
             entropy_mean=float(rng.random()))
        for st in ("encoder", "decoder") for lyr in range(3) for s in range(2) for h in range(4)
    ]
    return pd.DataFrame(rows)


@pytest.fixture
def segment_mass(rng):
    segs = ["text", "robot0_eef_pos", "agentview_image"]
    rows = [
        dict(stack="encoder", layer=0, kind="self_attention", sample=0, head_index=h,
             query_segment=q, key_segment=k, mass=float(rng.random()))
        for h in range(2) for q in segs for k in segs
    ]
    return pd.DataFrame(rows)


def test_entropy_heatmap_is_layer_by_head_mean_over_samples(head_stats, tmp_path):
    head_stats.to_parquet(tmp_path / "head_stats.parquet")
    fig = plot_head_metric(tmp_path / "head_stats.parquet", stack="decoder", kind="self_attention")
    ax = fig.axes[0]
    want = (head_stats[head_stats["stack"] == "decoder"]
            .groupby(["layer", "head_index"]).entropy_mean.mean().unstack().to_numpy())
    np.testing.assert_allclose(ax.images[0].get_array(), want)
    assert ax.get_xlabel() == "head" and ax.get_ylabel() == "layer"
    assert ax.images[0].get_clim() == pytest.approx((want.min(), want.max()))
    assert len(fig.axes) == 2


def test_segment_mass_keeps_sequence_order_and_averages_heads(segment_mass):
    pv = prepare_segment_mass(segment_mass, stack="encoder", layer=0, kind="self_attention")
    assert list(pv.index) == ["text", "robot0_eef_pos", "agentview_image"]
    fig = plot_segment_mass(segment_mass, stack="encoder", layer=0, head=1)
    sel = segment_mass[segment_mass.head_index == 1]
    img = fig.axes[0].images[0].get_array()
    assert img[0, 2] == pytest.approx(
        sel[(sel.query_segment == "text") & (sel.key_segment == "agentview_image")].mass.item())
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == list(pv.index)


def test_top_pairs_sorted_with_labels():
    df = pd.DataFrame(dict(stack="encoder", layer=0, kind="self_attention", sample=0, head_index=0,
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
    avg = segment_mass[segment_mass.head_index == 0].assign(head_index=-1, mass=0.5)
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
    from attnscope.analysis import analyze, load_table
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
        assert fig.axes[0].images[0].get_array().shape == (3, 4)  # 3 layers x 4 heads
    both = load_table(tmp_path / "tables", "head_stats", with_mean_head=True)
    fig = plot_head_metric(both, stack="decoder", kind="cross_attention")
    assert fig.axes[0].images[0].get_array().shape == (3, 5)  # + the mean of heads
    assert "avg" in [t.get_text() for t in fig.axes[0].get_xticklabels()]


def _pairs(rows):
    """A top_pairs table from (sample, head, rank, query, key, weight, qlabel, klabel,
    allowed_keys) rows."""
    cols = ["sample", "head_index", "rank", "query", "key", "weight", "query_label", "key_label",
            "allowed_keys"]
    df = pd.DataFrame(rows, columns=cols)
    return df.assign(stack="decoder", layer=0, kind="self_attention")


def test_top_pair_summary_counts_each_heads_top_pair_over_samples():
    """Forced cells (allowed_keys 1) never count; the rest: per head, how often a token
    pair is the head's top pair, and its mean weight there."""
    from attnscope.render.tables import plot_top_pair_summary, prepare_top_pair_summary

    rows = []
    for s in range(4):
        rows += [(s, 0, 0, 0, 0, 1.0, "<s>", "<s>", 1),  # forced: row 0 sees one key
                 (s, 0, 1, 2, 1, 0.6 + 0.1 * (s % 2), "cat", "the", 3),
                 (s, 0, 2, 3, 3, 0.5, "sat", "sat", 4),
                 (s, 3, 0, 0, 0, 1.0, "<s>", "<s>", 1),
                 (s, 3, 1, 3, 2, 0.8, "sat", "cat", 4) if s < 3 else
                 (s, 3, 1, 1, 0, 0.7, "the", "<s>", 2)]
    df = _pairs(rows)
    tp = prepare_top_pair_summary(df, stack="decoder", layer=0, kind="self_attention")
    h0 = tp[tp.head_index == 0]
    assert h0["pair"].tolist() == ["cat -> the"] and h0["count"].item() == 4
    assert h0["weight"].item() == pytest.approx(0.65) and h0["share"].item() == 1.0
    h3 = tp[tp.head_index == 3]
    assert h3["pair"].tolist() == ["sat -> cat", "the -> <s>"]
    assert h3["count"].tolist() == [3, 1] and h3["samples"].tolist() == [4, 4]
    fig = plot_top_pair_summary(df, stack="decoder", layer=0, kind="self_attention")
    assert "forced cells excluded" in fig.get_suptitle().replace("\n", " ")
    assert [ax.get_title() for ax in fig.axes] == ["head 0", "head 3"]
    # tables of version 1 (no allowed_keys) still read, and the title says what it knows
    old = df.drop(columns="allowed_keys")
    fig = plot_top_pair_summary(old, stack="decoder", layer=0, kind="self_attention")
    assert "forced cells not marked" in fig.get_suptitle().replace("\n", " ")


def test_top_pairs_of_one_sample_leave_forced_cells_out():
    df = _pairs([(0, 0, 0, 0, 0, 1.0, "<s>", "<s>", 1), (0, 0, 1, 2, 1, 0.6, "cat", "the", 3)])
    assert prepare_top_pairs(df, k=5).pair.tolist() == ["cat -> the"]
    assert "forced cells excluded" in plot_top_pairs(df, head=0).axes[0].get_title().replace(
        "\n", " ")


def test_top_pairs_table_marks_forced_cells(small_archive, tmp_path):
    """analyze writes allowed_keys (top_pairs version 2; 3: head_index): row 0 of a causal
    array is forced."""
    import pyarrow.parquet as pq

    from attnscope.analysis import analyze
    from attnscope.contracts import TABLE_VERSION_KEY

    analyze(small_archive, tmp_path / "t", topk=16, progress=False)
    meta = pq.read_schema(tmp_path / "t" / "top_pairs.parquet").metadata
    assert meta[TABLE_VERSION_KEY.encode()] == b"3"
    df = pd.read_parquet(tmp_path / "t" / "top_pairs.parquet")
    enc = df[df["stack"] == "encoder"]
    assert (enc["allowed_keys"] == 5).all()  # bidirectional, 5 keys
    cross = df[df["kind"] == "cross_attention"]
    assert (cross["allowed_keys"] == 5).all()


def test_normalised_entropy_has_a_fixed_unit_scale_and_enough_decimals(head_stats):
    from attnscope.render.tables import cell_format

    hs = head_stats.assign(norm_entropy_mean=0.9 + head_stats["entropy_mean"] * 0.004)
    fig = plot_head_metric(hs, stack="decoder", kind="self_attention",
                           metric="norm_entropy_mean")
    assert fig.axes[0].images[0].get_clim() == (0.0, 1.0)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert all(len(t.split(".")[1]) == 3 for t in texts)  # 1/256 of 0..1 needs 3 decimals
    assert cell_format(0.0, 1.0) == "{:.3f}" and cell_format(1.0, 1.004) == "{:.5f}"
    assert cell_format(0.0, 100.0) == "{:.2f}"

"""Table schema (analysis/tables.py): per-head tables name the head ``head_index`` and hold
real heads only, the mean over heads has its own tables, and tables of the previous schema
(column ``head``, mean rows at ``head == -1``) read the same in every reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from analysis_helpers import make_layout, make_weights

from attnscope.analysis import analyze, diff_archives, load_table, timeline
from attnscope.contracts import MEAN_HEAD_TABLES, TABLE_VERSION_KEY, TABLE_VERSIONS
from attnscope.errors import ConfigError, SelectionError, StaleTableError
from attnscope.store import ArchiveWriter, open_archive

PER_HEAD = ("head_stats", "row_stats", "top_pairs", "segment_mass")
SORT = ["stack", "layer", "kind", "sample"]


def _entropy(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(x > 0, x * np.log(x), 0).sum(-1)


@pytest.fixture
def tables(tmp_path: Path) -> tuple[Path, Path, dict]:
    """An encoder-decoder archive with episode/step ids, analysed, timelined and diffed
    against itself: ``(archive, tables dir, weights)``."""
    w = make_weights(seed=2)
    path = tmp_path / "a.zarr"
    n = w["encoder"][0]["self_attention"].shape[0]
    with ArchiveWriter.create(path, make_layout(), dtype="float32") as wr:
        wr.append(w, sample_ids={"episode": np.zeros(n, np.int64), "step": np.arange(n)})
    out = tmp_path / "t"
    analyze(path, out, topk=3, progress=False)
    timeline(path, out, query="action")
    diff_archives(path, path, out)
    return path, out, w


def _old(out: Path, dest: Path) -> Path:
    """``out``'s per-head tables rewritten as the writer before version 2 wrote them: one
    table each, column ``head`` where ``head_index`` is, the mean rows at ``head == -1``
    after the heads, no mean table; version metadata as then (top_pairs 2, others none)."""
    dest.mkdir()
    for f in out.glob("*.parquet"):
        if f.stem not in MEAN_HEAD_TABLES.values():
            (dest / f.name).write_bytes(f.read_bytes())
    for table, mean_name in MEAN_HEAD_TABLES.items():
        heads = pq.read_table(out / f"{table}.parquet")
        mean = pq.read_table(out / f"{mean_name}.parquet")
        at = heads.schema.get_field_index("head_index")
        mean = mean.add_column(at, "head_index", pa.array(np.full(len(mean), -1, np.int64)))
        both = pa.concat_tables([heads, mean.cast(heads.schema)])
        both = both.rename_columns(["head" if c == "head_index" else c for c in both.column_names])
        meta = dict(heads.schema.metadata)
        meta.pop(TABLE_VERSION_KEY.encode())
        if table == "top_pairs":
            meta[TABLE_VERSION_KEY.encode()] = b"2"
        pq.write_table(both.replace_schema_metadata(meta), dest / f"{table}.parquet")
    return dest


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    keys = [c for c in (*SORT, "head_index", "query", "rank", "key_segment", "query_segment",
                        "step") if c in a.columns]
    pd.testing.assert_frame_equal(a.sort_values(keys, kind="stable").reset_index(drop=True),
                                  b.sort_values(keys, kind="stable").reset_index(drop=True))


def test_per_head_tables_hold_real_heads_and_pool_naively(tables) -> None:
    path, out, w = tables
    hs = load_table(out, "head_stats", archive=path)
    assert "head" not in hs.columns and (hs.head_index >= 0).all()
    assert len(hs[hs.head_index == 2]) > 0  # attribute access reads the column
    # a naive groupby pools real heads only: the mean row entropy over samples and heads
    enc = hs[hs["stack"] == "encoder"]  # (DataFrame.stack is a method: brackets)
    enc = enc.groupby("layer").entropy_mean.mean()
    for layer, got in enc.items():
        want = _entropy(w["encoder"][layer]["self_attention"]).mean()
        assert got == pytest.approx(want, rel=1e-5)
    mean = load_table(out, "mean_head_stats", archive=path)
    assert "head_index" not in mean.columns
    x = w["encoder"][0]["self_attention"]
    got = mean[(mean["stack"] == "encoder") & (mean.layer == 0)].sort_values("sample")
    np.testing.assert_allclose(got.entropy_mean, _entropy(x.mean(1)).mean(-1), rtol=1e-5)
    import polars as pl

    p = pl.read_parquet(out / "head_stats.parquet")
    assert p.filter(pl.col("head_index") == 2).height == len(hs[hs.head_index == 2])
    for name in (*PER_HEAD, "diff", "timeline", *MEAN_HEAD_TABLES.values()):
        meta = pq.read_schema(out / f"{name}.parquet").metadata
        assert meta[TABLE_VERSION_KEY.encode()] == str(TABLE_VERSIONS[name]).encode(), name


def test_with_mean_head_appends_the_mean_rows_at_minus_one(tables) -> None:
    _, out, _ = tables
    for name in (*PER_HEAD, "diff", "timeline"):
        heads, mean = load_table(out, name), load_table(out, MEAN_HEAD_TABLES[name])
        both = load_table(out, name, with_mean_head=True)
        assert list(both.columns) == list(heads.columns)
        assert len(both) == len(heads) + len(mean) and len(mean) > 0
        pd.testing.assert_frame_equal(
            both[both.head_index == -1].drop(columns="head_index").reset_index(drop=True),
            mean)
    got = load_table(out, "top_pairs", with_mean_head=True, columns=["head_index", "weight"])
    assert list(got.columns) == ["head_index", "weight"] and (got.head_index == -1).any()
    with pytest.raises(ConfigError, match="with_mean_head needs a per-head table"):
        load_table(out, "head_similarity", with_mean_head=True)


def test_old_schema_tables_read_as_the_current_schema(tables, tmp_path) -> None:
    path, out, _ = tables
    old = _old(out, tmp_path / "old")
    assert "head" in pq.read_schema(old / "head_stats.parquet").names
    assert not (old / "mean_head_stats.parquet").exists()
    for name in (*PER_HEAD, "diff", "timeline"):
        _same(load_table(old, name, archive=path), load_table(out, name))
        _same(load_table(old, MEAN_HEAD_TABLES[name], archive=path),
              load_table(out, MEAN_HEAD_TABLES[name]))
        _same(load_table(old, name, with_mean_head=True),
              load_table(out, name, with_mean_head=True))
    got = load_table(old, "segment_mass", columns=["head_index", "mass"])
    assert list(got.columns) == ["head_index", "mass"] and (got.head_index >= 0).all()
    got = load_table(old, "mean_head_segment_mass", columns=["sample", "mass"])
    assert list(got.columns) == ["sample", "mass"]
    with open_archive(path) as a, ArchiveWriter.open(path) as wr:  # one more sample: stale
        n = a.n_samples
        wr.append({k: a[k][:1] for k in a.arrays},
                  sample_ids={"episode": np.zeros(1, np.int64), "step": np.array([n])})
    with pytest.raises(StaleTableError):
        load_table(old, "mean_head_top_pairs", archive=path)


def test_old_schema_tables_feed_the_figures_and_the_report(tables, tmp_path) -> None:
    from attnscope.render import render_archive
    from attnscope.render.compare import plot_diff_summary
    from attnscope.render.report import write_report
    from attnscope.render.tables import plot_head_metric, plot_top_pair_summary
    from attnscope.render.timeline import timeline_series

    path, out, _ = tables
    old = _old(out, tmp_path / "old")
    for d in (out, old):
        figs = render_archive(path, tmp_path / f"figs-{d.name}", what=["tables", "timeline"],
                              tables_dir=d, progress=False)
        assert len(figs) > 0
    new_figs = sorted(p.name for p in (tmp_path / "figs-t").rglob("*.png"))
    assert new_figs == sorted(p.name for p in (tmp_path / "figs-old").rglob("*.png"))
    # a path to an old table: head renamed, the mean of heads drawn as before
    fig = plot_head_metric(old / "head_stats.parquet", stack="encoder", kind="self_attention")
    assert "avg" in [t.get_text() for t in fig.axes[0].get_xticklabels()]
    fig = plot_top_pair_summary(old / "top_pairs.parquet", stack="encoder", layer=0,
                                kind="self_attention")
    assert fig.axes[-1].get_title() == "mean of heads"
    fig = plot_diff_summary(pd.read_parquet(old / "diff.parquet"), stack="encoder",
                            kind="self_attention")
    assert fig.axes[0].images[0].get_array().shape[1] == 5  # 4 heads + the mean
    series = timeline_series(pd.read_parquet(old / "timeline.parquet"), episode=0,
                             stack="decoder", kind="cross_attention")
    new = timeline_series(load_table(out, "timeline"), episode=0, stack="decoder",
                          kind="cross_attention")  # no mean rows: the mean of the heads
    for layer, lines in series.items():
        for seg, (steps, mass) in lines.items():
            np.testing.assert_array_equal(steps, new[layer][seg][0])
            np.testing.assert_allclose(mass, new[layer][seg][1], rtol=1e-5)
    pages = [write_report(path, tmp_path / f"{d.name}.html", tables_dir=d).read_text()
             for d in (out, old)]
    assert pages[0] == pages[1]


def test_unknown_columns_name_the_table_columns(tables) -> None:
    _, out, _ = tables
    with pytest.raises(SelectionError, match=r"table 'mean_head_stats' has no column\(s\) "
                                             r"\['head_index'\]; its columns: \["):
        load_table(out, "mean_head_stats", columns=["head_index"])

"""analyze(): tables against direct numpy, identity, parallel paths, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from analysis_helpers import build_archive, make_layout, make_weights

from attnscope.analysis import TABLES, StaleTableError, analyze, load_table, statistics_json
from attnscope.errors import AttnscopeError, ConfigError, SelectionError

KEY = ["stack", "layer", "kind", "sample", "head_index"]


def _direct_entropy(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(x > 0, x * np.log(x), 0).sum(-1)


@pytest.fixture
def analysed(small: tuple[Any, dict], tmp_path: Path) -> tuple[Any, dict, dict[str, Path]]:
    a, w = small
    return a, w, analyze(a, tmp_path / "out", topk=5, progress=False)


def test_head_stats_match_numpy(analysed: tuple) -> None:
    a, w, paths = analysed
    df = load_table(paths["head_stats"].parent, "head_stats", archive=a)
    x = w["decoder"][0]["self_attention"]
    sel = df[(df["stack"] == "decoder") & (df["kind"] == "self_attention")].sort_values(
        ["sample", "head_index"]
    )
    assert sel.causal.all()  # detected from the zero upper triangle
    assert (df.head_index >= 0).all()  # real heads only: a naive groupby pools real heads
    real = sel
    ent = _direct_entropy(x)
    np.testing.assert_allclose(real.entropy_mean, ent.mean(-1).ravel(), atol=1e-5)
    np.testing.assert_allclose(real.entropy_max, ent.max(-1).ravel(), atol=1e-5)
    np.testing.assert_allclose(real["mean"], x.mean((2, 3)).ravel(), rtol=1e-5)
    np.testing.assert_allclose(real["std"], x.std((2, 3)).ravel(), rtol=1e-4)
    np.testing.assert_allclose(real["max"], x.max((2, 3)).ravel())
    np.testing.assert_allclose(real.sink_score, x[..., 0].mean(-1).ravel(), rtol=1e-5)
    mean = load_table(paths["head_stats"].parent, "mean_head_stats", archive=a)
    assert "head_index" not in mean.columns
    avg = mean[(mean["stack"] == "decoder") & (mean["kind"] == "self_attention")]
    np.testing.assert_allclose(avg.sort_values("sample").entropy_mean,
                               _direct_entropy(x.mean(1)).mean(-1), atol=1e-5)


def test_top_pairs_match_argsort_with_labels(analysed: tuple) -> None:
    a, w, paths = analysed
    df = load_table(paths["top_pairs"].parent, "top_pairs", with_mean_head=True)
    assert set(df.head_index) == {0, 1, 2, 3, -1}  # the mean table's rows at head_index -1
    x = w["decoder"][0]["cross_attention"]
    labels = a.layout.encoder.labels
    for head in (1, -1):
        m = x[2, head] if head >= 0 else x[2].mean(0)
        got = df[(df["kind"] == "cross_attention") & (df["sample"] == 2)
                 & (df["head_index"] == head)]
        got = got.sort_values("rank")
        order = np.argsort(-m.ravel(), kind="stable")[:5]
        np.testing.assert_array_equal(got["query"], order // m.shape[1])
        np.testing.assert_array_equal(got["key"], order % m.shape[1])
        np.testing.assert_allclose(got.weight, m.ravel()[order], rtol=1e-5)
        assert list(got.key_label) == [labels[k] for k in order % m.shape[1]]
    assert set(df[df["kind"] == "cross_attention"].key_segment) <= {"text", "agentview_image"}


def test_segment_mass_rows_sum_to_one(analysed: tuple) -> None:
    _, w, paths = analysed
    df = pd.read_parquet(paths["segment_mass"])
    sums = df.groupby([*KEY, "query_segment"]).mass.sum()
    np.testing.assert_allclose(sums, 1, rtol=1e-4)
    x = w["decoder"][0]["cross_attention"]
    got = df.query(
        "kind == 'cross_attention' and sample == 0 and head_index == 0 "
        "and query_segment == 'action' and key_segment == 'agentview_image'"
    ).mass
    np.testing.assert_allclose(got, x[0, 0, 1:, 7:].sum(-1).mean(), rtol=1e-5)


def test_row_stats_and_similarity_shapes(analysed: tuple) -> None:
    _, w, paths = analysed
    rows = pd.read_parquet(paths["row_stats"])
    x = w["encoder"][0]["self_attention"]
    enc = rows[(rows["stack"] == "encoder") & (rows.head_index == 3)]
    enc = enc.sort_values(["sample", "query"])
    np.testing.assert_allclose(enc.row_max, x[:, 3].max(-1).ravel())
    np.testing.assert_allclose(enc.entropy, _direct_entropy(x[:, 3]).ravel(), atol=1e-5)
    sim = pd.read_parquet(paths["head_similarity"])
    assert len(sim) == 3 * 6 * 6  # arrays x samples x head pairs (4 heads)
    assert sim.js.between(0, np.log(2) + 1e-6).all()


def test_tables_readable_by_pyarrow_pandas_and_others(analysed: tuple) -> None:
    _, _, paths = analysed
    for name in TABLES:
        t = pq.read_table(paths[name])
        assert t.num_rows > 0
        assert b"attnscope.identity" in t.schema.metadata
    doc = json.loads(paths["manifest"].read_text())
    assert doc["identity"]["fingerprint"]
    import duckdb  # both are in the dev extras: a missing one is a failure, not a skip
    import polars

    n = pq.read_table(paths["head_stats"]).num_rows
    assert polars.read_parquet(paths["head_stats"]).height == n
    assert duckdb.sql(f"select count(*) from '{paths['head_stats']}'").fetchall()[0][0] == n


def test_statistics_json_written_matches_archive_statistics(analysed: tuple) -> None:
    a, w, paths = analysed
    written = json.loads(paths["statistics"].read_text())
    nested = statistics_json(w)
    assert written.keys() == nested.keys() == {"encoder", "decoder"}
    for stack in written:
        for got, want in zip(written[stack], nested[stack], strict=True):
            assert got.keys() == want.keys()
            assert got["shape"] == want["shape"]
            for k in ("mean", "std", "min", "max"):
                assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7)
    from_archive = statistics_json(a)  # the out-of-core path, separately from analyze()
    for stack in written:
        for got, want in zip(from_archive[stack], written[stack], strict=True):
            assert (got["layer"], got["type"], got["shape"]) == (
                want["layer"],
                want["type"],
                want["shape"],
            )
            for k in ("mean", "std", "min", "max"):
                assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9)


def test_stale_table_is_detected(analysed: tuple, tmp_path: Path) -> None:
    _, _, paths = analysed
    other = build_archive(tmp_path / "other.zarr", make_weights(seed=9), make_layout())
    with pytest.raises(StaleTableError, match="stale"):
        load_table(paths["head_stats"].parent, "head_stats", archive=other)
    with pytest.raises(SelectionError, match="unknown table"):
        load_table(paths["head_stats"].parent, "nope")


def test_table_goes_stale_when_samples_are_appended(analysed: tuple) -> None:
    a, w, paths = analysed
    from attnscope.store import ArchiveWriter, open_archive

    out = paths["head_stats"].parent
    load_table(out, "head_stats", archive=a.path)  # current: no error
    a.close()
    with ArchiveWriter.open(a.path) as wr:
        wr.append(
            {
                st: [{k: v[:2] for k, v in layer.items()} for layer in layers]
                for st, layers in w.items()
            }
        )
    with pytest.raises(StaleTableError, match="is stale"):
        load_table(out, "head_stats", archive=open_archive(a.path))


def test_workers_and_heads_selection(small: tuple, tmp_path: Path) -> None:
    a, _ = small
    p1 = analyze(a, tmp_path / "w1", progress=False, block_bytes=1)
    p2 = analyze(a, tmp_path / "w2", progress=False, workers=2, block_bytes=1)
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_parquet(p1[name]), pd.read_parquet(p2[name]))
    p3 = analyze(a, tmp_path / "h", progress=False, arrays=["encoder"], heads=[1, 3])
    df = pd.read_parquet(p3["head_stats"])
    assert set(df["head_index"]) == {1, 3} and set(df["stack"]) == {"encoder"}
    assert set(pd.read_parquet(p3["mean_head_stats"])["stack"]) == {"encoder"}


def test_dask_cluster_equals_single_process(small: tuple, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    a, _ = small
    if a.format != "zarr":
        with pytest.raises(ConfigError, match="needs a Zarr archive"):
            analyze(a, tmp_path / "dist", progress=False, scheduler="tcp://127.0.0.1:1")
        return
    single = analyze(a, tmp_path / "single", progress=False)
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        dist = analyze(a, tmp_path / "dist", progress=False, scheduler=cluster.scheduler_address)
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_parquet(single[name]), pd.read_parquet(dist[name]))


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"arrays": ["decoder/7/cross_attention"]}, SelectionError, "no attention array"),
        ({"heads": [0, 99]}, SelectionError, "unknown head"),
        ({"topk": 10_000}, ConfigError, "larger than"),
        ({"topk": 0}, ConfigError, "positive"),
        ({"head_similarity": "kl"}, ConfigError, "expected one of"),
        ({"workers": 0}, ConfigError, "workers"),
        ({"sink_token": 50}, ConfigError, "sink_token"),
    ],
)
def test_bad_options_raise_clear_errors(
    small: tuple, tmp_path: Path, kwargs: dict, err: type, match: str
) -> None:
    a, _ = small
    with pytest.raises(err, match=match):
        analyze(a, tmp_path / "bad", progress=False, **kwargs)
    assert not (tmp_path / "bad" / "head_stats.parquet").exists()


def test_missing_and_foreign_archives(tmp_path: Path) -> None:
    pytest.importorskip("attnscope.store.reader")
    with pytest.raises(AttnscopeError):
        analyze(tmp_path / "missing.zarr", tmp_path / "o", progress=False)
    foreign = tmp_path / "foreign.zarr"
    foreign.mkdir()
    (foreign / "hello.txt").write_text("not an archive")
    with pytest.raises(AttnscopeError):
        analyze(foreign, tmp_path / "o", progress=False)


def test_analysis_never_imports_torch() -> None:
    code = (
        "import sys, attnscope.analysis as A, attnscope.analysis.api, attnscope.analysis.tables;"
        "import numpy as np;"
        "A.statistics_json({'encoder': [{'self_attention': np.full((1, 2, 3, 3), 1/3)}]});"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_tables_of_a_relative_path_are_not_stale_from_another_cwd(tmp_path, monkeypatch) -> None:
    from analysis_helpers import build_archive, make_layout, make_weights

    monkeypatch.chdir(tmp_path)
    build_archive(Path("a.zarr"), make_weights(seed=2), make_layout()).close()
    analyze("a.zarr", "tables", progress=False)
    monkeypatch.chdir(tmp_path.parent)
    df = load_table(tmp_path / "tables", "head_stats", archive=tmp_path / "a.zarr")
    assert len(df) > 0


def _damage(path: Path, how: str) -> None:
    """Damage that verify rejects: a deleted array, or an impossible commit count."""
    import shutil

    name = "decoder/0/cross_attention"
    if str(path).endswith(".zarr"):
        if how == "deleted array":
            shutil.rmtree(path / name)
            return
        rec = path / "_commits" / "main" / "zarr.json"
        doc = json.loads(rec.read_text())
        doc["attributes"]["attnscope"]["committed"] = -2
        rec.write_text(json.dumps(doc))
        return
    import h5py

    with h5py.File(path, "r+") as f:
        if how == "deleted array":
            del f[name]
        else:
            f["_commits/main"][:3] = [0, 6, -2]  # start, stop, committed, ...


@pytest.mark.parametrize("how", ["deleted array", "negative commit count"])
@pytest.mark.parametrize("command", ["analyze", "rollout", "diff", "timeline", "statistics"])
def test_data_commands_refuse_a_damaged_archive_before_computing(
    tmp_path: Path, fmt: str, how: str, command: str
) -> None:
    from attnscope.analysis.diff import diff_archives
    from attnscope.analysis.rollout import rollout_archive
    from attnscope.analysis.timeline import timeline
    from attnscope.errors import ArchiveCorruptError

    good = tmp_path / f"good.{fmt}"
    build_archive(good, make_weights(seed=1), make_layout()).close()
    bad = tmp_path / f"bad.{fmt}"
    build_archive(bad, make_weights(seed=1), make_layout()).close()
    _damage(bad, how)
    out = tmp_path / "out"
    run = {
        "analyze": lambda: analyze(bad, out, progress=False),
        "rollout": lambda: rollout_archive(bad, out),
        "diff": lambda: diff_archives(good, bad, out),
        "timeline": lambda: timeline(bad, out),
        "statistics": lambda: statistics_json(bad, out / "s.json"),
    }[command]
    with pytest.raises(ArchiveCorruptError) as e:
        run()
    msg = str(e.value)
    assert "\n" not in msg and "attnscope verify" in msg
    assert ("missing from storage" if how == "deleted array" else "committed=-2") in msg
    assert not out.exists() or not any(out.iterdir())  # refused before writing anything


def test_a_failed_analyze_leaves_no_partial_table(small, tmp_path: Path, monkeypatch) -> None:
    import errno

    a, _w = small
    real_close = pq.ParquetWriter.close

    def close(self: Any) -> None:  # the disk fills while the tables are finished
        real_close(self)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "close", close)
    with pytest.raises(OSError, match="No space left"):
        analyze(a, tmp_path / "t", progress=False)
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == []

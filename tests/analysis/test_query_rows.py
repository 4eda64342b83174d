"""Arrays that keep only some query rows (a capture row policy): every table names the
original query row and equals the full archive's values at those rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from analysis_helpers import build_archive, make_layout, make_weights, softmax_block

from attnscope.analysis import analyze, diff_archives, load_table, rollout_archive, timeline
from attnscope.contracts import KIND_AXES
from attnscope.errors import ConfigError, SelectionError
from attnscope.store import ArchiveWriter, open_archive

ROWS = {"encoder": [2, 11], "decoder": [0, 3, 9]}
KEY = ["stack", "layer", "kind", "sample", "head_index", "query"]
ROW_COLS = ["entropy", "norm_entropy", "row_max", "mean_distance", "sink_score"]


def _keep(weights: dict, rows: dict) -> dict:
    """``weights`` with only ``rows`` of each array whose query side is named."""
    out: dict = {}
    for stack, layers in weights.items():
        out[stack] = []
        for layer in layers:
            new = {}
            for kind, w in layer.items():
                side = KIND_AXES[(stack, kind)][0]
                new[kind] = w[:, :, rows[side]] if side in rows else w
            out[stack].append(new)
    return out


def _pair(tmp_path: Path, fmt: str, rows: dict = ROWS, **kw) -> tuple[Path, Path]:
    w = make_weights(seed=3)
    full = build_archive(tmp_path / f"full.{fmt}", w, make_layout(), **kw)
    part = build_archive(tmp_path / f"part.{fmt}", _keep(w, rows), make_layout(), query_rows=rows,
                         **kw)  # fmt: skip
    full.close()
    part.close()
    return tmp_path / f"full.{fmt}", tmp_path / f"part.{fmt}"


def _tables(tmp_path: Path, path: Path, name: str) -> dict[str, pd.DataFrame]:
    paths = analyze(path, tmp_path / name, progress=False, topk=4)
    return {t: load_table(paths[t].parent, t, with_mean_head=True)  # mean rows: head_index -1
            for t in ("row_stats", "top_pairs", "head_stats")}


@pytest.mark.parametrize("sparse", [None, 5])
def test_row_stats_name_the_original_rows_with_the_full_values(tmp_path, fmt, sparse) -> None:
    full, part = _pair(tmp_path, fmt, sparse_topk=sparse)
    f, p = _tables(tmp_path, full, "tf"), _tables(tmp_path, part, "tp")
    rs = p["row_stats"]
    for side, rows in ROWS.items():
        got = sorted(rs.loc[rs["stack"] == side, "query"].unique())
        if side == "decoder":  # cross-attention's queries are the decoder's too
            assert got == rows
    want_n = sum(len(ROWS[KIND_AXES[(s, k)][0]]) for s, k in KIND_AXES) * 6 * 5
    assert len(rs) == want_n
    merged = rs.merge(f["row_stats"], on=KEY, suffixes=("", "_full"), validate="one_to_one")
    assert len(merged) == len(rs)
    for c in ROW_COLS:
        np.testing.assert_allclose(merged[c], merged[c + "_full"], rtol=1e-5, atol=1e-6)
    for c in ("query_label", "query_segment"):
        assert (merged[c] == merged[c + "_full"]).all()
    # the causal decoder stays causal: its kept rows have later keys, all zero
    hs = p["head_stats"]
    dec = hs[(hs["stack"] == "decoder") & (hs["kind"] == "self_attention")]
    assert dec["causal"].all() and (dec["n_queries"] == 3).all()


def test_top_pairs_are_the_top_of_the_kept_rows_at_original_indices(tmp_path, fmt) -> None:
    w = make_weights(seed=3)
    _full, part = _pair(tmp_path, fmt)
    tp = _tables(tmp_path, part, "tp")["top_pairs"]
    for (stack, layer, kind, sample, head), g in tp.groupby(
        ["stack", "layer", "kind", "sample", "head_index"]
    ):
        if head < 0:
            continue
        x = w[stack][layer][kind][sample, head]  # (T, S) of the full matrix
        rows = ROWS[KIND_AXES[(stack, kind)][0]]
        np.testing.assert_allclose(g["weight"], x[g["query"], g["key"]], rtol=1e-6)
        assert set(g["query"]) <= set(rows)
        want = np.sort(x[rows].ravel())[::-1][: len(g)]
        np.testing.assert_allclose(np.sort(g["weight"])[::-1], want, rtol=1e-6)


def test_ragged_partial_rows_keep_only_real_kept_rows(tmp_path) -> None:
    rng = np.random.default_rng(0)
    lens = np.array([10, 6, 10, 3])
    mask = np.arange(10)[None, :] < lens[:, None]
    lay = make_layout()
    x = softmax_block(rng, (4, 2, 10, 10), causal=True)
    x = np.where(mask[:, None, None, :], x, 0)
    x /= x.sum(-1, keepdims=True)
    x = np.where(mask[:, None, :, None], x, 0)
    rows = [1, 5, 9]
    for name, data, kw in (("full", x, {}), ("part", x[:, :, rows], {"query_rows":
                                                                     {"decoder": rows}})):
        with ArchiveWriter.create(tmp_path / f"{name}.zarr", lay, dtype="float32",
                                  max_lengths={"decoder": 10}, **kw) as wr:  # fmt: skip
            wr.append({"decoder/0/self_attention": data}, masks={"decoder": mask})
    f = _tables(tmp_path, tmp_path / "full.zarr", "tf")["row_stats"]
    p = _tables(tmp_path, tmp_path / "part.zarr", "tp")["row_stats"]
    want = {(s, q) for s in range(4) for q in rows if q < lens[s]}
    assert set(zip(p["sample"], p["query"])) == want
    m = p.merge(f, on=KEY, suffixes=("", "_full"))
    assert len(m) == len(p)
    for c in ROW_COLS:
        np.testing.assert_allclose(m[c], m[c + "_full"], rtol=1e-5, atol=1e-6)


def test_statistics_and_manifest_say_which_rows(tmp_path, fmt) -> None:
    _full, part = _pair(tmp_path, fmt)
    paths = analyze(part, tmp_path / "t", progress=False)
    stats = json.loads(Path(paths["statistics"]).read_text())
    dec = stats["decoder"][0]
    assert dec["query_rows"] == ROWS["decoder"] and dec["shape"] == [4, 3, 10]
    man = json.loads(Path(paths["manifest"]).read_text())
    assert man["options"]["query_rows"]["encoder/0/self_attention"] == ROWS["encoder"]


def test_rollout_refuses_partial_rows_naming_array_and_rows(tmp_path) -> None:
    _full, part = _pair(tmp_path, "zarr")
    with pytest.raises(SelectionError, match=r"encoder/0/self_attention keeps only query rows "
                                             r"\[2, 11\]"):  # fmt: skip
        rollout_archive(part, tmp_path / "r")


def test_diff_refuses_other_kept_rows_and_diffs_equal_ones(tmp_path) -> None:
    full, part = _pair(tmp_path, "zarr")
    with pytest.raises(ConfigError, match=r"kept query rows .*: A all rows, B \[2, 11\]"):
        diff_archives(full, part, tmp_path / "d")
    path = diff_archives(part, part, tmp_path / "d2")
    d = pd.read_parquet(path)
    assert (d["js"] == 0).all()
    assert set(d.loc[d["stack"] == "decoder", "n_queries"]) == {3}


def test_timeline_selects_among_the_kept_rows(tmp_path) -> None:
    w = make_weights(seed=3)
    ids = {"episode": np.zeros(6, np.int64), "step": np.arange(6)}
    lay = make_layout()
    for name, data, kw in (("full", w, {}), ("part", _keep(w, ROWS), {"query_rows": ROWS})):
        with ArchiveWriter.create(tmp_path / f"{name}.zarr", lay, dtype="float32", **kw) as wr:
            wr.append(data, sample_ids=ids)
    arrays = ["decoder/0/cross_attention"]
    kept_action = [r for r in ROWS["decoder"] if r >= 1]  # the "action" segment is 1..9
    f = pd.read_parquet(timeline(tmp_path / "full.zarr", tmp_path / "tf", query=kept_action,
                            arrays=arrays))  # fmt: skip
    p = pd.read_parquet(timeline(tmp_path / "part.zarr", tmp_path / "tp", query="action",
                            arrays=arrays))  # fmt: skip
    np.testing.assert_allclose(p["mass"], f["mass"], rtol=1e-6)
    with open_archive(tmp_path / "part.zarr") as a:
        assert a.query_rows(arrays[0]).tolist() == ROWS["decoder"]


def _timeline_pair(tmp_path: Path, rows: list[int]) -> tuple[Path, Path]:
    """Full and ``decoder: rows`` archives of the same weights, with episode/step ids."""
    w = make_weights(seed=3)
    ids = {"episode": np.zeros(6, np.int64), "step": np.arange(6)}
    part = _keep(w, {"decoder": rows})
    for name, data, kw in (("full", w, {}), ("part", part, {"query_rows": {"decoder": rows}})):
        with ArchiveWriter.create(
            tmp_path / f"{name}.zarr", make_layout(), dtype="float32", **kw
        ) as wr:
            wr.append(data, sample_ids=ids)
    return tmp_path / "full.zarr", tmp_path / "part.zarr"


@pytest.mark.parametrize(
    ("query", "match"),
    [
        ("bos", r"query 'bos' \(tokens \[0\]\) selects no kept row"),
        ([0], r"query \[0\] selects no kept row"),
        ([4], r"query \[4\] selects no kept row"),
        ("last", r"query 'last' is token 9, not a kept row"),
    ],
    ids=["bos", "token0", "token4", "last"],
)
def test_timeline_refuses_a_group_without_kept_rows(tmp_path, query, match) -> None:
    _full, part = _timeline_pair(tmp_path, [3, 8])  # the last token (9) is not kept
    rest = r"; decoder/0/cross_attention keeps only query rows \[3, 8\] \(a capture row policy\)$"
    with pytest.raises(SelectionError, match=match + rest):
        timeline(part, tmp_path / "t", query=query, arrays=["decoder/0/cross_attention"])
    assert not (tmp_path / "t" / "timeline.parquet").exists()


def test_timeline_last_is_the_last_token_when_it_was_kept(tmp_path) -> None:
    full, part = _timeline_pair(tmp_path, [3, 9])
    arrays = ["decoder/0/cross_attention"]
    f = pd.read_parquet(timeline(full, tmp_path / "tf", query="last", arrays=arrays))
    p = pd.read_parquet(timeline(part, tmp_path / "tp", query="last", arrays=arrays))
    assert len(p) == len(f) > 0 and set(p["query_group"]) == {"last token"}
    np.testing.assert_allclose(p["mass"], f["mass"], rtol=1e-6)


def _ragged_timeline(tmp_path: Path, lens: list[int], rows: list[int]) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    n = len(lens)
    mask = np.arange(10)[None, :] < np.asarray(lens)[:, None]
    x = softmax_block(rng, (n, 2, 10, 10), causal=True)
    x = np.where(mask[:, None, None, :], x, 0)
    x /= x.sum(-1, keepdims=True)
    x = np.where(mask[:, None, :, None], x, 0)
    ids = {"episode": np.zeros(n, np.int64), "step": np.arange(n)}
    part = x[:, :, rows]
    for name, data, kw in (("full", x, {}), ("part", part, {"query_rows": {"decoder": rows}})):
        kw.update(dtype="float32", max_lengths={"decoder": 10})
        with ArchiveWriter.create(tmp_path / f"{name}.zarr", make_layout(), **kw) as wr:
            wr.append({"decoder/0/self_attention": data}, masks={"decoder": mask}, sample_ids=ids)
    return tmp_path / "full.zarr", tmp_path / "part.zarr"


def test_ragged_timeline_last_needs_each_samples_last_token_kept(tmp_path) -> None:
    full, part = _ragged_timeline(tmp_path, [10, 6, 10, 2], [1, 5, 9])
    f = pd.read_parquet(timeline(full, tmp_path / "tf", query="last"))
    p = pd.read_parquet(timeline(part, tmp_path / "tp", query="last"))
    assert len(p) == len(f) > 0
    np.testing.assert_allclose(p["mass"], f["mass"], rtol=1e-6)
    _full, part = _ragged_timeline(tmp_path / "b", [10, 6, 10, 3], [1, 5, 9])
    want = r"query 'last' is token 2 of sample 3, not a kept row; .* query rows \[1, 5, 9\]"
    with pytest.raises(SelectionError, match=want):
        timeline(part, tmp_path / "tb", query="last")


def test_ragged_timeline_refuses_kept_rows_that_are_padding_everywhere(tmp_path) -> None:
    _full, part = _ragged_timeline(tmp_path, [6, 8, 3, 9], [1, 5, 9])
    assert len(pd.read_parquet(timeline(part, tmp_path / "ok", query=[5, 9]))) > 0
    want = r"query \[9\] selects no real kept row in any sample of decoder/0/self_attention; "
    with pytest.raises(SelectionError, match=want + r".* query rows \[1, 5, 9\]"):
        timeline(part, tmp_path / "t", query=[9])
    _full, part = _ragged_timeline(tmp_path / "c", [1, 1, 1, 1], [1, 5, 9])
    empty = pd.read_parquet(timeline(part, tmp_path / "all", query="all"))  # as `analyze` runs it
    assert len(empty) == 0  # every kept row is padding: no rows, like a full ragged archive

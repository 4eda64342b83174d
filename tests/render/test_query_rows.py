"""Figures and the report of arrays that keep only some query rows (a capture row policy):
the y axis names the kept rows' tokens, never 0..R-1."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

from attnscope.analysis import analyze
from attnscope.render._prepare import prepare_matrix
from attnscope.render.batch import render_archive
from attnscope.render.plots import plot_head_grid, plot_heatmap
from attnscope.render.report import write_report
from attnscope.store import ArchiveWriter, SideLayout, TokenLayout, open_archive

from .test_report import viewer_data

LAYOUT = TokenLayout(
    encoder=SideLayout.from_lengths({"text": 3, "image": 4}),
    decoder=SideLayout.from_lengths({"text": 2, "traj": 4}),
)
ROWS = [1, 3, 5]
KEPT_LABELS = ("text[1]", "traj[1]", "traj[3]")


def _softmax(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    e = np.exp(rng.standard_normal(shape) * 2)
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "rows.zarr"
    with ArchiveWriter.create(path, LAYOUT, dtype="float32", query_rows={"decoder": ROWS}) as w:
        w.append({
            "encoder/0/self_attention": _softmax(rng, (2, 2, 7, 7)),
            "decoder/0/self_attention": _softmax(rng, (2, 2, 3, 6)),
            "decoder/0/cross_attention": _softmax(rng, (2, 2, 3, 7)),
        })  # fmt: skip
    return path


def test_prepared_rows_are_the_kept_tokens(archive) -> None:
    with open_archive(archive) as a:
        for name in ("decoder/0/self_attention", "decoder/0/cross_attention"):
            pm = prepare_matrix(a[name], head_idx=1, batch_idx=1)
            assert pm.rows.labels == KEPT_LABELS
            assert pm.rows.segment_names == (("text", 0.0), ("traj", 1.5))
            assert pm.rows.boundaries == (1,)
            np.testing.assert_array_equal(pm.data, a[name][1, 1])
        pm = prepare_matrix(a["encoder/0/self_attention"], head_idx=0)
        assert len(pm.rows.labels) == 7  # a full-row array is unchanged


def test_heatmap_and_grid_label_the_y_axis_with_kept_tokens(archive) -> None:
    with open_archive(archive) as a:
        arr = a["decoder/0/cross_attention"]
        fig = plot_heatmap(arr, head_idx=0)
        ax = fig.axes[0]
        assert tuple(t.get_text() for t in ax.get_yticklabels()) == KEPT_LABELS
        fig = plot_head_grid(arr)
        assert tuple(t.get_text() for t in fig.axes[0].get_yticklabels()) == KEPT_LABELS


def test_ragged_kept_rows_crop_a_samples_padding(tmp_path) -> None:
    rng = np.random.default_rng(1)
    mask = np.array([[1] * 6, [1, 1, 1, 1, 0, 0]], bool)  # sample 1: row 5 is padding
    x = _softmax(rng, (2, 2, 3, 6))
    x[1, :, :, 4:] = 0
    x /= x.sum(-1, keepdims=True)
    path = tmp_path / "r.zarr"
    with ArchiveWriter.create(path, LAYOUT, dtype="float32", query_rows={"decoder": ROWS},
                              max_lengths={"decoder": 6}) as w:  # fmt: skip
        w.append({"decoder/0/self_attention": x}, masks={"decoder": mask})
    with open_archive(path) as a:
        pm = prepare_matrix(a["decoder/0/self_attention"], head_idx=0, batch_idx=1)
        assert pm.rows.labels == KEPT_LABELS[:2]
        assert pm.data.shape == (2, 4)
        np.testing.assert_allclose(pm.data, x[1, 0, :2, :4], rtol=1e-6)


def test_render_and_report_of_kept_rows(archive, tmp_path) -> None:
    tables = tmp_path / "t"
    analyze(archive, tables, progress=False, topk=3)
    files = render_archive(archive, tmp_path / "f", tables_dir=tables, progress=False)
    assert any("decoder" in p.name for p in files)
    page = write_report(archive, tmp_path / "r.html", tables_dir=tables).read_text()
    data = viewer_data(page)
    arrays = {a["name"]: a for a in data["arrays"]}
    for name in ("decoder/0/self_attention", "decoder/0/cross_attention"):
        side = arrays[name]["rows"]
        assert side == f"decoder@{name}"
        tok = data["tokens"][side]["1"]
        assert tuple(tok["labels"]) == KEPT_LABELS and tok["pos"] == ROWS
        d = arrays[name]["data"]["1"]
        raw = np.frombuffer(base64.b64decode(d["b64"]), dtype="<f2")
        with open_archive(archive) as a:
            want = np.asarray(a[name][1], dtype=np.float32).astype("<f2")
        np.testing.assert_array_equal(raw.reshape(want.shape), want)
    assert arrays["encoder/0/self_attention"]["rows"] == "encoder"


def test_overlay_of_kept_rows_averages_the_kept_rows_of_the_group(tmp_path) -> None:
    from attnscope.errors import SelectionError
    from attnscope.render.overlay import prepare_overlay

    rng = np.random.default_rng(2)
    lay = TokenLayout(
        SideLayout.from_lengths({"text": 2, "cam": 4}),
        SideLayout.from_lengths({"act": 2, "traj": 3}),
    ).with_groups({"cam": {"kind": "image", "grid": [2, 2]}})
    cross = _softmax(rng, (2, 2, 5, 6))
    kept = [0, 3, 4]
    path = tmp_path / "o.zarr"
    with ArchiveWriter.create(path, lay, dtype="float32", query_rows={"decoder": kept}) as w:
        w.append({"decoder/0/cross_attention": cross[:, :, kept]})
    ov = prepare_overlay(path, sample=1, query="traj", head=1)
    assert ov.queries == (3, 4)  # traj is 2..4; row 2 was not kept
    want = cross[1, 1, 3:5, 2:6].mean(axis=0).reshape(2, 2)
    np.testing.assert_allclose(ov.grid, want, rtol=1e-6)
    last = prepare_overlay(path, sample=0, query="last", head=0)
    np.testing.assert_allclose(last.grid, cross[0, 0, 4, 2:6].reshape(2, 2), rtol=1e-6)
    with pytest.raises(SelectionError, match=r"keeps only query rows \[0, 3, 4\]"):
        prepare_overlay(path, sample=0, query=[1], head=0)


def test_uncropped_figures_mask_the_dropped_rows(archive) -> None:
    """``crop=False`` on a row-policy array: all 6 decoder rows, the kept ones (1, 3, 5) as
    stored, the dropped ones masked and labelled with their own tokens."""
    with open_archive(archive) as a:
        arr = a["decoder/0/cross_attention"]
        pm = prepare_matrix(arr, head_idx=1, batch_idx=1, crop=False)
        assert pm.n_rows == 6 and pm.rows.labels == LAYOUT.decoder.labels
        np.testing.assert_array_equal(pm.data[ROWS], arr[1, 1])
        assert pm.mask[[0, 2, 4]].all() and not pm.mask[ROWS].any()
        fig = plot_heatmap(arr, batch_idx=1, crop=False)
        assert fig.axes[0].images[0].get_array().mask[[0, 2, 4]].all()

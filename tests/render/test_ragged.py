"""Ragged archives (schema 2) rendered: each sample's figures and report maps hold only its
real tokens (any padding pattern), labelled with its own tokens, segments recounted."""

from __future__ import annotations

import base64
import html
import re

import numpy as np
import pytest
from matplotlib.cbook import is_math_text

from attnscope import AttentionVisualizer
from attnscope.errors import ShapeError
from attnscope.render import batch as batch_mod
from attnscope.render import (
    plot_attention_flow,
    plot_head_grid,
    plot_heatmap,
    plot_layer_comparison,
    render_archive,
)
from attnscope.render._prepare import prepare_matrix
from attnscope.render.report import write_report
from attnscope.store import ArchiveWriter, SideLayout, TokenLayout, open_archive

from .test_report import dump, hover, needs_chromium, viewer_data

ENC_MAX, DEC_MAX, HEADS = 8, 5, 3
LAYOUT = TokenLayout(SideLayout.from_lengths({"text": 4, "image": 4}),
                     SideLayout.from_lengths({"act": DEC_MAX}))
ENC, DEC = "encoder/0/self_attention", "decoder/0/self_attention"
CROSS = "decoder/0/cross_attention"
# (encoder mask, decoder mask) per sample of two batches: none, right, middle, left padding
BATCHES = [
    (np.array([[1] * 8, [1, 1, 1, 1, 1, 0, 0, 0]], bool),
     np.array([[1] * 5, [0, 0, 1, 1, 1]], bool)),
    (np.array([[1, 1, 0, 0, 1, 0, 1, 1], [0, 1, 1, 1, 1, 0, 0, 0]], bool),
     np.array([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], bool)),
]
HOSTILE = ["$x$", "</script><b>", "a\u2028b", "$$"]


def _soft(rng: np.random.Generator, shape: tuple[int, ...], keys: np.ndarray) -> np.ndarray:
    """Softmax rows over each sample's real keys; padded query rows left non-zero (as a
    model leaves them) for the writer to zero."""
    x = np.exp(rng.normal(size=shape) * 2) * keys[:, None, None, :]
    return (x / x.sum(-1, keepdims=True)).astype(np.float32)


def _labels(mask: np.ndarray, tag: str, first: int) -> list[list[str]]:
    out = []
    for i, row in enumerate(mask):
        own = [f"{tag}{first + i}.{j}" for j in range(len(row))]
        if first + i == 3:  # one sample's real tokens (positions 1..4) are hostile
            own[1 : 1 + len(HOSTILE)] = HOSTILE
        out.append([lab if m else "[PAD]" for lab, m in zip(own, row)])
    return out


@pytest.fixture(scope="module", params=["zarr", "h5"])
def ragged(request, tmp_path_factory):
    """``(path, weights as stored (N, H, L, L) per array, enc masks (N, 8), dec masks (N, 5),
    enc labels, dec labels)`` of a ragged archive written batch by batch."""
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("ragged") / f"r.{request.param}"
    full = {n: [] for n in (ENC, DEC, CROSS)}
    em, dm, el, dl = [], [], [], []
    with ArchiveWriter.create(path, LAYOUT, dtype="float32",
                              max_lengths={"encoder": ENC_MAX, "decoder": DEC_MAX}) as w:
        first = 0
        for enc_m, dec_m in BATCHES:
            b = len(enc_m)
            weights = {
                ENC: _soft(rng, (b, HEADS, ENC_MAX, ENC_MAX), enc_m),
                DEC: _soft(rng, (b, HEADS, DEC_MAX, DEC_MAX), dec_m),
                CROSS: _soft(rng, (b, HEADS, DEC_MAX, ENC_MAX), enc_m),
            }
            labels = {"encoder": _labels(enc_m, "e", first), "decoder": _labels(dec_m, "d", first)}
            w.append(weights, masks={"encoder": enc_m, "decoder": dec_m},
                     tokens={sd: {"labels": labels[sd]} for sd in labels})
            for name, x in weights.items():
                qm = dec_m if name != ENC else enc_m
                km = enc_m if name != DEC else dec_m
                full[name].append(x * qm[:, None, :, None] * km[:, None, None, :])
            em.append(enc_m)
            dm.append(dec_m)
            el += labels["encoder"]
            dl += labels["decoder"]
            first += b
    stored = {n: np.concatenate(v) for n, v in full.items()}
    return path, stored, np.concatenate(em), np.concatenate(dm), el, dl


def _real(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask)


def _ticks(ax, which: str) -> list[str]:
    got = ax.get_xticklabels() if which == "x" else ax.get_yticklabels()
    return [t.get_text() for t in got]


def _boundaries(ax, which: str) -> list[float]:
    gid = "segment_boundary_key" if which == "x" else "segment_boundary_query"
    pick = (lambda ln: ln.get_xdata()[0]) if which == "x" else (lambda ln: ln.get_ydata()[0])
    return sorted(float(pick(ln)) for ln in ax.lines if ln.get_gid() == gid)


def test_prepared_matrix_is_the_samples_real_tokens(ragged) -> None:
    path, stored, em, dm, el, dl = ragged
    with open_archive(path) as arc:
        for s in range(len(em)):
            q, k = _real(dm[s]), _real(em[s])
            for head in (None, 1):
                p = prepare_matrix(arc.attention("decoder", 0, "cross_attention"),
                                   head_idx=head, batch_idx=s)
                want = stored[CROSS][s].mean(0) if head is None else stored[CROSS][s, head]
                np.testing.assert_allclose(p.data, want[np.ix_(q, k)], rtol=1e-6, atol=1e-7)
                assert (p.n_rows, p.n_cols) == (len(q), len(k))
                assert p.rows.labels == tuple(dl[s][i] for i in q)  # its own tokens
                assert p.cols.labels == tuple(el[s][i] for i in k)
                assert "[PAD]" not in p.rows.labels + p.cols.labels


def test_segments_are_recounted_over_the_kept_tokens(ragged) -> None:
    path, *_ = ragged
    with open_archive(path) as arc:
        arr = arc.attention("encoder", 0, "self_attention")
        mid = prepare_matrix(arr, batch_idx=2)  # real 0, 1 | 4, 6, 7: text 2, image 3
        assert mid.cols.boundaries == (2,) and mid.rows.boundaries == (2,)
        assert mid.cols.segment_names == (("text", 0.5), ("image", 3.0))
        left = prepare_matrix(arr, batch_idx=3)  # real 1..4: text 3, image 1
        assert left.cols.boundaries == (3,)
        right = prepare_matrix(arr, batch_idx=1)  # real 0..4: text 4, image 1
        assert right.cols.boundaries == (4,)


def test_heatmap_of_sample_two_uses_its_own_tokens(ragged) -> None:
    path, stored, em, _, el, _ = ragged
    k = _real(em[2])
    with open_archive(path) as arc:
        fig = plot_heatmap(arc.attention("encoder", 0, "self_attention"), head_idx=2, batch_idx=2)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), stored[ENC][2, 2][np.ix_(k, k)],
                               rtol=1e-6)
    assert _ticks(ax, "x") == [el[2][i] for i in k] == _ticks(ax, "y")
    assert _ticks(ax, "x") != [el[0][i] for i in k]  # not sample 0's
    assert _boundaries(ax, "x") == [1.5] == _boundaries(ax, "y")


def test_grid_layers_and_flow_crop_each_panel(ragged) -> None:
    path, stored, em, dm, el, dl = ragged
    s, q, k = 2, _real(dm[2]), _real(em[2])
    with open_archive(path) as arc:
        grid = plot_head_grid(arc.attention("decoder", 0, "cross_attention"), batch_idx=s)
        for h, ax in enumerate(grid.axes[:HEADS]):
            np.testing.assert_allclose(ax.images[0].get_array(),
                                       stored[CROSS][s, h][np.ix_(q, k)], rtol=1e-6)
        assert _ticks(grid.axes[0], "y") == [dl[s][i] for i in q]
        layers = plot_layer_comparison({0: arc.attention("encoder", 0, "self_attention")},
                                       batch_idx=s, head_idx=0)
        assert layers.axes[0].images[0].get_array().shape == (len(k), len(k))
        assert _ticks(layers.axes[0], "x") == [el[s][i] for i in k]
        flow = plot_attention_flow(*(arc[n] for n in (ENC, DEC, CROSS)), batch_idx=s)
        enc_ax, dec_ax, cross_ax = flow.axes[:3]
        assert enc_ax.images[0].get_array().shape == (len(k), len(k))
        assert dec_ax.images[0].get_array().shape == (len(q), len(q))
        np.testing.assert_allclose(cross_ax.images[0].get_array(),
                                   stored[CROSS][s].mean(0)[np.ix_(q, k)], rtol=1e-6)
        assert _ticks(cross_ax, "x") == [el[s][i] for i in k]


def test_visualizer_with_archive_inputs(ragged) -> None:
    path, stored, em, dm, el, dl = ragged
    viz, s, q, k = AttentionVisualizer(), 2, _real(dm[2]), _real(em[2])
    with open_archive(path) as arc:
        direct = viz.plot_attention_heatmap(arc[CROSS], head_idx=1, batch_idx=s, show=False)
    figs = [direct,
        viz.plot_attention_heatmap(path, stack="decoder", layer=0, kind="cross_attention",
                                   head_idx=1, batch_idx=s, show=False),
        viz.plot_multi_head_attention(path, stack="decoder", layer=0, kind="cross_attention",
                                      batch_idx=s, show=False),
        viz.plot_layer_comparison(path, stack="decoder", attention_type="cross_attention",
                                  head_idx=1, batch_idx=s, show=False),
    ]
    for fig in figs:
        ax = fig.axes[0]
        want = stored[CROSS][s, 0 if fig is figs[2] else 1][np.ix_(q, k)]
        np.testing.assert_allclose(ax.images[0].get_array(), want, rtol=1e-6)
        assert _ticks(ax, "x") == [el[s][i] for i in k]
    flow = viz.plot_attention_flow(path, layer_idx=0, batch_idx=s, show=False)
    assert _ticks(flow.axes[2], "y") == [dl[s][i] for i in q]


def test_layouts_given_with_a_ragged_selection(ragged) -> None:
    path, stored, em, *_ = ragged
    k = _real(em[2])
    with open_archive(path) as arc:
        arr = arc[ENC]
        # a layout of the stored axis is cropped like the matrix
        p = prepare_matrix(arr, batch_idx=2, query_layout=LAYOUT.encoder,
                           key_layout=LAYOUT.encoder)
        assert p.cols.labels == tuple(LAYOUT.encoder.labels[i] for i in k)
        # one of the real tokens is used as given; any other length is an error
        mine = SideLayout.from_labels([f"t{i}" for i in range(len(k))])
        p = prepare_matrix(arr, batch_idx=2, query_layout=mine, key_layout=mine)
        assert p.cols.labels == mine.labels
        with pytest.raises(ShapeError, match="covers 3 tokens but the matrix has 5"):
            prepare_matrix(arr, batch_idx=2, query_layout=SideLayout.from_labels("abc"),
                           key_layout=None)


def test_render_archive_jobs_of_sample_two(ragged, tmp_path) -> None:
    path, stored, em, dm, el, dl = ragged
    s, q, k = 2, _real(dm[2]), _real(em[2])
    maps = ("heatmap", "grid", "layers", "flow")
    written = render_archive(path, tmp_path / "out", samples=[1, 2, 3], heads=[None, 1],
                             what=maps, progress=False)
    assert len(written) == 3 * (3 * 2 + 3 + 3 * 2 + 2)  # heatmaps, grids, layers, flows
    with open_archive(path) as arc:
        req = batch_mod._request(arc, None, [1], [s], None, None, maps, None,
                                 "png", False)
        for job in batch_mod._jobs(arc, req):
            fig = job.figure()
            ax = fig.axes[2 if job.meta["what"] == "flow" else 0]  # flow: the cross panel
            axis = {"encoder": k, "decoder": q}
            labels = {"encoder": el[s], "decoder": dl[s]}
            key_side = "decoder" if job.meta.get("kind") == "self_attention" and \
                job.meta.get("stack") == "decoder" else "encoder"
            assert _ticks(ax, "x") == [labels[key_side][i] for i in axis[key_side]], job.file
            assert ax.images[0].get_array().shape[1] == len(axis[key_side])


def test_hostile_labels_of_a_ragged_sample_stay_literal(ragged) -> None:
    path, *_ = ragged
    with open_archive(path) as arc:
        fig = plot_heatmap(arc[ENC], batch_idx=3)
    fig.canvas.draw()
    shown = _ticks(fig.axes[0], "x")
    assert shown[0] == "\\$x\\$" and not [t for t in shown if is_math_text(t)]


@pytest.fixture(scope="module")
def ragged_tables(ragged):
    from attnscope.analysis import analyze

    path = ragged[0]
    out = path.parent / f"tables-{path.suffix[1:]}"
    analyze(path, out, progress=False)
    return out


def test_report_embeds_each_samples_real_tokens(ragged, ragged_tables, tmp_path) -> None:
    path, stored, em, dm, el, dl = ragged
    page = write_report(path, tmp_path / "r.html", tables_dir=ragged_tables).read_text()
    data = viewer_data(page)
    assert data["samples"] == [0, 1, 2, 3]
    for s in data["samples"]:
        tok = data["tokens"]["encoder"][str(s)]
        k = _real(em[s])
        assert tok["labels"] == [el[s][i] for i in k]  # its own, real tokens only
        assert tok["pos"] == (None if em[s].all() else k.tolist())
    cross = next(a for a in data["arrays"] if a["name"] == CROSS)["data"]["2"]
    q, k = _real(dm[2]), _real(em[2])
    assert (cross["T"], cross["S"], cross["t"], cross["s"]) == (len(q), len(k), len(q), len(k))
    raw = np.frombuffer(base64.b64decode(cross["b64"]), dtype="<f2").reshape(HEADS, len(q), -1)
    want = stored[CROSS][2][:, q][:, :, k].astype("<f2")
    np.testing.assert_array_equal(raw, want)
    assert "real tokens per sample 4-8" in page  # the layout section says it is ragged
    # top pairs carry the table's labels (sample 2's own tokens) and stored positions
    pairs = data["pairs"][ENC]["2|1"]
    assert pairs and all(p[3] == el[2][p[0]] and p[4] == el[2][p[1]] for p in pairs)
    assert all(em[2][p[0]] and em[2][p[1]] for p in pairs)


@needs_chromium
def test_viewer_hover_on_sample_two_shows_its_tokens(ragged, ragged_tables, tmp_path) -> None:
    path, stored, em, dm, el, dl = ragged
    out = write_report(path, tmp_path / "r.html", tables_dir=ragged_tables)
    q, k = _real(dm[2]), _real(em[2])
    i, j = 1, 2  # cell of the cropped map: stored query q[1] = 2, key k[2] = 4
    dom = dump(out, f"array={CROSS}&sample=2&head=1&cell={i},{j}", tmp_path)
    text, weight, cell = hover(dom)
    want = float(np.float16(stored[CROSS][2, 1, q[i], k[j]]))
    assert cell == f"{i},{j}" and weight == pytest.approx(want, rel=1e-6)
    shown = html.unescape(text)
    assert f'query "{dl[2][q[i]]}" (#{q[i]})' in shown
    assert f'key "{el[2][k[j]]}" (#{k[j]})' in shown
    assert "[PAD]" not in dom and f"{want:.4g}" in shown


@needs_chromium
def test_viewer_hostile_labels_of_a_ragged_sample(ragged, ragged_tables, tmp_path) -> None:
    path, _, em, _, el, _ = ragged
    out = write_report(path, tmp_path / "r.html", tables_dir=ragged_tables)
    k = _real(em[3])  # real 1..4: HOSTILE[1:] then a plain label
    dom = dump(out, f"array={ENC}&sample=3&head=0&cell=0,1", tmp_path)
    shown = html.unescape(hover(dom)[0])
    assert f'query "{el[3][k[0]]}" (#{k[0]})' in shown and f'key "{el[3][k[1]]}"' in shown
    assert not re.search(r"<b>(?!&amp;)", dom.split("<main>")[-1])  # never parsed as HTML


def test_a_painted_figure_does_not_depend_on_the_other_samples(ragged, tmp_path) -> None:
    # samples 1 and 2 both keep 5 encoder tokens, with other labels: the reused figure
    # template must carry each one's own tick labels
    path = ragged[0]
    kw = dict(what=["heatmap", "grid"], stacks=["encoder"], progress=False)
    alone = render_archive(path, tmp_path / "alone", samples=[2], **kw)
    both = render_archive(path, tmp_path / "both", samples=[1, 2], **kw)
    by_name = {p.name: p.read_bytes() for p in both}
    assert [by_name[p.name] for p in alone] == [p.read_bytes() for p in alone]
    one = [by_name[p.name.replace("s0002", "s0001")] for p in alone]
    assert all(a != b for a, b in zip(one, (p.read_bytes() for p in alone)))


def test_cli_render_and_report_of_a_ragged_archive(ragged, ragged_tables, tmp_path) -> None:
    from click.testing import CliRunner

    from attnscope.cli import cli

    path = ragged[0]
    res = CliRunner().invoke(cli, ["render", str(path), "--out", str(tmp_path / "f"),
                                   "--samples", "2-3", "--what", "heatmap", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "f" / "heatmap").iterdir())) == 2 * 3
    res = CliRunner().invoke(cli, ["report", str(path), "--out", str(tmp_path / "r.html"),
                                   "--tables", str(ragged_tables), "--samples", "2"])
    assert res.exit_code == 0, res.output
    tok = viewer_data((tmp_path / "r.html").read_text())["tokens"]["encoder"]["2"]
    assert tok["labels"] == [ragged[4][2][i] for i in _real(ragged[2][2])]


def test_uncropped_figures_mask_the_padding(ragged) -> None:
    """``crop=False``: the whole stored axes, padded rows and key columns masked (any
    padding pattern), the real cells as stored; the colour range ignores the padding."""
    path, stored, em, dm, el, dl = ragged
    with open_archive(path) as arc:
        for s in range(len(em)):
            p = prepare_matrix(arc.attention("decoder", 0, "cross_attention"), head_idx=1,
                               batch_idx=s, crop=False)
            assert (p.n_rows, p.n_cols) == (DEC_MAX, ENC_MAX)
            padded = ~(dm[s][:, None] & em[s][None, :])
            np.testing.assert_array_equal(p.mask, padded)
            real = stored[CROSS][s, 1][~padded]
            np.testing.assert_allclose(p.data[~padded], real, rtol=1e-6)
            assert p.vmax == pytest.approx(real.max())
            assert p.rows.labels == tuple(dl[s])  # every stored position's own label
        fig = plot_heatmap(arc.attention("decoder", 0, "cross_attention"), batch_idx=2,
                           crop=False)
        assert fig.axes[0].images[0].get_array().mask.any() and len(fig.legends) == 1

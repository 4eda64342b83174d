import matplotlib.colors as mcolors
import numpy as np
import pytest
from matplotlib.figure import Figure

from attnscope.errors import InputError, SelectionError
from attnscope.render import (
    plot_attention_flow,
    plot_head_grid,
    plot_heatmap,
    plot_layer_comparison,
)
from attnscope.render._axes import SEGMENT_NAME_GID
from attnscope.render.plots import BOUNDARY_GID
from attnscope.store.layout import SideLayout

from .conftest import random_attention


def boundary_positions(ax, which):
    lines = [ln for ln in ax.lines if ln.get_gid() == BOUNDARY_GID[which]]
    if which == "cols":
        return sorted(float(ln.get_xdata()[0]) for ln in lines)
    return sorted(float(ln.get_ydata()[0]) for ln in lines)


def test_heatmap_one_head_image_is_the_matrix(rng):
    x = random_attention(rng, (2, 8, 6, 7))
    fig = plot_heatmap(x, head_idx=3, batch_idx=1, title="T", vmin=0.0, vmax=0.5, cmap="hot")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2  # heatmap + colour bar
    ax = fig.axes[0]
    assert ax.get_title() == "T"
    im = ax.images[0]
    np.testing.assert_array_equal(im.get_array(), x[1, 3])
    assert im.get_clim() == (0.0, 0.5)
    assert im.get_cmap().name.startswith("hot")


def test_heatmap_head_average(rng):
    x = random_attention(rng, (2, 4, 5, 5))
    fig = plot_heatmap(x, head_idx=None, colorbar=False)
    assert len(fig.axes) == 1
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), x[0].mean(0), rtol=1e-6)
    assert "mean of heads" in fig.axes[0].get_title()


def test_heatmap_default_clim_is_data_range(rng):
    x = random_attention(rng, (1, 1, 6, 6))
    im = plot_heatmap(x, head_idx=0).axes[0].images[0]
    assert im.get_clim() == pytest.approx((x.min(), x.max()))


def test_heatmap_log_scale(rng):
    x = random_attention(rng, (1, 1, 6, 6), sharp=6)
    im = plot_heatmap(x, head_idx=0, log=True).axes[0].images[0]
    assert isinstance(im.norm, mcolors.LogNorm)
    lo, hi = im.get_clim()
    # the log range starts at the smallest positive value, floored at 1e-6 of the maximum
    assert lo == pytest.approx(max(x.min(), x.max() * 1e-6)) and hi == pytest.approx(x.max())


def test_heatmap_draws_into_given_axes(rng):
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2)
    out = plot_heatmap(random_attention(rng, (1, 2, 3, 3)), ax=b, colorbar=False)
    assert out is fig and len(b.images) == 1 and len(a.images) == 0


def test_modality_boundaries_at_token_indices(rng, layout):
    enc, dec = layout.encoder, layout.decoder
    x = random_attention(rng, (1, 2, dec.length, enc.length))
    ax = plot_heatmap(x, query_layout=dec, key_layout=enc).axes[0]
    assert boundary_positions(ax, "cols") == [9.5, 10.5, 19.5]  # text|eef|image|depth
    assert boundary_positions(ax, "rows") == [9.5, 19.5]
    # 29 tokens per axis: readable, one label per token
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[:2] == ["text[0]", "text[1]"] and labels[10] == "robot0_eef_pos"
    assert len(labels) == 29


def test_long_sequence_gets_segment_names_and_downsampling(rng):
    lay = SideLayout.from_lengths({"text": 300, "agentview_image": 2000, "state": 100})
    n = lay.length
    x = np.zeros((1, 1, n, n), dtype=np.float32)
    x[0, 0, 5, 2399] = 1.0  # one sharp key must survive block-max reduction
    ax = plot_heatmap(x, head_idx=0, query_layout=lay, key_layout=lay).axes[0]
    data = ax.images[0].get_array()
    assert max(data.shape) <= 1024
    assert data.shape == (800, 800)  # blocks of 3 tokens
    assert data.max() == 1.0 and data[5 // 3, -1] == 1.0
    # every 60th token labelled (2400 / 40), the segment names on the opposite side
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[:3] == ["text[0]", "text[60]", "text[120]"] and len(labels) == 40
    assert list(ax.get_xticks()[:2]) == [0, 60]
    assert "every 60th token labelled" in ax.get_xlabel()
    top = [t for t in ax.texts if t.get_gid() == SEGMENT_NAME_GID["cols"]]
    assert [t.get_text() for t in top] == ["text", "agentview_image", "state"]
    assert [t.get_position()[0] for t in top] == [149.5, 1299.5, 2349.5]  # segment centres
    assert boundary_positions(ax, "cols") == [299.5, 2299.5]
    # extent keeps token coordinates
    assert ax.images[0].get_extent() == [-0.5, n - 0.5, n - 0.5, -0.5]


def test_head_grid_axes_titles_and_shared_clim(rng):
    x = random_attention(rng, (2, 6, 5, 5))
    fig = plot_head_grid(x, batch_idx=1, title="grid")
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 6 and len(fig.axes) == 7  # 6 heads + 1 colour bar
    assert [ax.get_title() for ax in image_axes] == [f"head {i}" for i in range(6)]
    clims = {ax.images[0].get_clim() for ax in image_axes}
    assert len(clims) == 1
    assert next(iter(clims)) == pytest.approx((x[1].min(), x[1].max()))
    for i, ax in enumerate(image_axes):
        np.testing.assert_array_equal(ax.images[0].get_array(), x[1, i])
    assert fig._suptitle.get_text() == "grid"


def test_layer_comparison_one_panel_per_layer(rng):
    layers = [random_attention(rng, (1, 4, 5, 5)) for _ in range(3)]
    fig = plot_layer_comparison(layers, head_idx=2)
    image_axes = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in image_axes] == ["layer 0", "layer 1", "layer 2"]
    for lyr, ax in zip(layers, image_axes):
        np.testing.assert_array_equal(ax.images[0].get_array(), lyr[0, 2])
    assert len({ax.images[0].get_clim() for ax in image_axes}) == 1


def test_attention_flow_shared_axes_line_up(rng, layout):
    enc, dec = layout.encoder, layout.decoder
    s, t = enc.length, dec.length + 3  # make T != S to catch a swapped layout
    dec = SideLayout.from_lengths({"text": 10, "traj": 13, "delta": 9})
    e = random_attention(rng, (1, 2, s, s))
    d = random_attention(rng, (1, 2, t, t))
    c = random_attention(rng, (1, 2, t, s))
    fig = plot_attention_flow(e, d, c, layer_idx=0, encoder_layout=enc, decoder_layout=dec)
    ax_enc, ax_dec, ax_cross = fig.axes[:3]
    assert [a.get_title() for a in (ax_enc, ax_dec, ax_cross)] == [
        "encoder self-attention", "decoder self-attention", "decoder cross-attention"]
    assert len(fig.axes) == 6  # three panels, three colour bars
    np.testing.assert_allclose(ax_cross.images[0].get_array(), c[0].mean(0), rtol=1e-6)
    assert ax_cross.get_shared_x_axes().joined(ax_cross, ax_enc)
    assert ax_cross.get_shared_y_axes().joined(ax_cross, ax_dec)
    assert ax_cross.get_xlim() == ax_enc.get_xlim() == (-0.5, s - 0.5)
    assert ax_cross.get_ylim() == ax_dec.get_ylim() == (t - 0.5, -0.5)
    assert boundary_positions(ax_cross, "cols") == [9.5, 10.5, 19.5]
    assert boundary_positions(ax_cross, "rows") == [9.5, 22.5]


def test_attention_flow_rejects_mismatched_layers(rng):
    e = random_attention(rng, (1, 2, 5, 5))
    d = random_attention(rng, (1, 2, 4, 4))
    with pytest.raises(InputError, match="cross-attention has 6 keys"):
        plot_attention_flow(e, d, random_attention(rng, (1, 2, 4, 6)))


@pytest.mark.parametrize("fn", [plot_heatmap, plot_head_grid])
def test_bad_batch_index(fn, rng):
    with pytest.raises(SelectionError, match="batch_idx 5 out of range"):
        fn(random_attention(rng, (2, 8, 3, 3)), batch_idx=5)


def test_head_nine_of_eight(rng):
    with pytest.raises(SelectionError, match=r"head_idx 9 out of range.*0\.\.7"):
        plot_heatmap(random_attention(rng, (1, 8, 3, 3)), head_idx=9)


def test_save_path_writes_identical_png(tmp_path, rng):
    x = random_attention(rng, (1, 2, 8, 8))
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    plot_heatmap(x, head_idx=1, save_path=a)
    plot_heatmap(x, head_idx=1, save_path=b)
    assert a.read_bytes() == b.read_bytes()
    assert b"Software" not in a.read_bytes()


@pytest.mark.parametrize("fmt", ["svg", "pdf"])
def test_svg_pdf_are_reproducible(tmp_path, rng, fmt):
    x = random_attention(rng, (1, 2, 8, 8))
    a, b = tmp_path / f"a.{fmt}", tmp_path / f"b.{fmt}"
    plot_heatmap(x, head_idx=1, save_path=a)
    plot_heatmap(x, head_idx=1, save_path=b)
    assert a.read_bytes() == b.read_bytes()


def _causal(rng, t: int = 8) -> np.ndarray:
    x = np.tril(rng.random((t, t)) + 0.05)
    return (x / x.sum(-1, keepdims=True)).astype(np.float32)


def _pixel(fig, ax, x: float, y: float) -> np.ndarray:
    """RGB of the rendered figure at data point (x, y) of ``ax``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    px, py = ax.transData.transform((x, y))
    img = np.asarray(canvas.buffer_rgba())
    return img[int(img.shape[0] - py), int(px), :3]


def test_masked_cells_are_drawn_in_the_mask_colour_with_a_legend(rng):
    from attnscope.render._style import MASK_COLOR, MASK_LABEL, colormap

    x = _causal(rng)
    fig = plot_heatmap(x)
    ax = fig.axes[0]
    want = np.round(np.array(mcolors.to_rgb(MASK_COLOR)) * 255)
    np.testing.assert_array_equal(_pixel(fig, ax, 6, 1), want)  # key 6 > query 1: masked
    assert not np.array_equal(_pixel(fig, ax, 1, 6), want)  # allowed cell
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [MASK_LABEL]
    # the grey is no colour of the attention colormap (nor of the table colormaps)
    for name in ("viridis", "magma", "Blues", "RdBu_r"):
        lut = colormap(name)(np.linspace(0, 1, 256))[:, :3]
        assert np.min(np.linalg.norm(lut - mcolors.to_rgb(MASK_COLOR), axis=1)) > 0.1
    assert plot_heatmap(rng.random((5, 5))).legends == []  # nothing masked, no legend


def test_masked_cells_in_grids_layers_and_flows(rng):
    from attnscope.render._style import MASK_COLOR

    want = np.round(np.array(mcolors.to_rgb(MASK_COLOR)) * 255)
    x = np.stack([_causal(rng), _causal(rng)])[None]  # (1, 2, 8, 8)
    for fig in (plot_head_grid(x), plot_layer_comparison([x, x])):
        assert all(im.get_array().mask[1, 6] for ax in fig.axes for im in ax.images)
        np.testing.assert_array_equal(_pixel(fig, fig.axes[0], 6, 1), want)
        assert len(fig.legends) == 1
    enc = random_attention(rng, (1, 2, 5, 5))
    cross = random_attention(rng, (1, 2, 8, 5))
    fig = plot_attention_flow(enc, x, cross)
    dec_ax = fig.axes[1]
    np.testing.assert_array_equal(_pixel(fig, dec_ax, 6, 1), want)
    assert not fig.axes[0].images[0].get_array().mask.any()  # encoder: nothing masked


def test_forced_rows_do_not_set_the_colour_scale(rng):
    x = _causal(rng)  # row 0 has one allowed key: weight 1.0
    fig = plot_heatmap(x)
    im = fig.axes[0].images[0]
    assert im.get_clim()[1] == pytest.approx(x[1:].max()) and x[1:].max() < 1.0
    assert "1-key rows excluded" in fig.axes[1].get_ylabel()  # the colour bar says so
    # the forced cell is drawn in the top colour, not outside the colormap
    top = np.array(im.cmap(1.0)[:3]) * 255  # Agg rounds colours to within 1 level
    np.testing.assert_allclose(_pixel(fig, fig.axes[0], 0, 0), top, atol=1)


def test_percentile_scale_tops_the_colour_bar_at_that_percentile(rng):
    x = random_attention(rng, (1, 1, 12, 12), sharp=4.0)
    fig = plot_heatmap(x, scale="p90")
    im, cbar = fig.axes[0].images[0], fig.axes[1]
    assert im.get_clim()[1] == pytest.approx(np.percentile(x, 90))
    assert "90th pct" in cbar.get_ylabel()
    # the colour bar's top pixel is the colormap's top colour, at the documented limit
    assert cbar.get_ylim()[1] == pytest.approx(np.percentile(x, 90))
    top = np.array(im.cmap(1.0)[:3]) * 255
    lo, hi = cbar.get_ylim()
    # (the bar is 256 colours: its top pixel row is the top entry or its neighbour)
    np.testing.assert_allclose(_pixel(fig, cbar, 0.5, hi - (hi - lo) * 0.005), top, atol=3)


def test_row_scale_divides_each_row_by_its_max(rng):
    from attnscope.render._prepare import prepare_matrix

    x = _causal(rng)
    p = prepare_matrix(x, scale="row")
    np.testing.assert_allclose(p.data.max(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(p.data[3, :4], x[3, :4] / x[3, :4].max(), rtol=1e-6)
    assert (p.vmin, p.vmax) == (0.0, 1.0) and p.label == "weight / row max"


def test_raw_tensor_ticks_are_integers(rng):
    fig = plot_heatmap(random_attention(rng, (1, 1, 11, 11)))
    ax = fig.axes[0]
    fig.canvas.draw()
    for ticks in (ax.get_xticks(), ax.get_yticks()):
        inside = [t for t in ticks if -0.5 <= t <= 10.5]
        assert inside and all(float(t).is_integer() for t in inside)


def test_one_layer_comparison_title_is_not_clipped(rng):
    x = random_attention(rng, (1, 2, 6, 6))
    title = "decoder self_attention across layers, mean of heads, sample 0"
    fig = plot_layer_comparison([x], title=title)
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.x1
    assert fig.get_suptitle().replace("\n", " ") == title


def test_head_grid_panels_label_every_kth_token_with_segment_names(rng):
    lay = SideLayout.from_lengths({"text": 20, "image": 16})
    x = random_attention(rng, (1, 2, 36, 36))
    fig = plot_head_grid(x, query_layout=lay, key_layout=lay)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()][:2] == ["text[0]", "text[4]"]  # 36 / 10
    assert "tokens" not in [t.get_text() for a in fig.axes for t in a.get_yticklabels()]
    names = [t.get_text() for a in fig.axes for t in a.texts
             if t.get_gid() in SEGMENT_NAME_GID.values()]
    assert "text" in names and "image" in names

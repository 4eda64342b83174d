import json

import pytest

from attnscope.errors import ConfigError, SelectionError
from attnscope.render import render_archive


def names(paths, root):
    return sorted(str(p.relative_to(root)) for p in paths)


def test_batch_writes_documented_files(small_archive, tmp_path):
    out = tmp_path / "figs"
    paths = render_archive(small_archive, out, layers=[0], heads=[None, 3], samples=[1],
                           progress=False)
    assert names(paths, out) == [
        "flow/L00-s0001-h03.png",
        "flow/L00-s0001-havg.png",
        "grid/decoder-L00-cross_attention-s0001.png",
        "grid/decoder-L00-self_attention-s0001.png",
        "grid/encoder-L00-self_attention-s0001.png",
        "heatmap/decoder-L00-cross_attention-s0001-h03.png",
        "heatmap/decoder-L00-cross_attention-s0001-havg.png",
        "heatmap/decoder-L00-self_attention-s0001-h03.png",
        "heatmap/decoder-L00-self_attention-s0001-havg.png",
        "heatmap/encoder-L00-self_attention-s0001-h03.png",
        "heatmap/encoder-L00-self_attention-s0001-havg.png",
        "layers/decoder-cross_attention-s0001-h03.png",
        "layers/decoder-cross_attention-s0001-havg.png",
        "layers/decoder-self_attention-s0001-h03.png",
        "layers/decoder-self_attention-s0001-havg.png",
        "layers/encoder-self_attention-s0001-h03.png",
        "layers/encoder-self_attention-s0001-havg.png",
    ]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    manifest = json.loads((out / "manifest.json").read_text())
    name = "heatmap/encoder-L00-self_attention-s0001-h03.png"
    entry = next(f for f in manifest["files"] if f["file"] == name)
    assert entry == {"file": entry["file"], "what": "heatmap", "stack": "encoder", "layer": 0,
                     "kind": "self_attention", "sample": 1, "head": 3}
    assert manifest["archive"]["archive"] == "small.zarr"


def test_batch_is_byte_identical_across_runs(small_archive, tmp_path):
    kw = dict(layers=[1], kinds=["cross_attention"], what=["heatmap", "grid"], progress=False)
    a = render_archive(small_archive, tmp_path / "a", **kw)
    b = render_archive(small_archive, tmp_path / "b", **kw)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    manifests = [(tmp_path / d / "manifest.json").read_bytes() for d in "ab"]
    assert manifests[0] == manifests[1]


def test_batch_svg(small_archive, tmp_path):
    paths = render_archive(small_archive, tmp_path, layers=[2], stacks=["encoder"],
                           what=["heatmap"], fmt="svg", progress=False)
    assert names(paths, tmp_path) == ["heatmap/encoder-L02-self_attention-s0000-havg.svg"]


@pytest.mark.parametrize(
    "kw, err, needle",
    [
        (dict(heads=[9]), SelectionError, r"head 9 out of range.*0\.\.3"),
        (dict(kinds=["bogus"]), SelectionError, "kind 'bogus' does not exist"),
        (dict(samples=[2]), SelectionError, r"sample 2 out of range.*0\.\.1"),
        (dict(layers=[5]), SelectionError, "layer 5 does not exist"),
        (dict(what=["pie"]), ConfigError, "unknown figure type 'pie'"),
        (dict(fmt="jpg"), ConfigError, "unsupported figure format 'jpg'"),
    ],
)
def test_batch_bad_selection(small_archive, tmp_path, kw, err, needle):
    with pytest.raises(err, match=needle):
        render_archive(small_archive, tmp_path, progress=False, **kw)
    assert not list(tmp_path.rglob("*.png"))


def test_batch_tables_need_tables_dir(small_archive, tmp_path):
    with pytest.raises(ConfigError, match="'tables' needs the analysis tables"):
        render_archive(small_archive, tmp_path, what=["tables"], progress=False)
    # the default draws every figure kind but tables when no tables are given
    paths = render_archive(small_archive, tmp_path / "all", layers=[0], progress=False)
    assert {p.relative_to(tmp_path / "all").parts[0] for p in paths} == {
        "heatmap", "grid", "layers", "flow"}


def test_every_figure_kind_has_a_job_builder():
    from attnscope.contracts import FIGURE_KINDS
    from attnscope.render.batch import FIGURES

    assert tuple(FIGURES) == FIGURE_KINDS


@pytest.mark.parametrize("kw, needle", [
    (dict(layers=[]), "layers selects nothing"),
    (dict(heads=[]), "heads selects nothing"),
    (dict(what=[]), "what selects nothing"),
])
def test_batch_empty_selection_is_an_error(small_archive, tmp_path, kw, needle):
    with pytest.raises(SelectionError, match=needle):
        render_archive(small_archive, tmp_path / "o", progress=False, **kw)
    assert not (tmp_path / "o").exists()


def test_batch_out_is_a_file(small_archive, tmp_path):
    f = tmp_path / "taken"
    f.write_text("keep")
    with pytest.raises(ConfigError, match="exists and is a file"):
        render_archive(small_archive, f, progress=False)
    assert f.read_text() == "keep"


def test_batch_selection_without_figures_is_an_error(rng, tmp_path):
    from attnscope.store import SideLayout, TokenLayout

    from .conftest import random_attention, write_archive

    enc_only = write_archive(
        tmp_path / "enc.zarr",
        {"encoder": [{"self_attention": random_attention(rng, (1, 2, 3, 3))}]},
        TokenLayout(SideLayout.from_lengths({"text": 3}), None),
    )
    # flow needs encoder self, decoder self and cross attention of one layer
    with pytest.raises(SelectionError, match=r"the selection gives no figures: what=\['flow'\]"):
        render_archive(enc_only, tmp_path / "o", what=["flow"], progress=False)
    assert not (tmp_path / "o").exists()


def test_reused_figures_do_not_depend_on_what_was_drawn_before(small_archive, tmp_path):
    """Figures painted on a shared template equal the same figure rendered alone."""
    kw = dict(what=["heatmap", "grid", "flow"], progress=False)
    many = render_archive(small_archive, tmp_path / "many", heads=[None, 0, 3],
                          samples=[0, 1], **kw)
    alone = render_archive(small_archive, tmp_path / "alone", heads=[3], samples=[1],
                           layers=[1], **kw)
    root_many, root_alone = tmp_path / "many", tmp_path / "alone"
    assert len(alone) >= 3 and len(many) > 4 * len(alone)
    for p in alone:
        assert p.read_bytes() == (root_many / p.relative_to(root_alone)).read_bytes(), p


def test_reused_figure_shows_its_own_data(small_archive, tmp_path):
    """Two heads painted on one template give different pictures (the data is updated)."""
    paths = render_archive(small_archive, tmp_path, layers=[0], stacks=["encoder"],
                           heads=[0, 1], what=["heatmap"], progress=False)
    assert len(paths) == 2 and paths[0].read_bytes() != paths[1].read_bytes()


@pytest.mark.parametrize("entry", ["render_archive", "write_report", "diff_figures", "visualizer"])
def test_rendering_refuses_an_archive_with_a_deleted_array(rng, tmp_path, entry):
    import shutil

    from attnscope.errors import ArchiveCorruptError
    from attnscope.render.compare import render_diff
    from attnscope.render.report import write_report
    from attnscope.render.visualizer import AttentionVisualizer

    from .conftest import SMALL_LAYOUT, small_weights, write_archive

    path = write_archive(tmp_path / "a.zarr", small_weights(rng), SMALL_LAYOUT)
    good = write_archive(tmp_path / "b.zarr", small_weights(rng), SMALL_LAYOUT)
    shutil.rmtree(path / "decoder" / "1" / "cross_attention")
    out = tmp_path / "out"
    run = {
        "render_archive": lambda: render_archive(path, out, progress=False),
        "write_report": lambda: write_report(path, out / "r.html", tables_dir=tmp_path),
        "diff_figures": lambda: render_diff(good, path, out),
        "visualizer": lambda: AttentionVisualizer().plot_attention_heatmap(
            path, stack="encoder", layer=0, kind="self_attention", show=False),
    }[entry]
    with pytest.raises(ArchiveCorruptError, match="decoder/1/cross_attention: listed in the root"):
        run()
    assert not out.exists()


def test_heads_are_the_models_ids_in_files_titles_and_grids(kept_heads_archive, tmp_path):
    """An archive keeping model heads 0 and 3: head 3 is asked for as 3, its files say h03,
    its title 'head 3', and the grid's panels are 'head 0' and 'head 3'."""
    from PIL import Image

    from attnscope.render import plots
    from attnscope.store import open_archive

    out = tmp_path / "figs"
    paths = render_archive(kept_heads_archive, out, layers=[0], heads=[3],
                           what=["heatmap", "grid"], progress=False)
    assert "heatmap/decoder-L00-self_attention-s0000-h03.png" in names(paths, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {f["head"] for f in manifest["files"] if f["what"] == "heatmap"} == {3}
    with open_archive(kept_heads_archive) as arc:
        fig = plots.plot_head_grid(arc.attention("decoder", 0, "self_attention"))
        assert [ax.get_title() for ax in fig.axes[:2]] == ["head 0", "head 3"]
        fig = plots.plot_heatmap(arc.attention("decoder", 0, "self_attention"), head_idx=3,
                                 title=None)
        assert fig.axes[0].get_title() == "head 3, sample 0"
    assert Image.open(out / "grid/decoder-L00-self_attention-s0000.png").size[0] > 0


@pytest.mark.parametrize("head", [1, 2])
def test_a_head_the_archive_did_not_keep_is_refused(kept_heads_archive, tmp_path, head):
    with pytest.raises(SelectionError, match=rf"head {head} is not a stored head.*\[0, 3\]"):
        render_archive(kept_heads_archive, tmp_path / "f", heads=[head], progress=False)
    assert not (tmp_path / "f").exists()


def test_painted_figures_draw_masked_cells_in_the_mask_colour(kept_heads_archive, tmp_path):
    """Batch PNGs (painted on reused templates): the causal decoder map has its masked
    triangle (6 of 16 cells) in the mask colour; the encoder map has no such area."""
    import matplotlib.colors as mcolors
    import numpy as np
    from PIL import Image

    from attnscope.render._style import MASK_COLOR

    out = tmp_path / "f"
    render_archive(kept_heads_archive, out, layers=[0], heads=[None, 3], what=["heatmap"],
                   samples=[0, 1], progress=False)
    grey = np.round(np.array(mcolors.to_rgb(MASK_COLOR)) * 255)

    def grey_pixels(name):
        img = np.asarray(Image.open(out / "heatmap" / name).convert("RGB"))
        return int((img == grey).all(axis=-1).sum())

    dec = grey_pixels("decoder-L00-self_attention-s0001-h03.png")
    assert dec > 6 / 16 * 0.3 * 1000 * 800 * 0.5  # a large share of the map area
    assert grey_pixels("encoder-L00-self_attention-s0001-h03.png") < 100  # antialiased text
    assert abs(grey_pixels("decoder-L00-self_attention-s0000-havg.png") - dec) < 100

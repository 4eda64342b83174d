"""Token labels are text, always: `$` never starts mathtext, in any figure or the report."""

from __future__ import annotations

import io

import pytest
from matplotlib.cbook import is_math_text

from attnscope.render import (
    plot_attention_flow,
    plot_head_grid,
    plot_heatmap,
    plot_top_pairs,
    render_archive,
)
from attnscope.render._axes import SEGMENT_NAME_GID
from attnscope.render._style import plain
from attnscope.store.layout import Segment, SideLayout, TokenLayout

from .conftest import random_attention, write_archive

LONG = "x" * 300
# real tokenizers emit these: mathtext would crash on the first two and draw math for $x$
HOSTILE = ["$$", "$\\frac$", "$x$", "a\nb", LONG, "é→漢", "\\$", "$"]
ENC = SideLayout((Segment("$seg$", 0, 4), Segment("img$$", 4, 8)), tuple(HOSTILE))
DEC = SideLayout((Segment("$\\frac$", 0, 3),), ("$$", "$y$", "ok"))

pytestmark = pytest.mark.filterwarnings("ignore:Glyph.*missing from font")


def texts(fig):
    """Every text drawn on the figure (tick labels included), after a real draw."""
    fig.savefig(io.BytesIO(), format="png")
    out = [t for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels()]
    return [t.get_text() for t in out if t.get_text()]


def assert_plain(labels):
    assert labels
    assert not [t for t in labels if is_math_text(t)]


def test_plain_escapes_dollars_and_shortens():
    assert plain("$x$") == "\\$x\\$" and not is_math_text(plain("$x$"))
    assert plain(LONG) == "x" * 39 + "…"
    assert plain("a\nb") == "a\nb"


@pytest.fixture
def weights(rng):
    return {
        "encoder": [{"self_attention": random_attention(rng, (1, 2, 8, 8))}],
        "decoder": [{"self_attention": random_attention(rng, (1, 2, 3, 3)),
                     "cross_attention": random_attention(rng, (1, 2, 3, 8))}],
    }


def test_heatmap_grid_flow_draw_labels_as_text(weights):
    enc = weights["encoder"][0]["self_attention"]
    dec = weights["decoder"][0]
    fig = plot_heatmap(enc, head_idx=0, query_layout=ENC, key_layout=ENC)
    labels = texts(fig)
    assert_plain(labels)
    assert "\\$x\\$" in labels and "x" * 39 + "…" in labels  # drawn as "$x$", shortened
    assert_plain(texts(plot_head_grid(enc, query_layout=ENC, key_layout=ENC)))
    assert_plain(texts(plot_attention_flow(enc, dec["self_attention"], dec["cross_attention"],
                                           encoder_layout=ENC, decoder_layout=DEC)))


def test_long_axes_show_segment_names_as_text(rng):
    lay = SideLayout((Segment("$$", 0, 30), Segment("$\\frac$", 30, 60)))
    fig = plot_heatmap(random_attention(rng, (1, 1, 60, 60)), query_layout=lay, key_layout=lay,
                       colorbar=False)
    labels = texts(fig)  # every 2nd token's label, escaped
    assert_plain(labels)
    assert labels[:2] == ["\\$\\$[0]", "\\$\\$[2]"]
    names = [t.get_text() for ax in fig.axes for t in ax.texts
             if t.get_gid() in SEGMENT_NAME_GID.values()]  # segment names beside them
    assert sorted(set(names)) == ["\\$\\$", "\\$\\frac\\$"]


@pytest.fixture
def hostile_archive(tmp_path, weights):
    from attnscope.analysis import analyze

    path = write_archive(tmp_path / "hostile.zarr", weights, TokenLayout(ENC, DEC))
    analyze(path, tmp_path / "tables", topk=4, progress=False)
    return path


def test_every_batch_figure_and_table_figure_renders(hostile_archive, tmp_path):
    paths = render_archive(hostile_archive, tmp_path / "figs", heads=[None, 1],
                           tables_dir=tmp_path / "tables", fmt="svg", progress=False)
    kinds = {p.relative_to(tmp_path / "figs").parts[0] for p in paths}
    assert kinds == {"heatmap", "grid", "layers", "flow", "tables"}


def test_top_pairs_labels_are_text(hostile_archive, tmp_path):
    import pandas as pd

    tp = pd.read_parquet(tmp_path / "tables" / "top_pairs.parquet")
    assert tp["query_label"].isin(HOSTILE).any()
    assert_plain(texts(plot_top_pairs(tp, stack="encoder", layer=0, kind="self_attention")))


def test_report_with_hostile_labels(hostile_archive, tmp_path):
    from attnscope.render.report import write_report

    page = write_report(hostile_archive, tmp_path / "r.html",
                        tables_dir=tmp_path / "tables").read_text()
    assert "$\\frac$" in page  # the layout and pair tables show labels verbatim (HTML-escaped)
    assert "<script>" in page and page.count("<script>") == 1

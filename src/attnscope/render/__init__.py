"""Figures of stored attention: heatmaps, head grids, layer comparisons, attention flow,
figures of the analysis tables, and batch rendering of a whole archive.

Never imports torch (tensors are duck-typed). Reads archives lazily: a single-head
figure reads one (sample, head) matrix. Matplotlib picks the Agg backend by itself
when there is no display; nothing here calls ``matplotlib.use()`` or sets a global style.

Examples
--------
>>> from attnscope.render import plot_heatmap, render_archive        # doctest: +SKIP
>>> fig = plot_heatmap(arc.attention("encoder", 0, "self_attention"), head_idx=3)  # doctest: +SKIP
>>> render_archive("run.zarr", "figs", what=["heatmap", "grid"])     # doctest: +SKIP
"""

from __future__ import annotations

from attnscope.render._prepare import (
    MAX_PIXELS,
    MAX_TICK_LABELS,
    PreparedMatrix,
    block_reduce,
    prepare_matrix,
    select_matrix,
)
from attnscope.render._save import save_figure
from attnscope.render.batch import WHAT, render_archive
from attnscope.render.compare import (
    plot_diff,
    plot_diff_summary,
    plot_rollout,
    render_diff,
    render_rollout,
)
from attnscope.render.notebook import Viewer, show, viewer
from attnscope.render.overlay import OverlayData, plot_overlay, prepare_overlay
from attnscope.render.plots import (
    draw_matrix,
    plot_attention_flow,
    plot_head_grid,
    plot_heatmap,
    plot_layer_comparison,
)
from attnscope.render.tables import plot_head_metric, plot_segment_mass, plot_top_pairs
from attnscope.render.timeline import plot_timeline, timeline_series
from attnscope.render.visualizer import AttentionVisualizer

__all__ = [
    "MAX_PIXELS",
    "MAX_TICK_LABELS",
    "WHAT",
    "AttentionVisualizer",
    "PreparedMatrix",
    "block_reduce",
    "draw_matrix",
    "plot_attention_flow",
    "plot_diff",
    "plot_diff_summary",
    "plot_head_grid",
    "plot_head_metric",
    "plot_heatmap",
    "plot_layer_comparison",
    "plot_rollout",
    "plot_segment_mass",
    "plot_top_pairs",
    "prepare_matrix",
    "render_archive",
    "render_diff",
    "render_rollout",
    "save_figure",
    "select_matrix",
    "OverlayData",
    "plot_overlay",
    "prepare_overlay",
    "plot_timeline",
    "timeline_series",
    "Viewer",
    "show",
    "viewer",
]

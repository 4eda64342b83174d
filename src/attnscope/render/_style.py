"""One style bundle for every render figure: colormaps, font sizes, figure sizes, label text.

Plots, table figures and the HTML report draw with :data:`STYLE`; nothing here touches
matplotlib's global ``rcParams``.

Token labels come from tokenizers and archives, not from us: ``$$`` or ``$\\frac$`` would be
parsed as mathtext (and crash the draw), ``$x$`` drawn as math. :func:`plain` escapes every
``$`` so matplotlib shows the text as written, and shortens labels that would swallow the
figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import matplotlib as mpl

__all__ = ["STYLE", "Style", "colormap", "plain"]


@dataclass(frozen=True)
class Style:
    """Colours and sizes shared by every figure."""

    #: attention matrices (plots and report)
    cmap: str = "viridis"
    #: per-head statistic tables (entropy ...)
    metric_cmap: str = "magma"
    #: modality-to-modality mass
    mass_cmap: str = "Blues"
    #: bars of the top pairs
    bar_color: str = "tab:blue"
    #: segment boundary lines on attention matrices
    boundary_color: str = "white"
    boundary_width: float = 0.8
    #: tick labels: one per token up to 20 tokens, smaller beyond; segment names
    tick_size: float = 8
    dense_tick_size: float = 6
    segment_tick_size: float = 7
    #: panel titles in grids and flows
    panel_title_size: float = 10
    #: values written into table cells
    cell_size: float = 7
    #: longest label drawn in full; longer ones end in an ellipsis
    max_label_chars: int = 40
    #: figure size of a single heatmap and of the flow figure
    heatmap_size: tuple[float, float] = (10, 8)
    flow_size: tuple[float, float] = (14, 12)
    #: the HTML report's attention maps and flows (inline PNGs: kept small)
    report_map_size: tuple[float, float] = (7, 5.6)
    report_flow_size: tuple[float, float] = (12, 10)
    report_dpi: int = 80
    report_flow_dpi: int = 64


STYLE = Style()


def colormap(name: Any) -> Any:
    """A colormap by name (or as given) whose NaN/"bad" colour is its lowest colour.

    Exact zeros on a log scale are "bad": drawn in the lowest colour, not white.
    """
    cmap = mpl.colormaps[name] if isinstance(name, str) else name
    return cmap.with_extremes(bad=cmap(0.0))


def plain(label: Any, max_chars: int = STYLE.max_label_chars) -> str:
    """``label`` as literal text for matplotlib: ``$`` escaped, long labels shortened."""
    text = str(label)
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    # matplotlib shows "\$" as "$" and never starts mathtext on it
    return text.replace("$", r"\$")

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

__all__ = ["MASK_COLOR", "MASK_LABEL", "STYLE", "Style", "colormap", "mask_color", "plain"]


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


#: masked cells (a causal mask's upper triangle, NaN): a neutral grey that no colormap of
#: the style comes near (RGB distance >= 0.15 to every entry of viridis, magma, Blues, RdBu_r)
MASK_COLOR = "#c8c8c8"
#: the mask colour for colormaps that come near the grey (Greys, gray, ...)
MASK_COLOR_ALT = "#ff4fd8"
#: legend text of the mask colour
MASK_LABEL = "masked: not attended (causal mask, NaN)"


def mask_color(cmap: Any) -> str:
    """:data:`MASK_COLOR`, or :data:`MASK_COLOR_ALT` when ``cmap`` has a colour near it."""
    import numpy as np

    cmap = mpl.colormaps[cmap] if isinstance(cmap, str) else cmap
    lut = np.asarray(cmap(np.linspace(0.0, 1.0, 256)))[:, :3]
    grey = np.asarray(mpl.colors.to_rgb(MASK_COLOR))
    near = float(np.min(np.linalg.norm(lut - grey, axis=1))) < 0.1
    return MASK_COLOR_ALT if near else MASK_COLOR


def colormap(name: Any) -> Any:
    """A colormap by name (or as given) whose "bad" colour (masked and NaN cells) is the
    mask colour (:func:`mask_color`), with values below / above the range in its lowest /
    highest colour (a robust top clips the few brightest cells to the top colour)."""
    cmap = mpl.colormaps[name] if isinstance(name, str) else name
    return cmap.with_extremes(bad=mask_color(cmap), under=cmap(0.0), over=cmap(1.0))


def plain(label: Any, max_chars: int = STYLE.max_label_chars) -> str:
    """``label`` as literal text for matplotlib: ``$`` escaped, long labels shortened."""
    text = str(label)
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    # matplotlib shows "\$" as "$" and never starts mathtext on it
    return text.replace("$", r"\$")

"""Batch rendering that reuses one figure per shape instead of building every figure anew.

A figure of the batch is mostly text (tick labels, titles, colour bars) that does not change
between figures of the same kind, shape and token layout. Building it and laying it out costs
~10x more than drawing its images. :class:`Painter` keeps one *template* per key (plot
function, matrix shapes, axis decoration, colormap, scale type, figure size):

1. the template is built once by the plot function itself, with a placeholder title and a
   fixed colour range, so its layout depends on the key only, never on which figure of the
   key came first (output is byte-identical whatever the order, in one process or several);
2. its layout is computed once and frozen, and everything that changes between figures
   (images, segment lines, spines, the title, the colour bars) is hidden for one full draw,
   kept as a pixel background;
3. each figure restores the background, sets its images' data and colour limits and its
   title, draws only those artists, and writes the pixels as a PNG.

Only PNG output with an explicit title is painted this way; everything else (SVG/PDF, table
figures with data-dependent text) goes through a fresh figure and ``savefig``.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from attnscope.render import plots
from attnscope.render._axes import fit_title
from attnscope.render._prepare import PreparedMatrix, shared_limits
from attnscope.render._save import DPI, freeze_layout, png_from_canvas

__all__ = ["Painter"]

#: colour range of the template's one layout pass: tick labels as wide as typical ones
_TEMPLATE_LIMITS = {False: (0.0, 0.0125), True: (1e-4, 1.0)}
_PLACEHOLDER_TITLE = "Xg"


def _heatmap_limits(args: dict, mats: list[PreparedMatrix]) -> list[tuple[float, float]]:
    return [(m.vmin, m.vmax) for m in mats]


def _grid_limits(args: dict, mats: list[PreparedMatrix]) -> list[tuple[float, float]]:
    lim = shared_limits(mats, args.get("vmin"), args.get("vmax"), args.get("log", False),
                        args.get("scale", "max"))
    return [lim] * len(mats)


@dataclass(frozen=True)
class _Kind:
    """How the figures of one plot function are prepared and updated."""

    matrices: Callable[..., list[PreparedMatrix]]
    limits: Callable[[dict, list[PreparedMatrix]], list[tuple[float, float]]]
    #: the title is the figure's suptitle (else the first Axes' title)
    suptitle: bool
    #: keyword arguments that are not part of the template key (data, title, limits)
    data_args: tuple[str, ...]


_KINDS: dict[Callable[..., Figure], _Kind] = {
    plots.plot_heatmap: _Kind(
        plots.heatmap_matrices, _heatmap_limits, False, ("attention", "batch_idx", "head_idx")
    ),
    plots.plot_head_grid: _Kind(
        plots.grid_matrices, _grid_limits, True, ("attention", "batch_idx")
    ),
    plots.plot_attention_flow: _Kind(
        plots.flow_matrices,
        _heatmap_limits,
        True,
        ("encoder_attention", "decoder_self_attention", "decoder_cross_attention",
         "batch_idx", "head_idx", "layer_idx"),
    ),
}


class _Template:
    """One laid-out figure, its pixel background and the artists that change per figure."""

    def __init__(self, fig: Figure, kind: _Kind) -> None:
        fig.set_dpi(DPI)
        self.fig, self.canvas = fig, FigureCanvasAgg(fig)
        freeze_layout(fig)
        cbar_axes = [ax for ax in fig.axes if hasattr(ax, "_colorbar")]
        self.panels = [ax for ax in fig.axes if ax not in cbar_axes]
        self.images = [im for ax in self.panels for im in ax.images]
        self.title = fig._suptitle if kind.suptitle else self.panels[0].title
        moving = [a for ax in self.panels for a in (*ax.images, *ax.lines, *ax.spines.values())]
        for a in (*moving, *cbar_axes):
            a.set_visible(False)
        self.title.set_text("")  # empty, not hidden: its position is kept
        self.canvas.draw()
        self.background = self.canvas.copy_from_bbox(fig.bbox)
        for a in (*moving, *cbar_axes):
            a.set_visible(True)
        self.cbar_axes = cbar_axes

    def paint(self, mats: list[PreparedMatrix], limits: list[tuple[float, float]], title: str,
              path: Path) -> Path:
        for im, m, (lo, hi) in zip(self.images, mats, limits):
            im.set_data(m.display())
            if im.get_clim() != (lo, hi):
                im.set_clim(lo, hi)  # colour bars follow through the norm's callbacks
        self.title.set_text(title)
        self.canvas.restore_region(self.background)
        for ax in self.panels:
            for a in (*ax.images, *ax.lines, *ax.spines.values()):
                ax.draw_artist(a)
        for cax in self.cbar_axes:
            self.fig.draw_artist(cax)
        self.fig.draw_artist(self.title)
        return png_from_canvas(self.canvas, path)


def _freeze(x: Any) -> Any:
    """A hashable stand-in for a keyword argument value of the template key."""
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    try:
        hash(x)
    except TypeError:
        return repr(x)
    return x


class Painter:
    """Writes batch figures as PNGs, one reused template figure per key (see module doc)."""

    def __init__(self, max_templates: int = 24) -> None:
        self._templates: OrderedDict[Any, _Template] = OrderedDict()
        self._max = max_templates

    def paint(self, draw: Callable[..., Figure], args: tuple, kwargs: dict, path: Path
              ) -> Path | None:
        """Write the figure ``draw(*args, **kwargs)`` to ``path``; ``None`` if not reusable."""
        kind = _KINDS.get(draw)
        if kind is None or path.suffix != ".png" or kwargs.get("title") is None:
            return None
        bound = inspect.signature(draw).bind(*args, **kwargs)
        bound.apply_defaults()
        given = dict(bound.arguments)
        if given.get("ax") is not None:
            return None
        mats = kind.matrices(*[given[n] for n in kind.data_args if n.endswith("attention")],
                             **{k: v for k, v in given.items() if not k.endswith("attention")})
        # the colour bar label and the mask legend are drawn into the template: part of the key
        shape = tuple((m.data.shape, m.n_rows, m.n_cols, m.rows, m.cols, m.label, m.has_mask)
                      for m in mats)
        fixed = {k: _freeze(v) for k, v in given.items()
                 if k not in kind.data_args and k not in ("title", "vmin", "vmax")}
        key = (draw.__name__, shape, tuple(sorted(fixed.items())))
        tpl = self._templates.get(key)
        if tpl is None:
            lo, hi = _TEMPLATE_LIMITS[bool(given.get("log"))]
            fig = draw(*args, **{**kwargs, "vmin": lo, "vmax": hi, "title": _PLACEHOLDER_TITLE})
            import matplotlib.pyplot as plt

            plt.close(fig)  # out of pyplot's registry; the Figure itself lives on here
            tpl = self._templates[key] = _Template(fig, kind)
            if len(self._templates) > self._max:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(key)
        title = kwargs["title"]
        width = tpl.fig.get_figwidth() * (1.0 if kind.suptitle else 0.75)
        if fit_title(title, width) != title:  # a wrapped title needs its own layout
            return None
        return tpl.paint(mats, kind.limits(given, mats), title, path)

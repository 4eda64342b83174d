"""Saving and showing figures reproducibly.

The same figure saved twice gives the same bytes: PNG files carry no ``Software``
tag, PDF files no creator/producer/creation date, SVG files no date and a fixed
``svg.hashsalt`` for their element ids.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure

from attnscope.contracts import FIGURE_FORMATS
from attnscope.errors import ConfigError
from attnscope.render._ipython import display_once, inline_backend, show_once

__all__ = ["finish", "freeze_layout", "save_figure", "write_png"]

_METADATA = {
    "png": {"Software": None},
    "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
    "svg": {"Creator": None, "Date": None},
}
_NON_INTERACTIVE = {"agg", "pdf", "ps", "svg", "pgf", "cairo", "template"}
DPI = 100


def save_figure(fig: Figure, path: str | os.PathLike, *, fmt: str | None = None) -> Path:
    """Save ``fig`` to ``path`` with pinned metadata so repeated saves are byte-identical.

    ``fmt`` defaults to the file suffix (``png`` when there is none).
    """
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".") or "png").lower()
    if fmt not in FIGURE_FORMATS:
        raise ConfigError(f"unsupported figure format {fmt!r}; expected one of {FIGURE_FORMATS}")
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    with mpl.rc_context({"svg.hashsalt": "attnscope", "svg.fonttype": "path"}):
        fig.savefig(path, format=fmt, dpi=DPI, metadata=_METADATA[fmt])
    return path


def freeze_layout(fig: Figure) -> None:
    """Run the figure's layout engine once and keep that layout for every later draw."""
    engine = fig.get_layout_engine()
    if engine is not None:
        engine.execute(fig)
        fig.set_layout_engine("none")


def write_png(fig: Figure, path: str | os.PathLike) -> Path:
    """Lay out ``fig`` once, draw it once at :data:`DPI` and write the pixels as a PNG.

    ``savefig`` with a layout engine draws twice (one pass without rendering to lay out,
    one to render) and runs the layout twice; this draws once. The file is the same
    bytes for the same figure (PIL writes no time or software chunk). The figure's layout
    stays frozen afterwards.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig.set_dpi(DPI)
    canvas = FigureCanvasAgg(fig)
    freeze_layout(fig)
    canvas.draw()
    return png_from_canvas(canvas, path)


def png_from_canvas(canvas: Any, path: str | os.PathLike) -> Path:
    """Write an Agg canvas's current pixels to ``path`` as a PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(canvas.buffer_rgba())).save(path, format="png")
    return path


def finish(fig: Figure, save_path: str | os.PathLike | None, show: bool) -> Figure:
    """Optional conveniences after drawing: save, then show (skipped on headless backends).

    In a notebook (the inline backend) the figure appears once: ``show=True`` displays it
    at once, and a returned figure that is the cell's value is not displayed again;
    ``show=False`` leaves it to the notebook (shown at the end of the cell, once).
    """
    if save_path is not None:
        save_figure(fig, save_path)
    if inline_backend():
        return show_once(fig) if show else display_once(fig)
    if show:
        import matplotlib.pyplot as plt

        if plt.get_backend().lower() not in _NON_INTERACTIVE:
            plt.show()
    return fig

"""Saving and showing figures reproducibly.

The same figure saved twice gives the same bytes: PNG files carry no ``Software``
tag, PDF files no creator/producer/creation date, SVG files no date and a fixed
``svg.hashsalt`` for their element ids.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib as mpl
from matplotlib.figure import Figure

from attnscope.contracts import FIGURE_FORMATS
from attnscope.errors import ConfigError

__all__ = ["finish", "save_figure"]

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


def finish(fig: Figure, save_path: str | os.PathLike | None, show: bool) -> Figure:
    """Optional conveniences after drawing: save, then show (skipped on headless backends)."""
    if save_path is not None:
        save_figure(fig, save_path)
    if show:
        import matplotlib.pyplot as plt

        if plt.get_backend().lower() not in _NON_INTERACTIVE:
            plt.show()
    return fig

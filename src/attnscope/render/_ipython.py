"""Notebooks (Jupyter, VS Code): is this code running in one, and figures shown once there.

Nothing here imports IPython: it is looked up in ``sys.modules`` (a kernel has always
imported it), so the core install and plain scripts never load it.

Why figures appeared twice: with the inline backend (``matplotlib_inline``, used by
Jupyter and VS Code) every figure still open in pyplot is displayed when the cell ends,
and a ``Figure`` that is the cell's last expression is displayed again by IPython's
display hook. :func:`show_once` displays the figure now and takes it out of pyplot;
:func:`display_once` makes the display hook show a figure only when nothing else
does in that cell.
"""

from __future__ import annotations

import sys
from typing import Any

from matplotlib.figure import Figure

__all__ = ["display_once", "inline_backend", "kernel_shell", "show_once"]

INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


def kernel_shell() -> Any | None:
    """The IPython shell of a notebook kernel running this code, or None (a script, a
    terminal IPython, no IPython at all)."""
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    shell = get() if get is not None else None
    return shell if getattr(shell, "kernel", None) is not None else None


def inline_backend() -> bool:
    """Whether figures are drawn by the notebook's inline backend (``%matplotlib inline``,
    the default in Jupyter and VS Code kernels)."""
    import matplotlib

    backend = str(matplotlib.get_backend()).lower()
    return kernel_shell() is not None and backend in {INLINE_BACKEND, "inline"}


def _count() -> int | None:
    shell = kernel_shell()
    return None if shell is None else shell.execution_count


def _detach(fig: Figure) -> None:
    """Take ``fig`` out of pyplot, so the end-of-cell flush does not display it."""
    import matplotlib.pyplot as plt

    plt.close(fig)  # a no-op for a figure pyplot does not manage


class _OnceHook:
    """``fig._ipython_display_``: IPython calls it instead of its formatters when the figure
    is a cell's value (or passed to ``display``)."""

    def __init__(self, fig: Figure, shown_in: int | None) -> None:
        self.fig, self.shown_in = fig, shown_in

    def __call__(self) -> None:
        fig = self.fig
        if self.shown_in is not None and self.shown_in == _count():
            return  # shown by show=True in this very cell already
        _detach(fig)  # displayed here, so not again by the end-of-cell flush
        fig.__dict__.pop("_ipython_display_", None)  # back to IPython's own formatters
        from IPython.display import display

        display(fig)


def display_once(fig: Figure) -> Figure:
    """Make a returned figure display once in a notebook when it is the cell's value: the
    display hook takes it out of pyplot before showing it. No-op outside notebooks."""
    if inline_backend():
        fig._ipython_display_ = _OnceHook(fig, None)  # type: ignore[attr-defined]
    return fig


def show_once(fig: Figure) -> Figure:
    """Display ``fig`` now in the notebook, once: not again at the end of the cell, nor as
    the cell's value in this cell (later cells show it again when asked)."""
    from IPython.display import display

    fig.__dict__.pop("_ipython_display_", None)
    display(fig)
    _detach(fig)
    fig._ipython_display_ = _OnceHook(fig, _count())  # type: ignore[attr-defined]
    return fig

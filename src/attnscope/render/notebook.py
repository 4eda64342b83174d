"""The interactive viewer inline in notebooks (Jupyter, VS Code): ``attnscope.show``.

The report's viewer (:mod:`attnscope.render._viewer`), as one self-contained HTML fragment
per display: the stored weights embedded as float16, drawn client-side, nothing fetched (no
server, no internet). Pick array, sample and head; hover a cell for its tokens and weight;
click a query for its row. Several viewers share a page: each has its own id prefix, a
stylesheet scoped to its root and its state in a closure.

What a cell embeds is bounded: by default the first arrays and samples whose maps fit in
:data:`MAX_NOTEBOOK_BYTES` (at least one array of one sample; axes longer than
``max_cells`` tokens block-max reduced, as the report). An explicit ``arrays=`` /
``samples=`` choice over ``max_bytes`` is refused with its size, never silently cut.

Rich display: an :class:`~attnscope.store.AttentionArray` displays this viewer (the store's
``_repr_html_`` calls :func:`array_html`), an archive a summary table
(``store._display``). Outside a notebook :func:`show` prints a plain-text summary instead.
"""

from __future__ import annotations

import html
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attnscope.errors import AttnscopeError, ConfigError, SelectionError
from attnscope.render._ipython import kernel_shell
from attnscope.render._viewer import CSS, markup, scoped_css, script
from attnscope.render.batch import load_tables
from attnscope.render.report import (
    MAX_CELLS,
    _cost,
    _costs,
    _json_for_script,
    _timeline,
    _viewer_data,
)
from attnscope.store import AttentionArchive, AttentionArray, check_structure, open_archive

__all__ = ["MAX_NOTEBOOK_BYTES", "Viewer", "array_html", "show", "viewer"]

#: embedded attention (base64 bytes) that the default choice of arrays and samples stays under
MAX_NOTEBOOK_BYTES = 2_000_000

Source = str | os.PathLike[str] | AttentionArchive | AttentionArray

# shown until the viewer's script removes it: where outputs do not run scripts
_NO_SCRIPT = (
    "<b>The attnscope viewer did not run</b>: this output's script was not executed (an "
    "untrusted notebook: re-run the cell or trust the notebook; or a page without JavaScript)."
)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


class Viewer:
    """One viewer's data, displayed inline by notebooks (``_repr_html_``).

    Built by :func:`viewer`; each display gets fresh element ids, so one viewer shown
    twice, or many viewers, never clash on a page. ``repr()`` is a plain-text summary.
    """

    def __init__(self, data: dict[str, Any], note: str, text: str, nbytes: int) -> None:
        self._json = _json_for_script(data)
        self._note = note
        #: the plain-text summary (what a terminal shows)
        self.text = text
        #: base64 bytes of the embedded maps
        self.nbytes = nbytes

    def html(self) -> str:
        """A self-contained HTML fragment: the viewer's root element, its scoped style,
        data and script. Fresh ids on every call."""
        p = f"attnscope-{secrets.token_hex(6)}-"
        return (
            f"<div id='{p}root' class='attnscope-viewer'><style>{scoped_css(p + 'root')}</style>"
            f"<p id='{p}nojs'>{_NO_SCRIPT}</p>{markup(p, self._note)}"
            f"<script type='application/json' id='{p}attnscope-data'>{self._json}</script>"
            f"{script(p, False)}</div>"
        )

    def _repr_html_(self) -> str:
        return self.html()

    def __repr__(self) -> str:
        return self.text

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the viewer as a standalone HTML page (for a browser, outside notebooks)."""
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"viewer path {str(path)!r} is a folder; expected an .html file")
        path.write_text(
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>attnscope viewer</title><style>{CSS}</style></head><body>"
            f"{self.html()}</body></html>",
            encoding="utf-8",
        )
        return path


def _all_arrays(arc: AttentionArchive) -> list[str]:
    """The archive's array names (the one place this module asks for them)."""
    return list(arc.arrays)


def _names(arc: AttentionArchive, arrays: Sequence[str] | str | None) -> list[str] | None:
    if arrays is None:
        return None
    names = [arrays] if isinstance(arrays, str) else [str(a) for a in arrays]
    unknown = [n for n in names if n not in arc]
    if unknown or not names:
        raise SelectionError(
            f"unknown array(s) {unknown}; the archive has {_all_arrays(arc)}" if unknown
            else f"arrays selects nothing; the archive has {_all_arrays(arc)}"
        )
    return names


def _samples(arc: AttentionArchive, sample: int | None, samples: Sequence[int] | None
             ) -> tuple[int, list[int] | None]:
    n = arc.n_samples
    if n == 0:
        raise SelectionError(f"archive {arc.path!r} holds no committed sample yet")
    chosen = None if samples is None else sorted({int(s) for s in samples})
    if chosen == []:
        raise SelectionError("samples selects nothing; give at least one, or None for the "
                             "first that fit")
    if sample is None:
        sample = chosen[0] if chosen else 0
    chosen = None if chosen is None else sorted(set(chosen) | {int(sample)})
    for s in [int(sample), *(chosen or [])]:
        if not 0 <= s < n:
            raise SelectionError(f"sample {s} out of range [0, {n})")
    return int(sample), chosen


def _choose(
    arc: AttentionArchive, names: list[str] | None, sample: int, samples: list[int] | None,
    max_cells: int, max_bytes: int,
) -> tuple[list[str], list[int], int]:
    """Arrays and samples to embed, and their base64 bytes: the given ones (refused past
    ``max_bytes``), else the first that fit (at least one array of ``sample``)."""
    if names is None:  # the first arrays whose maps of ``sample`` fit
        every = _all_arrays(arc)
        per = _costs(arc, every, sample, sample + 1, max_cells)[:, 0]
        fit = int(np.searchsorted(np.cumsum(per), max_bytes, side="right"))
        names = every[: max(1, fit)]
    if samples is not None:
        used = int(sum(_cost(arc, names, s, s + 1, max_cells)[0] for s in samples))
        if used > max_bytes:
            raise ConfigError(
                f"the selection embeds {_mb(used)} of attention in the notebook, over "
                f"max_bytes={max_bytes} ({_mb(max_bytes)}); choose fewer arrays= or samples=, "
                "a smaller max_cells=, or raise max_bytes"
            )
        return names, samples, used
    # ``sample``, then the first other samples that fit, in blocks (masks read per block)
    chosen, used = [sample], int(_cost(arc, names, sample, sample + 1, max_cells)[0])
    lo, n, step = 0, arc.n_samples, 1024
    while lo < n:
        hi = min(n, lo + step)
        cost = _cost(arc, names, lo, hi, max_cells)
        if lo <= sample < hi:
            cost[sample - lo] = 0  # counted already
        cum = np.cumsum(cost) + used
        fit = int(np.searchsorted(cum, max_bytes, side="right"))
        chosen += [s for s in range(lo, lo + fit) if s != sample]
        if fit < len(cost):
            break
        used, lo = int(cum[-1]), hi
    else:
        return names, sorted(chosen), used
    return names, sorted(chosen), int(cum[fit - 1]) if fit else used


def _span(xs: Sequence[int]) -> str:
    xs = list(xs)
    if len(xs) > 1 and xs == list(range(xs[0], xs[-1] + 1)):
        return f"{xs[0]}-{xs[-1]}"
    return ", ".join(map(str, xs))


def viewer(
    source: Source,
    *,
    arrays: Sequence[str] | str | None = None,
    sample: int | None = None,
    samples: Sequence[int] | None = None,
    head: int | None = None,
    tables_dir: str | os.PathLike[str] | None = None,
    max_cells: int = MAX_CELLS,
    max_bytes: int = MAX_NOTEBOOK_BYTES,
) -> Viewer:
    """The interactive viewer of an archive or one of its arrays, for a notebook.

    Parameters
    ----------
    source
        An archive path, an open :class:`~attnscope.store.AttentionArchive`, or an
        :class:`~attnscope.store.AttentionArray` (then ``arrays`` defaults to it).
    arrays
        Array names to embed (default: the first that fit ``max_bytes``, at least one).
    sample
        Sample shown first (default the first of ``samples``, else 0); always embedded.
    samples
        Samples to embed (default: the first that fit ``max_bytes``, with ``sample``).
    head
        Head shown first (an original head index), default the mean of the heads.
    tables_dir
        Folder written by :func:`attnscope.analysis.analyze` for this archive: adds the
        entropy, modality-mass and top-pairs tables (and the episode timeline).
    max_cells
        Longest map axis embedded as is; longer axes are block-max reduced.
    max_bytes
        Budget of embedded attention (base64 bytes). An explicit ``arrays``/``samples``
        choice over it raises :class:`~attnscope.errors.ConfigError`.

    Returns
    -------
    Viewer
        Displayed inline when it is a cell's value; ``.save(path)`` writes a page.
    """
    arc_src = source.archive if isinstance(source, AttentionArray) else source
    if isinstance(source, AttentionArray) and arrays is None:
        arrays = [source.name]
    if max_cells < 1:
        raise ConfigError(f"max_cells must be >= 1, got {max_cells}")
    with open_archive(arc_src) as arc:
        check_structure(arc, every_chunk=False)
        names = _names(arc, arrays)
        first, given = _samples(arc, sample, samples)
        names, chosen, nbytes = _choose(arc, names, first, given, max_cells, max_bytes)
        if head is not None and all(int(head) not in arc[n].heads for n in names):
            raise SelectionError(f"head {head} is in none of {names}; they keep heads "
                                 f"{sorted({h for n in names for h in arc[n].heads})}")
        tables = None if tables_dir is None else load_tables(tables_dir, arc)
        data = _viewer_data(arc, names, tables, chosen, first, 10, max_cells,
                            None if head is None else int(head))
        data["timeline"] = None if tables_dir is None else _timeline(tables_dir, arc)
        total, n = len(_all_arrays(arc)), arc.n_samples
        what = (f"{len(names)} of {total} arrays, samples {_span(chosen)} of {n} embedded "
                f"({_mb(nbytes)})")
        note = html.escape(what) + (
            ". <code>attnscope.show(archive, arrays=[...], samples=[...])</code> chooses "
            "others." if (len(names) < total or len(chosen) < n) else ".")
        listed = ", ".join(names[:6]) + (f", ... ({len(names)})" if len(names) > 6 else "")
        text = f"attnscope viewer of {arc.path}: {what}; arrays {listed}"
    return Viewer(data, note, text, nbytes)


def show(source: Source, **options: Any) -> None:
    """Show the interactive viewer inline in a notebook (options as :func:`viewer`).

    Outside a notebook (a script, a terminal) it prints a plain-text summary and how to
    get a page instead (``viewer(...).save("view.html")`` or ``attnscope report``).

    Examples
    --------
    >>> import attnscope                                                  # doctest: +SKIP
    >>> attnscope.show("run.zarr", arrays=["encoder/0/self_attention"], sample=3)
    ...                                                                   # doctest: +SKIP
    """
    v = viewer(source, **options)
    if kernel_shell() is None:
        print(f"{v.text}\n(not in a notebook: the viewer draws in Jupyter or VS Code; "
              "attnscope.render.notebook.viewer(...).save('view.html') writes a page to open "
              "in a browser, `attnscope report` a full report)")
        return
    from IPython.display import display

    display(v)


def array_html(arr: AttentionArray) -> str:
    """Rich display of an array (the store's ``AttentionArray._repr_html_``): its viewer
    with the default choice, or the one-line reason it cannot be shown."""
    try:
        return viewer(arr).html()
    except AttnscopeError as e:
        return f"<pre>attnscope: {html.escape(f'{type(e).__name__}: {e}')}</pre>"

"""Rich display of archives and arrays in notebooks (``_repr_html_``).

An archive shows a summary table: format, samples committed, dtype, mode, codec, the
token layout per side (segments = modalities, token labels) and one row per array (shape,
heads, chunks). Every value reaches the page HTML-escaped.

An array shows the interactive viewer, which render draws. The store never imports render
at import time; :func:`array_html` importing :mod:`attnscope.render.notebook` *when a
notebook asks to display an array* is the one allowed exception (recorded in
``docs/architecture.md``): nothing of render is loaded by ``import attnscope.store``,
scripts, or the CLI.
"""

from __future__ import annotations

import html
from typing import Any

__all__ = ["archive_html", "array_html"]


def _e(x: Any) -> str:
    return html.escape(str(x))


def _table(header: list[str] | None, rows: list[list[Any]]) -> str:
    head = "".join(f"<th style='text-align:left'>{_e(h)}</th>" for h in header or [])
    head = f"<tr>{head}</tr>" if head else ""
    body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{_e(v)}</td>" for v in r)
                   + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _labels(labels: Any, n: int = 6) -> str:
    shown = [str(x) for x in list(labels)[:n]]
    return ", ".join(shown) + (", ..." if len(labels) > n else "")


def archive_html(arc: Any) -> str:  # an AttentionArchive (reader imports this module)
    """The archive's summary table as an HTML fragment."""
    try:
        meta = arc.metadata
        codec = meta.get("compressor") or "none"
        if meta.get("level") is not None:
            codec = f"{codec} (level {meta['level']})"
        mode = arc.mode if arc.topk is None else f"{arc.mode} (top-{arc.topk})"
        facts = [
            ["format", arc.format], ["schema version", arc.schema_version],
            ["samples committed", arc.n_samples], ["stored dtype", arc.dtype], ["mode", mode],
            ["codec", codec], ["ragged", "yes" if arc.ragged else "no"],
        ]
        sides = []
        for side in ("encoder", "decoder"):
            lay = getattr(arc.layout, side)
            if lay is not None:
                segs = "; ".join(f"{s.name} [{s.start}:{s.stop}]" for s in lay.segments)
                sides.append([side, lay.length, segs, _labels(lay.labels)])
        arrays = []
        for name in arc.arrays:
            a = arc[name]
            arrays.append([name, "x".join(map(str, a.shape)), str(a.dtype),
                           ", ".join(map(str, a.heads)), "x".join(map(str, a.chunks))])
    except Exception as e:  # a display must not raise: say why in one line
        return f"<pre>{_e(repr(arc))}\n(no summary: {_e(type(e).__name__)}: {_e(e)})</pre>"
    return (
        f"<div class='attnscope-archive'><b>AttentionArchive</b> <code>{_e(arc.path)}</code>"
        + _table(None, facts)
        + "<b>Token layout</b>"
        + _table(["side", "tokens", "segments (modalities)", "labels"], sides)
        + "<b>Arrays</b> (N, H, T, S)"
        + _table(["array", "shape", "dtype", "heads", "chunks"], arrays)
        + "<p>Display an array (<code>archive[name]</code>) or call "
        "<code>attnscope.show(archive, arrays=[...], sample=...)</code> for the interactive "
        "viewer.</p></div>"
    )


def array_html(arr: Any) -> str:  # an AttentionArray
    """The array's interactive viewer (drawn by render, imported here, lazily)."""
    from attnscope.render.notebook import array_html as viewer_html

    return viewer_html(arr)

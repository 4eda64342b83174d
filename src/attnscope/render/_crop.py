"""One sample's real tokens: what a figure or the report keeps of a padded (ragged) archive.

Ragged archives (schema 2) store every sample padded to the archive's maximum, with a mask
per side saying which stored positions hold real tokens (any pattern: right, left or middle
padding). A figure of one sample shows only its real tokens: the padded query rows and key
columns are dropped (the real positions are *selected*, not a prefix sliced), the axis
labels are that sample's own (``archive.sample_layout(i)``), and the segments are recounted
over the kept positions (a segment with no real token disappears).

Archives without masks (schema 1) report every token real; nothing is cropped then, so
their figures are exactly what they were. In-memory arrays and tensors carry no mask and
are never cropped. Nothing in here draws.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from attnscope.errors import SelectionError
from attnscope.store.layout import Segment, SideLayout

__all__ = [
    "crop_layout",
    "fit_layout",
    "kept_rows_layout",
    "has_sample_axes",
    "positions_of",
    "read_real",
    "real_positions",
    "sample_axes",
    "stored_axes",
]


def positions_of(mask: Any) -> np.ndarray | None:
    """Stored positions of the real tokens; None when every token is real (nothing to crop)."""
    m = np.asarray(mask, dtype=bool)
    return None if m.all() else np.flatnonzero(m)


def real_positions(attn: Any, sample: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(query positions, key positions)`` of one sample's real tokens in an archive selection.

    Each is an ascending int array of stored positions, or None when that axis has no
    padding (or ``attn`` knows no masks: in-memory arrays, tensors, archives without masks).
    """
    valid = getattr(attn, "valid", None)
    if isinstance(attn, np.ndarray) or hasattr(attn, "detach") or not callable(valid):
        return None, None
    q, k = valid(int(sample))
    return positions_of(q), positions_of(k)


def _span(pos: np.ndarray | None) -> slice:
    return slice(None) if pos is None else slice(int(pos[0]), int(pos[-1]) + 1)


def read_real(
    attn: Any, index: tuple[int, ...], rows: np.ndarray | None, cols: np.ndarray | None
) -> np.ndarray:
    """``attn[index]`` (a ``(..., T, S)`` block) restricted to stored positions rows x cols.

    Reads only the bounding box of the kept positions, then selects them; ``None`` keeps a
    whole axis. With both ``None`` this is exactly ``attn[index]``.
    """
    if rows is None and cols is None:
        return np.asarray(attn[index])
    x = np.asarray(attn[(*index, Ellipsis, _span(rows), _span(cols))])
    if rows is not None:
        x = np.take(x, rows - rows[0], axis=-2)
    if cols is not None:
        x = np.take(x, cols - cols[0], axis=-1)
    return x


def crop_layout(layout: SideLayout, positions: np.ndarray) -> SideLayout:
    """The layout of the tokens at ``positions`` (ascending stored positions), in that order.

    Labels are taken at those positions; each segment keeps the positions that fall in it
    and the segments are laid end to end again (empty ones dropped), so boundaries sit
    between the kept tokens.
    """
    pos = np.asarray(positions, dtype=np.int64)
    segments, start = [], 0
    for seg in layout.segments:
        n = int(np.count_nonzero((pos >= seg.start) & (pos < seg.stop)))
        if n:
            segments.append(Segment(seg.name, start, start + n))
            start += n
    return SideLayout(tuple(segments), tuple(layout.labels[int(i)] for i in pos))


def fit_layout(
    layout: SideLayout | None, positions: np.ndarray | None, stored: int
) -> SideLayout | None:
    """A layout of the stored axis (``stored`` tokens) cropped to ``positions``.

    A layout of any other length (e.g. one already covering only the real tokens) is
    returned as given; the caller checks it against the matrix.
    """
    if layout is None or positions is None or layout.length != stored:
        return layout
    return crop_layout(layout, positions)


def kept_rows_layout(attn: Any, layout: SideLayout | None) -> SideLayout | None:
    """The query layout of an array that keeps only some query rows (a capture row policy,
    ``attn.query_rows``): the kept rows' labels, segments recounted; else ``layout``."""
    rows = getattr(attn, "query_rows", None)
    if layout is None or rows is None or layout.length == len(rows):
        return layout
    return crop_layout(layout, np.asarray(rows, dtype=np.int64))


def has_sample_axes(attn: Any) -> bool:
    """Whether ``attn`` is an archive selection whose archive knows each sample's layout."""
    per_sample = getattr(getattr(attn, "archive", None), "sample_layout", None)
    named = getattr(attn, "stack", None) and getattr(attn, "kind", None)
    return callable(per_sample) and bool(named)


def sample_axes(attn: Any, sample: int) -> tuple[SideLayout | None, SideLayout | None] | None:
    """``(query, key)`` layouts with sample ``sample``'s own labels, from the archive behind
    an archive selection (``archive.sample_layout``); None when ``attn`` has no such archive."""
    if not has_sample_axes(attn):
        return None
    try:
        q, k = attn.archive.sample_layout(int(sample)).axes(attn.stack, attn.kind)
    except SelectionError:
        return None, None
    return kept_rows_layout(attn, q), k


def stored_axes(
    attn: Any, sample: int, mat: np.ndarray
) -> tuple[np.ndarray, np.ndarray, SideLayout | None, SideLayout | None]:
    """One sample's matrix on the archive's whole axes instead of its real tokens.

    ``mat`` is the sample's stored ``(R, S)`` matrix (``R`` kept rows of a row-policy
    array, else ``T``). Returns ``(matrix (T, S), hidden (T, S) bool, query layout, key
    layout)``: rows a row policy dropped are NaN, and ``hidden`` marks them, the padded
    rows and the padded key columns, so a figure draws them as masked cells. The layouts
    are the sample's own labels over the whole axes.
    """
    kept = getattr(attn, "query_rows", None)
    valid = getattr(attn, "valid", None)
    r, s = mat.shape
    q_ok, k_ok = valid(int(sample)) if callable(valid) else (np.ones(r, bool), np.ones(s, bool))
    q_lay = k_lay = None
    if has_sample_axes(attn):
        try:
            q_lay, k_lay = attn.archive.sample_layout(int(sample)).axes(attn.stack, attn.kind)
        except SelectionError:
            pass
    rows = np.arange(r) if kept is None else np.asarray(kept, dtype=np.int64)
    t = q_lay.length if q_lay is not None and kept is not None else int(rows.max()) + 1
    full = np.full((t, s), np.nan, dtype=np.float32)
    full[rows] = mat
    hidden = np.ones((t, s), dtype=bool)
    hidden[rows[np.asarray(q_ok, dtype=bool)]] = False
    hidden[:, ~np.asarray(k_ok, dtype=bool)] = True
    return full, hidden, q_lay, k_lay

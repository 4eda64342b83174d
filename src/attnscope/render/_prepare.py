"""Data preparation for plots: selection, head averaging, downsampling, axis layout.

Nothing in here draws. Every plot function first turns its input into a
:class:`PreparedMatrix` (a small 2-D numpy array plus how it maps back to token
indices), so tests can check the numbers without rendering pixels.

Inputs accepted wherever an "attention" argument is documented:

* numpy arrays of shape ``(B, H, T, S)``, ``(H, T, S)`` or ``(T, S)``;
* torch tensors (duck-typed: anything with ``.detach``), converted with
  ``.detach().cpu().float().numpy()`` -- this module never imports torch;
* an archive selection: an ``AttentionArray`` from
  ``archive.attention(stack, layer, kind)`` (anything with a 4-D ``.shape`` that is
  indexed as ``arr[sample, head]`` / ``arr[sample]``). Only the selected sample and
  head are read; the head average is accumulated one head at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnscope.errors import ConfigError, InputError, SelectionError, ShapeError
from attnscope.render._crop import (
    fit_layout,
    kept_rows_layout,
    read_real,
    real_positions,
    sample_axes,
    stored_axes,
)
from attnscope.store import as_numpy as _store_numpy
from attnscope.store.layout import SideLayout, TokenLayout

__all__ = [
    "MAX_PANEL_TICK_LABELS",
    "MAX_PIXELS",
    "MAX_TICK_LABELS",
    "PreparedMatrix",
    "as_numpy",
    "block_reduce",
    "causal_mask",
    "check_layout",
    "head_ids",
    "head_position",
    "n_heads",
    "n_samples",
    "prepare_matrix",
    "select_matrix",
]

#: Largest number of matrix cells drawn along one axis; longer axes are block-reduced.
MAX_PIXELS = 1024
#: Largest number of tokens on an axis for which every token gets its own tick label.
MAX_TICK_LABELS = 40
#: The same for the small panels of multi-panel figures (head grids, layer comparisons):
#: beyond it they show segment names, which read better at that size and cost far less
#: text layout than a label per token on every panel.
MAX_PANEL_TICK_LABELS = 10


def as_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a float numpy array (torch tensors are duck-typed via ``.detach``)."""
    if hasattr(x, "detach"):
        x = _store_numpy(x)
    if isinstance(x, np.ndarray):
        return x if x.dtype.kind == "f" else x.astype(np.float32)
    if isinstance(x, (list, tuple)):
        return np.asarray(x, dtype=np.float32)
    raise InputError(
        "expected a numpy array, a torch tensor or an archive AttentionArray, "
        f"got {type(x).__name__}"
    )


def _is_lazy(x: Any) -> bool:
    """True for archive selections: 4-D shaped, indexable, not an in-memory array."""
    shape = getattr(x, "shape", None)
    return (
        not isinstance(x, np.ndarray)
        and not hasattr(x, "detach")
        and shape is not None
        and len(shape) == 4
        and hasattr(x, "__getitem__")
    )


def _shape4(x: Any) -> tuple[int, int, int, int]:
    """``(B, H, T, S)`` of an attention input, with 3-D/2-D inputs given leading singleton axes."""
    shape = tuple(int(n) for n in x.shape)
    if len(shape) == 4:
        return shape  # type: ignore[return-value]
    if len(shape) == 3:
        return (1, *shape)  # type: ignore[return-value]
    if len(shape) == 2:
        return (1, 1, *shape)  # type: ignore[return-value]
    raise ShapeError(
        f"attention must have shape (B, H, T, S), (H, T, S) or (T, S); got shape {shape}"
    )


def n_heads(attn: Any) -> int:
    """Number of heads of an attention input."""
    return _shape4(attn)[1]


def head_ids(attn: Any) -> list[int]:
    """The model's head ids along the head axis of ``attn``.

    An archive selection knows them (``AttentionArray.heads``: a capture may keep only
    some heads, e.g. 0 and 3); any other input numbers its heads ``0..H-1``.
    """
    h = n_heads(attn)
    ids = getattr(attn, "heads", None) if _is_lazy(attn) else None
    if not isinstance(ids, (list, tuple, np.ndarray)) or len(ids) != h:
        return list(range(h))
    return [int(i) for i in ids]


def head_position(attn: Any, head: Any) -> int:
    """Position on the head axis of ``attn`` of model head ``head`` (see :func:`head_ids`).

    Raises :class:`SelectionError` naming the stored head ids when ``head`` is not one.
    """
    ids = head_ids(attn)
    if isinstance(head, bool) or not isinstance(head, (int, np.integer)):
        raise SelectionError(f"head_idx must be a head id, one of {_id_list(ids)}; got {head!r}")
    if int(head) not in ids:
        why = "out of range" if ids == list(range(len(ids))) else "is not a stored head"
        raise SelectionError(
            f"head_idx {int(head)} {why}: this attention has heads {_id_list(ids)}"
        )
    return ids.index(int(head))


def _id_list(ids: Sequence[int]) -> str:
    """``0..7`` for a full range, else the ids themselves (``[0, 3]``)."""
    if list(ids) == list(range(len(ids))):
        return f"0..{len(ids) - 1}"
    return str(list(ids))


def n_samples(attn: Any) -> int:
    """Number of samples (batch entries) of an attention input."""
    return _shape4(attn)[0]


def _check_index(value: int, n: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SelectionError(f"{what} must be an integer in [0, {n}), got {value!r}")
    v = int(value)
    if not 0 <= v < n:
        raise SelectionError(f"{what} {v} out of range: this attention has {n} ({what} 0..{n - 1})")
    return v


def select_matrix(
    attn: Any,
    *,
    head_idx: int | None = None,
    batch_idx: int = 0,
    rows: np.ndarray | None = None,
    cols: np.ndarray | None = None,
) -> np.ndarray:
    """The ``(T, S)`` matrix of one sample: one head, or the mean over heads (``head_idx=None``).

    ``head_idx`` is the model's head id (:func:`head_ids`: an archive keeping heads 0 and
    3 is asked for head 3, never for its second stored head).

    Archive selections read only sample ``batch_idx`` (and head ``head_idx``); the head
    average is accumulated head by head so peak memory stays at two matrices. ``rows`` /
    ``cols`` (ascending query / key positions, e.g. a sample's real tokens) keep only those
    rows and columns; an archive selection then reads only their bounding box.
    """
    b, h, _, _ = _shape4(attn)
    batch_idx = _check_index(batch_idx, b, "batch_idx")
    if head_idx is not None:
        head_idx = head_position(attn, head_idx)
    if _is_lazy(attn):
        if head_idx is not None:
            return read_real(attn, (batch_idx, head_idx), rows, cols).astype(np.float32)
        acc = read_real(attn, (batch_idx, 0), rows, cols).astype(np.float64)
        for i in range(1, h):
            acc += read_real(attn, (batch_idx, i), rows, cols)
        return (acc / h).astype(np.float32)
    x = as_numpy(attn)
    x = read_real(x.reshape(_shape4(x)), (batch_idx,), rows, cols)
    if head_idx is not None:
        return np.asarray(x[head_idx], dtype=np.float32)
    return x.mean(axis=0, dtype=np.float64).astype(np.float32)


def block_reduce(
    mat: np.ndarray, max_pixels: int = MAX_PIXELS, how: str = "max"
) -> tuple[np.ndarray, int, int]:
    """Shrink ``mat`` to at most ``max_pixels`` cells per axis by block max or mean.

    Each axis is cut into blocks of ``f = ceil(n / max_pixels)`` consecutive tokens (the
    last block may be shorter) and every block is replaced by its max (default: a single
    sharp key stays visible) or its mean (preserves mass). Returns
    ``(reduced, f_rows, f_cols)``; factors of 1 mean the axis was left alone.
    """
    if how not in ("max", "mean"):
        raise SelectionError(f"reduce must be 'max' or 'mean', got {how!r}")
    if max_pixels < 1:
        raise SelectionError(f"max_pixels must be >= 1, got {max_pixels}")
    t, s = mat.shape
    fr = -(-t // max_pixels)
    fc = -(-s // max_pixels)
    if fr == 1 and fc == 1:
        return mat, 1, 1
    fill = -np.inf if how == "max" else np.nan
    tp, sp = -(-t // fr) * fr, -(-s // fc) * fc
    padded = np.full((tp, sp), fill, dtype=np.float32)
    padded[:t, :s] = mat
    blocks = padded.reshape(tp // fr, fr, sp // fc, fc)
    out = blocks.max(axis=(1, 3)) if how == "max" else np.nanmean(blocks, axis=(1, 3))
    return out.astype(np.float32), fr, fc


def check_layout(layout: SideLayout | None, n: int, what: str) -> SideLayout | None:
    """Check that a side layout covers ``n`` tokens (or is ``None``)."""
    if layout is None:
        return None
    if not isinstance(layout, SideLayout):
        raise InputError(f"{what} layout must be a SideLayout or None, got {type(layout).__name__}")
    if layout.length != n:
        raise ShapeError(f"{what} layout covers {layout.length} tokens but the matrix has {n}")
    return layout


@dataclass(frozen=True)
class AxisSpec:
    """How one matrix axis is decorated: tick labels (every ``label_step``-th token),
    segment boundaries and segment names."""

    n: int
    labels: tuple[str, ...] | None
    #: token indices where a new segment starts (boundary drawn at ``index - 0.5``)
    boundaries: tuple[int, ...] = ()
    #: ``(name, centre)`` of each segment, centre in token coordinates
    segment_names: tuple[tuple[str, float], ...] = ()
    #: a tick label on every ``label_step``-th token (1: every token)
    label_step: int = 1

    @classmethod
    def build(
        cls, n: int, layout: SideLayout | None, max_labels: int = MAX_TICK_LABELS
    ) -> AxisSpec:
        """Labels of every token up to ``max_labels`` tokens, else of every k-th token
        (``k = ceil(n / max_labels)``); segment names and boundaries always."""
        if layout is None:
            return cls(n, None)
        bounds = tuple(seg.start for seg in layout.segments[1:])
        names = tuple((seg.name, (seg.start + seg.stop - 1) / 2) for seg in layout.segments)
        step = max(1, -(-n // max(1, max_labels)))
        return cls(n, tuple(layout.labels), bounds, names, step)

    def ticks(self) -> tuple[list[int], list[str]]:
        """Positions and labels of the token ticks drawn (every ``label_step``-th)."""
        if self.labels is None:
            return [], []
        pos = list(range(0, self.n, self.label_step))
        return pos, [self.labels[i] for i in pos]


@dataclass(frozen=True)
class PreparedMatrix:
    """A matrix ready to draw: values, colour range, and how its cells map to tokens."""

    data: np.ndarray
    #: query / key token counts of the full matrix (before any reduction)
    n_rows: int
    n_cols: int
    row_factor: int = 1
    col_factor: int = 1
    rows: AxisSpec = field(default=None)  # type: ignore[assignment]
    cols: AxisSpec = field(default=None)  # type: ignore[assignment]
    vmin: float | None = None
    vmax: float | None = None
    log: bool = False
    #: cells that may not be attended (causal upper triangle, NaN), same shape as ``data``;
    #: drawn in :data:`~attnscope.render._style.MASK_COLOR`. None: nothing masked
    mask: np.ndarray | None = None
    #: the values that set the colour range (allowed cells of rows with more than one
    #: allowed key); None: every finite value of ``data``
    scale_values: np.ndarray | None = field(default=None, repr=False)
    #: colour bar label, saying how the range was chosen
    label: str = "attention weight"

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """``imshow`` extent so data coordinates are token indices even after reduction."""
        return (-0.5, self.n_cols - 0.5, self.n_rows - 0.5, -0.5)

    @property
    def has_mask(self) -> bool:
        return self.mask is not None and bool(self.mask.any())

    def display(self) -> np.ndarray:
        """``data`` as drawn: a masked array (masked cells take the colormap's "bad" colour,
        the mask colour); on a log scale non-positive allowed cells are lifted below the
        range, so they take the lowest colour, not the mask colour."""
        data = self.data
        if self.log:
            data = np.where(data > 0, data, np.float32(np.finfo(np.float32).tiny))
        if self.mask is None:
            return data
        return np.ma.masked_array(data, mask=self.mask)


#: ``scale`` values: ``"max"`` (default), ``"row"`` or a percentile ``"p99"`` / ``"p99.5"``
SCALES = ("max", "row", "p<percentile>")


def check_scale(scale: str) -> float | None:
    """The percentile of a ``"pNN"`` scale, None for ``"max"`` / ``"row"``; else ConfigError."""
    if scale in ("max", "row"):
        return None
    if isinstance(scale, str) and scale.startswith("p"):
        try:
            q = float(scale[1:])
        except ValueError:
            q = -1.0
        if 0 < q <= 100:
            return q
    raise ConfigError(
        f"scale must be 'max', 'row' or a percentile such as 'p99' (0 < p <= 100), "
        f"got {scale!r}"
    )


def scale_label(scale: str, forced: bool) -> str:
    """Colour bar label stating how the colour range was chosen."""
    q = check_scale(scale)
    if scale == "row":
        return "weight / row max"
    parts = [] if q is None else [f"top: {q:g}th pct"]
    if forced:
        parts.append("1-key rows excluded")
    return f"weight ({'; '.join(parts)})" if parts else "attention weight"


def colour_limits(
    data: np.ndarray,
    vmin: float | None,
    vmax: float | None,
    log: bool,
    scale: str = "max",
) -> tuple[float, float]:
    """Colour limits: explicit values win; log scales start at the smallest positive value.

    ``scale="pNN"`` puts the top at the NN-th percentile of the finite values (a robust
    upper limit: a few sink cells do not wash out the rest); ``"row"``: ``[0, 1]``.
    """
    finite = data[np.isfinite(data)]
    q = check_scale(scale)
    if scale == "row":
        finite = np.asarray([0.0, 1.0])
    hi = float(finite.max()) if finite.size else 1.0
    if q is not None and finite.size:
        hi = float(np.percentile(finite, q))
    if log:
        pos = finite[finite > 0]
        lo = float(pos.min()) if pos.size else 1e-6
        lo = max(lo, hi * 1e-6) if hi > 0 else lo
        lo = lo if vmin is None or vmin <= 0 else float(vmin)
        hi = hi if vmax is None else float(vmax)
        if hi <= lo:
            hi = lo * 10
        return lo, hi
    lo = float(finite.min()) if finite.size else 0.0
    lo = lo if vmin is None else float(vmin)
    hi = hi if vmax is None else float(vmax)
    return lo, hi


def causal_mask(
    mat: np.ndarray, q_pos: np.ndarray | None, k_pos: np.ndarray | None
) -> np.ndarray | None:
    """``(T, S)`` True where key position > query position, when every such cell of ``mat``
    is exactly 0 (causal self-attention); None otherwise.

    ``q_pos`` / ``k_pos`` are the positions of the drawn rows / columns in one token
    sequence (stored or original positions; None: ``0..T-1`` / ``0..S-1``). A matrix with
    no cell past the diagonal proves nothing and gets None.
    """
    t, s = mat.shape
    q = np.arange(t) if q_pos is None else np.asarray(q_pos)
    k = np.arange(s) if k_pos is None else np.asarray(k_pos)
    upper = k[None, :] > q[:, None]
    if not upper.any() or np.any(mat[upper]) or not np.any(mat[~upper]):
        return None
    return upper


def _reduce_mask(mask: np.ndarray, fr: int, fc: int) -> np.ndarray:
    """A block is masked when every cell of it is (block-reduced like the data)."""
    if fr == 1 and fc == 1:
        return mask
    t, s = mask.shape
    padded = np.ones((-(-t // fr) * fr, -(-s // fc) * fc), dtype=bool)
    padded[:t, :s] = mask
    return padded.reshape(padded.shape[0] // fr, fr, padded.shape[1] // fc, fc).all(axis=(1, 3))


def scaled(
    mat: np.ndarray, mask: np.ndarray | None, scale: str
) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(data, values setting the colour range, whether forced rows were left out)``.

    Rows with a single allowed key (causal row 0: always 1.0) carry no information and
    would set a linear scale that leaves every other row dark: their cells are left out of
    the range (unless every row is forced). ``scale="row"`` divides each row by its max.
    """
    allowed = np.isfinite(mat) if mask is None else (~mask & np.isfinite(mat))
    n_allowed = allowed.sum(axis=1)
    forced = n_allowed == 1
    keep = allowed & ~forced[:, None] if (~forced & (n_allowed > 0)).any() else allowed
    left_out = bool(forced.any() and keep.sum() < allowed.sum())
    data = mat
    if scale == "row":
        peak = np.where(allowed, mat, 0).max(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            data = np.where(peak > 0, mat / peak, 0).astype(np.float32)
    return data, data[keep], left_out


def array_layouts(arr: Any) -> tuple[SideLayout | None, SideLayout | None]:
    """(query, key) layouts of an archive AttentionArray, when it knows where it comes from."""
    for attr in ("axes_layout", "layouts"):
        got = getattr(arr, attr, None)
        if isinstance(got, tuple) and len(got) == 2:
            return got
    archive = getattr(arr, "archive", None)
    stack, kind = getattr(arr, "stack", None), getattr(arr, "kind", None)
    layout = getattr(arr, "layout", None) or getattr(archive, "layout", None)
    if isinstance(layout, TokenLayout) and stack and kind:
        try:
            q, k = layout.axes(stack, kind)
        except SelectionError:
            return None, None
        return kept_rows_layout(arr, q), k
    return None, None


def prepare_matrix(
    attn: Any,
    *,
    head_idx: int | None = None,
    batch_idx: int = 0,
    query_layout: SideLayout | None = None,
    key_layout: SideLayout | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    log: bool = False,
    reduce: str = "max",
    max_pixels: int = MAX_PIXELS,
    max_labels: int = MAX_TICK_LABELS,
    scale: str = "max",
    crop: bool = True,
) -> PreparedMatrix:
    """Select, average and downsample one matrix, and work out its axis decoration.

    ``attn`` is any attention input (a ``(T, S)`` matrix included). An archive selection
    without explicit layouts brings its own (modality-aware axes), with sample
    ``batch_idx``'s own token labels. Axes of at most ``max_labels`` tokens get a tick
    label per token, longer ones a label on every k-th token.

    An archive selection of a ragged archive is cropped to the sample's real tokens (padded
    query rows and key columns removed, whatever the padding pattern); a layout covering
    the stored axis is cropped alike, with its segments recounted (see ``_crop``).
    ``crop=False`` shows an archive selection on the archive's whole axes instead: padded
    rows and columns, and the rows a capture row policy dropped, become masked cells.

    Masked cells (:func:`causal_mask`: a self-attention map whose cells past the diagonal
    are all 0; NaN cells) are marked in ``mask``. The colour range comes from the allowed
    cells of rows with more than one allowed key (:func:`scaled`), topped at their max
    (``scale="max"``) or a percentile (``"p99"``); ``"row"`` scales each row to its max.
    """
    check_scale(scale)
    b = _check_index(batch_idx, n_samples(attn), "batch_idx")
    if not crop and _is_lazy(attn):
        mat, hidden, q_lay, k_lay = stored_axes(attn, b, select_matrix(
            attn, head_idx=head_idx, batch_idx=b))
        if query_layout is None and key_layout is None:
            query_layout, key_layout = q_lay, k_lay
        t, s = mat.shape
        query_layout = check_layout(query_layout, t, "query")
        key_layout = check_layout(key_layout, s, "key")
        mask = _mask(None, np.where(hidden, 0, mat), None, None)
        mask = hidden if mask is None else mask | hidden
    else:
        mat, mask, query_layout, key_layout = _cropped(
            attn, b, head_idx, query_layout, key_layout)
        t, s = mat.shape
    data, values, forced = scaled(mat, mask, scale)
    data, fr, fc = block_reduce(data, max_pixels, reduce)
    if mask is not None:
        mask = _reduce_mask(mask, fr, fc)
    lo, hi = colour_limits(values, vmin, vmax, log, scale)
    return PreparedMatrix(
        data=data,
        n_rows=t,
        n_cols=s,
        row_factor=fr,
        col_factor=fc,
        rows=AxisSpec.build(t, query_layout, max_labels),
        cols=AxisSpec.build(s, key_layout, max_labels),
        vmin=lo,
        vmax=hi,
        log=log,
        mask=mask,
        scale_values=values,
        label=scale_label(scale, forced),
    )


def _cropped(
    attn: Any, b: int, head_idx: int | None, query_layout: SideLayout | None,
    key_layout: SideLayout | None,
) -> tuple[np.ndarray, np.ndarray | None, SideLayout | None, SideLayout | None]:
    """``(matrix, mask, query layout, key layout)`` of sample ``b``'s real tokens."""
    rows, cols = real_positions(attn, b) if _is_lazy(attn) else (None, None)
    if query_layout is None and key_layout is None:
        own = sample_axes(attn, b)
        query_layout, key_layout = own if own is not None else array_layouts(attn)
    mat = select_matrix(attn, head_idx=head_idx, batch_idx=b, rows=rows, cols=cols)
    t, s = mat.shape
    _, _, t_stored, s_stored = _shape4(attn)
    query_layout = check_layout(fit_layout(query_layout, rows, t_stored), t, "query")
    key_layout = check_layout(fit_layout(key_layout, cols, s_stored), s, "key")
    return mat, _mask(attn, mat, rows, cols), query_layout, key_layout


def _mask(
    attn: Any, mat: np.ndarray, rows: np.ndarray | None, cols: np.ndarray | None
) -> np.ndarray | None:
    """Cells not attended: the causal triangle of self-attention (positions: original
    query rows of a row-policy array, stored key positions), and NaN cells."""
    mask = None
    kind = getattr(attn, "kind", None) if _is_lazy(attn) else None  # None: any input
    if kind in (None, "self_attention"):
        q_pos = rows
        kept = getattr(attn, "query_rows", None) if _is_lazy(attn) else None
        if kept is not None:
            kept = np.asarray(kept, dtype=np.int64)
            q_pos = kept if rows is None else kept[rows]
        mask = causal_mask(mat, q_pos, cols)
    bad = ~np.isfinite(mat)
    if bad.any():
        mask = bad if mask is None else mask | bad
    return mask


def shared_limits(
    mats: Sequence[PreparedMatrix],
    vmin: float | None,
    vmax: float | None,
    log: bool,
    scale: str = "max",
) -> tuple[float, float]:
    """One colour range covering every matrix in ``mats`` (explicit limits win), from the
    values that set each one's range (:attr:`PreparedMatrix.scale_values`)."""
    parts = [m.data if m.scale_values is None else m.scale_values for m in mats]
    stacked = np.concatenate([np.ravel(x)[np.isfinite(np.ravel(x))] for x in parts])
    return colour_limits(stacked, vmin, vmax, log, scale)

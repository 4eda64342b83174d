"""Attention figures: one head, all heads, layers side by side, encoder -> decoder flow.

Every function prepares its data with :mod:`attnscope.render._prepare` first and only
then draws, returns the :class:`~matplotlib.figure.Figure`, and takes ``save_path=``
and ``show=`` as conveniences on top. Functions drawing a single panel accept
``ax=`` to draw into an existing Axes.

Axis decoration is modality-aware: with a :class:`~attnscope.store.layout.SideLayout`
for the query and key side, every token gets a tick label when an axis has at most
:data:`~attnscope.render._prepare.MAX_TICK_LABELS` tokens; longer axes get the segment
names at the segment centres instead. Segment boundaries are drawn as thin lines at
``start - 0.5`` of every segment after the first, on both axes.

Large matrices are block-reduced to at most ``max_pixels`` cells per axis (block
**max** by default, so one sharp key stays visible; ``reduce="mean"`` preserves mass)
and the image is placed with an ``extent`` in token units, so boundaries and ticks
stay at token indices whatever the reduction.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from attnscope.errors import InputError, SelectionError
from attnscope.render._axes import (  # noqa: F401  (BOUNDARY_GID: re-exported for tests)
    BOUNDARY_GID,
    PANEL_LABEL_CHARS,
    axis_label,
    decorate_axis,
    fit_title,
    mask_legend,
    title_pad,
)
from attnscope.render._ipython import display_once
from attnscope.render._prepare import (
    MAX_PANEL_TICK_LABELS,
    MAX_PIXELS,
    PreparedMatrix,
    head_ids,
    prepare_matrix,
    shared_limits,
)
from attnscope.render._save import finish
from attnscope.render._style import STYLE, colormap
from attnscope.store.layout import SideLayout

__all__ = [
    "annotate_cells",
    "draw_matrix",
    "fit_title",
    "mask_legend",
    "plot_attention_flow",
    "plot_head_grid",
    "plot_heatmap",
    "plot_layer_comparison",
]

PathLike = str | os.PathLike
#: (stack, kind) of the three arrays of a flow figure, in plot_attention_flow's argument order
FLOW_ARRAYS = (
    ("encoder", "self_attention"),
    ("decoder", "self_attention"),
    ("decoder", "cross_attention"),
)


def new_figure(figsize: tuple[float, float] | None) -> Figure:
    """A new pyplot-managed figure (so notebooks display it) with constrained layout; in a
    notebook displayed once, also when a function returning it ends the cell."""
    import matplotlib.pyplot as plt

    return display_once(plt.figure(figsize=figsize, layout="constrained"))


def _norm(lo: float | None, hi: float | None, log: bool) -> Normalize:
    return LogNorm(lo, hi, clip=False) if log else Normalize(lo, hi)


def draw_matrix(
    ax: Axes,
    prepared: PreparedMatrix,
    *,
    cmap: Any = None,
    norm: Normalize | None = None,
    xlabel: str | None = "key",
    ylabel: str | None = "query",
    col_rotation: float = 90,
    xticks: bool = True,
    yticks: bool = True,
    names: tuple[bool, bool] | None = None,
    label_chars: int | None = None,
) -> Any:
    """Draw a prepared matrix onto ``ax``; return the ``AxesImage``.

    The one matrix drawer of the render stage (attention maps and table figures). Data
    coordinates are cell indices (``extent`` undoes any block reduction); tick labels
    are drawn as literal text (see :func:`attnscope.render._style.plain`).
    ``xticks``/``yticks=False`` leave that axis without ticks (inner panels of a grid).
    ``names`` (x, y): draw the segment names on the top / right side (default: where
    there are ticks). ``label_chars``: small panels, tick labels cut in the middle.
    Masked cells (``prepared.mask``) take the mask colour.
    """
    im = ax.imshow(
        prepared.display(),
        cmap=colormap(cmap if cmap is not None else STYLE.cmap),
        norm=norm or _norm(prepared.vmin, prepared.vmax, prepared.log),
        aspect="auto",
        interpolation="nearest",
        extent=prepared.extent,
    )
    xn, yn = names if names is not None else (None, None)
    decorate_axis(ax, prepared.cols, "cols", col_rotation, xticks, xn, label_chars)
    decorate_axis(ax, prepared.rows, "rows", col_rotation, yticks, yn, label_chars)
    brief = label_chars is not None
    xlabel = axis_label(xlabel, prepared.cols, brief)
    ylabel = axis_label(ylabel, prepared.rows, brief)
    size = {"fontsize": STYLE.panel_title_size - 1} if brief else {}
    if xlabel:
        ax.set_xlabel(xlabel, **size)
    if ylabel:
        ax.set_ylabel(ylabel, **size)
    return im


def annotate_cells(
    ax: Axes, data: Any, fmt: str, *, dark_on_light: bool, fontsize: float | None = None,
    limits: tuple[float, float] | None = None,
) -> None:
    """Write every cell's value into it, in a colour that reads on the cell.

    ``dark_on_light``: the colormap is light at high values (black text above the middle
    of the range), else dark there (white text above the middle).
    """
    import numpy as np

    lo, hi = limits if limits is not None else (float(np.nanmin(data)), float(np.nanmax(data)))
    mid = (lo + hi) / 2
    hi_text, lo_text = ("black", "white") if dark_on_light else ("white", "black")
    for (r, c), v in np.ndenumerate(data):
        ax.text(
            c,
            r,
            fmt.format(v),
            ha="center",
            va="center",
            fontsize=fontsize or STYLE.cell_size,
            color=hi_text if v > mid else lo_text,
        )


def _panels(fig: Figure, n: int, ncols: int) -> list[Axes]:
    """``n`` Axes in a grid of ``ncols`` columns (row-major); unused cells removed."""
    nrows = math.ceil(n / ncols)
    grid = fig.subplots(nrows, ncols, squeeze=False)
    flat = [a for row in grid for a in row]
    for extra in flat[n:]:
        extra.remove()
    return flat[:n]


def _who(head_idx: int | None) -> str:
    return "mean of heads" if head_idx is None else f"head {head_idx}"


def plot_heatmap(
    attention: Any,
    *,
    head_idx: int | None = None,
    batch_idx: int = 0,
    query_layout: SideLayout | None = None,
    key_layout: SideLayout | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = STYLE.heatmap_size,
    cmap: Any = STYLE.cmap,
    vmin: float | None = None,
    vmax: float | None = None,
    log: bool = False,
    scale: str = "max",
    crop: bool = True,
    reduce: str = "max",
    max_pixels: int = MAX_PIXELS,
    colorbar: bool = True,
    ax: Axes | None = None,
    save_path: PathLike | None = None,
    show: bool = False,
) -> Figure:
    """Heatmap of one head, or of the mean over heads (``head_idx=None``), of one sample.

    Parameters
    ----------
    attention
        ``(B, H, T, S)`` numpy array or torch tensor, ``(H, T, S)``, ``(T, S)``, or an
        archive ``AttentionArray`` (only the selected sample/head is read).
    head_idx, batch_idx
        Selection; out-of-range values raise :class:`~attnscope.errors.SelectionError`.
    query_layout, key_layout
        Optional :class:`SideLayout` of the query (rows) and key (columns) tokens.
    log
        Logarithmic colour scale, for peaky attention. Its range starts at the smallest
        positive weight, floored at ``1e-6`` of the maximum (unless ``vmin`` is given).
    scale
        Top of the colour range: ``"max"`` (the largest allowed weight, rows with a
        single allowed key left out), a percentile ``"p99"`` (robust: the few brightest
        cells drawn at the top colour) or ``"row"`` (each row divided by its max). The
        colour bar label says which. Masked cells (causal upper triangle) are drawn in
        the mask colour, with a legend entry.
    crop
        Archive selections: show the sample's real tokens (default), or with
        ``crop=False`` the archive's whole axes, padded rows and columns and the rows a
        capture row policy dropped drawn as masked cells.
    reduce, max_pixels
        Block reduction (``"max"`` or ``"mean"``) of axes longer than ``max_pixels``.
    ax
        Draw into this Axes instead of a new figure.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> from attnscope.render import plot_heatmap
    >>> fig = plot_heatmap(np.full((1, 2, 4, 4), 0.25), head_idx=1)
    """
    (p,) = heatmap_matrices(
        attention, head_idx=head_idx, batch_idx=batch_idx, query_layout=query_layout,
        key_layout=key_layout, vmin=vmin, vmax=vmax, log=log, reduce=reduce,
        max_pixels=max_pixels, scale=scale, crop=crop,
    )
    own = ax is None
    fig = new_figure(figsize) if own else ax.figure
    ax = fig.add_subplot() if ax is None else ax
    im = draw_matrix(ax, p, cmap=cmap)
    text = title if title is not None else f"{_who(head_idx)}, sample {batch_idx}"
    ax.set_title(fit_title(text, 0.75 * fig.get_figwidth()) if own else text,
                 pad=title_pad(ax))
    if colorbar:
        fig.colorbar(im, ax=ax, label=p.label)
    if own:
        mask_legend(fig, [p], cmap)
    return finish(fig, save_path, show)


def _grid_shape(n: int, ncols: int | None) -> tuple[int, int]:
    if ncols is None:
        ncols = min(n, 4) if n <= 8 else math.ceil(math.sqrt(n))
    ncols = max(1, min(ncols, n))
    return math.ceil(n / ncols), ncols


def plot_head_grid(
    attention: Any,
    *,
    batch_idx: int = 0,
    heads: Sequence[int] | None = None,
    query_layout: SideLayout | None = None,
    key_layout: SideLayout | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    ncols: int | None = None,
    cmap: Any = STYLE.cmap,
    vmin: float | None = None,
    vmax: float | None = None,
    log: bool = False,
    scale: str = "max",
    crop: bool = True,
    reduce: str = "max",
    max_pixels: int = 512,
    save_path: PathLike | None = None,
    show: bool = False,
) -> Figure:
    """All heads of one layer side by side, with one shared colour scale and colour bar.

    The figure has one Axes per head (titled ``head i``, ``i`` the model's head id: an
    archive keeping heads 0 and 3 shows ``head 0`` and ``head 3``) plus one colour-bar
    Axes. Tick labels are kept on the outer panels only. ``scale`` as in
    :func:`plot_heatmap`, over all panels together.
    """
    heads = grid_heads(attention, heads)
    # vmin/vmax apply to the shared scale below, not to each head
    prepared = grid_matrices(
        attention, batch_idx=batch_idx, heads=heads, query_layout=query_layout,
        key_layout=key_layout, log=log, reduce=reduce, max_pixels=max_pixels, scale=scale,
        crop=crop,
    )
    nrows, ncols = _grid_shape(len(heads), ncols)
    fig = new_figure(figsize or (3.2 * ncols + 1.2, 3.0 * nrows + 0.8))
    # Not shared axes: inner panels drop their ticks entirely (shared axes would keep
    # every panel's hidden tick artists, which made a grid ~2x slower to draw).
    axes = _panels(fig, len(heads), ncols)
    norm = _norm(*shared_limits(prepared, vmin, vmax, log, scale), log)
    im = None
    for k, (ax, i, p) in enumerate(zip(axes, heads, prepared)):
        r, c = divmod(k, ncols)
        im = draw_matrix(
            ax,
            p,
            cmap=cmap,
            norm=norm,
            xlabel="key" if r == nrows - 1 else None,
            ylabel="query" if c == 0 else None,
            xticks=k + ncols >= len(heads),  # the last panel of its column
            yticks=c == 0,
            # segment names on the outer sides only: top row, last panel of each row
            names=(r == 0, c == ncols - 1 or k == len(heads) - 1),
            label_chars=PANEL_LABEL_CHARS,
        )
        ax.set_title(f"head {i}", fontsize=STYLE.panel_title_size, pad=title_pad(ax))
    fig.colorbar(im, ax=axes, shrink=0.8, label=_shared_label(prepared))
    if title is not None:
        fig.suptitle(fit_title(title, fig.get_figwidth()))
    mask_legend(fig, prepared, cmap)
    return finish(fig, save_path, show)


def _shared_label(mats: Sequence[PreparedMatrix]) -> str:
    """The colour bar label of panels sharing one scale (the one saying the most)."""
    return max((m.label for m in mats), key=len)


def plot_layer_comparison(
    layers: Sequence[Any] | Mapping[Any, Any],
    *,
    head_idx: int | None = None,
    batch_idx: int = 0,
    query_layout: SideLayout | None = None,
    key_layout: SideLayout | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    ncols: int | None = None,
    cmap: Any = STYLE.cmap,
    vmin: float | None = None,
    vmax: float | None = None,
    log: bool = False,
    scale: str = "max",
    crop: bool = True,
    shared_scale: bool = True,
    reduce: str = "max",
    max_pixels: int = 512,
    save_path: PathLike | None = None,
    show: bool = False,
) -> Figure:
    """One panel per layer (same kind, same head or head mean), titled ``layer i``.

    ``layers`` is a sequence of attention inputs (index = layer number) or a mapping
    ``{layer number: attention}``. With ``shared_scale`` (default) all panels use one
    colour range; otherwise each panel gets its own colour bar.
    """
    items = list(layers.items()) if isinstance(layers, Mapping) else list(enumerate(layers))
    if not items:
        raise SelectionError("no layers to compare")
    opts = dict(vmin=vmin, vmax=vmax, log=log, reduce=reduce, max_pixels=max_pixels,
                scale=scale, crop=crop)
    prepared = [
        prepare_matrix(a, head_idx=head_idx, batch_idx=batch_idx, query_layout=query_layout,
                       key_layout=key_layout, max_labels=MAX_PANEL_TICK_LABELS, **opts)
        for _, a in items
    ]
    nrows, ncols = _grid_shape(len(items), ncols if ncols is not None else min(len(items), 4))
    fig = new_figure(figsize or (4.0 * ncols + 1.0, 3.6 * nrows + 0.8))
    axes = _panels(fig, len(items), ncols)
    shared = (_norm(*shared_limits(prepared, vmin, vmax, log, scale), log)
              if shared_scale else None)
    im = None
    for k, (ax, (name, _), p) in enumerate(zip(axes, items, prepared)):
        r, c = divmod(k, ncols)
        # ticks on the outer panels only (as in head grids): tick labels are most of the cost
        im = draw_matrix(ax, p, cmap=cmap, norm=shared, label_chars=PANEL_LABEL_CHARS,
                         xticks=k + ncols >= len(items), yticks=c == 0,
                         xlabel="key" if k + ncols >= len(items) else None,
                         ylabel="query" if c == 0 else None,
                         names=(r == 0, c == ncols - 1 or k == len(items) - 1))
        ax.set_title(f"layer {name}", pad=title_pad(ax))
        if not shared_scale:
            fig.colorbar(im, ax=ax, label=p.label)
    if shared_scale:
        fig.colorbar(im, ax=axes, shrink=0.8, label=_shared_label(prepared))
    text = title if title is not None else f"{_who(head_idx)}, sample {batch_idx}"
    fig.suptitle(fit_title(text, fig.get_figwidth()))
    mask_legend(fig, prepared, cmap)
    return finish(fig, save_path, show)


def _check_flow(enc: PreparedMatrix, dec: PreparedMatrix, cross: PreparedMatrix) -> None:
    for side, n_cross, n_self, what in (
        ("keys", cross.n_cols, enc.n_cols, "encoder"),
        ("queries", cross.n_rows, dec.n_rows, "decoder"),
    ):
        if n_cross != n_self:
            raise InputError(
                f"cross-attention has {n_cross} {side} but {what} self-attention has "
                f"{n_self} tokens; they must come from the same layer and sample"
            )


def plot_attention_flow(
    encoder_attention: Any,
    decoder_self_attention: Any,
    decoder_cross_attention: Any,
    *,
    layer_idx: int | None = None,
    head_idx: int | None = None,
    batch_idx: int = 0,
    encoder_layout: SideLayout | None = None,
    decoder_layout: SideLayout | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = STYLE.flow_size,
    cmap: Any = STYLE.cmap,
    vmin: float | None = None,
    vmax: float | None = None,
    log: bool = False,
    scale: str = "max",
    crop: bool = True,
    reduce: str = "max",
    max_pixels: int = 512,
    save_path: PathLike | None = None,
    show: bool = False,
) -> Figure:
    """Encoder self-attention -> decoder self-attention -> decoder cross-attention of one layer.

    Layout (2 x 2 grid, panel sizes proportional to sequence lengths)::

        [ encoder self (S x S) ]  [ colour bars          ]
        [ cross (T x S)        ]  [ decoder self (T x T) ]

    The cross-attention panel shares its key axis (encoder tokens) with the encoder
    panel above it and its query axis (decoder tokens) with the decoder panel beside
    it, so token positions line up. Each panel has its own colour scale unless
    ``vmin``/``vmax`` are given. Axes order in ``fig.axes``: encoder self, decoder
    self, cross, then the three colour bars.
    """
    enc, dec, cross = flow_matrices(
        encoder_attention, decoder_self_attention, decoder_cross_attention,
        head_idx=head_idx, batch_idx=batch_idx, encoder_layout=encoder_layout,
        decoder_layout=decoder_layout, vmin=vmin, vmax=vmax, log=log, reduce=reduce,
        max_pixels=max_pixels, scale=scale, crop=crop,
    )
    s, t = enc.n_cols, dec.n_rows
    fig = new_figure(figsize)
    gs = fig.add_gridspec(2, 2, width_ratios=[s, t], height_ratios=[s, t])
    ax_enc = fig.add_subplot(gs[0, 0])
    ax_dec = fig.add_subplot(gs[1, 1])
    ax_cross = fig.add_subplot(gs[1, 0], sharex=ax_enc, sharey=ax_dec)
    ims = []
    for ax, p, name in (
        (ax_enc, enc, "encoder self-attention"),
        (ax_dec, dec, "decoder self-attention"),
        (ax_cross, cross, "decoder cross-attention"),
    ):
        ims.append(draw_matrix(ax, p, cmap=cmap, xlabel=None, ylabel=None))
        ax.set_title(name, fontsize=STYLE.panel_title_size, pad=title_pad(ax))
    ax_enc.set_ylabel("encoder query")
    ax_cross.set_xlabel("encoder key")
    ax_cross.set_ylabel("decoder query")
    ax_dec.set_xlabel("decoder key")
    ax_enc.tick_params(labelbottom=False)
    ax_dec.tick_params(labelleft=False)
    for im, ax, p, where, name in ((ims[0], ax_enc, enc, "right", "encoder self"),
                                   (ims[1], ax_dec, dec, "right", "decoder self"),
                                   (ims[2], ax_cross, cross, "bottom", "cross")):
        label = p.label.replace("attention weight", name, 1)
        fig.colorbar(im, ax=ax, location=where, shrink=0.8, label=label)
    text = title if title is not None else flow_title(layer_idx, head_idx, batch_idx)
    fig.suptitle(fit_title(text, fig.get_figwidth()))
    mask_legend(fig, [enc, dec, cross], cmap)
    return finish(fig, save_path, show)


def flow_title(layer_idx: int | None, head_idx: int | None, batch_idx: int) -> str:
    """The default title of :func:`plot_attention_flow`."""
    layer = "" if layer_idx is None else f"layer {layer_idx}, "
    return f"Attention flow: {layer}{_who(head_idx)}, sample {batch_idx}"


# --- data of each figure, shared with the figure reuse of batch rendering (_reuse.py) ----


def heatmap_matrices(
    attention: Any, *, head_idx: int | None = None, batch_idx: int = 0,
    query_layout: SideLayout | None = None, key_layout: SideLayout | None = None,
    vmin: float | None = None, vmax: float | None = None, log: bool = False,
    reduce: str = "max", max_pixels: int = MAX_PIXELS, scale: str = "max", crop: bool = True,
    **_: Any,
) -> list[PreparedMatrix]:
    """The one matrix of :func:`plot_heatmap` (other keyword arguments are ignored)."""
    return [
        prepare_matrix(attention, head_idx=head_idx, batch_idx=batch_idx,
                       query_layout=query_layout, key_layout=key_layout, vmin=vmin,
                       vmax=vmax, log=log, reduce=reduce, max_pixels=max_pixels, scale=scale,
                       crop=crop)
    ]


def grid_heads(attention: Any, heads: Sequence[int] | None) -> list[int]:
    """The model head ids of a head grid's panels (default: every stored head)."""
    ids = head_ids(attention)
    heads = ids if heads is None else list(heads)
    if not heads:
        raise SelectionError(f"no heads selected; this attention has heads {ids}")
    return heads


def grid_matrices(
    attention: Any, *, batch_idx: int = 0, heads: Sequence[int] | None = None,
    query_layout: SideLayout | None = None, key_layout: SideLayout | None = None,
    log: bool = False, reduce: str = "max", max_pixels: int = 512, scale: str = "max",
    crop: bool = True, **_: Any,
) -> list[PreparedMatrix]:
    """One matrix per panel of :func:`plot_head_grid`, each on its own colour range."""
    return [
        prepare_matrix(attention, head_idx=i, batch_idx=batch_idx, query_layout=query_layout,
                       key_layout=key_layout, log=log, reduce=reduce, max_pixels=max_pixels,
                       max_labels=MAX_PANEL_TICK_LABELS, scale=scale, crop=crop)
        for i in grid_heads(attention, heads)
    ]


def flow_matrices(
    encoder_attention: Any, decoder_self_attention: Any, decoder_cross_attention: Any, *,
    head_idx: int | None = None, batch_idx: int = 0,
    encoder_layout: SideLayout | None = None, decoder_layout: SideLayout | None = None,
    vmin: float | None = None, vmax: float | None = None, log: bool = False,
    reduce: str = "max", max_pixels: int = 512, scale: str = "max", crop: bool = True,
    **_: Any,
) -> list[PreparedMatrix]:
    """Encoder self, decoder self and cross matrices of :func:`plot_attention_flow`, checked."""
    opts = dict(vmin=vmin, vmax=vmax, log=log, reduce=reduce, max_pixels=max_pixels,
                scale=scale, crop=crop)
    out = [
        prepare_matrix(a, query_layout=q, key_layout=k, head_idx=head_idx, batch_idx=batch_idx,
                       **opts)
        for a, q, k in (
            (encoder_attention, encoder_layout, encoder_layout),
            (decoder_self_attention, decoder_layout, decoder_layout),
            (decoder_cross_attention, decoder_layout, encoder_layout),
        )
    ]
    _check_flow(*out)
    return out

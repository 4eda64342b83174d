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

import matplotlib as mpl
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from attnscope.errors import InputError, SelectionError
from attnscope.render._prepare import (
    MAX_PIXELS,
    AxisSpec,
    PreparedMatrix,
    n_heads,
    prepare_matrix,
    shared_limits,
)
from attnscope.render._save import finish
from attnscope.store.layout import SideLayout

__all__ = [
    "draw_matrix",
    "plot_attention_flow",
    "plot_head_grid",
    "plot_heatmap",
    "plot_layer_comparison",
]

PathLike = str | os.PathLike
BOUNDARY_GID = {"rows": "segment_boundary_query", "cols": "segment_boundary_key"}


def new_figure(figsize: tuple[float, float] | None) -> Figure:
    """A new pyplot-managed figure (so notebooks display it) with constrained layout."""
    import matplotlib.pyplot as plt

    return plt.figure(figsize=figsize, layout="constrained")


def _norm(p: PreparedMatrix, vmin: float | None = None, vmax: float | None = None) -> Normalize:
    lo = p.vmin if vmin is None else vmin
    hi = p.vmax if vmax is None else vmax
    return LogNorm(lo, hi, clip=False) if p.log else Normalize(lo, hi)


def _cmap(name: Any) -> Any:
    cmap = mpl.colormaps[name] if isinstance(name, str) else name
    # exact zeros on a log scale are "bad": draw them in the lowest colour, not white
    return cmap.with_extremes(bad=cmap(0.0))


def _decorate_axis(ax: Axes, spec: AxisSpec, which: str, boundary_color: str) -> None:
    set_ticks = ax.set_xticks if which == "cols" else ax.set_yticks
    line = ax.axvline if which == "cols" else ax.axhline
    for b in spec.boundaries:
        line(b - 0.5, color=boundary_color, lw=0.8, alpha=0.9, gid=BOUNDARY_GID[which])
    rot = 90 if which == "cols" else 0
    if spec.labels is not None:
        size = 8 if spec.n <= 20 else 6
        set_ticks(range(spec.n), spec.labels, rotation=rot, fontsize=size)
    elif spec.segment_names:
        centres = [c for _, c in spec.segment_names]
        names = [n for n, _ in spec.segment_names]
        set_ticks(centres, names, rotation=rot, fontsize=7)


def draw_matrix(
    ax: Axes,
    prepared: PreparedMatrix,
    *,
    cmap: Any = "viridis",
    norm: Normalize | None = None,
    boundary_color: str = "white",
    xlabel: str | None = "key",
    ylabel: str | None = "query",
) -> Any:
    """Draw a prepared matrix onto ``ax``; return the ``AxesImage``.

    Data coordinates are token indices (``extent`` undoes any block reduction).
    """
    im = ax.imshow(
        prepared.data,
        cmap=_cmap(cmap),
        norm=norm or _norm(prepared),
        aspect="auto",
        interpolation="nearest",
        extent=prepared.extent,
    )
    _decorate_axis(ax, prepared.cols, "cols", boundary_color)
    _decorate_axis(ax, prepared.rows, "rows", boundary_color)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    return im


def _default_title(head_idx: int | None, batch_idx: int) -> str:
    head = "mean of heads" if head_idx is None else f"head {head_idx}"
    return f"{head}, sample {batch_idx}"


def plot_heatmap(
    attention: Any,
    *,
    head_idx: int | None = None,
    batch_idx: int = 0,
    query_layout: SideLayout | None = None,
    key_layout: SideLayout | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = (10, 8),
    cmap: Any = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    log: bool = False,
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
    p = prepare_matrix(
        attention,
        head_idx=head_idx,
        batch_idx=batch_idx,
        query_layout=query_layout,
        key_layout=key_layout,
        vmin=vmin,
        vmax=vmax,
        log=log,
        reduce=reduce,
        max_pixels=max_pixels,
    )
    fig = new_figure(figsize) if ax is None else ax.figure
    ax = fig.add_subplot() if ax is None else ax
    im = draw_matrix(ax, p, cmap=cmap)
    ax.set_title(title if title is not None else _default_title(head_idx, batch_idx))
    if colorbar:
        fig.colorbar(im, ax=ax, label="attention weight")
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
    cmap: Any = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    log: bool = False,
    reduce: str = "max",
    max_pixels: int = 512,
    save_path: PathLike | None = None,
    show: bool = False,
) -> Figure:
    """All heads of one layer side by side, with one shared colour scale and colour bar.

    The figure has one Axes per head (titled ``head i``) plus one colour-bar Axes.
    Tick labels are kept on the outer panels only.
    """
    h = n_heads(attention)
    heads = list(range(h)) if heads is None else list(heads)
    if not heads:
        raise SelectionError(f"no heads selected; this attention has heads 0..{h - 1}")
    prepared = [
        prepare_matrix(
            attention,
            head_idx=i,
            batch_idx=batch_idx,
            query_layout=query_layout,
            key_layout=key_layout,
            log=log,
            reduce=reduce,
            max_pixels=max_pixels,
        )
        for i in heads
    ]
    lo, hi = shared_limits(prepared, vmin, vmax, log)
    nrows, ncols = _grid_shape(len(heads), ncols)
    if figsize is None:
        figsize = (3.2 * ncols + 1.2, 3.0 * nrows + 0.8)
    fig = new_figure(figsize)
    # Not shared axes: inner panels drop their ticks entirely (shared axes would keep
    # every panel's hidden tick artists, which made a grid ~2x slower to draw).
    axes = fig.subplots(nrows, ncols, squeeze=False)
    norm = LogNorm(lo, hi) if log else Normalize(lo, hi)
    im = None
    for k, (i, p) in enumerate(zip(heads, prepared)):
        ax = axes[k // ncols][k % ncols]
        r, c = divmod(k, ncols)
        im = draw_matrix(
            ax,
            p,
            cmap=cmap,
            norm=norm,
            xlabel="key" if r == nrows - 1 else None,
            ylabel="query" if c == 0 else None,
        )
        ax.set_title(f"head {i}", fontsize=10)
        last_in_col = k + ncols >= len(heads)
        if not last_in_col:
            ax.set_xticks([])
        if c != 0:
            ax.set_yticks([])
    for k in range(len(heads), nrows * ncols):
        axes[k // ncols][k % ncols].remove()
    fig.colorbar(im, ax=[a for row in axes for a in row if a.figure is fig], shrink=0.8)
    if title is not None:
        fig.suptitle(title)
    return finish(fig, save_path, show)


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
    cmap: Any = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    log: bool = False,
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
    prepared = [
        prepare_matrix(
            a,
            head_idx=head_idx,
            batch_idx=batch_idx,
            query_layout=query_layout,
            key_layout=key_layout,
            vmin=vmin,
            vmax=vmax,
            log=log,
            reduce=reduce,
            max_pixels=max_pixels,
        )
        for _, a in items
    ]
    nrows, ncols = _grid_shape(len(items), ncols if ncols is not None else min(len(items), 4))
    if figsize is None:
        figsize = (4.0 * ncols + 1.0, 3.6 * nrows + 0.8)
    fig = new_figure(figsize)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    lo, hi = shared_limits(prepared, vmin, vmax, log)
    shared = (LogNorm(lo, hi) if log else Normalize(lo, hi)) if shared_scale else None
    im = None
    panels = []
    for k, ((name, _), p) in enumerate(zip(items, prepared)):
        ax = axes[k // ncols][k % ncols]
        im = draw_matrix(ax, p, cmap=cmap, norm=shared)
        ax.set_title(f"layer {name}")
        panels.append(ax)
        if not shared_scale:
            fig.colorbar(im, ax=ax)
    for k in range(len(items), nrows * ncols):
        axes[k // ncols][k % ncols].remove()
    if shared_scale:
        fig.colorbar(im, ax=panels, shrink=0.8)
    head = "mean of heads" if head_idx is None else f"head {head_idx}"
    fig.suptitle(title if title is not None else f"{head}, sample {batch_idx}")
    return finish(fig, save_path, show)


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
    figsize: tuple[float, float] | None = (14, 12),
    cmap: Any = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    log: bool = False,
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
    kw = dict(
        head_idx=head_idx,
        batch_idx=batch_idx,
        vmin=vmin,
        vmax=vmax,
        log=log,
        reduce=reduce,
        max_pixels=max_pixels,
    )
    enc = prepare_matrix(
        encoder_attention, query_layout=encoder_layout, key_layout=encoder_layout, **kw
    )
    dec = prepare_matrix(
        decoder_self_attention, query_layout=decoder_layout, key_layout=decoder_layout, **kw
    )
    cross = prepare_matrix(
        decoder_cross_attention, query_layout=decoder_layout, key_layout=encoder_layout, **kw
    )
    if enc.n_cols != cross.n_cols:
        raise InputError(
            f"cross-attention has {cross.n_cols} keys but encoder self-attention has "
            f"{enc.n_cols} tokens; they must come from the same layer and sample"
        )
    if dec.n_rows != cross.n_rows:
        raise InputError(
            f"cross-attention has {cross.n_rows} queries but decoder self-attention has "
            f"{dec.n_rows} tokens; they must come from the same layer and sample"
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
        ax.set_title(name, fontsize=10)
    ax_enc.set_ylabel("encoder query")
    ax_cross.set_xlabel("encoder key")
    ax_cross.set_ylabel("decoder query")
    ax_dec.set_xlabel("decoder key")
    ax_enc.tick_params(labelbottom=False)
    ax_dec.tick_params(labelleft=False)
    fig.colorbar(ims[0], ax=ax_enc, location="right", shrink=0.8, label="encoder self")
    fig.colorbar(ims[1], ax=ax_dec, location="right", shrink=0.8, label="decoder self")
    fig.colorbar(ims[2], ax=ax_cross, location="bottom", shrink=0.8, label="cross")
    head = "mean of heads" if head_idx is None else f"head {head_idx}"
    layer = "" if layer_idx is None else f"layer {layer_idx}, "
    fig.suptitle(
        title if title is not None else f"Attention flow: {layer}{head}, sample {batch_idx}"
    )
    return finish(fig, save_path, show)

"""Figures from the analysis tables (Parquet files written by :mod:`attnscope.analysis`).

* :func:`plot_head_metric` -- layer x head heatmap of a per-head statistic (entropy by
  default) from ``head_stats.parquet``;
* :func:`plot_segment_mass` -- query-segment x key-segment attention mass from
  ``segment_mass.parquet``, one panel per head or the mean over heads;
* :func:`plot_top_pairs` -- the strongest query -> key pairs from ``top_pairs.parquet``.

Each accepts a :class:`pandas.DataFrame` or a path to the Parquet file. The per-head
tables hold real heads only; the mean over heads is drawn when the frame also holds its
rows at ``head_index == -1`` (``attnscope.analysis.load_table(dir, name,
with_mean_head=True)``, what ``render_archive`` and the report read). Column names are
the analysis schema's (:data:`attnscope.contracts.TABLE_COLUMNS`), with no other spellings:
a missing column is an :class:`~attnscope.errors.InputError` naming the column and the
table, so a renamed column fails loudly instead of drawing the wrong thing. The matrices
are drawn with :func:`attnscope.render.plots.draw_matrix` in the render style bundle.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from attnscope.contracts import AVERAGE_HEAD, HEAD_INDEX, TABLE_COLUMNS
from attnscope.errors import InputError, SelectionError
from attnscope.render._axes import fit_title, short
from attnscope.render._prepare import AxisSpec, PreparedMatrix
from attnscope.render._save import finish
from attnscope.render._style import STYLE, plain
from attnscope.render.plots import annotate_cells, draw_matrix, new_figure

__all__ = [
    "load_table",
    "plot_head_metric",
    "plot_segment_mass",
    "plot_top_pair_summary",
    "plot_top_pairs",
    "drop_forced",
    "prepare_head_metric",
    "prepare_top_pair_summary",
    "prepare_segment_mass",
    "prepare_top_pairs",
]

PathLike = str | os.PathLike


def require(df: pd.DataFrame, table: str, *names: str) -> None:
    """Raise :class:`InputError` unless ``df`` has every column in ``names``."""
    schema = [c for c, _ in TABLE_COLUMNS[table]]
    for name in names:
        if name not in df.columns:
            raise InputError(
                f"table {table!r} has no {name!r} column; expected the analysis columns "
                f"{schema}, got {list(df.columns)}"
            )


def _head_label(h: Any) -> str:
    return "avg" if h == AVERAGE_HEAD else str(h)


def load_table(table: pd.DataFrame | PathLike) -> pd.DataFrame:
    """A DataFrame as is, or read from a Parquet path; a table written before version 2
    (column ``head``, mean rows at -1) gets its ``head`` column named ``head_index``."""
    if isinstance(table, pd.DataFrame):
        df = table
    else:
        path = os.fspath(table)
        if not os.path.exists(path):
            from attnscope.errors import ArchiveNotFoundError

            raise ArchiveNotFoundError(f"analysis table not found: {path}")
        df = pd.read_parquet(path)
    if "head" in df.columns and HEAD_INDEX not in df.columns:
        df = df.rename(columns={"head": HEAD_INDEX})
    return df


def _select(table: pd.DataFrame | PathLike, name: str, **sel: Any) -> pd.DataFrame:
    """Rows of table ``name`` matching every non-``None`` selection."""
    df = load_table(table)
    for col, value in sel.items():
        if value is None:
            continue
        require(df, name, col)
        valid = sorted(df[col].dropna().unique().tolist(), key=str)
        if value not in valid:
            raise SelectionError(f"{col} {value!r} not in the table; valid values: {valid}")
        df = df[df[col] == value]
    return df


def _matrix(pv: pd.DataFrame, lo: float, hi: float, row_labels: Sequence[str]) -> PreparedMatrix:
    """A pivot table as a matrix for :func:`draw_matrix`, one tick label per cell."""
    data = pv.to_numpy(dtype=np.float64)
    n_rows, n_cols = data.shape
    cols = [_head_label(c) if isinstance(c, (int, np.integer)) else str(c) for c in pv.columns]
    return PreparedMatrix(
        data=data,
        n_rows=n_rows,
        n_cols=n_cols,
        rows=AxisSpec(n_rows, tuple(row_labels)),
        cols=AxisSpec(n_cols, tuple(cols)),
        vmin=lo,
        vmax=hi,
    )


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = new_figure(figsize)
    return fig, fig.add_subplot()


#: head_stats columns that :func:`plot_head_metric` can draw
METRICS = tuple(c for c, t in TABLE_COLUMNS["head_stats"] if t.startswith("float"))
#: metrics in [0, 1] by definition: drawn on a fixed 0-1 colour scale, so colours compare
#: across figures and tiny differences do not span the whole colormap
FIXED_UNIT = ("norm_entropy_mean", "norm_entropy_min", "norm_entropy_max", "row_max_mean",
              "row_max_min", "sink_score")


def cell_format(lo: float, hi: float) -> str:
    """A format with enough decimals that two cells of visibly different colour (1/256 of
    the range ``hi - lo`` apart) never print the same number (at least 2, at most 6)."""
    span = float(hi - lo)
    digits = 2 if not np.isfinite(span) or span <= 0 else int(np.ceil(-np.log10(span / 256)))
    return f"{{:.{min(6, max(2, digits))}f}}"


def prepare_head_metric(
    head_stats: pd.DataFrame | PathLike,
    *,
    stack: str,
    kind: str,
    metric: str = "entropy_mean",
) -> pd.DataFrame:
    """Layer x head table of ``metric`` (mean over samples if the table has several)."""
    if metric not in METRICS:
        raise InputError(f"unknown head metric {metric!r}; expected one of {list(METRICS)}")
    df = _select(head_stats, "head_stats", stack=stack, kind=kind)
    require(df, "head_stats", "layer", HEAD_INDEX, metric)
    return (
        df.pivot_table(index="layer", columns=HEAD_INDEX, values=metric, aggfunc="mean")
        .sort_index()
        .sort_index(axis=1)
    )


def plot_head_metric(
    head_stats: pd.DataFrame | PathLike,
    *,
    stack: str,
    kind: str = "self_attention",
    metric: str = "entropy_mean",
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    cmap: Any = STYLE.metric_cmap,
    annotate: bool | None = None,
    ax: Axes | None = None,
    save_path: PathLike | None = None,
    show: bool = False,
) -> Figure:
    """Heatmap of a per-head statistic, rows = layers, columns = heads (mean entropy by default).

    ``metric`` is a numeric ``head_stats`` column (:data:`METRICS`). Values are
    annotated in the cells when the table is small (<= 16 x 16) unless ``annotate``
    says otherwise.
    """
    pv = prepare_head_metric(head_stats, stack=stack, kind=kind, metric=metric)
    vals = pv.to_numpy(dtype=np.float64)
    lo, hi = (0.0, 1.0) if metric in FIXED_UNIT else (np.nanmin(vals), np.nanmax(vals))
    p = _matrix(pv, lo, hi, [str(i) for i in pv.index])
    fig, ax = _axes(
        ax, figsize or (max(4.0, 0.7 * p.n_cols + 2.5), max(3.0, 0.5 * p.n_rows + 1.5))
    )
    im = draw_matrix(ax, p, cmap=cmap, xlabel="head", ylabel="layer", col_rotation=0)
    if annotate if annotate is not None else (p.n_rows <= 16 and p.n_cols <= 16):
        annotate_cells(ax, p.data, cell_format(lo, hi), dark_on_light=True, limits=(lo, hi))
    fig.colorbar(im, ax=ax, label=metric + (" (fixed 0-1 scale)" if metric in FIXED_UNIT else ""))
    ax.set_title(title if title is not None else f"{metric}: {stack} {kind}")
    return finish(fig, save_path, show)


def prepare_segment_mass(
    segment_mass: pd.DataFrame | PathLike,
    *,
    stack: str,
    layer: int,
    kind: str,
    head: int | None = None,
    segment_order: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Query-segment x key-segment mass of one head (or the mean over heads and samples)."""
    df = _select(segment_mass, "segment_mass", stack=stack, layer=layer, kind=kind,
                 **{HEAD_INDEX: head})
    require(df, "segment_mass", HEAD_INDEX, "query_segment", "key_segment", "mass")
    if head is None:
        avg = df[df[HEAD_INDEX] == AVERAGE_HEAD]
        # the table's own mean-of-heads rows when present, else the mean of the head rows
        df = avg if len(avg) else df
    pv = df.pivot_table(index="query_segment", columns="key_segment", values="mass", aggfunc="mean")
    # keep the modality order of the sequence (first appearance), not alphabetical order
    if segment_order is None:
        rows = list(dict.fromkeys(df["query_segment"]))
        cols = list(dict.fromkeys(df["key_segment"]))
    else:
        rows = [s for s in segment_order if s in pv.index]
        cols = [s for s in segment_order if s in pv.columns]
    return pv.reindex(index=rows, columns=cols)


def plot_segment_mass(
    segment_mass: pd.DataFrame | PathLike,
    *,
    stack: str,
    layer: int,
    kind: str = "self_attention",
    head: int | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    cmap: Any = STYLE.mass_cmap,
    ax: Axes | None = None,
    save_path: PathLike | None = None,
    show: bool = False,
) -> Figure:
    """Modality-to-modality attention mass (rows: query segment, columns: key segment)."""
    pv = prepare_segment_mass(segment_mass, stack=stack, layer=layer, kind=kind, head=head)
    hi = max(float(np.nanmax(pv.to_numpy(dtype=np.float64))), 1e-12)
    p = _matrix(pv, 0.0, hi, [str(i) for i in pv.index])
    fig, ax = _axes(
        ax, figsize or (max(5.0, 1.1 * p.n_cols + 3.0), max(4.0, 0.8 * p.n_rows + 2.0))
    )
    im = draw_matrix(
        ax, p, cmap=cmap, xlabel="key segment", ylabel="query segment", col_rotation=30
    )
    annotate_cells(ax, p.data, "{:.2f}", dark_on_light=False, fontsize=STYLE.tick_size)
    fig.colorbar(im, ax=ax, label="attention mass")
    who = "mean of heads" if head is None else f"head {head}"
    ax.set_title(title if title is not None else f"{stack} layer {layer} {kind}, {who}")
    return finish(fig, save_path, show)


def prepare_top_pairs(
    top_pairs: pd.DataFrame | PathLike,
    *,
    stack: str | None = None,
    layer: int | None = None,
    kind: str | None = None,
    head: int | None = None,
    sample: int | None = None,
    k: int = 20,
) -> pd.DataFrame:
    """The ``k`` heaviest pairs, with a ``pair`` column ``"query label -> key label"``;
    forced cells (:func:`drop_forced`) left out."""
    df = _select(top_pairs, "top_pairs", stack=stack, layer=layer, kind=kind,
                 **{HEAD_INDEX: head}, sample=sample)
    require(df, "top_pairs", "weight", "query_label", "key_label", "layer", HEAD_INDEX, "sample")
    df = drop_forced(df)
    df = df.sort_values("weight", ascending=False, kind="stable").head(k)
    pair = df["query_label"].astype(str) + " -> " + df["key_label"].astype(str)
    # pairs pooled over several heads/samples/layers: say where each one comes from
    for name, tag in (("layer", "L"), (HEAD_INDEX, "h"), ("sample", "s")):
        if df[name].nunique() > 1:
            vals = df[name].map(_head_label) if name == HEAD_INDEX else df[name].astype(str)
            pair = pair + f" ({tag}" + vals + ")"
    out = pd.DataFrame({"pair": pair.to_numpy(), "weight": df["weight"].to_numpy()})
    return out.reset_index(drop=True)


def plot_top_pairs(
    top_pairs: pd.DataFrame | PathLike,
    *,
    stack: str | None = None,
    layer: int | None = None,
    kind: str | None = None,
    head: int | None = None,
    sample: int | None = None,
    k: int = 20,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    save_path: PathLike | None = None,
    show: bool = False,
) -> Figure:
    """Horizontal bars of the ``k`` heaviest query -> key pairs, heaviest on top; forced
    cells (a query's only allowed key) excluded, as the title says."""
    top_pairs = load_table(top_pairs)
    tp = prepare_top_pairs(
        top_pairs, stack=stack, layer=layer, kind=kind, head=head, sample=sample, k=k
    )
    if tp.empty:
        raise SelectionError("no attention pairs match this selection")
    fig, ax = _axes(ax, figsize or (8.0, 0.3 * len(tp) + 1.5))
    y = np.arange(len(tp))
    ax.barh(y, tp["weight"].to_numpy(), color=STYLE.bar_color)
    # two labels and a provenance tag per pair: allow about twice a label's length
    labels = [plain(p, 2 * STYLE.max_label_chars + 12) for p in tp["pair"]]
    ax.set_yticks(y, labels, fontsize=STYLE.cell_size)
    ax.invert_yaxis()
    ax.set_xlabel("attention weight")
    parts = [
        str(x)
        for x in (
            stack,
            None if layer is None else f"layer {layer}",
            kind,
            None if head is None else f"head {head}",
        )
        if x is not None
    ]
    note = forced_note(load_table(top_pairs))
    text = title if title is not None else f"top {len(tp)} pairs " + " ".join(parts) + note
    ax.set_title(text if title is not None else _wrap(text, fig.get_figwidth()))
    return finish(fig, save_path, show)


def _wrap(text: str, width_in: float) -> str:
    return fit_title(text, 0.9 * width_in)


def drop_forced(df: pd.DataFrame) -> pd.DataFrame:
    """``top_pairs`` rows without forced cells: pairs whose query row may attend to one key
    only (``allowed_keys == 1``: causal row 0 always puts 1.0 there, which says nothing).
    Tables written before ``allowed_keys`` existed (version 1) are returned as they are."""
    if "allowed_keys" not in df.columns:
        return df
    return df[df["allowed_keys"] != 1]


def forced_note(df: pd.DataFrame) -> str:
    """Title suffix saying what happened to forced cells."""
    if "allowed_keys" not in df.columns:
        return " (forced cells not marked in this table: re-run analyze)"
    return " (forced cells excluded)"


def prepare_top_pair_summary(
    top_pairs: pd.DataFrame | PathLike,
    *,
    stack: str,
    layer: int,
    kind: str,
    n: int = 5,
) -> pd.DataFrame:
    """How often and how strongly each (query token, key token) pair is a head's top pair.

    For every (sample, head) its top pair is the heaviest non-forced cell (rank order of
    the table after :func:`drop_forced`); pairs are named by their token labels (each
    sample's own when the archive stores tokens), so the same tokens in different samples
    count together. Per head (model head ids; the head mean ``-1`` last), the ``n`` pairs
    that are top most often.

    Returns
    -------
    DataFrame with columns ``head_index``, ``pair`` (``"query label -> key label"``), ``count``
    (samples where it is the head's top pair), ``share`` (count / samples of that head),
    ``weight`` (its mean weight there), ``samples``, ``query_label``, ``key_label``.
    """
    df = _select(top_pairs, "top_pairs", stack=stack, layer=layer, kind=kind)
    require(df, "top_pairs", "sample", HEAD_INDEX, "rank", "weight", "query_label", "key_label")
    df = drop_forced(df)
    top = df.sort_values(["sample", HEAD_INDEX, "rank"], kind="stable").groupby(
        ["sample", HEAD_INDEX], sort=True).head(1)
    top = top.assign(pair=top["query_label"].astype(str) + " -> " + top["key_label"].astype(str))
    g = top.groupby([HEAD_INDEX, "pair"], sort=True).agg(
        count=("sample", "size"), weight=("weight", "mean"),
        query_label=("query_label", "first"), key_label=("key_label", "first")).reset_index()
    samples = top.groupby(HEAD_INDEX)["sample"].nunique()
    g["samples"] = g[HEAD_INDEX].map(samples).astype(np.int64)
    g["share"] = g["count"] / g["samples"]
    g["order"] = g[HEAD_INDEX].where(g[HEAD_INDEX] != AVERAGE_HEAD, np.iinfo(np.int64).max)
    g = g.sort_values(["order", "count", "weight", "pair"], ascending=[True, False, False, True],
                      kind="stable")
    g = g.groupby(HEAD_INDEX, sort=False).head(n)
    cols = [HEAD_INDEX, "pair", "count", "share", "weight", "samples", "query_label", "key_label"]
    return g[cols].reset_index(drop=True)


def plot_top_pair_summary(
    top_pairs: pd.DataFrame | PathLike,
    *,
    stack: str,
    layer: int,
    kind: str = "self_attention",
    n: int = 5,
    title: str | None = None,
    ncols: int = 4,
    save_path: PathLike | None = None,
    show: bool = False,
) -> Figure:
    """One panel per head: the (query token, key token) pairs that are most often its top
    pair over the samples (bar: share of samples; text: count and mean weight), forced
    cells excluded (:func:`prepare_top_pair_summary`)."""
    import math

    top_pairs = load_table(top_pairs)
    tp = prepare_top_pair_summary(top_pairs, stack=stack, layer=layer, kind=kind, n=n)
    if tp.empty:
        raise SelectionError("no attention pairs match this selection")
    heads = list(dict.fromkeys(tp[HEAD_INDEX]))
    ncols = max(1, min(ncols, len(heads)))
    nrows = math.ceil(len(heads) / ncols)
    fig = new_figure((4.2 * ncols, (0.32 * n + 1.0) * nrows + 0.9))
    grid = fig.subplots(nrows, ncols, squeeze=False)
    flat = [a for row in grid for a in row]
    for extra in flat[len(heads):]:
        extra.remove()
    for ax, h in zip(flat, heads):
        sub = tp[tp[HEAD_INDEX] == h]
        y = np.arange(len(sub))
        ax.barh(y, sub["share"].to_numpy(), color=STYLE.bar_color)
        names = [f"{short(q, 16)} -> {short(k, 16)}"
                 for q, k in zip(sub["query_label"], sub["key_label"])]
        ax.set_yticks(y, names, fontsize=STYLE.cell_size)
        ax.set_ylim(n - 0.5, -0.5)
        ax.set_xlim(0, 1.45)
        ax.set_xticks([0, 0.5, 1])
        for yi, (c, w, m) in enumerate(zip(sub["count"], sub["weight"], sub["samples"])):
            ax.text(min(float(c) / m, 1.0) + 0.02, yi, f"{c}/{m}, w {w:.2f}", va="center",
                    fontsize=STYLE.cell_size)
        ax.set_title(_head_name(h), fontsize=STYLE.panel_title_size)
        ax.tick_params(axis="x", labelsize=STYLE.cell_size)
    for ax in flat[(nrows - 1) * ncols:len(heads)]:
        ax.set_xlabel("share of samples where it is the top pair", fontsize=STYLE.cell_size)
    text = title if title is not None else (
        f"{stack} layer {layer} {kind}: each head's top pair over samples"
        + forced_note(load_table(top_pairs)))
    fig.suptitle(text if title is not None else _wrap(text, fig.get_figwidth()))
    return finish(fig, save_path, show)


def _head_name(h: Any) -> str:
    return "mean of heads" if h == AVERAGE_HEAD else f"head {int(h)}"

"""Figures from the analysis tables (Parquet files written by :mod:`attnscope.analysis`).

* :func:`plot_head_metric` -- layer x head heatmap of a per-head statistic (entropy by
  default) from ``head_stats.parquet``;
* :func:`plot_segment_mass` -- query-segment x key-segment attention mass from
  ``segment_mass.parquet``, one panel per head or the mean over heads;
* :func:`plot_top_pairs` -- the strongest query -> key pairs from ``top_pairs.parquet``.

Each accepts a :class:`pandas.DataFrame` or a path to the Parquet file. Column names
are looked up among a few accepted spellings (``query_segment`` / ``q_segment`` ...),
so small naming differences in the tables do not break the figures.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from attnscope.contracts import AVERAGE_HEAD
from attnscope.errors import InputError, SelectionError
from attnscope.render._save import finish
from attnscope.render.plots import _cmap, new_figure

__all__ = [
    "load_table",
    "plot_head_metric",
    "plot_segment_mass",
    "plot_top_pairs",
    "prepare_head_metric",
    "prepare_segment_mass",
    "prepare_top_pairs",
]

PathLike = str | os.PathLike

_ALIASES: dict[str, tuple[str, ...]] = {
    "stack": ("stack", "side"),
    "layer": ("layer", "layer_idx"),
    "kind": ("kind", "attention_type", "type"),
    "head": ("head", "head_idx"),
    "sample": ("sample", "batch_idx", "sample_idx"),
    "entropy": ("entropy", "mean_entropy", "entropy_mean"),
    "query_segment": ("query_segment", "q_segment", "query_modality", "src_segment"),
    "key_segment": ("key_segment", "k_segment", "key_modality", "dst_segment"),
    "mass": ("mass", "attention_mass", "mean_mass", "weight"),
    "query": ("query", "query_idx", "q", "query_index"),
    "key": ("key", "key_idx", "k", "key_index"),
    "weight": ("weight", "value", "attention"),
    "query_label": ("query_label", "q_label"),
    "key_label": ("key_label", "k_label"),
}


def col(df: pd.DataFrame, name: str, *, required: bool = True) -> str | None:
    """The column of ``df`` holding ``name`` (or one of its accepted spellings)."""
    for c in _ALIASES.get(name, (name,)):
        if c in df.columns:
            return c
    if required:
        raise InputError(
            f"table has no {name!r} column (accepted: {list(_ALIASES.get(name, (name,)))}); "
            f"columns are {list(df.columns)}"
        )
    return None


def _head_label(h: Any) -> str:
    return "avg" if h == AVERAGE_HEAD else str(h)


def load_table(table: pd.DataFrame | PathLike) -> pd.DataFrame:
    """A DataFrame as is, or read from a Parquet path."""
    if isinstance(table, pd.DataFrame):
        return table
    path = os.fspath(table)
    if not os.path.exists(path):
        from attnscope.errors import ArchiveNotFoundError

        raise ArchiveNotFoundError(f"analysis table not found: {path}")
    return pd.read_parquet(path)


def _filter(df: pd.DataFrame, **sel: Any) -> pd.DataFrame:
    for name, value in sel.items():
        if value is None:
            continue
        c = col(df, name, required=False)
        if c is None:
            continue
        valid = sorted(df[c].dropna().unique().tolist(), key=str)
        if value not in valid:
            raise SelectionError(f"{name} {value!r} not in the table; valid values: {valid}")
        df = df[df[c] == value]
    return df


def prepare_head_metric(
    head_stats: pd.DataFrame | PathLike,
    *,
    stack: str,
    kind: str,
    metric: str = "entropy",
) -> pd.DataFrame:
    """Layer x head table of ``metric`` (mean over samples if the table has several)."""
    df = _filter(load_table(head_stats), stack=stack, kind=kind)
    m = col(df, metric)
    return (
        df.pivot_table(index=col(df, "layer"), columns=col(df, "head"), values=m, aggfunc="mean")
        .sort_index()
        .sort_index(axis=1)
    )


def plot_head_metric(
    head_stats: pd.DataFrame | PathLike,
    *,
    stack: str,
    kind: str = "self_attention",
    metric: str = "entropy",
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    cmap: Any = "magma",
    annotate: bool | None = None,
    ax: Axes | None = None,
    save_path: PathLike | None = None,
    show: bool = False,
) -> Figure:
    """Heatmap of a per-head statistic, rows = layers, columns = heads (entropy by default).

    Values are annotated in the cells when the table is small (<= 16 x 16) unless
    ``annotate`` says otherwise.
    """
    pv = prepare_head_metric(head_stats, stack=stack, kind=kind, metric=metric)
    data = pv.to_numpy(dtype=np.float64)
    if ax is None:
        fig = new_figure(
            figsize or (max(4.0, 0.7 * data.shape[1] + 2.5), max(3.0, 0.5 * data.shape[0] + 1.5))
        )
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    im = ax.imshow(
        data,
        cmap=_cmap(cmap),
        aspect="auto",
        interpolation="nearest",
        norm=Normalize(np.nanmin(data), np.nanmax(data)),
    )
    ax.set_xticks(range(data.shape[1]), [_head_label(h) for h in pv.columns])
    ax.set_yticks(range(data.shape[0]), [str(i) for i in pv.index])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    if annotate is None:
        annotate = data.shape[0] <= 16 and data.shape[1] <= 16
    if annotate:
        mid = (np.nanmin(data) + np.nanmax(data)) / 2
        for (r, c), v in np.ndenumerate(data):
            ax.text(
                c,
                r,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="black" if v > mid else "white",
            )
    fig.colorbar(im, ax=ax, label=metric)
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
    df = _filter(load_table(segment_mass), stack=stack, layer=layer, kind=kind, head=head)
    hc = col(df, "head", required=False)
    if head is None and hc is not None:
        avg = df[df[hc] == AVERAGE_HEAD]
        # the table's own mean-of-heads rows when present, else the mean of the head rows
        df = avg if len(avg) else df
    qc, kc, mc = col(df, "query_segment"), col(df, "key_segment"), col(df, "mass")
    pv = df.pivot_table(index=qc, columns=kc, values=mc, aggfunc="mean")
    # keep the modality order of the sequence (first appearance), not alphabetical order
    rows = (
        list(dict.fromkeys(df[qc]))
        if segment_order is None
        else [s for s in segment_order if s in pv.index]
    )
    cols = (
        list(dict.fromkeys(df[kc]))
        if segment_order is None
        else [s for s in segment_order if s in pv.columns]
    )
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
    cmap: Any = "Blues",
    ax: Axes | None = None,
    save_path: PathLike | None = None,
    show: bool = False,
) -> Figure:
    """Modality-to-modality attention mass (rows: query segment, columns: key segment)."""
    pv = prepare_segment_mass(segment_mass, stack=stack, layer=layer, kind=kind, head=head)
    data = pv.to_numpy(dtype=np.float64)
    if ax is None:
        fig = new_figure(
            figsize or (max(5.0, 1.1 * data.shape[1] + 3.0), max(4.0, 0.8 * data.shape[0] + 2.0))
        )
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    im = ax.imshow(
        data,
        cmap=_cmap(cmap),
        aspect="auto",
        interpolation="nearest",
        norm=Normalize(0.0, max(float(np.nanmax(data)), 1e-12)),
    )
    ax.set_xticks(range(data.shape[1]), [str(c) for c in pv.columns], rotation=30, ha="right")
    ax.set_yticks(range(data.shape[0]), [str(i) for i in pv.index])
    ax.set_xlabel("key segment")
    ax.set_ylabel("query segment")
    mid = np.nanmax(data) / 2
    for (r, c), v in np.ndenumerate(data):
        ax.text(
            c,
            r,
            f"{v:.2f}",
            ha="center",
            va="center",
            fontsize=8,
            color="white" if v > mid else "black",
        )
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
    """The ``k`` heaviest pairs, with a ``pair`` column ``"query label -> key label"``."""
    df = _filter(
        load_table(top_pairs), stack=stack, layer=layer, kind=kind, head=head, sample=sample
    )
    w = col(df, "weight")
    df = df.sort_values(w, ascending=False, kind="stable").head(k)
    q, kk = col(df, "query"), col(df, "key")
    ql, kl = col(df, "query_label", required=False), col(df, "key_label", required=False)
    qs = df[ql].astype(str) if ql else df[q].astype(str)
    ks = df[kl].astype(str) if kl else df[kk].astype(str)
    pair = qs + " -> " + ks
    # pairs pooled over several heads/samples/layers: say where each one comes from
    for name, tag in (("layer", "L"), ("head", "h"), ("sample", "s")):
        c = col(df, name, required=False)
        if c is not None and df[c].nunique() > 1:
            vals = df[c].map(_head_label) if name == "head" else df[c].astype(str)
            pair = pair + f" ({tag}" + vals + ")"
    out = pd.DataFrame({"pair": pair.to_numpy(), "weight": df[w].to_numpy()})
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
    """Horizontal bars of the ``k`` heaviest query -> key pairs, heaviest on top."""
    tp = prepare_top_pairs(
        top_pairs, stack=stack, layer=layer, kind=kind, head=head, sample=sample, k=k
    )
    if tp.empty:
        raise SelectionError("no attention pairs match this selection")
    if ax is None:
        fig = new_figure(figsize or (8.0, 0.3 * len(tp) + 1.5))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    y = np.arange(len(tp))
    ax.barh(y, tp["weight"].to_numpy(), color="tab:blue")
    ax.set_yticks(y, tp["pair"].tolist(), fontsize=7)
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
    ax.set_title(title if title is not None else f"top {len(tp)} pairs " + " ".join(parts))
    return finish(fig, save_path, show)

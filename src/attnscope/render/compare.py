"""Figures that compare or combine attention: archive differences (B - A) and rollout.

* :func:`plot_diff`: the difference ``B - A`` of one (sample, head or head mean) of two
  archives' arrays, on a diverging colormap centred on 0 with symmetric limits;
* :func:`plot_diff_summary`: layer x head of a ``diff`` table column (mean over samples);
* :func:`plot_rollout`: one sample's rollout matrix from the ``rollout`` table, with the
  sample's own token labels and segments;
* :func:`render_diff` / :func:`render_rollout`: write those figures for a selection.

Data is prepared apart from drawing (:func:`prepare_diff`, :func:`prepare_rollout`,
:func:`prepare_diff_summary` return :class:`PreparedMatrix`), and drawn with the render
stage's one matrix drawer, :func:`attnscope.render.plots.draw_matrix`. Never imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from attnscope.contracts import HEAD_INDEX
from attnscope.errors import InputError, SelectionError, ShapeError
from attnscope.render._prepare import MAX_PIXELS, AxisSpec, PreparedMatrix, prepare_matrix
from attnscope.render._save import finish, save_figure
from attnscope.render._style import STYLE, plain
from attnscope.render.plots import draw_matrix, new_figure
from attnscope.render.tables import load_table as as_frame
from attnscope.store.layout import Segment, SideLayout

__all__ = [
    "DIFF_CMAP",
    "plot_diff",
    "plot_diff_summary",
    "plot_rollout",
    "prepare_diff",
    "prepare_diff_summary",
    "prepare_rollout",
    "render_diff",
    "render_rollout",
]

PathLike = str | os.PathLike
#: diverging colormap of differences: blue where B < A, white at 0, red where B > A
DIFF_CMAP = "RdBu_r"
#: colour limit of an all-zero difference (a Normalize over [0, 0] draws nothing useful)
_FLAT = 1e-9


def _symmetric(p: PreparedMatrix, data: np.ndarray) -> PreparedMatrix:
    finite = np.abs(data[np.isfinite(data)])
    lim = max(float(finite.max()) if finite.size else 0.0, _FLAT)
    return dataclasses.replace(p, data=data, vmin=-lim, vmax=lim, log=False)


def prepare_diff(
    attn_a: Any,
    attn_b: Any,
    *,
    head_idx: int | None = None,
    batch_idx: int = 0,
    max_pixels: int = MAX_PIXELS,
) -> PreparedMatrix:
    """``B - A`` of one sample and head (or head mean), with A's axes, symmetric limits.

    Both matrices are prepared the same way (cropped to the sample's real tokens in ragged
    archives, block-**mean** reduced beyond ``max_pixels``, so the reduced difference is the
    difference of the reduced maps).
    """
    pa = prepare_matrix(attn_a, head_idx=head_idx, batch_idx=batch_idx, reduce="mean",
                        max_pixels=max_pixels)
    pb = prepare_matrix(attn_b, head_idx=head_idx, batch_idx=batch_idx, reduce="mean",
                        max_pixels=max_pixels)
    if (pa.n_rows, pa.n_cols) != (pb.n_rows, pb.n_cols):
        raise ShapeError(
            f"sample {batch_idx}: A is {(pa.n_rows, pa.n_cols)} real tokens, B "
            f"{(pb.n_rows, pb.n_cols)}; expected the same (query, key) shape"
        )
    data = pb.data.astype(np.float32) - pa.data.astype(np.float32)
    return _symmetric(pa, data)


def _one_panel(
    p: PreparedMatrix, *, cmap: Any, figsize: tuple[float, float] | None, ax: Axes | None,
    colorbar: bool, title: str, cbar_label: str, **labels: Any,
) -> tuple[Figure, Axes]:
    """Draw ``p`` on ``ax`` (or a new figure) with a title and an optional colour bar."""
    fig = new_figure(figsize) if ax is None else ax.figure
    ax = fig.add_subplot() if ax is None else ax
    im = draw_matrix(ax, p, cmap=cmap, **labels)
    ax.set_title(title)
    if colorbar:
        fig.colorbar(im, ax=ax, label=cbar_label)
    return fig, ax


def plot_diff(
    attn_a: Any,
    attn_b: Any,
    *,
    head_idx: int | None = None,
    batch_idx: int = 0,
    title: str | None = None,
    figsize: tuple[float, float] | None = STYLE.heatmap_size,
    cmap: Any = DIFF_CMAP,
    max_pixels: int = MAX_PIXELS,
    colorbar: bool = True,
    ax: Axes | None = None,
    save_path: PathLike | None = None,
    show: bool = False,
) -> Figure:
    """Heatmap of ``B - A`` for one sample and head (``head_idx=None``: the head mean).

    Parameters
    ----------
    attn_a, attn_b
        The same array of two archives (``arc.attention(stack, layer, kind)``), or
        ``(B, H, T, S)`` / ``(H, T, S)`` / ``(T, S)`` arrays of one shape.

    Returns
    -------
    matplotlib.figure.Figure
        Colour limits are ``±max |B - A|``, centred on 0.

    Examples
    --------
    >>> import numpy as np
    >>> fig = plot_diff(np.full((4, 4), 0.25), np.eye(4))
    """
    p = prepare_diff(attn_a, attn_b, head_idx=head_idx, batch_idx=batch_idx,
                     max_pixels=max_pixels)
    who = "mean of heads" if head_idx is None else f"head {head_idx}"
    fig, _ = _one_panel(
        p, cmap=cmap, figsize=figsize, ax=ax, colorbar=colorbar,
        title=title if title is not None else f"B - A, {who}, sample {batch_idx}",
        cbar_label="attention weight, B - A",
    )
    return finish(fig, save_path, show)


def _runs(names: Sequence[str]) -> tuple[Segment, ...]:
    """Consecutive runs of equal segment names as segments laid end to end."""
    out: list[Segment] = []
    for i, n in enumerate(names):
        if out and out[-1].name == n:
            out[-1] = Segment(n, out[-1].start, i + 1)
        else:
            out.append(Segment(str(n), i, i + 1))
    return tuple(out)


def _side(labels: Sequence[str], segments: Sequence[str]) -> SideLayout:
    return SideLayout(_runs(list(segments)), tuple(str(x) for x in labels))


def _rollout_frame(table: Any, archive: Any = None) -> Any:
    if isinstance(table, (str, os.PathLike)):
        from attnscope.analysis.tables import load_table  # reading only

        return load_table(table, "rollout", archive)
    if not hasattr(table, "columns"):
        raise InputError(
            f"table must be a rollout DataFrame or its folder, got {type(table).__name__}"
        )
    return table


def _which(df: Any, stack: str | None, kind: str | None) -> tuple[str, str]:
    have = sorted(set(zip(df["stack"], df["kind"], strict=True)))
    if stack is None and kind is None:
        for want in (("decoder", "cross_attention"), ("encoder", "self_attention")):
            if want in have:
                return want
        if not have:
            raise SelectionError("the rollout table is empty; expected rows of a sample")
        return have[0]
    want = (stack or "decoder", kind or "self_attention")
    if want not in have:
        raise SelectionError(f"rollout table has no {want}; it holds {have}")
    return want


def prepare_rollout(
    table: Any, *, sample: int = 0, stack: str | None = None, kind: str | None = None
) -> PreparedMatrix:
    """One sample's rollout matrix from the ``rollout`` table, axes from its labels/segments.

    ``stack``/``kind`` pick the matrix (default: ``decoder``/``cross_attention`` when
    present, else the encoder's, else the decoder's self rollout).
    """
    df = _rollout_frame(table)
    stack, kind = _which(df, stack, kind)
    sel = df[(df["stack"] == stack) & (df["kind"] == kind) & (df["sample"] == int(sample))]
    if not len(sel):
        samples = sorted(set(df["sample"]))
        raise SelectionError(
            f"rollout table has no sample {sample} for {stack}/{kind}; samples {samples}"
        )
    q = np.asarray(sel["query"], dtype=np.int64)
    k = np.asarray(sel["key"], dtype=np.int64)
    qs, qi = np.unique(q, return_inverse=True)
    ks, ki = np.unique(k, return_inverse=True)
    data = np.zeros((qs.size, ks.size), dtype=np.float32)
    data[qi, ki] = np.asarray(sel["score"], dtype=np.float32)
    qfirst = np.unique(q, return_index=True)[1]
    kfirst = np.unique(k, return_index=True)[1]
    rows = _side(sel["query_label"].iloc[qfirst], sel["query_segment"].iloc[qfirst])
    cols = _side(sel["key_label"].iloc[kfirst], sel["key_segment"].iloc[kfirst])
    hi = float(data.max()) if data.size else 1.0
    return PreparedMatrix(
        data=data, n_rows=qs.size, n_cols=ks.size,
        rows=AxisSpec.build(qs.size, rows), cols=AxisSpec.build(ks.size, cols),
        vmin=0.0, vmax=hi if hi > 0 else 1.0,
    )


def plot_rollout(
    table: Any,
    *,
    sample: int = 0,
    stack: str | None = None,
    kind: str | None = None,
    archive: Any = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = STYLE.heatmap_size,
    cmap: Any = STYLE.cmap,
    colorbar: bool = True,
    ax: Axes | None = None,
    save_path: PathLike | None = None,
    show: bool = False,
) -> Figure:
    """Heatmap of one sample's attention rollout (Abnar & Zuidema 2020).

    Parameters
    ----------
    table : DataFrame or path
        The ``rollout`` table, or the folder holding ``rollout.parquet`` (checked against
        ``archive`` when given, like :func:`attnscope.analysis.load_table`).
    stack, kind
        Which matrix: ``encoder``/``self_attention`` (encoder tokens from encoder tokens),
        ``decoder``/``self_attention``, ``decoder``/``cross_attention`` (encoder tokens'
        influence on decoder tokens; the default when present).

    Returns
    -------
    matplotlib.figure.Figure
    """
    df = _rollout_frame(table, archive)
    stack, kind = _which(df, stack, kind)
    p = prepare_rollout(df, sample=sample, stack=stack, kind=kind)
    q_side = "decoder" if kind == "cross_attention" else stack
    k_side = "encoder" if kind == "cross_attention" else stack
    fig, _ = _one_panel(
        p, cmap=cmap, figsize=figsize, ax=ax, colorbar=colorbar,
        title=title if title is not None else f"attention rollout {stack}/{kind}, "
        f"sample {sample}",
        cbar_label="rollout score", xlabel=f"{k_side} input token", ylabel=f"{q_side} token",
    )
    return finish(fig, save_path, show)


def prepare_diff_summary(
    diff_table: Any, *, stack: str, kind: str, metric: str = "js"
) -> PreparedMatrix:
    """layer x head of ``metric`` (a numeric ``diff`` column), mean over samples; the head
    mean (``-1``) is the last column, labelled ``mean``."""
    diff_table = as_frame(diff_table)  # a table before version 2: its head column renamed
    if metric not in diff_table.columns or metric in ("stack", "kind", "archive_fingerprint"):
        raise SelectionError(f"table 'diff' has no numeric {metric!r} column")
    sel = diff_table[(diff_table["stack"] == stack) & (diff_table["kind"] == kind)]
    if not len(sel):
        raise SelectionError(f"diff table has no rows for {stack}/{kind}")
    g = sel.groupby(["layer", HEAD_INDEX])[metric].mean().unstack(HEAD_INDEX)
    heads = sorted(h for h in g.columns if h >= 0) + [h for h in g.columns if h < 0]
    g = g[heads]
    data = g.to_numpy(dtype=np.float32)
    rows = AxisSpec(len(g.index), tuple(f"L{int(i)}" for i in g.index))
    cols = AxisSpec(len(heads), tuple("mean" if h < 0 else f"h{int(h)}" for h in heads))
    p = PreparedMatrix(data=data, n_rows=data.shape[0], n_cols=data.shape[1], rows=rows,
                       cols=cols, vmin=0.0, vmax=max(float(np.nanmax(data)), _FLAT))
    return p if metric in ("js", "max_abs_diff") else _symmetric(p, data)


def plot_diff_summary(
    diff_table: Any,
    *,
    stack: str,
    kind: str,
    metric: str = "js",
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    save_path: PathLike | None = None,
    show: bool = False,
) -> Figure:
    """layer x head heatmap of one ``diff`` column (``js`` default; ``entropy_change`` on a
    diverging scale centred on 0), mean over samples."""
    p = prepare_diff_summary(diff_table, stack=stack, kind=kind, metric=metric)
    fig, _ = _one_panel(
        p, cmap=STYLE.metric_cmap if metric in ("js", "max_abs_diff") else DIFF_CMAP,
        figsize=figsize, ax=ax, colorbar=True, cbar_label=metric,
        title=plain(f"{metric} (B vs A), {stack}/{kind}, mean over samples"),
        xlabel="head", ylabel="layer", col_rotation=0,
    )
    return finish(fig, save_path, show)


def _head_tag(h: int | None) -> str:
    return "havg" if h is None else f"h{int(h):02d}"


def render_diff(
    a: Any,
    b: Any,
    out_dir: PathLike,
    *,
    samples: Sequence[int] | None = None,
    heads: Sequence[int | None] | None = None,
    arrays: Sequence[str] | None = None,
    diff_table: Any = None,
    fmt: str = "png",
) -> list[Path]:
    """Write difference heatmaps ``diff/{stack}-L{layer:02d}-{kind}-s{sample:04d}-{head}.{fmt}``
    (default: sample 0, head mean, every array) and, given the ``diff`` table (DataFrame
    or its folder), ``diff/summary-js-{stack}-{kind}.{fmt}``. The two archives must have
    the same layout (:func:`attnscope.analysis.diff.check_same_layout`)."""
    import matplotlib.pyplot as plt

    from attnscope.analysis.diff import check_same_layout  # a layout check, no analysis
    from attnscope.store import check_structure, open_archive

    out = Path(out_dir) / "diff"
    files: list[Path] = []
    with open_archive(a) as arc_a, open_archive(b) as arc_b:
        check_structure(arc_a, every_chunk=False)
        check_structure(arc_b, every_chunk=False)
        check_same_layout(arc_a, arc_b)
        names = list(arrays) if arrays is not None else list(arc_a.arrays)
        for i in samples if samples is not None else [0]:
            if not 0 <= int(i) < arc_a.n_samples:
                raise SelectionError(f"sample {i} out of range; archives have {arc_a.n_samples}")
        for name in names:
            xa, xb = arc_a.attention(name), arc_b.attention(name)
            for i in samples if samples is not None else [0]:
                for h in heads if heads is not None else [None]:
                    fig = plot_diff(xa, xb, head_idx=h, batch_idx=int(i))
                    path = out / (f"{xa.stack}-L{xa.layer:02d}-{xa.kind}-s{int(i):04d}-"
                                  f"{_head_tag(h)}.{fmt}")
                    files.append(save_figure(fig, path, fmt=fmt))
                    plt.close(fig)
        if diff_table is not None:
            df = diff_table
            if isinstance(df, (str, os.PathLike)):
                from attnscope.analysis.tables import load_table  # reading only

                df = load_table(df, "diff", arc_a, with_mean_head=True)
            for stack, kind in sorted(set(zip(df["stack"], df["kind"], strict=True))):
                fig = plot_diff_summary(df, stack=stack, kind=kind)
                files.append(save_figure(fig, out / f"summary-js-{stack}-{kind}.{fmt}", fmt=fmt))
                plt.close(fig)
        _manifest(out, files, fmt, archive=arc_a.identity(), archive_b=arc_b.identity())
    return files


def render_rollout(
    table: Any,
    out_dir: PathLike,
    *,
    samples: Sequence[int] | None = None,
    archive: Any = None,
    fmt: str = "png",
) -> list[Path]:
    """Write ``rollout/{stack}-{kind}-s{sample:04d}.{fmt}`` for every rollout matrix of the
    selected samples (default: the table's first sample)."""
    import matplotlib.pyplot as plt

    df = _rollout_frame(table, archive)
    if not len(df):
        raise SelectionError("the rollout table is empty; expected rows of a sample")
    ids = list(samples) if samples is not None else [int(df["sample"].min())]
    files: list[Path] = []
    for i in ids:
        for stack, kind in sorted(set(zip(df["stack"], df["kind"], strict=True))):
            fig = plot_rollout(df, sample=int(i), stack=stack, kind=kind)
            path = Path(out_dir) / "rollout" / f"{stack}-{kind}-s{int(i):04d}.{fmt}"
            files.append(save_figure(fig, path, fmt=fmt))
            plt.close(fig)
    fps = sorted({str(f) for f in df["archive_fingerprint"]}) if "archive_fingerprint" in df else []
    ident = dict(df.attrs.get("identity") or {})
    ident.setdefault("fingerprint", fps[0] if len(fps) == 1 else fps or None)
    _manifest(Path(out_dir) / "rollout", files, fmt, archive=ident)
    return files


def _manifest(folder: Path, files: Sequence[Path], fmt: str, **archives: Any) -> None:
    """``folder/manifest.json``: the identity (fingerprint) of the archive(s) the figures
    came from and the files, like :func:`attnscope.render.render_archive`'s manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = {**archives, "format": fmt, "files": [{"file": Path(f).name} for f in files]}
    (folder / "manifest.json").write_text(
        json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n"
    )

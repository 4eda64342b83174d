"""Episode timeline figures: the mass a query group puts on each key modality, step by step,
one panel per layer (from the ``timeline`` table of :func:`attnscope.analysis.timeline`).

:func:`timeline_series` prepares the lines (tests read them); :func:`plot_timeline` draws.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from attnscope.contracts import AVERAGE_HEAD, HEAD_INDEX
from attnscope.errors import SelectionError
from attnscope.render._style import STYLE, plain

__all__ = ["plot_timeline", "timeline_series"]


def timeline_series(
    df: Any,
    *,
    episode: int,
    stack: str,
    kind: str,
    head: int = AVERAGE_HEAD,
) -> dict[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``{layer: {key segment: (steps, mass)}}`` of one episode, steps ascending.

    ``head``: a head number or ``-1`` (the head mean: the table's mean rows when it holds
    them, ``load_table(dir, "timeline", with_mean_head=True)``, else the mean of its head
    rows, the same number since the mass is linear in the weights). Several samples at the
    same step (repeated captures) are averaged.
    """
    from attnscope.render.tables import load_table

    df = load_table(df)
    sel = df[(df["episode"] == episode) & (df["stack"] == stack) & (df["kind"] == kind)]
    heads = sel[HEAD_INDEX]
    if head != AVERAGE_HEAD or (heads == AVERAGE_HEAD).any():
        sel = sel[heads == head]
    if sel.empty:
        raise SelectionError(
            f"the timeline table has no rows for episode {episode}, {stack} {kind}, head "
            f"{head}; episodes: {sorted(set(df['episode']))}, arrays: "
            f"{sorted(set(zip(df['stack'], df['kind'])))}"
        )
    g = sel.groupby(["layer", "key_segment", "step"], sort=True)["mass"].mean()
    out: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    order = list(dict.fromkeys(sel["key_segment"]))
    for layer in sorted(set(sel["layer"])):
        lines = {}
        for seg in order:
            s = g.loc[(layer, seg)]
            lines[seg] = (s.index.to_numpy(), s.to_numpy(dtype=np.float64))
        out[int(layer)] = lines
    return out


def plot_timeline(
    df: Any,
    *,
    episode: int,
    stack: str = "decoder",
    kind: str = "cross_attention",
    head: int = AVERAGE_HEAD,
    title: str | None = None,
) -> Any:
    """Lines of attention mass per key modality vs step, one panel per layer; the Figure.

    Examples
    --------
    >>> df = load_table("tables", "timeline")  # doctest: +SKIP
    >>> fig = plot_timeline(df, episode=0)  # doctest: +SKIP
    """
    from attnscope.render.plots import new_figure

    series = timeline_series(df, episode=episode, stack=stack, kind=kind, head=head)
    n = len(series)
    fig = new_figure((4.2 * n, 3.4))
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    for ax, (layer, lines) in zip(axes, series.items()):
        for seg, (steps, mass) in lines.items():
            ax.plot(steps, mass, marker="o", ms=3, label=plain(seg))
        ax.set_title(f"layer {layer}", fontsize=STYLE.panel_title_size)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("attention mass")
    axes[-1].legend(fontsize=STYLE.tick_size, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    qg = plain(str(df["query_group"].iloc[0])) if len(df) else ""
    who = "mean of heads" if head == AVERAGE_HEAD else f"head {head}"
    fig.suptitle(
        title
        if title is not None
        else f"episode {episode}: {qg} -> key modalities, {stack} {kind}, {who}"
    )
    return fig

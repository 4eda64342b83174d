"""Axis decoration of attention figures: token and segment labels, boundaries, titles and
the mask legend (used by :func:`attnscope.render.plots.draw_matrix` and the figures).

Token labels: every token up to ``MAX_TICK_LABELS``, else every k-th token
(:class:`~attnscope.render._prepare.AxisSpec`), the axis label saying so, segment names
on the opposite side of an axis with several segments. Titles are wrapped to the figure
width, never clipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from attnscope.render._prepare import AxisSpec, PreparedMatrix
from attnscope.render._style import MASK_LABEL, STYLE, mask_color, plain

__all__ = [
    "BOUNDARY_GID",
    "PANEL_LABEL_CHARS",
    "SEGMENT_NAME_GID",
    "axis_label",
    "decorate_axis",
    "fit_title",
    "mask_legend",
    "short",
    "title_pad",
]

#: longest tick label on the small panels of grids and layer comparisons (cut in the middle)
PANEL_LABEL_CHARS = 18
BOUNDARY_GID = {"rows": "segment_boundary_query", "cols": "segment_boundary_key"}


def _ordinal(k: int) -> str:
    return {1: "", 2: "2nd ", 3: "3rd "}.get(k, f"{k}th ")


def decorate_axis(
    ax: Axes, spec: AxisSpec, which: str, rotation: float, ticks: bool = True,
    names: bool | None = None, label_chars: int | None = None,
) -> None:
    set_ticks = ax.set_xticks if which == "cols" else ax.set_yticks
    line = ax.axvline if which == "cols" else ax.axhline
    for b in spec.boundaries:
        line(
            b - 0.5,
            color=STYLE.boundary_color,
            lw=STYLE.boundary_width,
            alpha=0.9,
            gid=BOUNDARY_GID[which],
        )
    names = ticks if names is None else names
    if names and spec.labels is not None and len(spec.segment_names) > 1:
        # segment names beside the token labels (panels: cut like their labels)
        _segment_axis(ax, spec, which, None if label_chars is None else label_chars + 6)
    if not ticks:  # inner grid panels: no tick objects at all (each costs ~1 ms to lay out)
        set_ticks([])
        return
    rot = rotation if which == "cols" else 0
    # rotated column labels read best anchored at their right end
    align = {"ha": "right"} if which == "cols" and 0 < rot < 90 else {}
    if spec.labels is not None:
        pos, labels = spec.ticks()
        dense = len(pos) > 20 or label_chars is not None
        size = STYLE.dense_tick_size if dense else STYLE.tick_size
        text = [plain(x) if label_chars is None else short(x, label_chars) for x in labels]
        set_ticks(pos, text, rotation=rot, fontsize=size, **align)
    elif spec.segment_names:
        centres = [c for _, c in spec.segment_names]
        names = [plain(n) for n, _ in spec.segment_names]
        set_ticks(centres, names, rotation=rot, fontsize=STYLE.segment_tick_size, **align)
    else:  # a raw tensor: token indices are integers
        axis = ax.xaxis if which == "cols" else ax.yaxis
        axis.set_major_locator(MaxNLocator(integer=True))


#: rotation (degrees) of the segment names above the columns
NAME_ROTATION = 20
#: gid of the segment-name texts beside token labels (tests find them by it)
SEGMENT_NAME_GID = {"rows": "segment_name_query", "cols": "segment_name_key"}


def _segment_axis(ax: Axes, spec: AxisSpec, which: str, max_chars: int | None = None) -> None:
    """Segment names at their centres on the opposite side (top / right) of the axes.

    Plain texts in a blended transform (data along the axis, axes across it), not a
    secondary axis: a secondary axis costs as much layout as the main one.
    """
    size = STYLE.segment_tick_size
    for name, centre in spec.segment_names:
        name = plain(name) if max_chars is None else short(name, max_chars)
        if which == "cols":
            ax.text(centre, 1.01, name, transform=ax.get_xaxis_transform(),
                    fontsize=size, rotation=NAME_ROTATION, ha="left", va="bottom",
                    rotation_mode="anchor", gid=SEGMENT_NAME_GID[which])
        else:
            ax.text(1.01, centre, name, transform=ax.get_yaxis_transform(),
                    fontsize=size, ha="left", va="center", gid=SEGMENT_NAME_GID[which])


def title_pad(ax: Axes, base: float = 6.0) -> float:
    """Title padding (points) that clears the segment names drawn above ``ax``."""
    import math

    names = [t for t in ax.texts if t.get_gid() == SEGMENT_NAME_GID["cols"]]
    if not names:
        return base
    size = names[0].get_fontsize()
    longest = max(len(t.get_text()) for t in names)
    return base + size * 1.2 + longest * size * 0.55 * math.sin(math.radians(NAME_ROTATION))


def axis_label(base: str | None, spec: AxisSpec, brief: bool = False) -> str | None:
    """``key``, ``key: text`` for a one-segment axis, ``(every 3rd token labelled)``
    (``brief``: ``(every 3rd)``, for small panels)."""
    if not base:
        return base
    if spec.labels is not None and len(spec.segment_names) == 1:
        base = f"{base}: {plain(spec.segment_names[0][0])}"
    if spec.labels is not None and spec.label_step > 1:
        step = _ordinal(spec.label_step)
        base += f" (every {step.strip()})" if brief else f" (every {step}token labelled)"
    return base


def short(label: Any, max_chars: int) -> str:
    """``label`` as literal text of at most ``max_chars``, cut in the middle so that both
    ends stay (``robot0_eef_pos_past_traj[8]`` -> ``robot0_e…traj[8]``)."""
    text = str(label)
    if len(text) > max_chars:
        head = (max_chars - 1) // 2
        text = text[:head] + "…" + text[len(text) - (max_chars - 1 - head):]
    return plain(text)


def mask_legend(fig: Figure, mats: Sequence[PreparedMatrix], cmap: Any) -> None:
    """A legend entry for the mask colour, below the figure, when any cell is masked."""
    if not any(m.has_mask for m in mats):
        return
    from matplotlib.patches import Patch

    patch = Patch(facecolor=mask_color(cmap if cmap is not None else STYLE.cmap),
                  edgecolor="0.3", linewidth=0.5, label=MASK_LABEL)
    fig.legend(handles=[patch], loc="outside lower right", fontsize=STYLE.segment_tick_size,
               frameon=False, handlelength=1.2, handleheight=1.2)


def fit_title(text: str, width_in: float, fontsize: float = 12) -> str:
    """``text`` wrapped onto lines that fit ``width_in`` inches (titles are never clipped)."""
    import textwrap

    chars = max(16, int(width_in * 72 / (fontsize * 0.55)))
    return "\n".join(textwrap.wrap(text, chars, break_long_words=True)) if len(text) > chars \
        else text

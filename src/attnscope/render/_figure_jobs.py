"""Jobs of the ``overlay`` and ``timeline`` figure kinds of :mod:`attnscope.render.batch`
(whose ``FIGURES`` table points here), and the checks they need first."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

from attnscope.contracts import AVERAGE_HEAD, KIND_AXES
from attnscope.errors import ConfigError
from attnscope.render import overlay
from attnscope.render import timeline as timeline_fig

__all__ = ["default_what", "load_timeline", "overlay_arrays", "overlay_jobs", "timeline_jobs"]


def head_tag(h: int | None) -> str:
    """File-name tag of a head: ``h03``, or ``havg`` for the mean over heads."""
    return "havg" if h is None else f"h{h:02d}"


def load_timeline(tables_dir: str | os.PathLike | None, arc: Any) -> Any:
    """The ``timeline`` table of ``tables_dir``, checked against ``arc``."""
    from attnscope.analysis.tables import load_table, table_exists

    if tables_dir is None or not table_exists(tables_dir, "timeline.parquet"):
        raise ConfigError(
            f"figure type 'timeline' needs timeline.parquet in the tables folder (got "
            f"{None if tables_dir is None else str(tables_dir)!r}): run "
            "`attnscope analyze ARCHIVE --out DIR` on an archive with episode/step ids"
        )
    return load_table(tables_dir, "timeline", arc, with_mean_head=True)


def has_timeline(tables_dir: Any) -> bool:
    """Whether the tables folder (local or a URL) holds ``timeline.parquet``."""
    from attnscope.analysis.tables import table_exists  # reading only

    return table_exists(tables_dir, "timeline.parquet")


def default_what(arc: Any, what: tuple[str, ...], tables_dir: Any) -> tuple[str, ...]:
    """``what=None``: overlays only for layouts with image groups, timelines only when the
    tables folder has one."""
    sides = [lay for lay in (arc.layout.encoder, arc.layout.decoder) if lay is not None]
    has_tl = tables_dir is not None and has_timeline(tables_dir)
    keep = {"overlay": any(overlay.image_groups(lay) for lay in sides), "timeline": has_tl}
    return tuple(w for w in what if keep.get(w, True))


def overlay_arrays(arc: Any, sel: Sequence[tuple[str, int, str]], query: Any) -> list:
    """``(stack, layer, kind, image segments)`` of the selected arrays an overlay reads:
    key side with image groups and the query on the query side; of those, the default
    array kind (``overlay.default_array``) when the selection has it."""
    out = []
    for st, lyr, kd in sel:
        qs, ks = KIND_AXES[(st, kd)]
        q, k = arc.layout.side(qs), arc.layout.side(ks)
        imgs = overlay.image_groups(k)
        named = isinstance(query, str) and query not in overlay.QUERY_WORDS
        if imgs and not (named and query not in {g.name for g in q.segments}):
            out.append((st, lyr, kd, imgs))
    pref = overlay.default_array(arc, query)
    return [x for x in out if (x[0], x[2]) == pref] or out


def overlay_jobs(p: Any) -> Iterator[Any]:
    ids = p.arc.sample_ids if p.req.frames is not None else None
    for st, lyr, kd, imgs in overlay_arrays(p.arc, p.req.sel, p.req.query):
        for s, hd in p.samples_heads():
            for name, seg in imgs.items():
                frame = None
                if p.req.frames is not None:
                    frame = overlay.find_frame(p.req.frames, s, camera=seg.group.camera, ids=ids)
                meta = dict(stack=st, layer=lyr, kind=kd, sample=s, head=hd, image=name)
                yield p.job(
                    f"overlay/{st}-L{lyr:02d}-{kd}-s{s:04d}-{head_tag(hd)}-{name}",
                    {**meta, "query": p.req.query, "frame": frame and str(frame)},
                    overlay.plot_overlay,
                    p.arc,
                    array=f"{st}/{lyr}/{kd}",
                    sample=s,
                    head=hd,
                    image=name,
                    query=p.req.query,
                    frame=frame,
                    upsampling=p.req.upsampling,
                )


def timeline_jobs(p: Any) -> Iterator[Any]:
    df = p.tables["timeline"]
    arrays = {(st, kd) for st, _, kd in p.req.sel}
    for st, kd in dict.fromkeys(zip(df["stack"], df["kind"])):
        if (st, kd) not in arrays:
            continue
        for ep in sorted(set(df["episode"])):
            for hd in p.req.heads:
                yield p.job(
                    f"timeline/e{ep}-{st}-{kd}-{head_tag(hd)}",
                    dict(table="timeline", stack=st, kind=kd, episode=int(ep), head=hd),
                    timeline_fig.plot_timeline,
                    df,
                    episode=int(ep),
                    stack=st,
                    kind=kd,
                    head=AVERAGE_HEAD if hd is None else hd,
                )

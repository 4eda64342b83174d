"""Batch rendering of an archive (and its analysis tables) into a folder of figures.

File names are stable handles, documented in ``docs/render.md``; what each file shows
is recorded in ``manifest.json`` next to them (the archive's identity and, per file,
the selection), because metadata belongs in data, not in file names.

=========  =================================================================
``what``   files (``{fmt}`` is ``png``, ``svg`` or ``pdf``)
=========  =================================================================
heatmap    ``heatmap/{stack}-L{layer:02d}-{kind}-s{sample:04d}-{head}.{fmt}``
grid       ``grid/{stack}-L{layer:02d}-{kind}-s{sample:04d}.{fmt}``
layers     ``layers/{stack}-{kind}-s{sample:04d}-{head}.{fmt}``
flow       ``flow/L{layer:02d}-s{sample:04d}-{head}.{fmt}``
tables     ``tables/entropy-{stack}-{kind}.{fmt}``,
           ``tables/segment_mass-{stack}-L{layer:02d}-{kind}.{fmt}``,
           ``tables/top_pairs-{stack}-L{layer:02d}-{kind}.{fmt}``
overlay    ``overlay/{stack}-L{layer:02d}-{kind}-s{sample:04d}-{head}-{image}.{fmt}``
timeline   ``timeline/e{episode}-{stack}-{kind}-{head}.{fmt}``
=========  =================================================================

``{head}`` is ``h{head:02d}`` for one head and ``havg`` for the mean over heads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnscope.contracts import FIGURE_FORMATS, FIGURE_KINDS, STACKS
from attnscope.errors import ArchiveNotFoundError, ConfigError, SelectionError
from attnscope.render import _figure_jobs as figure_jobs
from attnscope.render import overlay, plots, tables
from attnscope.render._figure_jobs import head_tag as _head_tag
from attnscope.render._prepare import check_scale, head_ids
from attnscope.render._reuse import Painter
from attnscope.render._save import save_figure, write_png
from attnscope.store import check_structure, open_archive

__all__ = ["FIGURES", "WHAT", "Job", "render_archive"]

WHAT = FIGURE_KINDS
#: the analysis tables that table figures read
FIGURE_TABLES = ("head_stats", "segment_mass", "top_pairs")


@dataclass(frozen=True)
class Request:
    """A checked selection: everything needed to list the figures again in a worker."""

    sel: tuple[tuple[str, int, str], ...]  # (stack, layer, kind) that exist
    samples: tuple[int, ...]
    heads: tuple[int | None, ...]
    what: tuple[str, ...]
    fmt: str
    log: bool
    tables_dir: str | None
    #: overlays: the query group, frames folder (None: no frame) and upsampling
    query: Any = "all"
    frames: str | None = None
    upsampling: str = "auto"
    #: colour range of attention maps (``plots.plot_heatmap``'s ``scale``)
    scale: str = "max"


@dataclass(frozen=True)
class Job:
    """One figure to draw: its file, what it shows, and how to draw it."""

    file: str
    meta: dict[str, Any]
    draw: Callable[..., Any]
    args: tuple
    kwargs: dict[str, Any]

    def figure(self) -> Any:
        return self.draw(*self.args, **self.kwargs)


class _Plan:
    """An open archive and a :class:`Request`; builds the :class:`Job` of each figure.

    Jobs pass archive selections without layouts: each figure takes its sample's own
    labels and real tokens from the archive (``_prepare.prepare_matrix``).
    """

    def __init__(self, arc: Any, req: Request) -> None:
        self.arc, self.req = arc, req
        self.tables = load_tables(req.tables_dir, arc) if "tables" in req.what else {}
        if "timeline" in req.what:
            self.tables["timeline"] = figure_jobs.load_timeline(req.tables_dir, arc)

    def samples_heads(self) -> Iterator[tuple[int, int | None]]:
        return ((s, h) for s in self.req.samples for h in self.req.heads)

    def job(self, stem: str, meta: dict, draw: Callable, *args: Any, **kwargs: Any) -> Job:
        what = stem.split("/")[0]
        return Job(f"{stem}.{self.req.fmt}", {"what": what, **meta}, draw, args, kwargs)


def _head_name(h: int | None) -> str:
    return "mean of heads" if h is None else f"head {h}"


def _heatmap_jobs(p: _Plan) -> Iterator[Job]:
    for st, lyr, kd in p.req.sel:
        for s, hd in p.samples_heads():
            yield p.job(
                f"heatmap/{st}-L{lyr:02d}-{kd}-s{s:04d}-{_head_tag(hd)}",
                dict(stack=st, layer=lyr, kind=kd, sample=s, head=hd),
                plots.plot_heatmap,
                p.arc.attention(st, lyr, kd),
                head_idx=hd,
                batch_idx=s,
                log=p.req.log,
                scale=p.req.scale,
                title=f"{st} layer {lyr} {kd}, {_head_name(hd)}, sample {s}",
            )


def _grid_jobs(p: _Plan) -> Iterator[Job]:
    for st, lyr, kd in p.req.sel:
        for s in p.req.samples:
            yield p.job(
                f"grid/{st}-L{lyr:02d}-{kd}-s{s:04d}",
                dict(stack=st, layer=lyr, kind=kd, sample=s),
                plots.plot_head_grid,
                p.arc.attention(st, lyr, kd),
                batch_idx=s,
                log=p.req.log,
                scale=p.req.scale,
                title=f"{st} layer {lyr} {kd}, all heads, sample {s}",
            )


def _layer_jobs(p: _Plan) -> Iterator[Job]:
    groups: dict[tuple[str, str], list[int]] = {}
    for st, lyr, kd in p.req.sel:
        groups.setdefault((st, kd), []).append(lyr)
    for (st, kd), lyrs in groups.items():
        for s, hd in p.samples_heads():
            yield p.job(
                f"layers/{st}-{kd}-s{s:04d}-{_head_tag(hd)}",
                dict(stack=st, layers=lyrs, kind=kd, sample=s, head=hd),
                plots.plot_layer_comparison,
                {lyr: p.arc.attention(st, lyr, kd) for lyr in lyrs},
                head_idx=hd,
                batch_idx=s,
                log=p.req.log,
                scale=p.req.scale,
                title=f"{st} {kd} across layers, {_head_name(hd)}, sample {s}",
            )


def _flow_jobs(p: _Plan) -> Iterator[Job]:
    existing = set(_all_sel(p.arc, STACKS))
    for lyr in sorted({lyr for (_, lyr, _) in p.req.sel}):
        need = [(st, lyr, kd) for st, kd in plots.FLOW_ARRAYS]
        if not all(x in existing for x in need):
            continue
        for s, hd in p.samples_heads():
            yield p.job(
                f"flow/L{lyr:02d}-s{s:04d}-{_head_tag(hd)}",
                dict(layer=lyr, sample=s, head=hd),
                plots.plot_attention_flow,
                *(p.arc.attention(*x) for x in need),
                layer_idx=lyr,
                head_idx=hd,
                batch_idx=s,
                log=p.req.log,
                scale=p.req.scale,
                title=plots.flow_title(lyr, hd, s),
            )


def _table_jobs(p: _Plan) -> Iterator[Job]:
    for st, kd in dict.fromkeys((st, kd) for st, _, kd in p.req.sel):
        yield p.job(
            f"tables/entropy-{st}-{kd}",
            dict(table="head_stats", stack=st, kind=kd),
            tables.plot_head_metric,
            p.tables["head_stats"],
            stack=st,
            kind=kd,
        )
    for name, draw in (
        ("segment_mass", tables.plot_segment_mass),
        ("top_pairs", tables.plot_top_pair_summary),
    ):
        for st, lyr, kd in p.req.sel:
            if name == "segment_mass" and not _several_segments(p.arc, st, kd):
                continue  # one query segment x one key segment (text only): mass is 1
            yield p.job(
                f"tables/{name}-{st}-L{lyr:02d}-{kd}",
                dict(table=name, stack=st, layer=lyr, kind=kd),
                draw,
                p.tables[name],
                stack=st,
                layer=lyr,
                kind=kd,
            )


def _several_segments(arc: Any, stack: str, kind: str) -> bool:
    """Whether either side of an array has more than one segment (modalities to compare)."""
    try:
        sides = arc.layout.axes(stack, kind)
    except SelectionError:
        return True
    return any(len(side.segments) > 1 for side in sides)


#: figure kind -> the jobs it draws; the one place to add a figure kind
FIGURES: dict[str, Callable[[_Plan], Iterable[Job]]] = {
    "heatmap": _heatmap_jobs,
    "grid": _grid_jobs,
    "layers": _layer_jobs,
    "flow": _flow_jobs,
    "tables": _table_jobs,
    "overlay": figure_jobs.overlay_jobs,
    "timeline": figure_jobs.timeline_jobs,
}


def _jobs(arc: Any, req: Request) -> list[Job]:
    """Every figure of ``req``, in :data:`WHAT` order; deterministic in its inputs."""
    plan = _Plan(arc, req)
    return [job for kind in WHAT if kind in req.what for job in FIGURES[kind](plan)]


def load_tables(tables_dir: str | os.PathLike, arc: Any) -> dict[str, Any]:
    """``{name: DataFrame}`` of :data:`FIGURE_TABLES` from ``tables_dir``.

    Read with :func:`attnscope.analysis.load_table` against ``arc``, so tables computed
    from another archive raise :class:`~attnscope.errors.StaleTableError`.
    """
    from attnscope.analysis.tables import load_table, table_exists  # reading only

    found = {}
    for name in FIGURE_TABLES:
        if not table_exists(tables_dir, f"{name}.parquet"):  # a local folder or a URL
            raise ArchiveNotFoundError(
                f"no {name}.parquet in {tables_dir}; expected the folder written by "
                f"`attnscope analyze ARCHIVE --out {tables_dir}`"
            )
        # the mean-of-heads rows too (head_index -1); StaleTableError for another archive
        found[name] = load_table(tables_dir, name, arc, with_mean_head=True)
    return found


def _as_list(x: Any, what: str) -> list | None:
    if x is None:
        return None
    if isinstance(x, (str, int)):
        return [x]
    out = list(x)
    if not out:
        raise SelectionError(f"{what} selects nothing; give at least one, or None for all")
    return out


def _check_subset(given: Sequence[Any] | None, valid: Sequence[Any], what: str) -> list:
    if given is None:
        return list(valid)
    bad = [g for g in given if g not in valid]
    if bad:
        raise SelectionError(f"{what} {bad[0]!r} does not exist; valid {what}s: {list(valid)}")
    return list(given)


def _request(
    arc: Any,
    layers: Any,
    heads: Any,
    samples: Any,
    kinds: Any,
    stacks: Any,
    what: tuple[str, ...],
    tables_dir: str | os.PathLike | None,
    fmt: str,
    log: bool,
) -> Request:
    """Check a selection against the archive; every error is raised before drawing."""
    all_stacks = [s for s in STACKS if s in _stacks(arc)]
    stacks_ = _check_subset(_as_list(stacks, "stacks"), all_stacks, "stack")
    known = {lyr for st in stacks_ for lyr in arc.layers.get(st, ())}
    layers_ = _check_subset(_as_list(layers, "layers"), sorted(known), "layer")
    known_k = sorted({k for (_, _, k) in _all_sel(arc, stacks_)})
    kinds_ = _check_subset(_as_list(kinds, "kinds"), known_k, "kind")
    n = int(arc.n_samples)
    samples_ = _as_list(samples, "samples") or [0]
    for s in samples_:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < n:
            raise SelectionError(f"sample {s!r} out of range: the archive has samples 0..{n - 1}")
    heads_ = _as_list(heads, "heads") or [None]
    sel = [
        (st, lyr, kd)
        for st, lyr, kd in _all_sel(arc, stacks_)
        if lyr in layers_ and kd in kinds_
    ]
    for st, lyr, kd in sel:
        ids = head_ids(arc.attention(st, lyr, kd))  # the model's head ids, not positions
        for hd in heads_:
            if hd is not None and hd not in ids:
                full = ids == list(range(len(ids)))
                why, shown = ("out of range", f"0..{len(ids) - 1}") if full else (
                    "is not a stored head", str(ids))
                raise SelectionError(f"head {hd} {why}: {st} layer {lyr} {kd} has heads {shown}")
    return Request(
        sel=tuple(sel),
        samples=tuple(samples_),
        heads=tuple(heads_),
        what=what,
        fmt=fmt,
        log=log,
        tables_dir=None if tables_dir is None else os.fspath(tables_dir),
    )


def _check_options(
    fmt: str, what: Iterable[str] | None, tables_dir: Any, out: Path
) -> tuple[str, tuple[str, ...]]:
    fmt = fmt.lower()
    if fmt not in FIGURE_FORMATS:
        raise ConfigError(f"unsupported figure format {fmt!r}; expected one of {FIGURE_FORMATS}")
    if what is None:  # everything this call can draw: tables only when given tables
        # (overlay / timeline: narrowed to what the archive has in _default_what)
        what = [w for w in WHAT if w != "tables" or tables_dir is not None]
    what_ = _as_list(what, "what") or []
    bad = [w for w in what_ if w not in WHAT]
    if bad:
        raise ConfigError(f"unknown figure type {bad[0]!r}; expected any of {WHAT}")
    if "tables" in what_ and tables_dir is None:
        raise ConfigError(
            "figure type 'tables' needs the analysis tables (tables_dir, CLI --tables): run "
            "`attnscope analyze ARCHIVE --out DIR` first and pass DIR"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output folder {str(out)!r} exists and is a file; expected a folder")
    return fmt, tuple(what_)


def render_archive(
    archive_or_path: Any,
    out_dir: str | os.PathLike,
    *,
    layers: Iterable[int] | None = None,
    heads: Iterable[int | None] | None = None,
    samples: Iterable[int] | None = None,
    kinds: Iterable[str] | None = None,
    stacks: Iterable[str] | None = None,
    what: Iterable[str] | None = None,
    tables_dir: str | os.PathLike | None = None,
    fmt: str = "png",
    progress: bool = True,
    log: bool = False,
    workers: int | None = 1,
    query: str | Sequence[int] = "all",
    frames: str | os.PathLike | None = None,
    upsampling: str = "auto",
    scale: str = "max",
) -> list[Path]:
    """Render a batch of figures from an archive into ``out_dir``; return the written paths.

    Parameters
    ----------
    archive_or_path
        An opened archive or its path.
    layers, kinds, stacks
        Restrict to these layer numbers / attention kinds / stacks (default: all).
    heads
        Heads for the single-head figures; ``None`` inside the list means the head mean.
        Default ``None``: the head mean only (grids always show every head).
    samples
        Sample indices (default: ``[0]``).
    what
        Any of ``heatmap``, ``grid``, ``layers``, ``flow``, ``tables``, ``overlay``,
        ``timeline`` (:data:`WHAT`). Default: all of them, ``tables`` only when
        ``tables_dir`` is given, ``overlay`` only when the layout has image groups,
        ``timeline`` only when ``tables_dir`` holds ``timeline.parquet``.
    tables_dir
        Folder written by :func:`attnscope.analysis.analyze` for this archive, holding
        ``head_stats.parquet``, ``segment_mass.parquet`` and ``top_pairs.parquet``;
        required for ``tables``. Tables computed from another archive raise
        :class:`~attnscope.errors.StaleTableError`.
    fmt
        ``png`` (default), ``svg`` or ``pdf``. Output is byte-identical across runs.
    progress
        tqdm progress bar on stderr (only when stderr is a terminal).
    workers
        Processes drawing figures in parallel (``None``: one per core). Matplotlib is
        single-threaded, so this is the way to use several cores; each worker opens the
        archive read-only by path. Output is identical to ``workers=1``.
    query, frames, upsampling
        Overlays (``render.overlay``): the query group (a segment name, ``"all"``,
        ``"last"`` or token indices), a folder of camera frames (``{sample}.png``,
        ``{sample:06d}.png`` or ``episode{E}_step{S}.png``, optionally under a subfolder
        named after the image group's camera) and ``"auto"`` (nearest below 8 patches a
        side, else bilinear), ``"bilinear"`` or ``"nearest"``.
    scale
        Top of the colour range of attention maps: ``"max"`` (the largest allowed weight,
        rows with one allowed key left out), a percentile such as ``"p99"``, or ``"row"``
        (each row over its max); see :func:`attnscope.render.plot_heatmap`.

    Returns
    -------
    list of pathlib.Path, in rendering order; ``out_dir/manifest.json`` describes them.

    Raises
    ------
    SelectionError
        A selection that does not exist, is empty, or gives no figure at all.
    ConfigError
        An unknown format or figure type, ``tables`` without ``tables_dir``, or an
        ``out_dir`` that is a file.

    Examples
    --------
    >>> render_archive("run.zarr", "figs", layers=[0], what=["heatmap", "grid"])  # doctest: +SKIP
    """
    out = Path(out_dir)
    fmt, what_ = _check_options(fmt, what, tables_dir, out)
    if upsampling not in overlay.UPSAMPLING:
        raise ConfigError(
            f"unknown upsampling {upsampling!r}; expected one of {overlay.UPSAMPLING}"
        )
    check_scale(scale)
    with open_archive(archive_or_path) as arc:
        check_structure(arc, every_chunk=False)
        if what is None:
            what_ = figure_jobs.default_what(arc, what_, tables_dir)
        req = _request(arc, layers, heads, samples, kinds, stacks, what_, tables_dir, fmt, log)
        req = dataclasses.replace(
            req,
            query=query if isinstance(query, str) else tuple(query),
            frames=None if frames is None else os.fspath(frames),
            upsampling=upsampling,
            scale=scale,
        )
        jobs = _jobs(arc, req)
        if not jobs:
            raise SelectionError(
                f"the selection gives no figures: what={list(what_)} over "
                f"{[f'{s}/{lyr}/{k}' for s, lyr, k in req.sel]} (flow needs encoder self, "
                "decoder self and cross attention of the same layer)"
            )
        workers = _n_workers(workers, len(jobs), arc)
        if workers > 1:
            written = _render_parallel(str(arc.path), req, out, jobs, workers, progress)
        else:
            painter = Painter()
            written = [_save(job, out, painter) for job in _progress(jobs, progress)]
        manifest = {
            "archive": _identity(arc),
            "format": fmt,
            "files": [{"file": j.file, **j.meta} for j in jobs],
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(
        json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n"
    )
    return written


def _save(job: Job, out: Path, painter: Painter) -> Path:
    """Write one figure: painted on a reused template when it can be, else drawn afresh."""
    import matplotlib.pyplot as plt

    painted = painter.paint(job.draw, job.args, job.kwargs, out / job.file)
    if painted is not None:
        return painted
    fig = job.figure()
    fmt = job.file.rsplit(".", 1)[1]
    try:
        if fmt == "png":  # one layout pass and one draw instead of two of each
            return write_png(fig, out / job.file)
        return save_figure(fig, out / job.file, fmt=fmt)
    finally:
        plt.close(fig)


def _n_workers(workers: int | None, n_jobs: int, arc: Any) -> int:
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 1:
        raise ConfigError(f"workers must be >= 1 or None, got {workers}")
    # A worker costs ~1-2 s of imports and builds its own figure templates (_reuse.py),
    # while a reused figure takes ~0.1 s: only large batches gain from several processes.
    if n_jobs < MIN_PARALLEL_FIGURES or getattr(arc, "path", None) is None:
        return 1
    return min(workers, n_jobs // (MIN_PARALLEL_FIGURES // 2))


#: fewer figures than this are drawn in-process whatever ``workers`` says
MIN_PARALLEL_FIGURES = 64
_WORKER: dict[str, Any] = {}


def _worker_init(path: str, req: Request, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    # The worker process keeps its archive open for its whole life; it exits with the pool.
    _WORKER["jobs"] = _jobs(open_archive(path), req)
    _WORKER["out"] = Path(out)
    _WORKER["painter"] = Painter()


def _worker_render(i: int) -> str:
    return str(_save(_WORKER["jobs"][i], _WORKER["out"], _WORKER["painter"]))


def _render_parallel(
    path: str, req: Request, out: Path, jobs: list[Job], workers: int, progress: bool
) -> list[Path]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # Figures that share a template (same kind, stack and attention kind) go to the same
    # worker in runs, so each worker builds few templates (see _reuse.py).
    def group(i: int) -> tuple:
        m = jobs[i].meta
        return tuple(str(m.get(k)) for k in ("what", "table", "stack", "kind"))

    order = sorted(range(len(jobs)), key=group)
    chunk = max(2, -(-len(jobs) // (4 * workers)))
    # spawn, not fork: the parent may hold zarr's event-loop thread or an open HDF5 file.
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_worker_init, initargs=(path, req, str(out))
    ) as pool:
        done = pool.map(_worker_render, order, chunksize=chunk)
        paths = dict(zip(order, _progress(done, progress, total=len(jobs))))
    return [Path(paths[i]) for i in range(len(jobs))]


def _stacks(arc: Any) -> list[str]:
    return sorted({n.split("/")[0] for n in arc.arrays})


def _all_sel(arc: Any, stacks: Sequence[str]) -> list[tuple[str, int, str]]:
    return [
        (st, lyr, kd)
        for st in stacks
        if st in _stacks(arc)
        for lyr in arc.layers.get(st, ())
        for kd in arc.kinds[st, lyr]
    ]


def _identity(arc: Any) -> dict[str, Any]:
    try:
        ident = dict(arc.identity())
    except Exception:  # noqa: BLE001 - identity is informative only
        return {}
    # the absolute path differs between machines; keep the name only
    if "archive" in ident:
        ident["archive"] = Path(str(ident["archive"])).name
    return ident


def _progress(jobs: Iterable, progress: bool, total: int | None = None) -> Iterable:
    if not progress or not sys.stderr.isatty():
        return jobs
    from tqdm.auto import tqdm

    return tqdm(jobs, desc="render", unit="fig", total=total)

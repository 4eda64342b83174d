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
=========  =================================================================

``{head}`` is ``h{head:02d}`` for one head and ``havg`` for the mean over heads.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from attnscope.contracts import FIGURE_FORMATS, FIGURE_KINDS
from attnscope.errors import ConfigError, SelectionError
from attnscope.render import plots
from attnscope.render._save import save_figure

__all__ = ["WHAT", "render_archive"]

WHAT = FIGURE_KINDS


def _head_tag(h: int | None) -> str:
    return "havg" if h is None else f"h{h:02d}"


def _as_list(x: Any) -> list | None:
    if x is None:
        return None
    if isinstance(x, (str, int)):
        return [x]
    return list(x)


def _check_subset(given: Sequence[Any] | None, valid: Sequence[Any], what: str) -> list:
    if given is None:
        return list(valid)
    bad = [g for g in given if g not in valid]
    if bad:
        raise SelectionError(f"{what} {bad[0]!r} does not exist; valid {what}s: {list(valid)}")
    return list(given)


def _open(archive_or_path: Any) -> tuple[Any, bool]:
    if hasattr(archive_or_path, "attention"):
        return archive_or_path, False
    from attnscope.store import open_archive

    return open_archive(archive_or_path), True


def render_archive(
    archive_or_path: Any,
    out_dir: str | os.PathLike,
    *,
    layers: Iterable[int] | None = None,
    heads: Iterable[int | None] | None = None,
    samples: Iterable[int] | None = None,
    kinds: Iterable[str] | None = None,
    stacks: Iterable[str] | None = None,
    what: Iterable[str] = WHAT,
    tables_dir: str | os.PathLike | None = None,
    fmt: str = "png",
    progress: bool = True,
    log: bool = False,
    workers: int | None = 1,
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
        Any of ``heatmap``, ``grid``, ``layers``, ``flow``, ``tables``.
    tables_dir
        Folder holding ``head_stats.parquet``, ``segment_mass.parquet``,
        ``top_pairs.parquet``; required for ``tables`` unless those files sit in
        ``out_dir/tables``. Missing table files are skipped.
    fmt
        ``png`` (default), ``svg`` or ``pdf``. Output is byte-identical across runs.
    progress
        tqdm progress bar on stderr (only when stderr is a terminal).
    workers
        Processes drawing figures in parallel (``None``: one per core). Matplotlib is
        single-threaded, so this is the way to use several cores; each worker opens the
        archive read-only by path. Output is identical to ``workers=1``.

    Returns
    -------
    list of pathlib.Path, in rendering order; ``out_dir/manifest.json`` describes them.

    Examples
    --------
    >>> render_archive("run.zarr", "figs", layers=[0], what=["heatmap", "grid"])  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    fmt = fmt.lower()
    if fmt not in FIGURE_FORMATS:
        raise ConfigError(f"unsupported figure format {fmt!r}; expected one of {FIGURE_FORMATS}")
    what = _as_list(what) or []
    bad = [w for w in what if w not in WHAT]
    if bad:
        raise ConfigError(f"unknown figure type {bad[0]!r}; expected any of {WHAT}")
    arc, opened = _open(archive_or_path)
    out = Path(out_dir)
    try:
        all_stacks = [s for s in ("encoder", "decoder") if s in _stacks(arc)]
        stacks_ = _check_subset(_as_list(stacks), all_stacks, "stack")
        kinds_ = _as_list(kinds)
        layers_ = _as_list(layers)
        n = int(arc.n_samples)
        samples_ = _as_list(samples) or [0]
        for s in samples_:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < n:
                raise SelectionError(
                    f"sample {s!r} out of range: the archive has samples 0..{n - 1}"
                )
        heads_ = _as_list(heads) or [None]

        # (stack, layer, kind) selections that exist
        sel: list[tuple[str, int, str]] = []
        for st in stacks_:
            st_layers = list(arc.layers(st))
            for lyr in layers_ if layers_ is not None else st_layers:
                if lyr not in st_layers:
                    continue
                for kd in arc.kinds(st, lyr):
                    if kinds_ is None or kd in kinds_:
                        sel.append((st, lyr, kd))
        if layers_ is not None:
            known = {lyr for st in stacks_ for lyr in arc.layers(st)}
            missing = [x for x in layers_ if x not in known]
            if missing:
                raise SelectionError(
                    f"layer {missing[0]!r} does not exist; valid layers: {sorted(known)}"
                )
        if kinds_ is not None:
            known_k = {k for (_, _, k) in _all_sel(arc, stacks_)}
            missing = [x for x in kinds_ if x not in known_k]
            if missing:
                raise SelectionError(
                    f"kind {missing[0]!r} does not exist; valid kinds: {sorted(known_k)}"
                )
        for st, lyr, kd in sel:
            h = int(arc.attention(st, lyr, kd).shape[1])
            for hd in heads_:
                if hd is not None and not 0 <= hd < h:
                    raise SelectionError(
                        f"head {hd} out of range: {st} layer {lyr} {kd} has heads 0..{h - 1}"
                    )

        jobs = _build_jobs(arc, sel, samples_, heads_, what, fmt, log, out, tables_dir, all_stacks)
        written: list[Path] = []
        manifest = [{"file": name, **meta} for name, meta, _ in jobs]
        workers = _n_workers(workers, len(jobs), arc)
        if workers > 1:
            args = (sel, samples_, heads_, what, fmt, log, out, tables_dir, all_stacks)
            written = _render_parallel(str(arc.path), args, len(jobs), workers, progress)
        else:
            for name, _, make in _progress(jobs, progress):
                fig = make()
                try:
                    written.append(save_figure(fig, out / name, fmt=fmt))
                finally:
                    plt.close(fig)
        ident = _identity(arc)
        out.mkdir(parents=True, exist_ok=True)  # even when no figure was due
        (out / "manifest.json").write_text(
            json.dumps(
                {"archive": ident, "format": fmt, "files": manifest},
                indent=2,
                sort_keys=True,
                default=str,
            )
            + "\n"
        )
        return written
    finally:
        if opened and hasattr(arc, "close"):
            arc.close()


def _n_workers(workers: int | None, n_jobs: int, arc: Any) -> int:
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 1:
        raise ConfigError(f"workers must be >= 1 or None, got {workers}")
    # Spawning a worker costs ~1-2 s of imports: only worth it for a handful of figures.
    if n_jobs < 8 or getattr(arc, "path", None) is None:
        return 1
    return min(workers, n_jobs // 4)


_WORKER: dict[str, Any] = {}


def _worker_init(path: str, args: tuple) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from attnscope.store import open_archive

    arc = open_archive(path)
    _WORKER["arc"] = arc
    _WORKER["jobs"] = _build_jobs(arc, *args)
    _WORKER["out"] = Path(args[6])
    _WORKER["fmt"] = args[4]


def _worker_render(i: int) -> str:
    import matplotlib.pyplot as plt

    name, _, make = _WORKER["jobs"][i]
    fig = make()
    try:
        return str(save_figure(fig, _WORKER["out"] / name, fmt=_WORKER["fmt"]))
    finally:
        plt.close(fig)


def _render_parallel(
    path: str, args: tuple, n_jobs: int, workers: int, progress: bool
) -> list[Path]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent may hold zarr's event-loop thread or an open HDF5 file.
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_worker_init, initargs=(path, args)
    ) as pool:
        done = pool.map(_worker_render, range(n_jobs), chunksize=2)
        return [Path(p) for p in _progress(done, progress, total=n_jobs)]


def _build_jobs(
    arc: Any,
    sel: list[tuple[str, int, str]],
    samples_: list[int],
    heads_: list[int | None],
    what: list[str],
    fmt: str,
    log: bool,
    out: Path,
    tables_dir: str | os.PathLike | None,
    all_stacks: list[str],
) -> list[tuple[str, dict[str, Any], Callable[[], Any]]]:
    """``(file name, metadata, make figure)`` for every figure; deterministic in its inputs."""
    layout = arc.layout
    jobs: list[tuple[str, dict[str, Any], Callable[[], Any]]] = []

    def axes(st: str, kd: str) -> tuple[Any, Any]:
        try:
            return layout.axes(st, kd) if layout is not None else (None, None)
        except SelectionError:
            return None, None

    if "heatmap" in what:
        for st, lyr, kd in sel:
            q, k = axes(st, kd)
            for s in samples_:
                for hd in heads_:
                    name = f"heatmap/{st}-L{lyr:02d}-{kd}-s{s:04d}-{_head_tag(hd)}.{fmt}"
                    meta = dict(what="heatmap", stack=st, layer=lyr, kind=kd, sample=s, head=hd)
                    jobs.append(
                        (
                            name,
                            meta,
                            _bind(
                                plots.plot_heatmap,
                                arc.attention(st, lyr, kd),
                                head_idx=hd,
                                batch_idx=s,
                                query_layout=q,
                                key_layout=k,
                                log=log,
                                title=f"{st} layer {lyr} {kd}, {_head_name(hd)}, sample {s}",
                            ),
                        )
                    )
    if "grid" in what:
        for st, lyr, kd in sel:
            q, k = axes(st, kd)
            for s in samples_:
                name = f"grid/{st}-L{lyr:02d}-{kd}-s{s:04d}.{fmt}"
                meta = dict(what="grid", stack=st, layer=lyr, kind=kd, sample=s)
                jobs.append(
                    (
                        name,
                        meta,
                        _bind(
                            plots.plot_head_grid,
                            arc.attention(st, lyr, kd),
                            batch_idx=s,
                            query_layout=q,
                            key_layout=k,
                            log=log,
                            title=f"{st} layer {lyr} {kd}, all heads, sample {s}",
                        ),
                    )
                )
    if "layers" in what:
        groups: dict[tuple[str, str], list[int]] = {}
        for st, lyr, kd in sel:
            groups.setdefault((st, kd), []).append(lyr)
        for (st, kd), lyrs in groups.items():
            q, k = axes(st, kd)
            for s in samples_:
                for hd in heads_:
                    name = f"layers/{st}-{kd}-s{s:04d}-{_head_tag(hd)}.{fmt}"
                    meta = dict(what="layers", stack=st, layers=lyrs, kind=kd, sample=s, head=hd)
                    jobs.append(
                        (
                            name,
                            meta,
                            _bind(
                                plots.plot_layer_comparison,
                                {lyr: arc.attention(st, lyr, kd) for lyr in lyrs},
                                head_idx=hd,
                                batch_idx=s,
                                query_layout=q,
                                key_layout=k,
                                log=log,
                                title=f"{st} {kd} across layers, {_head_name(hd)}, sample {s}",
                            ),
                        )
                    )
    if "flow" in what:
        existing = set(_all_sel(arc, all_stacks))
        for lyr in sorted({lyr for (_, lyr, _) in sel}):
            need = [
                ("encoder", lyr, "self_attention"),
                ("decoder", lyr, "self_attention"),
                ("decoder", lyr, "cross_attention"),
            ]
            if not all(x in existing for x in need):
                continue
            for s in samples_:
                for hd in heads_:
                    name = f"flow/L{lyr:02d}-s{s:04d}-{_head_tag(hd)}.{fmt}"
                    meta = dict(what="flow", layer=lyr, sample=s, head=hd)
                    jobs.append(
                        (
                            name,
                            meta,
                            _bind(
                                plots.plot_attention_flow,
                                *(arc.attention(*x) for x in need),
                                layer_idx=lyr,
                                head_idx=hd,
                                batch_idx=s,
                                log=log,
                                encoder_layout=getattr(layout, "encoder", None),
                                decoder_layout=getattr(layout, "decoder", None),
                            ),
                        )
                    )
    if "tables" in what:
        jobs.extend(_table_jobs(Path(tables_dir) if tables_dir else out / "tables", sel, fmt))

    return jobs


def _head_name(h: int | None) -> str:
    return "mean of heads" if h is None else f"head {h}"


def _bind(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[], Any]:
    return lambda: fn(*args, **kwargs)


def _stacks(arc: Any) -> list[str]:
    names = arc.arrays() if hasattr(arc, "arrays") else []
    return sorted({n.split("/")[0] for n in names})


def _all_sel(arc: Any, stacks: Sequence[str]) -> list[tuple[str, int, str]]:
    return [(st, lyr, kd) for st in stacks for lyr in arc.layers(st) for kd in arc.kinds(st, lyr)]


def _identity(arc: Any) -> dict[str, Any]:
    try:
        ident = dict(arc.identity())
    except Exception:  # noqa: BLE001 - identity is informative only
        return {}
    # the absolute path differs between machines; keep the name only
    if "archive" in ident:
        ident["archive"] = Path(str(ident["archive"])).name
    return ident


def _table_jobs(tdir: Path, sel: list[tuple[str, int, str]], fmt: str) -> list:
    from attnscope.render import tables

    jobs: list = []
    hs, sm, tp = (
        tdir / "head_stats.parquet",
        tdir / "segment_mass.parquet",
        tdir / "top_pairs.parquet",
    )
    if hs.exists():
        hs = tables.load_table(hs)
        for st, kd in dict.fromkeys((st, kd) for st, _, kd in sel):
            jobs.append(
                (
                    f"tables/entropy-{st}-{kd}.{fmt}",
                    dict(what="tables", table="head_stats", stack=st, kind=kd),
                    _bind(tables.plot_head_metric, hs, stack=st, kind=kd),
                )
            )
    for path, fn, tag in (
        (sm, tables.plot_segment_mass, "segment_mass"),
        (tp, tables.plot_top_pairs, "top_pairs"),
    ):
        if not path.exists():
            continue
        path = tables.load_table(path)
        for st, lyr, kd in sel:
            jobs.append(
                (
                    f"tables/{tag}-{st}-L{lyr:02d}-{kd}.{fmt}",
                    dict(what="tables", table=tag, stack=st, layer=lyr, kind=kd),
                    _bind(fn, path, stack=st, layer=lyr, kind=kd),
                )
            )
    return jobs


def _progress(jobs: Iterable, progress: bool, total: int | None = None) -> Iterable:
    if not progress or not sys.stderr.isatty():
        return jobs
    from tqdm.auto import tqdm

    return tqdm(jobs, desc="render", unit="fig", total=total)

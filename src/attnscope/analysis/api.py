"""``analyze``: every metric of an archive into Parquet, chunk by chunk.

Blocks of whole samples (aligned to the archive's sample chunks, ~``block_bytes`` of
float32 each) are read and analysed one at a time, in a thread pool (``workers``), or on a
Dask distributed cluster (``scheduler``); results stream into Parquet row groups, so
memory is bounded by a few blocks per worker whatever the archive size.
"""

from __future__ import annotations

import json
import os
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from attnscope._extras import require
from attnscope.analysis._engine import ArraySpec, StatsAccumulator, analyze_block
from attnscope.analysis._folder import TableFolder
from attnscope.analysis.blocks import (
    detect_causal,
    query_rows,
    read_block,
    read_tokens,
    sample_slices,
)
from attnscope.analysis.statistics import entries_from_accumulators, write_statistics
from attnscope.analysis.tables import TableWriter
from attnscope.contracts import KIND_AXES, MANIFEST, STATISTICS_JSON
from attnscope.errors import ConfigError, SelectionError
from attnscope.store import check_structure, open_archive

__all__ = ["analyze", "SIMILARITIES"]

SIMILARITIES = ("js", "cosine", None)
DEFAULT_BLOCK_BYTES = 32 << 20
SCHEDULER_TIMEOUT = "10s"  # connecting to a scheduler; distributed's default is 30 s


def _side(layout: Any, stack: str, kind: str, t: int, s: int) -> tuple[Any, Any]:
    from attnscope.store.layout import SideLayout

    q = k = None
    try:
        q, k = layout.axes(stack, kind)
    except Exception:  # layout missing a side: fall back to one anonymous segment
        q = k = None
    if q is None or q.length != t:
        q = SideLayout.from_labels([str(i) for i in range(t)])
    if k is None or k.length != s:
        k = SideLayout.from_labels([str(i) for i in range(s)])
    return q, k


def _spec(
    a: Any,
    name: str,
    *,
    topk: int,
    sink_token: int,
    similarity: str | None,
    heads: Sequence[int] | None,
    row_stats: bool,
) -> ArraySpec:
    arr = a[name]
    n, h, t, s = arr.shape
    stored_heads = [int(x) for x in (arr.heads if arr.heads is not None else range(h))]
    head_index = None
    use_heads = stored_heads
    if heads is not None:
        missing = [x for x in heads if x not in stored_heads]
        if missing:
            raise SelectionError(
                f"unknown head(s) {missing} in {name}; expected some of {stored_heads}"
            )
        head_index = tuple(stored_heads.index(x) for x in heads)
        use_heads = [int(x) for x in heads]
    if not isinstance(topk, (int, np.integer)) or isinstance(topk, bool) or topk < 1:
        raise ConfigError(f"topk must be a positive integer, got {topk!r}")
    if query_rows(arr) is not None:  # a row policy may keep fewer cells: list them all
        topk = min(int(topk), t * s)
    if topk > t * s:
        raise ConfigError(
            f"topk={topk} is larger than the {t}x{s}={t * s} query-key pairs of {name}; "
            f"expected topk <= {t * s}"
        )
    if not 0 <= int(sink_token) < s:
        raise ConfigError(
            f"sink_token={sink_token} out of range for {name}; expected 0 <= token < {s}"
        )
    rows = query_rows(arr)
    q, k = _side(a.layout, arr.stack, arr.kind, t if rows is None else _side_length(a, arr), s)
    q_seg_ids, q_labels = q.segment_ids(), list(q.labels)
    if rows is not None:  # the kept rows' segments and labels (a capture row policy)
        q_seg_ids = [q_seg_ids[r] for r in rows]
        q_labels = [q_labels[r] for r in rows]
    return ArraySpec(
        name=name,
        stack=arr.stack,
        layer=int(arr.layer),
        kind=arr.kind,
        heads=tuple(use_heads),
        n_queries=t,
        n_keys=s,
        causal=detect_causal(arr),
        q_seg_ids=tuple(q_seg_ids),
        k_seg_ids=tuple(k.segment_ids()),
        q_seg_names=tuple(x.name for x in q.segments),
        k_seg_names=tuple(x.name for x in k.segments),
        q_labels=tuple(q_labels),
        k_labels=tuple(k.labels),
        topk=int(topk),
        sink_token=int(sink_token),
        similarity=similarity,
        row_stats=row_stats,
        head_index=head_index,
        sparse=bool(getattr(arr, "is_sparse", False)),
        query_rows=None if rows is None else tuple(int(r) for r in rows),
    )


def _side_length(a: Any, arr: Any) -> int:
    """Length of ``arr``'s query side in the layout (its rows index that axis)."""
    lay = getattr(a.layout, KIND_AXES[(arr.stack, arr.kind)][0], None)
    return int(lay.length) if lay is not None else int(max(arr.query_rows) + 1)


def _select(a: Any, arrays: Sequence[str] | None) -> list[str]:
    names = list(a.arrays)
    if arrays is None:
        return names
    if isinstance(arrays, str):
        arrays = [arrays]
    out: list[str] = []
    for sel in arrays:
        hit = [n for n in names if n == sel or n.startswith(sel.rstrip("/") + "/")]
        if not hit:
            raise SelectionError(
                f"no attention array matches {sel!r}; expected one of {names} "
                "(or a 'stack' / 'stack/layer' prefix)"
            )
        out.extend(x for x in hit if x not in out)
    return out


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    disable = not enabled or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    return tqdm(total=total, unit="B", unit_scale=True, desc="analyze", disable=disable)


def _task(arr: Any, sl: slice, spec: ArraySpec) -> dict[str, Any]:
    return analyze_block(read_block(arr, sl), spec, sl.start, read_tokens(arr, sl))


def _run_local(a: Any, jobs: list[tuple[ArraySpec, slice]], workers: int) -> Iterator[tuple]:
    arrs = {spec.name: a[spec.name] for spec, _ in jobs}
    if workers <= 1:
        for spec, sl in jobs:
            yield spec, _task(arrs[spec.name], sl, spec)
        return
    # Ordered, with at most 2 blocks per worker in flight: bounded memory, deterministic output.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        it = iter(jobs)
        for spec, sl in it:
            pending.append((spec, pool.submit(_task, arrs[spec.name], sl, spec)))
            if len(pending) >= 2 * workers:
                s0, f0 = pending.popleft()
                yield s0, f0.result()
        while pending:
            s0, f0 = pending.popleft()
            yield s0, f0.result()


def _open_cached(path: str) -> Any:
    cache = _open_cached.__dict__.setdefault("cache", {})
    if path not in cache:
        cache[path] = open_archive(path)
    return cache[path]


def _remote_sparse_task(path: str, sl: slice, spec: ArraySpec) -> dict[str, Any]:
    arr = _open_cached(path)[spec.name]
    return analyze_block(read_block(arr, sl), spec, sl.start, read_tokens(arr, sl))


def _connect(client_cls: Any, address: Any) -> Any:
    try:
        return client_cls(address, timeout=SCHEDULER_TIMEOUT)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(
            f"cannot reach the Dask scheduler {address!r} ({' '.join(str(e).split())}); "
            "expected the address of a running scheduler, e.g. tcp://host:8786"
        ) from e


def _run_dask(a: Any, jobs: list[tuple[ArraySpec, slice]], scheduler: Any) -> Iterator[tuple]:
    dask = require("dask", "analysis on a Dask cluster")
    Client = require("distributed", "analysis on a Dask cluster").Client

    if getattr(a, "format", "zarr") != "zarr":
        raise ConfigError(
            f"scheduler= needs a Zarr archive, got format {a.format!r}: HDF5 file handles "
            "cannot be shared with Dask workers; use workers=N, or write the archive as .zarr"
        )

    client = scheduler if isinstance(scheduler, Client) else _connect(Client, scheduler)
    own = client is not scheduler
    try:
        nthreads = max(1, sum(client.nthreads().values()))
        tasks = []
        darrays: dict[str, Any] = {}
        for spec, sl in jobs:
            if spec.sparse:
                tasks.append(dask.delayed(_remote_sparse_task)(str(a.path), sl, spec))
                continue
            d = darrays.get(spec.name)
            if d is None:
                d = darrays[spec.name] = a.to_dask(spec.name)
            block = d[sl].rechunk({0: -1, 1: -1, 2: -1, 3: -1})
            # masks and labels are small: read here, shipped with the task
            tok = read_tokens(a[spec.name], sl)
            tasks.append(dask.delayed(analyze_block)(block, spec, sl.start, tok))
        window = 2 * nthreads
        pending: deque = deque()
        for (spec, _), task in zip(jobs, tasks):
            pending.append((spec, client.compute(task)))
            if len(pending) >= window:
                s0, f0 = pending.popleft()
                yield s0, f0.result()
                f0.release()
        while pending:
            s0, f0 = pending.popleft()
            yield s0, f0.result()
            f0.release()
    finally:
        if own:
            client.close()


def analyze(
    archive_or_path: Any,
    out_dir: str | os.PathLike[str],
    *,
    topk: int = 10,
    sink_token: int = 0,
    workers: int = 1,
    scheduler: Any = None,
    progress: bool = True,
    arrays: Sequence[str] | None = None,
    heads: Sequence[int] | None = None,
    head_similarity: str | None = "js",
    row_stats: bool = True,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> dict[str, Path]:
    """Compute every attention metric of an archive into Parquet tables.

    Parameters
    ----------
    archive_or_path : AttentionArchive, str or Path
        The archive (Zarr or HDF5, dense or sparse top-k).
    out_dir : str or Path
        Output directory (created), or a folder at an fsspec URL (``s3://bucket/tables``,
        reached with the archive's storage options: ``store.set_storage_options``).
        Tables are written as ``*.parquet.partial`` and renamed only once complete.
    topk : int
        Top pairs per (sample, head) and for the head average; ``1 <= topk <= T * S``.
    sink_token : int
        Key index whose received mass is the sink score (default the first token).
    workers : int
        Threads analysing blocks concurrently on this machine.
    scheduler : str or distributed.Client, optional
        Address of a Dask distributed scheduler (or a client): the blocks become
        ``dask.array`` tasks over the archive's arrays and run on that cluster.
    progress : bool
        tqdm progress bar on stderr (only when stderr is a terminal).
    arrays : list of str, optional
        Array names (``"decoder/0/cross_attention"``) or prefixes (``"decoder"``,
        ``"decoder/0"``); default all.
    heads : list of int, optional
        Original head ids to analyse; default all stored heads. The head average
        (``head = -1``) averages the selected heads.
    head_similarity : {"js", "cosine", None}
        Head-to-head similarity metric: Jensen-Shannon (``O(H^2)`` passes, the slowest
        metric), cosine (one matrix product) or none (no ``head_similarity`` table).
    row_stats : bool
        Write the per-query-row table (the largest table: ``N * (H + 1) * T`` rows). On by
        default: its metrics are computed anyway, and writing it costs a few percent of the
        run (docs/benchmarks.md); ``False`` skips the file.
    block_bytes : int
        Target float32 size of one analysed block; peak memory is a small multiple of this
        per worker.

    Returns
    -------
    dict of str to Path
        Table name -> file (a ``RemoteLocation``, a ``str``: the URL, in a folder at a
        URL): ``head_stats``, ``row_stats``, ``top_pairs``, ``segment_mass``,
        ``head_similarity``, plus ``statistics`` (``attention_statistics.json``) and
        ``manifest`` (``manifest.json``).

    Examples
    --------
    >>> paths = analyze("run.zarr", "analysis/", topk=5, workers=2)  # doctest: +SKIP
    >>> import pandas as pd; pd.read_parquet(paths["head_stats"])  # doctest: +SKIP
    """
    if head_similarity not in SIMILARITIES:
        raise ConfigError(f"head_similarity={head_similarity!r}; expected one of {SIMILARITIES}")
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    if int(block_bytes) < 1:
        raise ConfigError(f"block_bytes must be positive, got {block_bytes}")
    folder = TableFolder(out_dir)
    folder.refuse_file()
    with open_archive(archive_or_path) as a:
        check_structure(a)
        names = _select(a, arrays)
        specs = [
            _spec(
                a,
                nm,
                topk=topk,
                sink_token=sink_token,
                similarity=head_similarity,
                heads=heads,
                row_stats=row_stats,
            )
            for nm in names
        ]
        jobs = [(sp, sl) for sp in specs for sl in sample_slices(a[sp.name], int(block_bytes))]
        identity = dict(a.identity())
        identity["archive"] = str(identity.get("archive", a.path))
        writer = TableWriter(folder, identity, head_similarity)
        accs = {sp.name: StatsAccumulator() for sp in specs}
        total = sum(
            int(np.prod(a[sp.name].shape[1:])) * (sl.stop - sl.start) * a[sp.name].dtype.itemsize
            for sp, sl in jobs
        )
        runner = (
            _run_dask(a, jobs, scheduler) if scheduler is not None else _run_local(a, jobs, workers)
        )
        try:
            with _progress(total, progress) as bar:
                for spec, res in runner:
                    writer.write(spec, res)
                    accs[spec.name].add_partial(*res["stats"])
                    bar.update(res["nbytes"])
            paths = writer.commit()
        except BaseException:
            writer.abort()
            raise
        stats_doc = entries_from_accumulators({nm: (accs[nm], a[nm]) for nm in names})
        paths["statistics"] = write_statistics(stats_doc, STATISTICS_JSON, folder)
        manifest = {
            "identity": identity,
            "tables": {k: v.name for k, v in paths.items()},
            "options": {
                "topk": int(topk),
                "sink_token": int(sink_token),
                "arrays": names,
                "heads": None if heads is None else [int(x) for x in heads],
                "head_similarity": head_similarity,
                "row_stats": row_stats,
                "sparse_approximate": bool(getattr(a, "mode", "dense") == "sparse"),
                "causal": {sp.name: sp.causal for sp in specs},
                # arrays captured with a row policy: head statistics pool these rows only
                "query_rows": {
                    sp.name: list(sp.query_rows) for sp in specs if sp.query_rows is not None
                },
            },
        }
        paths["manifest"] = folder.write_text(MANIFEST, json.dumps(manifest, indent=2) + "\n")
        return paths

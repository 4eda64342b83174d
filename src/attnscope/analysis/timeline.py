"""Episode timelines: how the attention mass of a query group on each key modality evolves
over the steps of an episode, per array (stack, layer, kind) and head.

Needs per-sample ``episode`` and ``step`` ids (:data:`attnscope.contracts.EPISODE_ID`,
:data:`~attnscope.contracts.STEP_ID`, stored with ``ArchiveWriter.append(sample_ids=...)``
or ``capture(sample_ids=...)``). Reads the archive block by block (out of core) and writes
the ``timeline`` table (columns: ``contracts.TABLE_COLUMNS["timeline"]``,
``docs/analysis-tables.md``). Never imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from attnscope.analysis.blocks import iter_array_blocks, query_rows
from attnscope.analysis.tables import TableWriter, _const, _lookup, split_mean_head
from attnscope.contracts import (
    AVERAGE_HEAD,
    EPISODE_ID,
    HEAD_INDEX,
    KIND_AXES,
    MEAN_HEAD_TABLES,
    STEP_ID,
)
from attnscope.errors import ConfigError, SelectionError
from attnscope.store import check_structure, open_archive
from attnscope.store.layout import SideLayout

__all__ = ["TIMELINE", "has_episodes", "timeline", "timeline_mass"]

TIMELINE = "timeline"
#: bytes of float32 attention analysed at once
BLOCK_BYTES = 64 << 20


class _TimelineWriter(TableWriter):
    """The tables writer (``.partial`` files, final names on commit), timeline only."""

    def tables(self) -> list[str]:
        return [TIMELINE, MEAN_HEAD_TABLES[TIMELINE]]

    def write_table(self, table: pa.Table) -> None:
        for name, rows in split_mean_head(TIMELINE, table).items():
            self._writer(name).write_table(rows.replace_schema_metadata(
                self._schemas[name].metadata))


def has_episodes(archive: Any) -> bool:
    """Whether the archive stores ``episode`` and ``step`` ids per sample."""
    ids = archive.sample_ids
    return EPISODE_ID in ids and STEP_ID in ids


def timeline_mass(block: np.ndarray, query_weights: np.ndarray, segments: SideLayout) -> np.ndarray:
    """Mass of the weighted query rows on each key segment.

    Parameters
    ----------
    block : (n, H, T, S) attention
    query_weights : (n, T) weight of each query row (rows of the group, each sample's
        weights summing to 1: the mean over the group's real rows)
    segments : the key side's layout (S tokens)

    Returns
    -------
    (n, H, n_segments) float64
    """
    mass = np.einsum("nhts,nt->nhs", block.astype(np.float64), query_weights)
    ind = np.zeros((segments.length, len(segments.segments)))
    for j, seg in enumerate(segments.segments):
        ind[seg.start : seg.stop, j] = 1.0
    return mass @ ind


def timeline(
    archive_or_path: Any,
    out_dir: str | os.PathLike,
    *,
    query: str | Sequence[int] = "all",
    arrays: Iterable[str] | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> Path:
    """Write ``<out_dir>/timeline.parquet``; return its path.

    One row per (array, sample, head incl. the head mean ``-1``, key segment): the mass the
    query group's real rows put on that segment, averaged over those rows (a row's masses
    over the key segments sum to 1 for softmax rows), with the sample's episode and step.
    In ragged archives a sample whose query group is entirely padding has no rows.

    Parameters
    ----------
    archive_or_path
        An archive with ``episode`` and ``step`` sample ids.
    query
        The query group: a segment name, ``"all"`` (default), ``"last"`` (each sample's last
        real token) or token indices. Arrays whose query side lacks a named segment are
        skipped.
    arrays
        Array names or prefixes (``"decoder"``, ``"decoder/2"``); default all.

    Examples
    --------
    >>> timeline("run.zarr", "tables", query="robot0_eef_pos_past_traj")  # doctest: +SKIP
    PosixPath('tables/timeline.parquet')
    """
    with open_archive(archive_or_path) as arc:
        check_structure(arc)
        if not has_episodes(arc):
            raise ConfigError(
                f"timeline needs per-sample {EPISODE_ID!r} and {STEP_ID!r} ids; the archive has "
                f"{sorted(arc.sample_ids)} (pass sample_ids={{'{EPISODE_ID}': ..., "
                f"'{STEP_ID}': ...}} when capturing)"
            )
        ids = arc.sample_ids
        episode = np.asarray(ids[EPISODE_ID]).astype(np.int64)
        step = np.asarray(ids[STEP_ID]).astype(np.int64)
        names = _select(arc, query, arrays)
        w = _TimelineWriter(out_dir, arc.identity(), None)  # a local folder or a URL
        try:
            for name in names:
                for table in _array_tables(arc, name, query, episode, step, w, block_bytes):
                    w.write_table(table)
            return w.commit()[TIMELINE]
        except BaseException:
            w.abort()
            raise


def _select(arc: Any, query: Any, arrays: Iterable[str] | None) -> list[str]:
    names = sorted(arc.arrays)
    if arrays is not None:
        want = [arrays] if isinstance(arrays, str) else list(arrays)
        names = [n for n in names if any(n == p or n.startswith(p.rstrip("/") + "/") for p in want)]
        if not names:
            raise SelectionError(
                f"arrays {want} match no array; expected among {sorted(arc.arrays)}"
            )
    if isinstance(query, str) and query not in ("all", "last"):
        names = [n for n in names if _has_segment(arc, n, query)]
        if not names:
            raise SelectionError(
                f"query {query!r} is a segment of no array's query side; segments: "
                f"{ {s: [g.name for g in arc.layout.side(s).segments] for s in _sides(arc)} }"
            )
    return names


def _sides(arc: Any) -> list[str]:
    return [s for s in ("encoder", "decoder") if getattr(arc.layout, s) is not None]


def _has_segment(arc: Any, name: str, seg: str) -> bool:
    a = arc.attention(name)
    q = KIND_AXES[(a.stack, a.kind)][0]
    return seg in {s.name for s in arc.layout.side(q).segments}


def _array_tables(
    arc: Any,
    name: str,
    query: Any,
    episode: np.ndarray,
    step: np.ndarray,
    w: _TimelineWriter,
    block_bytes: int,
) -> Iterable[pa.Table]:
    arr = arc.attention(name)
    qside, kside = KIND_AXES[(arr.stack, arr.kind)]
    qlay, klay = arc.layout.side(qside), arc.layout.side(kside)
    seg_names = tuple(s.name for s in klay.segments)
    seg_kinds = tuple("" if s.group is None else s.group.kind for s in klay.segments)
    qname = (
        query
        if isinstance(query, str) and query not in ("all", "last")
        else (qlay.select(query)[1])
    )
    qlay.select(query)  # a bad query fails here; below, only "no real token" can
    kept = query_rows(arr)
    if kept is not None:  # a row policy: only the stored rows can be selected
        _check_kept(arc, name, qlay, query, kept)
    start = 0
    selected = False
    for block, cells in iter_array_blocks(arr, max_bytes=block_bytes):
        n, h = block.shape[:2]
        qreal = cells.any(axis=2) if cells is not None else np.ones(block.shape[::2], bool)
        if kept is not None:
            if _is(query, "last") and arc.ragged:
                _check_last(arc, name, qside, kept, start, n)
            qreal = np.zeros((n, qlay.length), bool)
            qreal[:, kept] = cells.any(axis=2) if cells is not None else True
        wq = np.zeros((n, qlay.length))
        keep = np.ones(n, dtype=bool)
        for i in range(n):
            try:
                rows = list(qlay.select(query, qreal[i])[0])
            except SelectionError:  # the group is all padding in this sample: no rows
                keep[i] = False
                continue
            wq[i, rows] = 1.0 / len(rows)
        samples = np.arange(start, start + n)[keep]
        start += n
        if not keep.any():
            continue
        selected = True
        wq = wq if kept is None else wq[:, kept]
        mass = timeline_mass(block[keep], wq[keep], klay)  # (n, H, n_seg)
        mass = np.concatenate([mass, mass.mean(axis=1, keepdims=True)], axis=1)
        heads = np.append(np.asarray(arr.heads, dtype=np.int64), AVERAGE_HEAD)  # model ids
        nseg = len(seg_names)
        n = len(samples)
        s_col = np.repeat(samples, (h + 1) * nseg)
        seg_col = np.tile(np.arange(nseg), n * (h + 1))
        cols = {
            "episode": pa.array(episode[s_col]),
            "step": pa.array(step[s_col]),
            "sample": pa.array(s_col.astype(np.int64)),
            HEAD_INDEX: pa.array(np.tile(np.repeat(heads, nseg), n).astype(np.int64)),
            "query_group": _const(qname, len(s_col), pa.string()),
            "key_segment": _lookup(seg_col, seg_names),
            "key_kind": _lookup(seg_col, seg_kinds),
            "mass": pa.array(mass.reshape(-1).astype(np.float32)),
        }
        yield _table(w, arr, cols, len(s_col))
    if kept is not None and start and not selected and not _is(query, "all"):
        # kept rows of the group that are padding everywhere ("all": as in full archives,
        # no rows, so that `attnscope analyze` still writes its tables)
        raise _not_kept(
            f"query {query!r} selects no real kept row in any sample of {name}", name, kept
        )


def _is(query: Any, word: str) -> bool:
    return isinstance(query, str) and query == word


def _not_kept(what: str, name: str, kept: np.ndarray) -> SelectionError:
    """The error of a query group that a row policy left without rows (as overlays word it)."""
    return SelectionError(
        f"{what}; {name} keeps only query rows {kept.tolist()} (a capture row policy)"
    )


def _check_kept(arc: Any, name: str, qlay: SideLayout, query: Any, kept: np.ndarray) -> None:
    """Refuse a query group naming no kept row, and ``"last"`` when the side's last token
    was not kept (ragged archives: checked per sample, :func:`_check_last`)."""
    if _is(query, "last"):
        last = qlay.length - 1
        if not arc.ragged and last not in set(kept.tolist()):
            raise _not_kept(f"query 'last' is token {last}, not a kept row", name, kept)
        return
    rows = qlay.select(query)[0]
    if not np.isin(rows, kept).any():
        what = f"query {query!r}" + (f" (tokens {list(rows)})" if isinstance(query, str) else "")
        raise _not_kept(f"{what} selects no kept row", name, kept)


def _check_last(arc: Any, name: str, qside: str, kept: np.ndarray, start: int, n: int) -> None:
    """Refuse ``"last"`` when a sample's last real token (ragged archives) was not kept."""
    real = np.asarray(arc.masks(qside, slice(start, start + n)), dtype=bool)
    rows = set(kept.tolist())
    for i, m in enumerate(real):
        pos = np.flatnonzero(m)
        if len(pos) and int(pos[-1]) not in rows:
            what = f"query 'last' is token {int(pos[-1])} of sample {start + i}, not a kept row"
            raise _not_kept(what, name, kept)


def _table(w: _TimelineWriter, arr: Any, cols: dict[str, pa.Array], n: int) -> pa.Table:
    schema = w._schemas[TIMELINE]
    data = {
        "archive_fingerprint": _const(str(w.identity.get("fingerprint")), n, pa.string()),
        "stack": _const(arr.stack, n, pa.string()),
        "layer": pa.array(np.full(n, arr.layer, dtype=np.int32)),
        "kind": _const(arr.kind, n, pa.string()),
        **cols,
    }
    return pa.Table.from_arrays([data[f.name].cast(f.type) for f in schema], schema=schema)

"""``ArchiveWriter``: create or resume an archive and append committed batches."""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from attnscope.contracts import FORMATS, SAMPLE_IDS
from attnscope.errors import ArchiveError, ConfigError, ShapeError
from attnscope.store.backends.base import ArrayHandle, Backend, MiB, Write
from attnscope.store.backends.location import locate
from attnscope.store.backends.lock import locks_inside
from attnscope.store.batch import BatchRules, Prepared
from attnscope.store.commitlog import LogState, Region, attrs_digest, new_record
from attnscope.store.frames import FrameStore
from attnscope.store.ids import id_array, read_ids
from attnscope.store.layout import TokenLayout
from attnscope.store.meta import (
    MAIN,
    archive_format,
    check_meta,
    committed_prefix,
    damage_is_corruption,
    open_backend,
    refuse_existing_at,
    root_meta,
    sniff_format,
)
from attnscope.store.names import (
    flatten_weights,
    sort_key,
    stored_names,
)
from attnscope.store.nodes import Node, check_range_fits, create_node
from attnscope.store.pipeline import (
    INFLIGHT_MB,
    PendingBatch,
    WritePipeline,
    coalesce,
    data_writes,
    run_options,
)
from attnscope.store.spec import ArchiveSpec, resolve_spec
from attnscope.store.stream import BatchStream
from attnscope.store.tokens import SideRules, SideStore

__all__ = ["ArchiveWriter"]


class ArchiveWriter:
    """Append attention batches to an archive; a context manager.

    Create a new archive with :meth:`create`, or resume one with :meth:`open`. Each
    :meth:`append` writes one batch in place and then advances the committed count;
    nothing of a batch is visible to readers before that, and earlier batches are never
    held in memory.

    Examples
    --------
    >>> layout = TokenLayout(encoder=SideLayout.from_lengths({"text": 5}))  # doctest: +SKIP
    >>> with ArchiveWriter.create("run.zarr", layout) as w:                   # doctest: +SKIP
    ...     w.append({"encoder/0/self_attention": weights})  # (B, H, S, S)
    """

    def __init__(self, workers: int | None = None, inflight_mb: float | None = None) -> None:
        # use create() / open()
        self._backend: Backend | None = None
        self._lease: Any = None
        self._closed = False
        self._workers = workers
        self._pipe = WritePipeline(self._write_group, int((inflight_mb or INFLIGHT_MB) * MiB))
        # a whole-archive writer of an archive that no commit record covers a sample of:
        # nodes on disk are debris of a killed first batch, replaced when met
        self._fresh = False
        self._ids_committed = True  # False: no sample committed, id arrays are not "earlier"

    # -- construction -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        layout: TokenLayout,
        spec: ArchiveSpec | None = None,
        *,
        overwrite: bool = False,
        **options: Any,
    ) -> ArchiveWriter:
        """Create a new archive and return a writer holding its lock.

        Parameters
        ----------
        path
            Directory (Zarr, default), ``*.zarr.zip`` (Zarr zip, not crash-safe),
            ``*.h5`` / ``*.hdf5`` (HDF5), or an fsspec URL of a Zarr archive
            (``s3://bucket/run.zarr``; see ``docs/archive-format.md``).
        layout
            Token layout of both sides; fixes ``T`` and ``S`` of every array.
        spec
            The archive's options as one :class:`ArchiveSpec` (format, dtype, compressor,
            validation, sparse top-k, capacity, arrays created up front, chunk policy,
            metadata; see its fields). Keywords of the same names override its fields.
        overwrite
            Replace an existing archive at ``path`` (never anything that is not one).
        **options
            Any :class:`ArchiveSpec` field by name, e.g. ``dtype="bfloat16"``,
            ``compressor="none"``, ``sparse_topk=8``, ``batch_size=32``; an unknown name
            raises ConfigError listing the valid ones.

        Returns
        -------
        ArchiveWriter
        """
        path = locate(path)
        run = run_options(options)
        fmt = archive_format(path, options.get("format", spec.format if spec else None))
        spec = resolve_spec(spec, options, fmt)
        meta = root_meta(spec, layout, fmt)
        inside = locks_inside(path, fmt)
        refuse_existing_at(path, inside, overwrite)
        self = cls(**run)
        self._fresh = True
        self._lease = self._hold(path.lease(None, inside=inside))
        try:
            path.clear_except_locks()
            self._backend = open_backend(path, fmt, "w", root_meta=meta, workers=self._workers)
            self._backend.write_commit(MAIN, new_record(0, 0, 0))
            self._init(path, fmt, meta, layout, start=0, stop=None, rid=MAIN, count=0,
                       record=new_record(0, 0, 0))  # fmt: skip
            for name, hts in (spec.arrays or {}).items():
                if len(hts) != 3:
                    raise ShapeError(f"arrays[{name!r}] must be (H, T, S), got {hts!r}")
                create_node(self, name, *map(int, hts), n=int(spec.capacity or 0))
            self._record_arrays()
            self._backend.flush()
            self._backend.publish()
        except BaseException:
            if self._backend is not None:
                self._backend.close()
            path.clear_except_locks()  # no half-created archive left behind (the lock is ours)
            self._lease.release()
            raise
        return self

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        mode: str = "a",
        *,
        sample_range: tuple[int, int] | None = None,
        format: str | None = None,
        workers: int | None = None,
        inflight_mb: float | None = None,
    ) -> ArchiveWriter:
        """Reopen an archive to append after its committed samples.

        Parameters
        ----------
        path
            An existing archive.
        mode
            Only ``"a"`` (append) is supported; use :meth:`create` for a new archive.
        sample_range
            ``(start, stop)``: write only samples ``[start, stop)``, concurrently with
            other writers of disjoint ranges (Zarr only; needs ``capacity`` and arrays
            created up front). A range writer resumes after its own committed samples.
        format
            Override format detection.
        workers, inflight_mb
            Encoder threads and the bound on batch data in flight (see :meth:`create`).
        """
        path = locate(path)
        if mode != "a":
            raise ConfigError(f"ArchiveWriter.open mode must be 'a', got {mode!r}; use create()")
        fmt = format or sniff_format(path)
        if fmt not in FORMATS:
            raise ConfigError(f"unknown format {fmt!r}; expected one of {FORMATS}")
        inside = locks_inside(path, fmt)
        if sample_range is not None:
            sample_range = cls._check_range_arg(path, fmt, inside, sample_range)
        self = cls(**run_options({"workers": workers, "inflight_mb": inflight_mb}))
        self._lease = self._hold(path.lease(sample_range, inside=inside))
        try:
            self._backend = open_backend(path, fmt, "a", workers=self._workers)
            with damage_is_corruption(path):
                self._resume(path, fmt, sample_range)
        except BaseException:
            self._lease.release()
            if self._backend is not None:
                self._backend.close()
            raise
        return self

    @classmethod
    def open_or_create(
        cls, path: str | os.PathLike, layout: TokenLayout, spec: ArchiveSpec | None = None,
        **options: Any,
    ) -> ArchiveWriter:
        """Resume the archive at ``path`` (:meth:`open`), or :meth:`create` it when there
        is none: nothing at ``path``, or only the lock folder of a writer that stopped
        before its first commit (an empty archive). What ``resume`` means for capture.
        """
        path = locate(path)
        if path.exists() and not path.holds_no_data():
            run = run_options(dict(options))
            return cls.open(path, format=options.get("format", spec.format if spec else None),
                            **run)  # fmt: skip
        return cls.create(path, layout, spec, **options)

    @staticmethod
    def _check_range_arg(path: str, fmt: str, inside: bool, rng: Any) -> tuple[int, int]:
        if fmt != "zarr" or not inside:
            raise ConfigError(
                f"sample_range writers need a Zarr directory archive; {path!r} is {fmt}"
                f"{' zip' if fmt == 'zarr' else ''} (one HDF5 file has one writer)"
            )
        a, b = (int(x) for x in rng)
        if not 0 <= a < b:
            raise ConfigError(f"sample_range must satisfy 0 <= start < stop, got {rng!r}")
        return a, b

    def _resume(self, path: str, fmt: str, sample_range: tuple[int, int] | None) -> None:
        assert self._backend is not None
        meta = self._backend.read_root_meta()
        layout = check_meta(meta, path)
        records = self._backend.read_records()
        commits = {r: (x["start"], x["stop"], x["committed"]) for r, x in records.items()}
        if not any(c > 0 for _a, _b, c in commits.values()):
            # Nodes of a first batch that never committed are debris: its sample-id arrays
            # are not "earlier" keys, and a whole-archive writer replaces what it finds
            # (removes the ids: the next batch defines the keys; recreates arrays).
            self._ids_committed = False
            if sample_range is None:
                self._backend.delete(SAMPLE_IDS)
                self._fresh = True
        if sample_range is None:
            n = committed_prefix(commits)
            rng = [(a, b, c) for rid, (a, b, c) in commits.items() if rid != MAIN and c > 0]
            skip = [(a, a + c) for a, _b, c in rng]  # range-written: not in our label blob
            rec = records.get(MAIN) or new_record(0, 0, 0)
            self._init(path, fmt, meta, layout, start=0, stop=None, rid=MAIN, count=n, others=skip,
                       record=rec)  # fmt: skip
            # Samples a range writer committed past the prefix are not ours to overwrite.
            self._limit = min([(a, b) for a, b, _c in rng if a >= n], default=None)
            return
        a, b = sample_range
        rid = f"range-{a}-{b}"
        count = commits.get(rid, (a, b, 0))[2]
        main = commits.get(MAIN, (0, 0, 0))
        if main[2] > a:
            raise ConfigError(
                f"sample_range {sample_range} overlaps the {main[2]} samples already "
                f"committed by the main writer"
            )
        for other, (oa, ob, oc) in commits.items():
            if other not in (rid, MAIN) and oc > 0 and oa < b and a < ob:
                raise ConfigError(
                    f"sample_range {sample_range} overlaps committed range [{oa}, {ob})"
                )
        rec = records.get(rid) or new_record(a, b, 0)
        self._init(path, fmt, meta, layout, start=a, stop=b, rid=rid, count=count, record=rec)
        for node in self._nodes.values():
            check_range_fits(self, node)

    def _init(self, path, fmt, meta, layout, *, start, stop, rid, count, others=(), record) -> None:  # type: ignore[no-untyped-def]
        self.path = path
        self._pipe.inline = fmt == "hdf5"  # see WritePipeline
        self._log = LogState.resume(record, start + count, fmt)
        self._durable = count
        self.format = fmt
        self._meta = meta
        self.layout = layout
        self._rules = BatchRules(layout, meta)
        self._sides = SideRules(layout, meta)
        self._start = start
        self._stop = stop
        self._rid = rid
        self._count = count
        self._limit: tuple[int, int] | None = None  # (start, stop) of the next range record
        self._nodes: dict[str, Node] = {}
        self._id_keys: list[str] | None = None
        self._id_handles: dict[str, ArrayHandle] = {}
        # (array name, part) -> (first sample, copy of samples [first, committed)) of the
        # last partly filled chunk this writer wrote; see _data_writes().
        self._tails: dict[tuple[str, str], tuple[int, np.ndarray]] = {}
        self._load_existing()
        assert self._backend is not None
        self._side_store = SideStore(self._backend, fmt, meta, rid)
        self._side_store.resume(start, count, others)
        self._frames = FrameStore(self._backend, meta)

    def _load_existing(self) -> None:
        b = self._backend
        assert b is not None
        for name in stored_names(b):
            attrs = b.get_attrs(name)
            h, t, s = (int(x) for x in attrs["hts"])
            node = Node(name, h, t, s, list(attrs.get("heads", range(h))))
            for part in self._parts():
                node.handles[part] = b.get_array(f"{name}/{part}" if part else name)
            self._nodes[name] = node
        # keys of the ids committed so far (None: nothing committed yet, see _resume)
        self._id_keys = (b.list_children(SAMPLE_IDS) or None) if self._ids_committed else None

    def _parts(self) -> list[str]:
        return ["values", "indices", "residual"] if self._rules.sparse else [""]

    @property
    def committed(self) -> int:
        """Samples durably committed by this writer (whole archive, or within its
        sample_range); batches handed to :meth:`submit` count once their commit is written."""
        return self._durable

    @property
    def sample_range(self) -> tuple[int, int] | None:
        return None if self._stop is None else (self._start, self._stop)

    # -- append -------------------------------------------------------------------------
    def append(
        self,
        weights: Mapping[str, Any],
        *,
        sample_ids: Mapping[str, Any] | None = None,
        masks: Mapping[str, Any] | None = None,
        tokens: Mapping[str, Mapping[str, Any]] | None = None,
        frames: Mapping[str, Any] | None = None,
    ) -> int:
        """Write one batch and commit it.

        Parameters
        ----------
        weights
            Either the model's nested dict ``{"encoder": [{"self_attention": (B, H, S, S)},
            ...], "decoder": [{"self_attention": (B, H, T, T), "cross_attention":
            (B, H, T, S)}, ...]}`` (``None`` entries = not captured) or a flat dict
            ``{"encoder/0/self_attention": (B, H, S, S), ...}``. Values are numpy arrays
            or torch tensors; in sparse mode also ``{"values": (B, H, T, k),
            "indices": (B, H, T, k)}`` dicts of precomputed top-k.
        sample_ids
            Optional per-sample ids, e.g. ``{"episode": (B,), "step": (B,)}`` (numeric).
        masks
            Ragged archives (``max_lengths``): side -> ``(B, L_b)`` bool, True = real
            token (any pattern: left or right padding), ``L_b`` this batch's length on
            that side (``<=`` the maximum). The weights' T/S are this batch's lengths;
            they are padded to the maximum, and every padded query row and key column is
            stored as zeros. Default: the batch's ``L_b`` tokens are real, the rest is
            padding.
        tokens
            side -> ``{"labels": B lists of L_b str, "ids": (B, L_b) int}`` (either key
            optional), stored per sample; every batch must carry the same fields.
        frames
            camera -> ``(B, h, w, 3)`` uint8, committed with the batch (``_frames/<camera>``).

        Returns
        -------
        int
            The new committed count (see :attr:`committed`).
        """
        self.submit(weights, sample_ids=sample_ids, masks=masks, tokens=tokens, frames=frames)
        self.flush()
        return self._durable

    def submit(
        self,
        weights: Mapping[str, Any],
        *,
        sample_ids: Mapping[str, Any] | None = None,
        masks: Mapping[str, Any] | None = None,
        tokens: Mapping[str, Mapping[str, Any]] | None = None,
        frames: Mapping[str, Any] | None = None,
    ) -> None:
        """Check one batch and hand it to the write pipeline; :meth:`append` without the wait.

        Everything :meth:`append` refuses is refused here, before anything is written.
        The batch is written and committed in the background, in order, together with
        the batches queued beside it (:mod:`~attnscope.store.pipeline`); blocks while the
        data in flight would exceed ``inflight_mb``. The arrays must not be modified until
        :meth:`flush` returns. A write error is raised by the next ``submit``, ``flush``
        or ``close``; :attr:`committed` counts what is durable.
        """
        if self._closed:
            raise ArchiveError(f"writer of {self.path!r} is closed")
        if self._pipe.failed is not None:
            raise self._pipe.failed
        items = flatten_weights(weights)
        if not items:
            raise ShapeError("append() got no attention arrays (all entries None or empty dict)")
        side = self._sides.prepare(items, masks, tokens, committed=self._count)
        self._side_store.check(side, self._count)
        later = bool(self._count or self._start)
        prepared, bsz = self._rules.prepare(
            side.items,
            {n: (x.h, x.t, x.s) for n, x in self._nodes.items()},
            first_sample=self._start + self._count,
            complete=later,
            range_writer=self._stop is not None,
            rows=side.rows,
        )
        ids = BatchRules.prepare_ids(sample_ids, bsz, self._id_keys, later=later)
        frm = self._frames.prepare(frames, bsz, self._count)
        # Everything is validated; from here on only writes happen.
        pos = self._start + self._count
        end = pos + bsz
        self._check_fits(pos, end)
        self._ensure_nodes(prepared, end)
        # Every box of the batch goes to the backend in one call (Zarr writes them
        # concurrently, HDF5 in one pass); the commit record follows only after it returned.
        writes, tails = data_writes(self._nodes, self._tails, prepared, pos, end)
        self._finish(side, ids, frm, pos, end, writes, tails)

    def flush(self) -> int:
        """Wait until every submitted batch is committed; returns :attr:`committed`."""
        self._pipe.wait()
        return self._durable

    def stream(self, batch_size: int, masks: Mapping[str, Any] | None = None) -> BatchStream:
        """A batch written in blocks of query rows (:class:`~.stream.BatchStream`): ``put``
        each block as it is computed, then ``commit``; ``masks`` for a ragged archive."""
        if self._closed:
            raise ArchiveError(f"writer of {self.path!r} is closed")
        self.flush()  # its blocks are written at once: after every queued batch
        return BatchStream(self, batch_size, masks)

    def _check_fits(self, pos: int, end: int) -> None:
        """A batch of samples ``[pos, end)`` must fit this writer's range and limit."""
        bsz = end - pos
        if self._stop is not None and end > self._stop:
            raise ShapeError(f"batch of {bsz} samples does not fit sample_range [{self._start}, "
                             f"{self._stop}): {self._stop - pos} slots left")  # fmt: skip
        if self._limit is not None and end > self._limit[0]:
            ra, rb = self._limit
            raise ConfigError(
                f"batch of {bsz} samples at {pos}..{end - 1} would overwrite samples "
                f"{ra}..{end - 1} committed by sample_range [{ra}, {rb}); "
                f"{ra - pos} slots left before it"
            )

    def _finish(
        self, side: Any, ids: dict[str, np.ndarray], frm: Any, pos: int, end: int,
        writes: list[Write], tails: dict[tuple[str, str], tuple[int, np.ndarray] | None],
        written: Sequence[Region] = (),
    ) -> None:  # fmt: skip
        """Queue the batch's boxes with its side data; the pipeline writes and commits them.

        ``written``: digests of boxes this batch already wrote (a :class:`BatchStream`).
        """
        writes = writes + self._id_writes(ids, pos, end)
        hint = math.gcd(*(h.chunks[0] for x in self._nodes.values() for h in x.handles.values()))
        writes += self._side_store.writes(side, pos, end, hint or 1) + self._frames.writes(
            frm, pos, end)
        for key, tail in tails.items():
            if tail is None:
                self._tails.pop(key, None)
            else:
                self._tails[key] = tail
        self._count += end - pos
        nbytes = sum(int(d.nbytes) for _h, _s, d in writes)
        self._pipe.put(PendingBatch(pos, end, writes, nbytes, list(written)))

    def _write_group(self, group: list[PendingBatch]) -> None:
        """Write the boxes of queued batches, then one log document and one commit record
        (runs in the pipeline's committer thread, one group at a time)."""
        b = self._backend
        assert b is not None
        writes = coalesce([w for batch in group for w in batch.writes])
        if self._lease is not None:
            self._lease.check()  # a lease deleted or taken over: write nothing more
        try:
            regions = self._log.regions(writes)
            b.write_many(writes)
        except BaseException:
            self._tails.clear()  # unknown state on disk: fall back to read-modify-write
            raise
        for batch in group:
            regions.extend(batch.extra_regions)
        pos, end = group[0].pos, group[-1].end
        stop = self._stop if self._stop is not None else end
        attrs = {n: attrs_digest(b.get_attrs(n)) for n in self._log.new_attrs(self._nodes)}
        rec = self._log.commit(b, self._rid, self._start, stop, pos, end, regions, attrs)
        b.write_commit(self._rid, rec)
        self._durable = end - self._start

    def _ensure_nodes(self, prepared: Prepared, end: int) -> None:
        """Create the arrays this batch brings first, and grow every array to ``end``."""
        b = self._backend
        assert b is not None
        new = [name for name in prepared if name not in self._nodes]
        # Without a declared batch_size, a single writer's first batch stands in for it
        # when it is a power of two (then chunks hold whole batches and no append re-encodes
        # a half-filled chunk); any other size would cut chunks to gcd(n, batch) samples.
        first = end - self._start if self._count == 0 and self._stop is None else None
        if first is not None and first & (first - 1):
            first = None
        for name in new:
            n = max(end, int(self._meta.get("capacity") or 0))
            create_node(self, name, *prepared[name]["_hts"], n=n, batch=first)
        if new:
            self._record_arrays()
        grow: list[tuple[ArrayHandle, int]] = []
        for name in prepared:
            for handle in self._nodes[name].handles.values():
                if handle.shape[0] < end:
                    # Grow geometrically, in whole chunks: each resize rewrites array
                    # metadata, which costs more than the data of a small batch.
                    cs = handle.chunks[0]
                    n = max(end, 2 * handle.shape[0])
                    grow.append((handle, -(-n // cs) * cs))
        if grow:
            b.resize_many(grow)

    def _id_writes(self, ids: dict[str, np.ndarray], pos: int, end: int) -> list[Write]:
        b = self._backend
        assert b is not None
        writes: list[Write] = []
        cap = int(self._meta.get("capacity") or 0)
        for key, arr in ids.items():
            h = self._id_handles.get(key)
            if h is None:
                hint = math.gcd(*(x.chunks[0] for n in self._nodes.values()
                                  for x in n.handles.values()))  # fmt: skip
                h = id_array(b, key, arr.dtype, cap, hint, shared=self._stop is not None)
                self._id_handles[key] = h
                self._id_keys = sorted(set(self._id_keys or []) | {key})
            if h.shape[0] < end:
                h.resize(max(end, 2 * h.shape[0]))
            writes.append((h, (slice(pos, end),), arr))
        return writes

    def committed_ids(self, keys: list[str] | tuple[str, ...]) -> dict[str, np.ndarray] | None:
        """The ids ``keys`` of this writer's committed samples (``[start, start + committed)``
        of its range, or of the archive), or None when one of them is not stored."""
        assert self._backend is not None
        return read_ids(self._backend, keys, self._start, self._count)

    def _record_arrays(self) -> None:
        """List every array in the root metadata, so a deleted one is noticed by verify."""
        assert self._backend is not None
        names = sorted(self._nodes, key=sort_key)
        if self._meta.get("arrays") != names:
            self._meta["arrays"] = names
            self._backend.write_root_meta(self._meta)

    # -- closing ------------------------------------------------------------------------
    def _hold(self, lease: Any) -> Any:
        """Acquire ``lease``; it is also released if this writer is dropped unclosed."""
        lease.acquire()
        weakref.finalize(self, lease.release)
        return lease

    def close(self) -> None:
        """Release the lock and close the store; safe to call more than once."""
        self._closed = True
        try:
            self._pipe.close()
            if self._backend is not None:
                backend, self._backend = self._backend, None
                try:
                    backend.flush()
                finally:
                    backend.close()
        finally:
            if self._lease is not None:
                self._lease.release()
        if self._pipe.failed is not None and not self._pipe.raised:
            self._pipe.raised = True
            raise self._pipe.failed

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"ArchiveWriter({self.path!r}, format={self.format!r}, "
            f"committed={self._durable}, {state})"
        )

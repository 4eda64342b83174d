"""Reading archives: ``open_archive``, ``AttentionArchive`` and lazy ``AttentionArray``s.

Every read of committed samples is checked: a chunk that is missing (Zarr would read it
as zeros) or fails to decode or to match its checksum raises ArchiveCorruptError naming
the array and the chunk, never a silently wrong number.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from attnscope.contracts import (
    FORMATS,
    KIND_AXES,
    MAX_LENGTHS,
    QUERY_ROWS,
    SAMPLE_IDS,
    STACKS,
    TOKEN_IDS,
    TOKEN_LABEL_SPANS,
    TOKEN_LABELS,
    TOKEN_MASK,
)
from attnscope.errors import ArchiveCorruptError, ConfigError, InputError, SelectionError
from attnscope.store import _display, views
from attnscope.store.backends.base import ArrayHandle, MiB
from attnscope.store.backends.location import locate
from attnscope.store.catalog import ArrayNames, HeadMap, KindMap, LayerMap, has_key, resolve_key
from attnscope.store.codecs import decode, read_dtype
from attnscope.store.commitlog import DigestIndex
from attnscope.store.frames import frame_cameras, frame_handle
from attnscope.store.indexing import norm_index
from attnscope.store.layout import SideLayout, TokenLayout
from attnscope.store.meta import (
    MAIN,
    check_meta,
    committed_prefix,
    damage_is_corruption,
    open_backend,
    sniff_format,
)
from attnscope.store.names import parse_array_name, stored_names
from attnscope.store.tokens import decode_labels, side_path

__all__ = ["AttentionArchive", "AttentionArray", "open_archive"]


def checked_read(archive: AttentionArchive, handle: ArrayHandle, box: tuple[slice, ...]) -> Any:
    """Read a box of committed data, refusing chunks that are missing from storage."""
    gone = handle.missing_in(box)
    if gone:
        raise ArchiveCorruptError(
            f"{archive.path!r}: array {handle.name!r} chunk {gone[0]} is missing although "
            f"its samples are committed ({len(gone)} missing in this read); the archive is "
            "damaged (run 'attnscope verify')"
        )
    data = handle.read(box)
    if archive._digests is not None:
        archive._digests.check(handle.name, box, np.asarray(data))
    return data


class AttentionArray:
    """Lazy view of one stored attention array, shape ``(N, H, T, S)`` (committed N).

    Indexing reads only the chunks the selection touches and returns numpy. Sparse
    arrays are returned densely (zeros where a weight was not kept).
    """

    def __init__(self, archive: AttentionArchive, name: str) -> None:
        self.archive = archive
        self.name = name
        self.stack, self.layer, self.kind = parse_array_name(name)
        b = archive._backend
        attrs = b.get_attrs(name)
        try:
            h, t, s = (int(x) for x in attrs["hts"])
        except (KeyError, TypeError, ValueError) as e:
            raise ArchiveCorruptError(f"{name}: array attributes lack (H, T, S): {attrs!r}") from e
        self._hts = (h, t, s)
        self.heads: list[int] = [int(x) for x in attrs.get("heads", range(h))]
        rows = attrs.get(QUERY_ROWS)
        #: original query rows stored, ascending ``(T,)`` int64 (a capture row policy); None:
        #: every row (archives written before policies read so)
        self.query_rows: np.ndarray | None = (
            None if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        )
        if self.query_rows is not None and len(self.query_rows) != t:
            raise ArchiveCorruptError(
                f"{name}: {len(self.query_rows)} query_rows but the array holds {t} rows"
            )
        self.is_sparse = archive.mode == "sparse"
        self._ldtype = archive.dtype
        parts = ["values", "indices", "residual"] if self.is_sparse else [""]
        self._parts = {p: b.get_array(f"{name}/{p}" if p else name) for p in parts}
        self._main = self._parts["values" if self.is_sparse else ""]
        if not self.is_sparse and tuple(self._main.shape[1:]) != (h, t, s):
            raise ArchiveCorruptError(
                f"{name}: stored shape {self._main.shape} disagrees with its (H, T, S) {(h, t, s)}"
            )
        n = archive.n_samples
        for handle in self._parts.values():
            if handle.shape[0] < n:
                raise ArchiveCorruptError(
                    f"{handle.name}: holds {handle.shape[0]} samples but {n} are committed "
                    "(truncated, or the commit record claims more than was written)"
                )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.archive.n_samples, *self._hts)

    @property
    def dtype(self) -> np.dtype:
        return read_dtype(self._ldtype)

    @property
    def chunks(self) -> tuple[int, ...]:
        c = tuple(self._main.chunks)
        return (*c[:3], self._hts[2]) if self.is_sparse else c

    @property
    def ndim(self) -> int:
        return 4

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (
            f"AttentionArray({self.name!r}, shape={self.shape}, dtype={self.dtype}, "
            f"chunks={self.chunks})"
        )

    def _repr_html_(self) -> str:  # notebooks: the interactive viewer (store/_display.py)
        return _display.array_html(self)

    # -- storage (what verify and info look at) -------------------------------------------
    def stored_lengths(self) -> dict[str, int]:
        """Storage array path -> samples allocated (>= the committed count when intact)."""
        return {h.name: int(h.shape[0]) for h in self._parts.values()}

    def chunk_keys(self) -> dict[str, list[tuple[int, ...]]]:
        """Storage array path -> sorted indices of the chunks present in storage."""
        return {h.name: sorted(h.stored_chunks()) for h in self._parts.values()}

    def missing_chunks(self) -> dict[str, list[tuple[int, ...]]]:
        """Storage array path -> chunks inside the committed samples that are not stored."""
        n = self.archive.n_samples
        out = {}
        for h in self._parts.values():
            box = (slice(0, min(n, h.shape[0])), *(slice(0, d) for d in h.shape[1:]))
            out[h.name] = h.missing_in(box)
        return out

    def storage_chunks(self) -> dict[str, tuple[int, ...]]:
        """Storage array path -> its chunk shape."""
        return {h.name: tuple(h.chunks) for h in self._parts.values()}

    def stored_nbytes(self) -> int | None:
        """Bytes on disk of all parts, if the backend knows them cheaply."""
        total: int | None = 0
        for h in self._parts.values():
            got = h.stored_nbytes()
            total = None if got is None or total is None else total + got
        return total

    # -- reading --------------------------------------------------------------------------
    def _read_box(self, box: tuple[slice, ...]) -> np.ndarray:
        if not self.is_sparse:
            return decode(checked_read(self.archive, self._main, box), self._ldtype)
        vals, idx, _ = self._read_sparse(box[:3])
        n, h, t, _k = vals.shape
        out = np.zeros((n, h, t, self._hts[2]), dtype=self.dtype)
        np.put_along_axis(out, idx.astype(np.intp), vals.astype(self.dtype), axis=-1)
        return out[..., box[3]]

    def _read_sparse(self, box3: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p = self._parts
        full = box3 + (slice(0, p["values"].shape[3]),)
        vals = decode(checked_read(self.archive, p["values"], full), self._ldtype)
        idx = checked_read(self.archive, p["indices"], full)
        return vals, idx, checked_read(self.archive, p["residual"], box3)

    def __getitem__(self, key: Any) -> np.ndarray:
        box, post = norm_index(key, self.shape)
        if any(s.stop <= s.start for s in box):
            block = np.zeros(tuple(max(0, s.stop - s.start) for s in box), dtype=self.dtype)
        else:
            block = self._read_box(box)
        return block[post]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)

    def iter_blocks(self, max_bytes: int = 64 * MiB) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield ``(sample_slice, block (n, H, T, S))`` covering all committed samples.

        Blocks are aligned to the storage chunks along the sample axis and hold at most
        ``max_bytes`` (but always at least one chunk of samples).
        """
        n = self.shape[0]
        cs = self.chunks[0]
        per = max(1, int(np.prod(self._hts)) * self.dtype.itemsize)
        step = max(cs, (max(1, int(max_bytes) // per) // cs) * cs)
        for a in range(0, n, step):
            sl = slice(a, min(n, a + step))
            yield sl, self[sl]

    def valid(self, sample: int) -> tuple[np.ndarray, np.ndarray]:
        """``(query mask (T,), key mask (S,))`` bool of one sample: True = real token.

        All True in archives without masks (every token real). An array keeping some
        query rows gets the mask of those rows.
        """
        qs, ks = KIND_AXES[(self.stack, self.kind)]
        qm = self.archive.masks(qs, int(sample))
        return (qm if self.query_rows is None else qm[self.query_rows]), self.archive.masks(
            ks, int(sample)
        )

    def query_index(self) -> np.ndarray:
        """Original query position of each stored row, ``(T,)`` int64 (``arange(T)`` when
        every row is stored)."""
        if self.query_rows is not None:
            return self.query_rows
        return np.arange(self._hts[1], dtype=np.int64)

    def topk_arrays(
        self, sample_slice: slice = slice(None)
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(values (n, H, T, k), indices (n, H, T, k), residual (n, H, T))`` of a sparse array."""
        if not self.is_sparse:
            raise SelectionError(f"{self.name} is dense; topk_arrays() needs a sparse archive")
        if not isinstance(sample_slice, slice):
            raise SelectionError(f"sample_slice must be a slice, got {sample_slice!r}")
        a, b, step = sample_slice.indices(self.shape[0])
        box = (slice(a, max(a, b)), slice(0, self._hts[0]), slice(0, self._hts[1]))
        v, i, r = self._read_sparse(box)
        return v[::step], i[::step], r[::step]


class AttentionArchive:
    """Read-only view of an archive; see :func:`open_archive`."""

    def __init__(self, path: str | os.PathLike, *, format: str | None = None) -> None:
        self.path = locate(path)
        with damage_is_corruption(self.path):
            self.format = format or sniff_format(self.path)
            if self.format not in FORMATS:
                raise ConfigError(f"unknown format {self.format!r}; expected one of {FORMATS}")
            self._backend = open_backend(self.path, self.format, "r")
            try:
                self._root = self._backend.read_root_meta()
                self.layout = check_meta(self._root, self.path)
                self._commits = self._backend.read_commits()
                self.n_samples = committed_prefix(self._commits)
                self._names = stored_names(self._backend)
            except BaseException:
                self._backend.close()
                raise
        self._cache: dict[str, AttentionArray] = {}
        self._side_handles: dict[str, ArrayHandle | None] = {}
        self._borrowed = False
        # reads check the commit log's digests (store/commitlog.py, DigestIndex)
        self._digests = DigestIndex(self.path, self._backend)

    def _borrow(self) -> AttentionArchive:
        # The same open archive (backend and caches shared) whose close() is a no-op: what
        # open_archive() returns for an archive it did not open.
        view = copy.copy(self)
        view._borrowed = True
        return view

    # -- metadata -----------------------------------------------------------------------
    @property
    def schema_version(self) -> int:
        return int(self._root["schema_version"])

    @property
    def dtype(self) -> str:
        return str(self._root["dtype"])

    @property
    def mode(self) -> str:
        return str(self._root.get("mode", "dense"))

    @property
    def topk(self) -> int | None:
        return self._root.get("topk")

    @property
    def commits(self) -> dict[str, tuple[int, int, int]]:
        """``{writer record id: (start, stop, committed)}`` as read when opened."""
        return dict(self._commits)

    @property
    def metadata(self) -> dict[str, Any]:
        """All root metadata plus ``n_samples`` and the per-writer ``commits`` records."""
        return {
            **json.loads(json.dumps(self._root)),
            "n_samples": self.n_samples,
            "commits": {k: list(v) for k, v in sorted(self._commits.items())},
        }

    def identity(self) -> dict[str, Any]:
        """Stable handle: path, schema version, committed count and a short fingerprint."""
        h = hashlib.sha256(json.dumps(self._root, sort_keys=True).encode())
        h.update(f"|{self.n_samples}".encode())
        return {
            "archive": str(self.path),  # absolute: tables checked from any cwd
            "schema_version": self.schema_version,
            "n_samples": self.n_samples,
            "fingerprint": h.hexdigest()[:16],
        }

    # -- arrays (the views and key grammar: store/catalog.py) -----------------------------
    @property
    def arrays(self) -> ArrayNames:
        """Stored array names, sorted by (stack, layer, kind): ``archive.arrays[0]``."""
        return ArrayNames(self._names)

    @property
    def layers(self) -> LayerMap:
        """Stack -> stored layer numbers: ``archive.layers["encoder"]`` -> ``(0, 1, 2)``."""
        return LayerMap(self._names)

    @property
    def kinds(self) -> KindMap:
        """``(stack, layer)`` -> stored kinds: ``archive.kinds["decoder", 0]``."""
        return KindMap(self._names)

    @property
    def heads(self) -> HeadMap:
        """Array -> original head numbers kept: ``archive.heads["encoder", 0]``."""
        return HeadMap(self)

    def missing_arrays(self) -> list[str]:
        """Arrays the root metadata lists that storage no longer holds (damage); none for
        archives written before the list was recorded."""
        return [n for n in self._root.get("arrays", []) if n not in self._names]

    def attention(
        self, stack: Any, layer: int | None = None, kind: str | None = None
    ) -> AttentionArray:
        """Lazy array of ``stack/layer/kind``, or of any key ``archive[...]`` takes (an
        array name, ``(stack, layer[, kind])``); the kind defaults when the layer holds one."""
        key = (stack, layer) if kind is None else (stack, layer, kind)
        key = stack if layer is None and kind is None else key
        if isinstance(key, str) and key in self.missing_arrays():
            raise ArchiveCorruptError(f"{self.path!r}: array {key!r} is listed in the root "
                                      "metadata but missing from storage; the archive is damaged")
        name = resolve_key(self._names, key)
        if name not in self._cache:
            with damage_is_corruption(self.path):
                self._cache[name] = AttentionArray(self, name)
        return self._cache[name]

    def query_rows(self, name: str) -> np.ndarray | None:
        """Original query rows array ``name`` stores (ascending int64); None: every row."""
        return self.attention(name).query_rows

    def __getitem__(self, key: Any) -> AttentionArray:
        """``a["encoder/0/self_attention"]``, ``a["encoder", 0]``, ``a["decoder", 0, "cross"]``."""
        return self.attention(key)

    def __contains__(self, key: object) -> bool:
        return has_key(self._names, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    @property
    def sample_ids(self) -> dict[str, np.ndarray]:
        """Per-sample ids of the committed samples, ``{key: (N,)}``; ``{}`` if none."""
        out = {}
        with damage_is_corruption(self.path):
            for key in self._backend.list_children(SAMPLE_IDS):
                h = self._backend.get_array(f"{SAMPLE_IDS}/{key}")
                n = min(self.n_samples, h.shape[0])
                out[key] = checked_read(self, h, (slice(0, n),))
        return out

    def frame(self, camera: str, sample: int) -> np.ndarray | None:
        """``(h, w, 3)`` uint8 frame of ``sample`` stored for ``camera`` (``_frames/<camera>``);
        None when the archive stores no frames of that camera."""
        with damage_is_corruption(self.path):
            if (h := frame_handle(self._backend, camera, sample, self.n_samples)) is None:
                return None
            box = (slice(sample, sample + 1), *(slice(0, d) for d in h.shape[1:]))
            return np.asarray(checked_read(self, h, box))[0]

    def cameras(self) -> list[str]:
        """Cameras whose frames are stored with the samples."""
        with damage_is_corruption(self.path):
            return frame_cameras(self._backend)

    # -- per-sample tokens (schema 2 masks; ids and labels in any archive) -----------------
    @property
    def ragged(self) -> bool:
        """Whether batches may be shorter than the layout (per-sample masks stored)."""
        return bool(self._root.get(MAX_LENGTHS))

    def _side_handle(self, side: str, part: str, rid: str | None = None) -> ArrayHandle | None:
        path = side_path(side, part, rid)
        if path not in self._side_handles:
            with damage_is_corruption(self.path):
                has = self._backend.has(path)
                self._side_handles[path] = self._backend.get_array(path) if has else None
        return self._side_handles[path]

    def _side_rows(self, side: str, part: str, box: slice) -> np.ndarray | None:
        """Committed rows ``box`` of a per-sample side array; None when not stored."""
        h = self._side_handle(side, part)
        if h is None:
            return None
        if h.shape[0] < min(box.stop, self.n_samples):
            raise ArchiveCorruptError(
                f"{self.path!r}: {h.name} holds {h.shape[0]} samples but {self.n_samples} are "
                "committed; the archive is damaged"
            )
        return checked_read(self, h, (box, *(slice(0, d) for d in h.shape[1:])))

    def masks(self, side: str, samples: int | slice = slice(None)) -> np.ndarray:
        """Real-token masks of one side: ``(n, L)`` bool for a slice, ``(L,)`` for an int.

        Archives without masks (schema 1, or not ragged) report every token real.
        """
        length = self.layout.side(side).length
        (box,), post = norm_index(samples, (self.n_samples,))
        got = self._side_rows(side, TOKEN_MASK, box)
        if got is None:
            if self.ragged and box.stop > box.start:
                raise ArchiveCorruptError(
                    f"{self.path!r}: ragged archive without {side_path(side, TOKEN_MASK)}; "
                    "the archive is damaged"
                )
            got = np.ones((box.stop - box.start, length), dtype=bool)
        return got.astype(bool, copy=False)[post]

    def lengths(self, side: str) -> np.ndarray:
        """``(N,)`` int64 number of real tokens of each sample on one side."""
        step = 1 << 16
        parts = [
            self.masks(side, slice(a, a + step)).sum(axis=1, dtype=np.int64)
            for a in range(0, self.n_samples, step)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _writer_of(self, i: int) -> str:
        # A range record covers exactly what its writer wrote; the main record's count may
        # include range-written samples below it, so range records take precedence.
        records = sorted(self._commits.items(), key=lambda kv: kv[0] == MAIN)
        for rid, (start, _stop, c) in records:
            if start <= i < start + c:
                return rid
        raise ArchiveCorruptError(f"{self.path!r}: no commit record covers sample {i}")

    def labels(self, side: str, samples: slice = slice(None)) -> list[list[str]] | None:
        """Each sample's token labels on one side (padded with ``""`` to the side's
        length); None when the archive stores no labels for that side."""
        length = self.layout.side(side).length
        (box,), post = norm_index(samples, (self.n_samples,))
        spans = self._side_rows(side, TOKEN_LABEL_SPANS, box)
        if spans is None:
            return None
        out: list[list[str]] = [[] for _ in range(len(spans))]
        by_writer: dict[str, list[int]] = {}
        for j in range(len(spans)):
            by_writer.setdefault(self._writer_of(box.start + j), []).append(j)
        for rid, js in by_writer.items():
            h = self._side_handle(side, TOKEN_LABELS, rid)
            lo, hi = int(spans[js, 0].min()), int(spans[js, 1].max())
            if h is None or not 0 <= lo <= hi <= h.shape[0]:
                raise ArchiveCorruptError(
                    f"{self.path!r}: labels of {side} samples point outside "
                    f"{side_path(side, TOKEN_LABELS, rid)}; the archive is damaged"
                )
            blob = checked_read(self, h, (slice(lo, hi),)).tobytes() if hi > lo else b""
            for j in js:
                a, b = int(spans[j, 0]) - lo, int(spans[j, 1]) - lo
                where = f"{self.path!r}: {side} sample {box.start + j}"
                out[j] = decode_labels(blob[a:b], length, where)
        return out[post[0]]

    def tokens(self, side: str, sample: int) -> tuple[list[str] | None, np.ndarray | None]:
        """``(labels, ids)`` of one sample on one side (``(L,)``, padded with ``""`` / -1
        where the writer padded the batch); each None when not stored."""
        (box,), _post = norm_index(int(sample), (self.n_samples,))
        labels = self.labels(side, box)
        ids = self._side_rows(side, TOKEN_IDS, box)
        return (
            None if labels is None else labels[0],
            None if ids is None else ids[0].astype(np.int64, copy=False),
        )

    def sample_layout(self, sample: int) -> TokenLayout:
        """The archive's layout with one sample's own token labels where they were stored."""
        sides: dict[str, SideLayout | None] = {}
        for side in STACKS:
            lay = getattr(self.layout, side)
            labels = None if lay is None else self.tokens(side, sample)[0]
            sides[side] = lay if labels is None else SideLayout(lay.segments, tuple(labels))
        return TokenLayout(**sides)

    def token_fields(self) -> dict[str, list[str]]:
        """side -> per-sample token data stored (``mask``, ``ids``, ``labels``)."""
        out = {}
        for side in STACKS:
            got = [
                name
                for name, part in (
                    (TOKEN_MASK, TOKEN_MASK),
                    (TOKEN_IDS, TOKEN_IDS),
                    (TOKEN_LABELS, TOKEN_LABEL_SPANS),
                )
                if self._side_handle(side, part) is not None
            ]
            if got:
                out[side] = got
        return out

    # -- out of core --------------------------------------------------------------------
    def to_dask(self, key: Any) -> Any:
        """Dask array ``(N, H, T, S)`` of ``archive[key]``, chunked like storage ([dask] extra)."""
        return views.to_dask(self, key)

    def to_xarray(self, stack: str | None = None, kind: str | None = None, *,
                  masked: bool = True) -> Any:
        """Lazy ``xarray.Dataset`` of one (stack, kind), all layers along ``layer``: see
        :func:`attnscope.store.views.to_xarray`; needs ``attnscope[dask]``."""
        return views.to_xarray(self, stack, kind, masked=masked)

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Close the archive, unless it was passed into :func:`open_archive` by its owner."""
        if not self._borrowed:
            self._backend.close()

    def __enter__(self) -> AttentionArchive:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"AttentionArchive({self.path!r}, format={self.format!r}, n_samples={self.n_samples}, "
            f"arrays={len(self._names)}, dtype={self.dtype!r}, mode={self.mode!r})"
        )

    def _repr_html_(self) -> str:  # notebooks: a summary table (store/_display.py)
        return _display.archive_html(self)


def open_archive(
    path: str | os.PathLike | AttentionArchive, *, format: str | None = None
) -> AttentionArchive:
    """Open an archive read-only: the one way in for every stage.

    Used as a context manager it closes only what it opened (as xarray's
    ``open_dataset``): given an already open :class:`AttentionArchive` it returns a view of
    it whose ``close()`` leaves the caller's archive open.

    Parameters
    ----------
    path
        Zarr directory / zip or HDF5 file written by :class:`ArchiveWriter`, a Zarr
        archive's fsspec URL (``s3://bucket/run.zarr``), or an open :class:`AttentionArchive`.
    format
        ``"zarr"`` or ``"hdf5"``; sniffed from the path when omitted.

    Returns
    -------
    AttentionArchive

    Raises
    ------
    ArchiveNotFoundError
        Nothing at ``path``.
    ArchiveCorruptError
        Not an attnscope archive, or one too damaged to open.

    Examples
    --------
    >>> with open_archive("run.zarr") as a:                        # doctest: +SKIP
    ...     w = a.attention("encoder", 0, "self_attention")[0, 3]  # (T, S) of sample 0 head 3
    """
    if isinstance(path, AttentionArchive):
        return path._borrow()
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(
            f"expected an archive path or an AttentionArchive, got {type(path).__name__}"
        )
    return AttentionArchive(path, format=format)

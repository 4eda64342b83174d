"""Small backend interface shared by the Zarr and HDF5 stores, plus format-independent policy.

A backend knows how to keep named n-dimensional arrays, one JSON document of root
metadata, small JSON attributes per array, and per-writer commit records. Everything
attention-specific (layouts, validation, sparse reconstruction) lives in
:mod:`attnscope.store.writer` and :mod:`attnscope.store.reader`, so both formats behave identically.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from itertools import product
from typing import Any

import numpy as np

from attnscope.contracts import COMPRESSORS
from attnscope.errors import ArchiveCorruptError, ConfigError

__all__ = [
    "Backend",
    "parse_record",
    "ArrayHandle",
    "choose_chunks",
    "chunk_grid",
    "chunk_ranges",
    "COMPRESSORS",
    "MiB",
]

MiB = 1 << 20


# Chunk sizing (see docs/archive-format.md): aim for ~1 MiB of uncompressed data per chunk,
# never more than 4 MiB, and keep one (sample, head) matrix (or a block of its rows) per
# chunk whenever a matrix is big enough to be worth a request of its own.
TARGET_CHUNK = 1 * MiB
MAX_CHUNK = 4 * MiB
MIN_HEAD_CHUNK = 256 * 1024
MAX_CHUNK_SAMPLES = 256


def choose_chunks(
    h: int,
    t: int,
    s: int,
    itemsize: int,
    *,
    chunk_samples: int | None = None,
    batch_size: int | None = None,
    query_block: int | None = None,
) -> tuple[int, int, int, int]:
    """Default chunk shape ``(n, h, t, s)`` for an attention array of ``(N, H, T, S)``.

    * one head matrix >= 4 MiB: blocks of rows of one head, ~1 MiB each;
    * one head matrix >= 256 KiB: one whole (sample, head) matrix per chunk;
    * smaller: all heads of a sample together, and several samples per chunk (a power of
      two, at most 256) to reach ~1 MiB — per-chunk overhead dominates tiny chunks.

    ``chunk_samples`` forces the sample extent (e.g. ``1`` so that any disjoint sample
    ranges of concurrent writers are chunk-aligned). Otherwise ``batch_size`` (appends
    come in batches of this size) cuts the sample extent to divide it, so that no chunk
    straddles two appends and is compressed twice. ``query_block`` (writes come in
    blocks of this many query rows, :class:`~attnscope.store.stream.BatchStream`) cuts a
    row-blocked chunk to ``block / ceil(block / rows)`` rows, so each block fills whole
    chunks.
    """
    m = t * s * itemsize
    if m > MAX_CHUNK:
        rows = max(1, min(t, TARGET_CHUNK // max(1, s * itemsize)))
        if query_block:
            qb = min(int(query_block), t)
            rows = -(-qb // -(-qb // rows))  # ceil(qb / ceil(qb / rows))
        shape = [1, 1, rows, s]
    elif m >= MIN_HEAD_CHUNK:
        shape = [1, 1, t, s]
    else:
        hc = min(h, max(1, MAX_CHUNK // m))
        if hc < h:
            shape = [1, hc, t, s]
        else:
            per = h * m
            n = max(1, TARGET_CHUNK // per)
            n = min(MAX_CHUNK_SAMPLES, 1 << (int(n).bit_length() - 1))
            shape = [n, h, t, s]
    if chunk_samples is not None:
        if int(chunk_samples) < 1:
            raise ConfigError(f"chunk_samples must be >= 1, got {chunk_samples}")
        shape[0] = int(chunk_samples)
    elif batch_size:
        shape[0] = math.gcd(shape[0], int(batch_size))
    return tuple(shape)  # type: ignore[return-value]


def chunk_grid(shape: Sequence[int], chunks: Sequence[int]) -> tuple[int, ...]:
    """Number of chunks along each dimension."""
    return tuple(math.ceil(n / c) if n else 0 for n, c in zip(shape, chunks))


def chunk_ranges(sel: Sequence[slice], chunks: Sequence[int]) -> list[range]:
    """Chunk indices along each dimension that a box of step-1 slices touches."""
    return [
        range(s.start // c, (s.stop - 1) // c + 1) if s.stop > s.start else range(0)
        for s, c in zip(sel, chunks)
    ]


def parse_record(path: str, rid: str, raw: Any) -> dict[str, Any]:
    """A commit record as stored -> ``{"start", "stop", "committed", ...}`` (ints).

    A record that has no content yet (a writer killed while an older version created
    its group) commits nothing: ``main`` -> 0 samples from 0, ``range-a-b`` -> 0 from a.
    """
    if raw is None:
        if rid == "main":
            return {"start": 0, "stop": 0, "committed": 0}
        parts = rid.split("-")
        if len(parts) == 3 and parts[0] == "range" and parts[1].isdigit() and parts[2].isdigit():
            return {"start": int(parts[1]), "stop": int(parts[2]), "committed": 0}
        raise ArchiveCorruptError(f"commit record {rid!r} in {path!r} is unreadable")
    try:
        if isinstance(raw, dict):
            rec = dict(raw)
            for k in ("start", "stop", "committed", "batches", "since"):
                if k in rec:
                    rec[k] = int(rec[k])
            for k in ("start", "stop", "committed"):
                rec[k] = int(raw[k])
            return rec
        a, b, c = (int(x) for x in raw)
        return {"start": a, "stop": b, "committed": c}
    except (KeyError, TypeError, ValueError) as e:
        raise ArchiveCorruptError(f"commit record {rid!r} in {path!r} is malformed: {raw!r}") from e


class ArrayHandle(abc.ABC):
    """One stored n-d array. Selections are tuples of ``slice`` with step 1, one per dim."""

    name: str  # path of the array inside the archive, e.g. "a/0/b"
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    # Whether the writer should merge a partly filled chunk in memory (ArchiveWriter keeps
    # its own tail samples) rather than let the backend read-modify-write it. False
    # where a partial write is cheap anyway (HDF5 without a filter: its chunk cache).
    merge_tails: bool = True

    archive: str  # path of the archive holding it (for messages)

    def read(self, sel: tuple[slice, ...]) -> np.ndarray:
        """Read a box; only the chunks it touches are read.

        A chunk that is not stored reads as the fill value (use :meth:`missing_in` first
        where that would be damage); one that fails to decode or to match its checksum
        raises ArchiveCorruptError naming the array and the chunk.
        """
        try:
            return self._read(sel)
        except ArchiveCorruptError:
            raise
        except Exception as e:  # noqa: BLE001 - a codec (checksum, decompression) failed
            raise self._damage(sel, e) from e

    @abc.abstractmethod
    def _read(self, sel: tuple[slice, ...]) -> np.ndarray:
        """Read a box through the format library (errors are located by :meth:`read`)."""

    def _damage(self, sel: tuple[slice, ...], err: Exception) -> ArchiveCorruptError:
        """Read chunk by chunk to name the first one of a failed box that fails to decode."""
        for idx in product(*chunk_ranges(sel, self.chunks)):
            box = tuple(
                slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, self.chunks, self.shape)
            )
            try:
                self._read(box)
            except Exception as e:  # noqa: BLE001
                err, where = e, f"chunk {idx} does not decode (checksum or compression error: "
                break
        else:
            where = "cannot be read ("
        msg = (str(err).splitlines() or [type(err).__name__])[0][:200]
        return ArchiveCorruptError(
            f"{self.archive!r}: array {self.name!r} {where}{msg}); the archive is damaged "
            "(run 'attnscope verify')"
        )

    @abc.abstractmethod
    def stored_chunks(self) -> frozenset[tuple[int, ...]]:
        """Indices of the chunks present in storage: listed once per handle, then cached."""

    def missing_in(self, sel: tuple[slice, ...]) -> list[tuple[int, ...]]:
        """Chunks a box touches that are not stored (uses :meth:`stored_chunks`)."""
        have = self.stored_chunks()
        return [idx for idx in product(*chunk_ranges(sel, self.chunks)) if idx not in have]

    @abc.abstractmethod
    def write(self, sel: tuple[slice, ...], data: np.ndarray) -> None:
        """Write a box."""

    @abc.abstractmethod
    def resize(self, n: int) -> None:
        """Set the extent of the first (sample) dimension."""

    @abc.abstractmethod
    def stored_nbytes(self) -> int | None:
        """Bytes the array occupies in storage, if cheaply known."""


# One box to write: (array, selection, data).
Write = tuple[ArrayHandle, tuple[slice, ...], np.ndarray]


class Backend(abc.ABC):
    """A container of arrays plus JSON metadata; one per open archive."""

    format: str
    path: str
    writable: bool
    # Incremented by every chunk read through read(); tests use it to prove lazy reads.
    chunk_reads: int = 0

    @abc.abstractmethod
    def read_root_meta(self) -> dict[str, Any]:
        """The root JSON metadata; raises ArchiveCorruptError if absent or unreadable."""

    @abc.abstractmethod
    def write_root_meta(self, meta: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def has(self, path: str) -> bool: ...

    @abc.abstractmethod
    def create_array(
        self,
        path: str,
        shape: tuple[int, ...],
        chunks: tuple[int, ...],
        dtype: np.dtype,
        *,
        dims: tuple[str, ...],
        attrs: dict[str, Any] | None = None,
        compressor: str = "zstd",
        level: int | None = None,
        overwrite: bool = False,
    ) -> ArrayHandle:
        """A new array; ``overwrite`` replaces one already at ``path``."""

    @abc.abstractmethod
    def get_array(self, path: str) -> ArrayHandle: ...

    @abc.abstractmethod
    def get_attrs(self, path: str) -> dict[str, Any]:
        """JSON attributes of a node (array or group)."""

    @abc.abstractmethod
    def set_attrs(self, path: str, attrs: dict[str, Any], *, group: bool = False) -> None:
        """Set JSON attributes of a node, creating a group at ``path`` when ``group``."""

    def delete(self, path: str) -> None:
        """Remove the array or group at ``path`` (and everything under it)."""
        raise NotImplementedError(f"{type(self).__name__} cannot delete {path!r}")

    @abc.abstractmethod
    def list_children(self, path: str) -> list[str]:
        """Sorted names of the arrays and groups directly under ``path`` ([] if absent)."""

    def read_commits(self) -> dict[str, tuple[int, int, int]]:
        """``{record id: (start, stop, committed)}`` of every writer that ever committed."""
        return {r: (x["start"], x["stop"], x["committed"]) for r, x in self.read_records().items()}

    @abc.abstractmethod
    def read_records(self) -> dict[str, dict[str, Any]]:
        """``{record id: record}``: ``start``, ``stop``, ``committed`` and, for archives with a
        commit log (:mod:`.commitlog`), ``batches``, ``chain``, ``since``."""

    @abc.abstractmethod
    def write_commit(self, rid: str, record: dict[str, Any]) -> None:
        """Durably replace the commit record ``rid`` (one atomic write)."""

    @abc.abstractmethod
    def write_log(self, rid: str, seq: int, doc: dict[str, Any]) -> None:
        """Write log document ``seq`` of writer ``rid`` (before its commit record names it)."""

    @abc.abstractmethod
    def read_log(self, rid: str, seq: int) -> dict[str, Any] | None:
        """Log document ``seq`` of writer ``rid``, or None when absent or unreadable."""

    def missing_chunks(self, path: str, n: int) -> list[tuple[int, ...]]:
        """Chunk indices of array ``path`` inside samples ``[0, n)`` that are not stored."""
        arr = self.get_array(path)
        sel = (slice(0, min(n, arr.shape[0])), *(slice(0, d) for d in arr.shape[1:]))
        return arr.missing_in(sel)

    def resize_many(self, sizes: Sequence[tuple[ArrayHandle, int]]) -> None:
        """Set the sample extent of several arrays (backends may do it concurrently)."""
        for handle, n in sizes:
            handle.resize(n)

    def write_many(self, writes: Sequence[Write]) -> None:
        """Write boxes into several arrays (one batch); backends may overlap the work.

        Returns only when every box is written; nothing here is a commit.
        """
        for handle, sel, data in writes:
            handle.write(sel, data)

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Make everything written so far durable (HDF5: H5Fflush)."""

    def publish(self) -> None:  # noqa: B027 - optional hook
        """A new archive is complete: make it visible at its path (HDF5: rename the file
        written beside it; Zarr needs nothing, its root metadata is one atomic write)."""

    @abc.abstractmethod
    def close(self) -> None: ...

"""Direct chunk writes into a Zarr v3 ``LocalStore`` array, bypassing zarr's codec pipeline.

For an array whose codec chain is ``bytes`` (little-endian), optionally ``zstd``,
optionally ``crc32c`` (what the Zarr backend creates for "none" and "zstd"), each chunk
is assembled, encoded with the same numcodecs ``Zstd(level, checksum)`` that zarr's
``ZstdCodec`` uses (read from the array's metadata), followed by its crc32c as zarr's
``Crc32cCodec`` writes it, and written to the file named by the array's own chunk key
encoding, atomically (temporary file in the same directory + ``os.replace``, as
``LocalStore`` does; no fsync, also as ``LocalStore``). The backend runs these writes in
a thread pool (numcodecs and file writes release the GIL). A chunk a box covers only
partly is read, decoded and merged first (read-modify-write, as zarr does); a missing
chunk reads as the fill value. Every chunk is written, even an all-fill one. Other codecs
(blosc), other stores (``ZipStore``) and anything unexpected go through zarr.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator
from itertools import product
from typing import Any

import numpy as np

from attnscope.errors import ArchiveCorruptError
from attnscope.store.backends.base import chunk_ranges

__all__ = ["DirectChunks", "direct_plan"]

#: one chunk to write: (chunk index, data, where it goes in the chunk or None, merge)
ChunkJob = tuple[tuple[int, ...], np.ndarray, "tuple[slice, ...] | None", bool]


def _with_crc(blob: Any) -> bytes:
    """``blob`` followed by its crc32c, little-endian: what zarr's Crc32cCodec writes."""
    import google_crc32c

    return bytes(blob) + int(google_crc32c.value(bytes(blob))).to_bytes(4, "little")


def _strip_crc(raw: bytes) -> bytes:
    """Check and drop the trailing crc32c of a chunk (ValueError when it does not match)."""
    import google_crc32c

    body, stored = raw[:-4], raw[-4:]
    if len(raw) < 4 or int(google_crc32c.value(body)).to_bytes(4, "little") != stored:
        raise ValueError("crc32c checksum mismatch")
    return body


def _atomic_put(path: str, blob: Any) -> None:
    """Replace ``path`` by ``blob`` atomically (same scheme and tmp name as ``LocalStore``)."""
    tmp = f"{path}.{uuid.uuid4().hex}.partial"
    try:
        fh = open(tmp, "wb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fh = open(tmp, "wb")  # noqa: SIM115
    try:
        with fh:
            fh.write(blob)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


class DirectChunks:
    """How to write encoded chunks of one array straight into its ``LocalStore`` directory."""

    def __init__(
        self,
        root: str,
        key: Callable[[tuple[int, ...]], str],
        codec: Any,
        crc: bool,
        fill: Any,
        chunks: tuple[int, ...],
        dtype: np.dtype,
    ) -> None:
        self.root = root  # the array's directory
        self.key = key  # zarr's own chunk key encoding, e.g. (0, 1) -> "c/0/1"
        self.codec = codec  # numcodecs.Zstd, or None for the bare little-endian bytes codec
        self.crc = crc  # a crc32c checksum follows (archives written before it have none)
        self.fill = fill  # fill value as a numpy scalar of the array's dtype
        self.chunks = chunks
        self.dtype = dtype

    def encode(self, chunk: np.ndarray) -> Any:
        blob = chunk if self.codec is None else self.codec.encode(chunk)
        return _with_crc(blob) if self.crc else blob

    def decode(self, raw: bytes) -> Any:
        if self.crc:
            raw = _strip_crc(raw)
        return raw if self.codec is None else self.codec.decode(raw)

    def fits(self, shape: tuple[int, ...], sel: Any, data: Any) -> bool:
        """Whether this path can write the box exactly as ``zarr_array[sel] = data``."""
        if not isinstance(data, np.ndarray) or data.dtype != self.dtype:
            return False
        if not isinstance(sel, tuple) or len(sel) != len(shape) or data.ndim != len(shape):
            return False
        for s, n, d in zip(sel, shape, data.shape):
            if not isinstance(s, slice) or s.step not in (None, 1):
                return False
            if not (isinstance(s.start, int) and isinstance(s.stop, int)):
                return False
            if not 0 <= s.start <= s.stop <= n or s.stop - s.start != d:
                return False
        return True

    def jobs(
        self, shape: tuple[int, ...], sel: tuple[slice, ...], data: np.ndarray
    ) -> Iterator[ChunkJob]:
        """``(coords, part, dst, merge)`` for every chunk a box touches.

        ``dst`` None: ``part`` is the whole chunk. Otherwise ``part`` goes to ``dst`` of a
        chunk that starts as the stored chunk (``merge``: the box covers only part of
        the chunk's in-bounds region) or as the fill value (an edge chunk covered whole).
        """
        for idx in product(*chunk_ranges(sel, self.chunks)):
            covered, edge = True, False
            src, dst = [], []
            for i, c, s, n in zip(idx, self.chunks, sel, shape):
                c0, c1 = i * c, min((i + 1) * c, n)
                lo, hi = max(s.start, c0), min(s.stop, c1)
                covered &= lo == c0 and hi == c1
                edge |= c1 - c0 != c
                src.append(slice(lo - s.start, hi - s.start))
                dst.append(slice(lo - c0, hi - c0))
            part = data[tuple(src)]
            if covered and not edge:
                yield idx, part, None, False
            else:
                yield idx, part, tuple(dst), not covered

    def store(
        self, idx: tuple[int, ...], part: np.ndarray, dst: tuple[slice, ...] | None, merge: bool
    ) -> None:
        """Assemble, encode and atomically write one chunk (runs in a worker thread)."""
        path = os.path.join(self.root, self.key(idx))
        if dst is None:
            chunk = np.ascontiguousarray(part)
        else:
            chunk = self._load(path) if merge else None
            if chunk is None:
                chunk = np.full(self.chunks, self.fill, dtype=self.dtype)
            chunk[dst] = part
        _atomic_put(path, self.encode(chunk))

    def _load(self, path: str) -> np.ndarray | None:
        """The stored chunk as a writable array, or None where it does not exist."""
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return None
        n = int(np.prod(self.chunks)) * self.dtype.itemsize
        try:
            buf = self.decode(raw)
            if len(buf) != n:
                raise ValueError(f"{len(buf)} bytes decoded, {n} expected")
        except Exception as e:  # noqa: BLE001 - any codec failure is damage
            raise ArchiveCorruptError(f"chunk {path!r} does not decode: {e}") from e
        return np.frombuffer(buf, dtype=self.dtype).reshape(self.chunks).copy()


def direct_plan(arr: Any, base: Any, dtype: np.dtype) -> DirectChunks | None:
    """A :class:`DirectChunks` when its chunks can be encoded exactly as zarr would.

    Only a ``LocalStore``, zarr v3, a regular chunk grid, C order, no storage transformers,
    a native little-endian fixed-size dtype, and the codec chain ``bytes``, optionally
    ``zstd``, optionally ``crc32c``; anything else returns None (zarr's own write path).
    """
    try:
        import numcodecs
        from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
        from zarr.core.chunk_grids import RegularChunkGrid
        from zarr.storage import LocalStore

        md = arr.metadata
        if not isinstance(base, LocalStore) or sys.byteorder != "little":
            return None
        if md.zarr_format != 3 or not isinstance(md.chunk_grid, RegularChunkGrid):
            return None
        if getattr(md, "storage_transformers", ()) or arr._async_array.config.order != "C":
            return None
        if dtype.hasobject or dtype.itemsize == 0 or dtype.byteorder not in "=<|":
            return None
        codecs = tuple(md.codecs)
        if not codecs or type(codecs[0]) is not BytesCodec:
            return None
        endian = codecs[0].endian
        if endian is not None and getattr(endian, "value", endian) != "little":
            return None
        crc = type(codecs[-1]) is Crc32cCodec
        rest = codecs[1:-1] if crc else codecs[1:]
        if not rest:
            codec = None
        elif len(rest) == 1 and type(rest[0]) is ZstdCodec:
            codec = numcodecs.Zstd(level=int(rest[0].level), checksum=bool(rest[0].checksum))
        else:
            return None
        fill = np.asarray(md.fill_value, dtype=dtype)[()]
        root = os.path.join(str(base.root), *arr.path.split("/"))
        chunks = tuple(arr.chunks)
        return DirectChunks(root, md.encode_chunk_key, codec, crc, fill, chunks, dtype)
    except Exception:  # noqa: BLE001 - anything unexpected: let zarr write
        return None

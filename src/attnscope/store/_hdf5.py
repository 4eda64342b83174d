"""HDF5 backend (``.h5`` / ``.hdf5``), imported lazily: h5py loads only when used.

Compressed arrays are written and read chunk by chunk with ``write_direct_chunk`` /
``read_direct_chunk`` and numcodecs, so no HDF5 filter plugin is needed here; the
datasets carry the registered filter ids (zstd 32015, blosc 32001), so any HDF5 tool
with ``hdf5plugin`` installed reads them too. Uncompressed arrays use plain h5py I/O.
Chunks are encoded in a small thread pool (numcodecs releases the GIL while compressing)
while the calling thread hands finished blobs to ``write_direct_chunk`` in order, so
encoding of one chunk overlaps the write of the previous one (h5py itself stays
single-threaded). The blobs are plain zstd frames (with content size), exactly what the
registered zstd filter 32015 (``hdf5plugin.Zstd``) decodes.

Crash safety: the file is flushed after each batch's data and again after its commit
record (a tiny int64 dataset written in place, never resized). Files use the default
(earliest) format, which has no "file open for write" superblock flag, so a killed
writer leaves a file that still opens at its last flush.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from typing import Any

import numpy as np

from attnscope.errors import ArchiveCorruptError, ArchiveNotFoundError, ConfigError
from attnscope.store._base import ArrayHandle, Backend, MiB, Write, chunk_grid

__all__ = ["HDF5Backend"]

ROOT_KEY = "attnscope"
COMMITS = "_commits"
ZSTD_ID = 32015
BLOSC_ID = 32001
# Encoder threads for compressed chunks: one per core, at most 4 (MEASURED.md: 2 threads
# took zstd-1 direct-chunk writes from ~330 to ~630 MB/s on the 2-core machine).
ENCODE_THREADS = max(1, min(4, os.cpu_count() or 1))


def _codec(name: str) -> tuple[Any, dict[str, Any]]:
    """``(numcodecs codec or None, create_dataset kwargs)`` for a compressor name."""
    import numcodecs

    if name == "none":
        return None, {}
    if name == "zstd":
        return numcodecs.Zstd(level=1), {"compression": ZSTD_ID, "compression_opts": (1,)}
    if name in ("blosc-zstd", "blosc-lz4"):
        cname = name.split("-")[1]
        codec = numcodecs.Blosc(cname=cname, clevel=1 if cname == "zstd" else 5, shuffle=1)
        code = {"lz4": 1, "zstd": 5}[cname]
        return codec, {
            "compression": BLOSC_ID,
            "compression_opts": (2, 2, 0, 0, codec.clevel, 1, code),
        }
    raise ConfigError(
        f"unknown compressor {name!r}; expected one of zstd, none, blosc-zstd, blosc-lz4"
    )


def _ranges(sel: tuple[slice, ...], chunks: tuple[int, ...]) -> list[range]:
    return [
        range(s.start // c, (s.stop - 1) // c + 1) if s.stop > s.start else range(0)
        for s, c in zip(sel, chunks)
    ]


class _H5Array(ArrayHandle):
    def __init__(self, ds: Any, backend: HDF5Backend) -> None:
        self._ds = ds
        self._b = backend
        self.chunks = tuple(ds.chunks)
        self.dtype = np.dtype(ds.dtype)
        comp = ds.attrs.get("attnscope_codec")
        self._codec = _codec(str(comp))[0] if comp is not None else None
        self.merge_tails = self._codec is not None

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return tuple(self._ds.shape)

    def read(self, sel: tuple[slice, ...]) -> np.ndarray:
        if self._codec is None:
            self._b.chunk_reads += int(np.prod([len(r) for r in _ranges(sel, self.chunks)]))
            return self._ds[sel]
        out = np.zeros(tuple(s.stop - s.start for s in sel), dtype=self.dtype)
        for idx in product(*_ranges(sel, self.chunks)):
            chunk = self._read_chunk(idx)
            if chunk is None:
                continue
            src, dst = [], []
            for i, c, s in zip(idx, self.chunks, sel):
                lo, hi = max(s.start, i * c), min(s.stop, (i + 1) * c)
                src.append(slice(lo - i * c, hi - i * c))
                dst.append(slice(lo - s.start, hi - s.start))
            out[tuple(dst)] = chunk[tuple(src)]
        return out

    def _read_chunk(self, idx: tuple[int, ...]) -> np.ndarray | None:
        offset = tuple(i * c for i, c in zip(idx, self.chunks))
        try:
            _mask, raw = self._ds.id.read_direct_chunk(offset)
        except RuntimeError as e:  # one call instead of a chunk-info query first
            if "not allocated" in str(e):
                return None  # never written: reads as zeros, like h5py's own reads
            raise
        self._b.chunk_reads += 1
        try:
            buf = self._codec.decode(raw)
        except Exception as e:  # noqa: BLE001 - any codec failure is damage
            raise ArchiveCorruptError(
                f"chunk {idx} of {self._ds.name!r} in {self._b.path!r} does not decode: {e}"
            ) from e
        return np.frombuffer(buf, dtype=self.dtype).reshape(self.chunks)

    def write(self, sel: tuple[slice, ...], data: np.ndarray) -> None:
        self._b.write_many([(self, sel, data)])

    def _chunks_of(
        self, sel: tuple[slice, ...], data: np.ndarray
    ) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        """``(chunk offset, full chunk array)`` for every chunk a box touches.

        A chunk the box covers only partly is read back and merged (read-modify-write).
        """
        shape = self.shape
        for idx in product(*_ranges(sel, self.chunks)):
            full = True
            src, dst = [], []
            for i, c, s, n in zip(idx, self.chunks, sel, shape):
                c0, c1 = i * c, min((i + 1) * c, n)
                lo, hi = max(s.start, c0), min(s.stop, c1)
                full &= lo == c0 and hi == c1
                src.append(slice(lo - s.start, hi - s.start))
                dst.append(slice(lo - c0, hi - c0))
            offset = tuple(i * c for i, c in zip(idx, self.chunks))
            part = data[tuple(src)]
            if full and part.shape == self.chunks:
                # Whole chunk inside the box: encode the caller's data without copying
                # when it is already contiguous.
                yield offset, np.ascontiguousarray(part)
                continue
            old = None if full else self._read_chunk(idx)
            chunk = np.zeros(self.chunks, self.dtype) if old is None else old.copy()
            chunk[tuple(dst)] = part
            yield offset, chunk

    def resize(self, n: int) -> None:
        self._ds.resize((n, *self._ds.shape[1:]))

    def stored_nbytes(self) -> int | None:
        try:
            return int(self._ds.id.get_storage_size())
        except Exception:  # noqa: BLE001
            return None

    def chunk_extents(self) -> list[tuple[tuple[int, ...], int | None, int]]:
        """``(offset, byte_offset, size)`` of every allocated chunk."""
        out = []
        for i in range(self._ds.id.get_num_chunks()):
            info = self._ds.id.get_chunk_info(i)
            out.append((tuple(info.chunk_offset), info.byte_offset, info.size))
        return out


class HDF5Backend(Backend):
    """One HDF5 file holding an attnscope archive."""

    format = "hdf5"

    def __init__(self, path: str, mode: str) -> None:
        import h5py

        self.path = str(path)
        self.writable = mode != "r"
        self.chunk_reads = 0
        self._pool: ThreadPoolExecutor | None = None
        if mode == "r" or mode == "a":
            if not os.path.exists(self.path):
                raise ArchiveNotFoundError(f"no archive at {self.path!r}")
            if os.path.isdir(self.path) or not h5py.is_hdf5(self.path):
                raise ArchiveCorruptError(f"{self.path!r} is not an HDF5 file")
        try:
            if mode == "r":
                self._f = h5py.File(self.path, "r", locking=False, rdcc_nbytes=16 * MiB)
            else:
                # HDF5's own flock is off on both sides: attnscope's lease excludes
                # writers, and readers must open a file while it is being written.
                self._f = h5py.File(
                    self.path, "w" if mode == "w" else "r+", locking=False, rdcc_nbytes=16 * MiB
                )
        except OSError as e:
            raise ArchiveCorruptError(
                f"{self.path!r} cannot be opened as HDF5 (truncated or damaged?): {e}"
            ) from e

    def read_root_meta(self) -> dict[str, Any]:
        raw = self._f.attrs.get(ROOT_KEY)
        if raw is None:
            raise ArchiveCorruptError(
                f"{self.path!r} is an HDF5 file but not an attnscope archive "
                f"(no {ROOT_KEY!r} root attribute)"
            )
        try:
            meta = json.loads(raw)
        except (TypeError, ValueError) as e:
            raise ArchiveCorruptError(
                f"root metadata of {self.path!r} is not valid JSON: {e}"
            ) from e
        if not isinstance(meta, dict):
            raise ArchiveCorruptError(f"root metadata of {self.path!r} is not a JSON object")
        return meta

    def write_root_meta(self, meta: dict[str, Any]) -> None:
        self._f.attrs[ROOT_KEY] = json.dumps(meta)

    def has(self, path: str) -> bool:
        return path in self._f

    def list_nodes(self) -> list[str]:
        out = []
        for stack in ("encoder", "decoder"):
            if stack not in self._f:
                continue
            for layer in self._f[stack]:
                for kind in self._f[stack][layer]:
                    out.append(f"{stack}/{layer}/{kind}")
        return out

    def list_children(self, path: str) -> list[str]:
        return sorted(self._f[path].keys()) if path in self._f else []

    def create_array(self, path, shape, chunks, dtype, *, dims, attrs=None, compressor="zstd"):  # type: ignore[no-untyped-def]
        codec, kw = _codec(compressor)
        ds = self._f.create_dataset(
            path,
            shape=shape,
            chunks=chunks,
            dtype=np.dtype(dtype),
            maxshape=(None, *shape[1:]),
            fillvalue=0,
            allow_unknown_filter=bool(kw),
            **kw,
        )
        if codec is not None:
            ds.attrs["attnscope_codec"] = compressor
        ds.attrs[ROOT_KEY] = json.dumps(attrs or {})
        ds.attrs["dimension_names"] = json.dumps(list(dims))
        return _H5Array(ds, self)

    def get_array(self, path: str) -> ArrayHandle:
        import h5py

        node = self._f[path]
        if not isinstance(node, h5py.Dataset):
            raise ArchiveCorruptError(f"{path!r} in {self.path!r} is a group, expected an array")
        return _H5Array(node, self)

    def get_attrs(self, path: str) -> dict[str, Any]:
        raw = self._f[path].attrs.get(ROOT_KEY)
        if raw is None:
            return {}
        try:
            got = json.loads(raw)
        except (TypeError, ValueError) as e:
            raise ArchiveCorruptError(f"attributes of {path!r} are not valid JSON: {e}") from e
        return got if isinstance(got, dict) else {}

    def set_attrs(self, path: str, attrs: dict[str, Any], *, group: bool = False) -> None:
        node = self._f.require_group(path) if group else self._f[path]
        node.attrs[ROOT_KEY] = json.dumps(attrs)

    def read_commits(self) -> dict[str, tuple[int, int, int]]:
        if COMMITS not in self._f:
            return {}
        out = {}
        for rid, ds in self._f[COMMITS].items():
            try:
                a, b, c = (int(x) for x in ds[()])
            except Exception as e:  # noqa: BLE001
                raise ArchiveCorruptError(
                    f"commit record {rid!r} in {self.path!r} is unreadable"
                ) from e
            out[rid] = (a, b, c)
        return out

    def write_commit(self, rid: str, start: int, stop: int, committed: int) -> None:
        # Data first, flushed; then the record, flushed: a kill between the two leaves the
        # previous record, so the torn batch stays invisible.
        self._f.flush()
        path = f"{COMMITS}/{rid}"
        rec = np.array([start, stop, committed], dtype=np.int64)
        if path in self._f:
            self._f[path][...] = rec
        else:
            self._f.create_dataset(path, data=rec)
        self._f.flush()

    def missing_chunks(self, path: str, n: int) -> list[tuple[int, ...]]:
        arr = self.get_array(path)
        assert isinstance(arr, _H5Array)
        shape = (min(n, arr.shape[0]), *arr.shape[1:])
        grid = chunk_grid(shape, arr.chunks)
        eof = os.path.getsize(self.path)
        present = {}
        for off, byte_off, size in arr.chunk_extents():
            present[tuple(o // c for o, c in zip(off, arr.chunks))] = (
                byte_off is not None and byte_off + size <= eof
            )
        return [idx for idx in product(*(range(g) for g in grid)) if not present.get(idx, False)]

    def flush(self) -> None:
        self._f.flush()

    def write_many(self, writes: Sequence[Write]) -> None:
        """Write boxes of several arrays; compressed chunks are encoded in a thread pool.

        The calling thread walks the chunks in order, submitting each to the pool, and
        writes encoded blobs with ``write_direct_chunk`` as they complete (in order), at
        most ``2 * ENCODE_THREADS`` chunks ahead so memory stays bounded.
        """
        jobs: list[tuple[_H5Array, tuple[slice, ...], np.ndarray]] = []
        for handle, sel, data in writes:
            assert isinstance(handle, _H5Array)
            data = np.ascontiguousarray(data, dtype=handle.dtype)
            if handle._codec is None:
                handle._ds[sel] = data
            else:
                jobs.append((handle, sel, data))
        if not jobs:
            return
        pool = self._encode_pool()
        if pool is None:
            for h, sel, data in jobs:
                for offset, chunk in h._chunks_of(sel, data):
                    h._ds.id.write_direct_chunk(offset, bytes(h._codec.encode(chunk)), 0)
            return
        ahead = 2 * ENCODE_THREADS
        pending: list[tuple[_H5Array, tuple[int, ...], Any]] = []

        def drain(keep: int) -> None:
            while len(pending) > keep:
                h, offset, fut = pending.pop(0)
                h._ds.id.write_direct_chunk(offset, bytes(fut.result()), 0)

        try:
            for h, sel, data in jobs:
                if any(p[0] is h for p in pending):
                    drain(0)  # a partly covered chunk must be read after its last write
                for offset, chunk in h._chunks_of(sel, data):
                    pending.append((h, offset, pool.submit(h._codec.encode, chunk)))
                    drain(ahead)
            drain(0)
        finally:
            for _h, _o, fut in pending:  # an error above: let no encode outlive the call
                fut.cancel()

    def _encode_pool(self) -> ThreadPoolExecutor | None:
        if ENCODE_THREADS < 2:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="attnscope-h5enc")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        try:
            if self._f.id.valid:
                self._f.close()
        except Exception:  # noqa: BLE001 - already closed
            pass

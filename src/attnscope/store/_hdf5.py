"""HDF5 backend (``.h5`` / ``.hdf5``), imported lazily: h5py loads only when used.

Chunks go through HDF5's own filter pipeline, with the standard filters that
``hdf5plugin`` registers (imported here): zstd (id 32015) or blosc (32001), then
Fletcher32 (on one-sample-per-chunk datasets only: the attention arrays and frames; see
``create_array``), so a flipped byte fails its checksum on read. Encoding and decoding happen
in C, and any HDF5 tool that loads the same plugins (``import hdf5plugin`` in Python,
``HDF5_PLUGIN_PATH=hdf5plugin.PLUGIN_PATH`` for HDFView/MATLAB) reads the files.
Archives written before Fletcher32 (whose chunks attnscope encoded itself, marked by an
``attnscope_codec`` attribute) declare the same filter ids and read the same way.

Crash safety: a new file is written as ``<path>.attnscope-creating`` and renamed to
``<path>`` once its metadata is complete and flushed, so a writer killed while creating it
leaves no file at ``<path>`` (an empty archive: resume creates it, overwrite replaces it).
The file is flushed after each batch's data and again after its commit
record (a tiny int64 dataset written in place, never resized). Files use the default
(earliest) format, which has no "file open for write" superblock flag, so a killed
writer leaves a file that still opens at its last flush.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import h5py
import hdf5plugin
import numpy as np

from attnscope.errors import ArchiveCorruptError, ArchiveError, ArchiveNotFoundError, ConfigError
from attnscope.store._base import ArrayHandle, Backend, MiB, Write, chunk_ranges
from attnscope.store._lock import CREATING

__all__ = ["HDF5Backend"]

ROOT_KEY = "attnscope"
COMMITS = "_commits"
# File-locking settings tried in turn for readers: HDF5 refuses to open a file twice in
# one process with different locking flags, so follow whatever the first opener used.
_LOCKINGS = (False, None, True, "best-effort")


def _filters(name: str, checksum: bool = True) -> dict[str, Any]:
    """``create_dataset`` keywords of a compressor name, plus Fletcher32 if ``checksum``."""
    if name == "none":
        comp: Any = {}
    elif name == "zstd":
        comp = hdf5plugin.Zstd(clevel=1)
    elif name in ("blosc-zstd", "blosc-lz4"):
        cname = name.split("-")[1]
        comp = hdf5plugin.Blosc(
            cname=cname, clevel=1 if cname == "zstd" else 5, shuffle=hdf5plugin.Blosc.SHUFFLE
        )
    else:
        raise ConfigError(
            f"unknown compressor {name!r}; expected one of zstd, none, blosc-zstd, blosc-lz4"
        )
    return {**comp, "fletcher32": True} if checksum else dict(comp)


class _H5Array(ArrayHandle):
    def __init__(self, ds: Any, backend: HDF5Backend) -> None:
        self._ds = ds
        self._b = backend
        self.name = ds.name.lstrip("/")
        self.archive = backend.path
        self.chunks = tuple(ds.chunks)
        self.dtype = np.dtype(ds.dtype)
        # One sample per chunk: a batch always covers whole chunks along samples.
        self.merge_tails = False
        self._stored: frozenset[tuple[int, ...]] | None = None

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return tuple(self._ds.shape)

    def _read(self, sel: tuple[slice, ...]) -> np.ndarray:
        self._b.chunk_reads += int(np.prod([len(r) for r in chunk_ranges(sel, self.chunks)]))
        return self._ds[sel]

    def write(self, sel: tuple[slice, ...], data: np.ndarray) -> None:
        self._ds[sel] = np.ascontiguousarray(data, dtype=self.dtype)

    def resize(self, n: int) -> None:
        self._ds.resize((n, *self._ds.shape[1:]))

    def stored_nbytes(self) -> int | None:
        try:
            return int(self._ds.id.get_storage_size())
        except Exception:  # noqa: BLE001
            return None

    def stored_chunks(self) -> frozenset[tuple[int, ...]]:
        """Allocated chunks that lie wholly inside the file (a truncated file loses some)."""
        if self._stored is None:
            eof = os.path.getsize(self._b.path)
            found: list[tuple[int, ...]] = []

            def visit(info: Any) -> None:
                if info.byte_offset is not None and info.byte_offset + info.size <= eof:
                    found.append(tuple(o // c for o, c in zip(info.chunk_offset, self.chunks)))

            dsid = self._ds.id
            if hasattr(dsid, "chunk_iter"):
                dsid.chunk_iter(visit)
            else:  # pragma: no cover - older HDF5: one query per chunk
                for i in range(dsid.get_num_chunks()):
                    visit(dsid.get_chunk_info(i))
            self._stored = frozenset(found)
        return self._stored


class HDF5Backend(Backend):
    """One HDF5 file holding an attnscope archive."""

    format = "hdf5"

    def __init__(self, path: str, mode: str) -> None:
        self.path = str(path)
        self.writable = mode != "r"
        self.chunk_reads = 0
        # A new file is created beside its final name and renamed into place once complete
        # (publish): a writer killed while creating it leaves no file at ``path``.
        self._creating = self.path + CREATING if mode == "w" else None
        if mode == "r" or mode == "a":
            if not os.path.exists(self.path):
                raise ArchiveNotFoundError(f"no archive at {self.path!r}")
            if os.path.isdir(self.path) or not h5py.is_hdf5(self.path):
                raise ArchiveCorruptError(f"{self.path!r} is not an HDF5 file")
        self._f = self._open(mode)

    def _open(self, mode: str) -> Any:
        h5mode = {"r": "r", "a": "r+", "w": "w"}[mode]
        # HDF5's own flock is off: attnscope's lease excludes writers, and readers must
        # open a file while it is being written.
        err: OSError | None = None
        for locking in _LOCKINGS if mode == "r" else (False,):
            try:
                return h5py.File(self._creating or self.path, h5mode, locking=locking,
                                 rdcc_nbytes=16 * MiB)  # fmt: skip
            except OSError as e:
                err = e
                if "locking" not in str(e):
                    break
        msg = str(err).splitlines()[0] if err is not None else ""
        if "already open" in msg or "locking" in msg:
            raise ArchiveError(
                f"{self.path!r} is already open in this process (an h5py.File or another "
                f"archive object) in a way HDF5 cannot share for {h5mode!r} access; close it "
                f"first ({msg})"
            ) from err
        raise ArchiveCorruptError(
            f"{self.path!r} cannot be opened as HDF5 (truncated or damaged?): {msg}"
        ) from err

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

    def delete(self, path: str) -> None:
        if path in self._f:
            del self._f[path]

    def list_children(self, path: str) -> list[str]:
        return sorted(self._f[path].keys()) if path in self._f else []

    def create_array(self, path, shape, chunks, dtype, *, dims, attrs=None, compressor="zstd",  # type: ignore[no-untyped-def]
                     overwrite=False):  # fmt: skip
        if overwrite and path in self._f:
            del self._f[path]
        ds = self._f.create_dataset(
            path,
            shape=shape,
            chunks=chunks,
            dtype=np.dtype(dtype),
            maxshape=(None, *shape[1:]),
            fillvalue=0,
            # Fletcher32 only where a chunk holds one sample: a multi-sample chunk (token
            # side arrays, label blob, sample ids) is rewritten in place as later batches
            # fill it, and a torn rewrite would break the checksum of its committed samples.
            **_filters(compressor, checksum=chunks[0] == 1),
        )
        ds.attrs[ROOT_KEY] = json.dumps(attrs or {})
        ds.attrs["dimension_names"] = json.dumps(list(dims))
        return _H5Array(ds, self)

    def get_array(self, path: str) -> ArrayHandle:
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

    def flush(self) -> None:
        self._f.flush()

    def publish(self) -> None:
        """Flush the new file and rename it to its final name (the file stays open)."""
        if self._creating is not None:
            self._f.flush()
            os.replace(self._creating, self.path)
            self._creating = None

    def write_many(self, writes: Sequence[Write]) -> None:
        """Write boxes of several arrays; HDF5 compresses and checksums them in C."""
        for handle, sel, data in writes:
            handle.write(sel, data)

    def close(self) -> None:
        try:
            if self._f.id.valid:
                self._f.close()
        except Exception:  # noqa: BLE001 - already closed
            pass
        if self._creating is not None:  # closed before complete: no archive
            try:
                os.remove(self._creating)
            except OSError:
                pass

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

A write that fails in the operating system (disk full, quota, I/O error) leaves HDF5 with
dirty caches it can never write; closing such a file makes HDF5 retry, fail again and, in
h5py, crash while objects are deallocated. So the first such failure abandons the file
(:meth:`HDF5Backend._abandon`): its descriptor is pointed at ``/dev/null``, the close then
succeeds without writing, every later write raises the same ``OSError``, and the error
reaches the caller as an ``OSError`` with the operating system's errno. What the failed
flush did write stays; a file it left shorter than the end its superblock records is
extended to that end (:meth:`HDF5Backend._settle`), so the committed samples read and a
resume continues (tried on a full 5 MiB tmpfs).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import h5py
import hdf5plugin
import numpy as np

from attnscope.errors import ArchiveCorruptError, ArchiveError, ArchiveNotFoundError
from attnscope.store.backends.base import (
    ArrayHandle,
    Backend,
    MiB,
    Write,
    chunk_ranges,
    parse_record,
)
from attnscope.store.backends.lock import CREATING
from attnscope.store.codecs import check_level

__all__ = ["HDF5Backend"]

ROOT_KEY = "attnscope"
COMMITS = "_commits"
COMMITLOG = "_commits_log"
# a record: start, stop, committed, batches, since, then the 32-byte chain as 4 int64
_RECORD_LEN = 9
# File-locking settings tried in turn for readers: HDF5 refuses to open a file twice in
# one process with different locking flags, so follow whatever the first opener used.
_LOCKINGS = (False, None, True, "best-effort")
# Opening for append rewrites the superblock's status flags at the start of the file; a
# handle that then writes nothing puts these bytes back on close (a refused resume leaves
# the file as it was).
HEAD_BYTES = 512
# HDF5 refuses a file shorter than the end its superblock records ("truncated file: eof =
# 170010, sblock->base_addr = 0, stored_eof = 170292"): what a flush that failed half way
# leaves (the superblock is rewritten in place, the data past the end never arrived).
_STORED_EOF = re.compile(r"truncated file.*stored_eof = (\d+)")
# HDF5 reports a failed system call inside its message: "... errno = 28, error message = ..."
_ERRNO = re.compile(r"errno = (\d+)")


def os_error(e: BaseException, path: str) -> OSError | None:
    """The operating-system error behind an h5py error (None when there is none)."""
    if isinstance(e, OSError) and e.errno:
        return OSError(e.errno, os.strerror(e.errno), path)
    m = _ERRNO.search(str(e))
    if m and int(m.group(1)):
        n = int(m.group(1))
        return OSError(n, os.strerror(n), path)
    return None


def _filters(name: str, checksum: bool = True, level: int | None = None) -> dict[str, Any]:
    """``create_dataset`` keywords of a compressor name and level (None: its default),
    plus Fletcher32 if ``checksum``."""
    level = check_level(name, level)
    if name == "none":
        comp: Any = {}
    elif name == "zstd":
        comp = hdf5plugin.Zstd(clevel=level)  # negative (fast) levels pass as cd_values
    else:
        cname = name.split("-")[1]
        comp = hdf5plugin.Blosc(cname=cname, clevel=level, shuffle=hdf5plugin.Blosc.SHUFFLE)
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
        with self._b.writing():
            self._ds[sel] = np.ascontiguousarray(data, dtype=self.dtype)

    def resize(self, n: int) -> None:
        with self._b.writing():
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
        self._failed: OSError | None = None  # the write failure that abandoned the file
        self._changed = False  # whether a write went through this handle (see close)
        self._head = b""  # the file's first bytes before an append open (see close)
        # A new file is created beside its final name and renamed into place once complete
        # (publish): a writer killed while creating it leaves no file at ``path``.
        self._creating = self.path + CREATING if mode == "w" else None
        if mode == "r" or mode == "a":
            if not os.path.exists(self.path):
                raise ArchiveNotFoundError(f"no archive at {self.path!r}")
            if os.path.isdir(self.path) or not h5py.is_hdf5(self.path):
                raise ArchiveCorruptError(f"{self.path!r} is not an HDF5 file")
        if mode == "a":
            with open(self.path, "rb") as fh:
                self._head = fh.read(HEAD_BYTES)
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
        with self.writing():
            self._f.attrs[ROOT_KEY] = json.dumps(meta)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Run a write; an operating-system failure abandons the file (module docstring)
        and is raised as ``OSError``; after one, every write raises it again."""
        if self._failed is not None:
            raise OSError(self._failed.errno, self._failed.strerror, self.path)
        self._changed = True
        try:
            yield
        except Exception as e:
            err = os_error(e, self.path)
            if err is None:
                raise
            self._abandon(err)
            raise err from e

    def _settle(self) -> None:
        """After an abandoned file is closed: if a failed flush left it shorter than its
        superblock's end, extend it (sparsely: no disk space) to that end, so that it opens
        and its committed samples read; the bytes that never arrived read as zeros and
        belong to no committed sample (commit records are written after their data)."""
        try:
            h5py.File(self.path, "r", locking=False).close()
        except Exception as e:  # noqa: BLE001 - only a short file is repaired here
            m = _STORED_EOF.search(str(e))
            if m and int(m.group(1)) > os.path.getsize(self.path):
                try:
                    os.truncate(self.path, int(m.group(1)))
                except OSError:  # pragma: no cover - the file stays as HDF5 left it
                    pass

    def _restore_head(self) -> None:
        """Put back the first bytes HDF5's append open rewrote."""
        try:
            with open(self.path, "r+b") as fh:
                if fh.read(len(self._head)) != self._head:
                    fh.seek(0)
                    fh.write(self._head)
        except OSError:  # pragma: no cover - the file became unwritable meanwhile
            pass

    def _abandon(self, err: OSError) -> None:
        """Point the file's descriptor at /dev/null: HDF5's later flushes and its close
        succeed without writing, and the file keeps what its last flush wrote. ``err``:
        the failure that every later write raises again."""
        self._failed = err
        try:
            fd = self._f.id.get_vfd_handle()
            null = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(null, int(fd))
            finally:
                os.close(null)
        except Exception:  # noqa: BLE001 - not the POSIX driver: HDF5 reports on close
            pass

    def has(self, path: str) -> bool:
        return path in self._f

    def delete(self, path: str) -> None:
        if path in self._f:
            del self._f[path]

    def list_children(self, path: str) -> list[str]:
        return sorted(self._f[path].keys()) if path in self._f else []

    def create_array(self, path, shape, chunks, dtype, *, dims, attrs=None, compressor="zstd", level=None, overwrite=False):  # type: ignore[no-untyped-def]  # noqa: E501
        with self.writing():
            if overwrite and path in self._f:
                del self._f[path]
            return self._create_array(path, shape, chunks, dtype, dims, attrs, compressor, level)

    def _create_array(self, path, shape, chunks, dtype, dims, attrs, compressor, level):  # type: ignore[no-untyped-def]  # noqa: E501
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
            **_filters(compressor, checksum=chunks[0] == 1, level=level),
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
        with self.writing():
            node = self._f.require_group(path) if group else self._f[path]
            node.attrs[ROOT_KEY] = json.dumps(attrs)

    def read_records(self) -> dict[str, dict[str, Any]]:
        if COMMITS not in self._f:
            return {}
        out = {}
        for rid, ds in self._f[COMMITS].items():
            try:
                raw = [int(x) for x in ds[()]]
            except Exception as e:  # noqa: BLE001
                raise ArchiveCorruptError(
                    f"commit record {rid!r} in {self.path!r} is unreadable"
                ) from e
            if len(raw) == 3:  # written before the commit log
                out[rid] = parse_record(self.path, rid, raw)
            elif len(raw) == _RECORD_LEN:
                chain = np.array(raw[5:], dtype=np.int64).tobytes().hex()
                keys = ("start", "stop", "committed", "batches", "since")
                out[rid] = {**dict(zip(keys, raw[:5])), "chain": chain if raw[3] else ""}
            else:
                raise ArchiveCorruptError(
                    f"commit record {rid!r} in {self.path!r} is malformed: {raw!r}"
                )
        return out

    def write_commit(self, rid: str, record: dict[str, Any]) -> None:
        # Data first, flushed; then the record (one in-place write of 72 bytes), flushed:
        # a kill between the two leaves the previous record, so the torn batch stays
        # invisible. The record is created whole with its first content.
        with self.writing():
            self._f.flush()
            path = f"{COMMITS}/{rid}"
            if "batches" in record:
                chain = bytes.fromhex(record.get("chain") or "00" * 32)
                head = [record[k] for k in ("start", "stop", "committed", "batches", "since")]
                rec = np.concatenate([np.array(head, np.int64), np.frombuffer(chain, np.int64)])
            else:
                rec = np.array([record["start"], record["stop"], record["committed"]], np.int64)
            # h5py objects stay in locals: a temporary freed while a failed write unwinds
            # would be closed before the file is abandoned (writing()), and HDF5's close
            # of it would write again and fail outside any handler
            ds = self._f[path] if path in self._f else None
            if ds is not None and ds.shape == rec.shape:
                ds[...] = rec
            else:
                if ds is not None:
                    del self._f[path]
                ds = self._f.create_dataset(path, data=rec)
            self._f.flush()

    def write_log(self, rid: str, seq: int, doc: dict[str, Any]) -> None:
        path = f"{COMMITLOG}/{rid}/{seq:08d}"
        data = np.frombuffer(json.dumps(doc, separators=(",", ":")).encode(), np.uint8)
        with self.writing():
            # A document of a batch that never committed is left as it is (a file abandoned
            # mid-flush may hold it past its end, where HDF5 can neither delete nor move it):
            # the new one takes the next free ".k" name; the last written is the one read.
            if path in self._f:
                k = 1
                while _log_name(path, k) in self._f:
                    k += 1
                path = _log_name(path, k)
            ds = self._f.create_dataset(path, data=data)
            # flushed while the dataset is open: closing it writes its header, and a write
            # that fails there (disk full) would fail outside writing()'s handling
            self._f.flush()
            del ds

    def read_log(self, rid: str, seq: int) -> dict[str, Any] | None:
        base = f"{COMMITLOG}/{rid}/{seq:08d}"
        path, k = base, 1
        while _log_name(base, k) in self._f:  # the last written (see write_log)
            path, k = _log_name(base, k), k + 1
        try:
            doc = json.loads(self._f[path][()].tobytes()) if path in self._f else None
        except Exception:  # noqa: BLE001 - unreadable is absent to the caller
            return None
        return doc if isinstance(doc, dict) else None

    def flush(self) -> None:
        if self.writable and self._changed:
            with self.writing():
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
        """Close the file; a close whose final flush fails in the operating system
        abandons the file (module docstring) and raises that ``OSError``. A file opened
        for append that nothing was written to is left byte for byte as it was."""
        if self._head and not self._changed and self._failed is None and self._f.id.valid:
            try:
                self._f.close()
            except Exception:  # noqa: BLE001 - nothing of ours was written
                pass
            self._restore_head()
            return
        err: OSError | None = None
        try:
            if self._f.id.valid:
                self._f.close()
        except Exception as e:  # noqa: BLE001 - already closed, or the last flush failed
            err = os_error(e, self.path) if self.writable and self._failed is None else None
            if err is not None:
                self._abandon(err)
                try:
                    self._f.close()
                except Exception:  # noqa: BLE001 - closed as far as HDF5 can
                    pass
        if self._failed is not None:
            self._settle()
        if err is not None:
            raise err
        if self._creating is not None:  # closed before complete: no archive
            try:
                os.remove(self._creating)
            except OSError:
                pass


def _log_name(path: str, k: int) -> str:
    """Name of the ``k``-th rewrite of a log document (0: the document itself)."""
    return path if k == 0 else f"{path}.{k}"

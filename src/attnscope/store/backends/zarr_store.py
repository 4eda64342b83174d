"""Zarr v3 backend: a directory store by default, ``.zip`` paths through ``ZipStore``.

Chunk files of a ``LocalStore`` are written atomically (temporary file + rename), so a
process killed mid-write leaves each chunk either old or new, never torn. Arrays are
unsharded (concurrent partial shard writes are unsafe, zarr-python #3413) and are
created with ``write_empty_chunks=True`` so that every chunk inside the committed
range exists on disk and a missing one means damage, not zeros.

Every chunk ends with a crc32c checksum (zarr's ``Crc32cCodec``), so a flipped byte
fails on read; archives written before it have none and read as before.

The direct chunk writer of ``LocalStore`` arrays lives in :mod:`._zarr_direct`. An
fsspec URL (``s3://bucket/run.zarr``) opens an ``FsspecStore`` (:mod:`.remote`): each
chunk and metadata document is one PUT, which object stores apply whole, so the same
order (chunks, then the commit record) gives the same guarantees.
"""

from __future__ import annotations

import asyncio
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from itertools import product
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore, WrapperStore, ZipStore

from attnscope.errors import ArchiveCorruptError, ArchiveNotFoundError
from attnscope.store.backends import remote
from attnscope.store.backends.base import ArrayHandle, Backend, Write, chunk_ranges, parse_record
from attnscope.store.backends.location import locate
from attnscope.store.backends.zarr_direct import _atomic_put, direct_plan
from attnscope.store.codecs import check_level

__all__ = ["ZarrBackend"]

ROOT_KEY = "attnscope"
COMMITS = "_commits"
# Threads of the direct chunk writer by default: one per core the process may run on.
ENCODE_THREADS = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                     else (os.cpu_count() or 1))  # fmt: skip
# Reads touching at most this many chunks check them one by one instead of listing the array.
SMALL_READ_CHUNKS = 64


class _CountingStore(WrapperStore):
    """Forwards to a store and counts ``get`` calls (one per chunk or metadata read)."""

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.gets = 0
        self.bytes_read = 0

    async def get(self, key, prototype, byte_range=None):  # type: ignore[no-untyped-def]
        buf = await self._store.get(key, prototype, byte_range)
        if "/c/" in key or key.startswith("c/"):
            self.gets += 1
            if buf is not None:
                self.bytes_read += len(buf)
        return buf


@contextmanager
def _no_debris_warning() -> Iterator[None]:
    """Listing a group: a ``*.partial`` file left by a killed write (never renamed into
    place) is no node; zarr would warn about it once per listing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr")
        yield


def _codecs(name: str, level: int | None = None) -> list[Any]:
    """Bytes-to-bytes codecs of a compressor name and level (None: its default), ending
    with a crc32c checksum."""
    from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

    level = check_level(name, level)
    if name == "none":
        comp = []
    elif name == "zstd":
        comp = [ZstdCodec(level=level)]
    else:
        cname = name.split("-")[1]
        comp = [BloscCodec(cname=cname, clevel=level, shuffle=BloscShuffle.shuffle)]
    return [*comp, Crc32cCodec()]


def _json(meta: dict[str, Any]) -> Any:
    """Round-trip through json so non-JSON values fail here, not in a reader."""
    return json.loads(json.dumps(meta))


class _ZarrArray(ArrayHandle):
    def __init__(self, arr: zarr.Array, backend: ZarrBackend | None = None) -> None:
        self._a = arr
        self._b = backend
        self.name = arr.path
        self.archive = backend.path if backend is not None else str(arr.store)
        self._stored: frozenset[tuple[int, ...]] | None = None
        self.chunks = tuple(arr.chunks)
        self.dtype = np.dtype(
            arr.dtype.to_native_dtype() if hasattr(arr.dtype, "to_native_dtype") else arr.dtype
        )
        base = backend._store._store if backend is not None and backend.writable else None
        self._direct = None if base is None else direct_plan(arr, base, self.dtype)

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return tuple(self._a.shape)

    def _read(self, sel: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(self._a[sel])

    def stored_chunks(self) -> frozenset[tuple[int, ...]]:
        """Chunk keys under ``<array>/c/``: one directory walk (or store listing), cached."""
        if self._stored is None:
            assert self._b is not None
            self._stored = frozenset(self._b._list_chunks(self.name, len(self.chunks)))
        return self._stored

    def missing_in(self, sel: tuple[slice, ...]) -> list[tuple[int, ...]]:
        """As the base class; a small read of a directory archive whose chunks were not
        listed yet stats its few chunk files instead (a head figure needs no listing of
        a long-context array's many thousand chunks)."""
        base = self._b._store._store if self._b is not None else None
        if self._stored is None and base is not None and not isinstance(base, ZipStore):
            idxs = list(product(*chunk_ranges(sel, self.chunks)))
            if len(idxs) <= SMALL_READ_CHUNKS:
                if not isinstance(base, LocalStore):  # object storage: one HEAD per chunk
                    return self._missing_remote(base, idxs)
                root = os.path.join(str(base.root), *self.name.split("/"), "c")
                return [i for i in idxs if not os.path.isfile(os.path.join(root, *map(str, i)))]
        return super().missing_in(sel)

    def _missing_remote(self, base: Any, idxs: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        from zarr.core.sync import sync

        async def _all() -> list[bool]:
            keys = [f"{self.name}/c/" + "/".join(map(str, i)) for i in idxs]
            return list(await asyncio.gather(*(base.exists(k) for k in keys)))

        return [i for i, ok in zip(idxs, sync(_all())) if not ok]

    def write(self, sel: tuple[slice, ...], data: np.ndarray) -> None:
        if self._b is not None:
            self._b.write_many([(self, sel, data)])
        else:
            self._a[sel] = data

    def resize(self, n: int) -> None:
        self._a.resize((n, *self._a.shape[1:]))

    def _setitem(self, sel: tuple[slice, ...], data: np.ndarray) -> Any:
        """Coroutine writing one box (so several arrays can be written in one event-loop trip)."""
        return self._a._async_array.setitem(sel, data)

    def stored_nbytes(self) -> int | None:
        try:
            return int(self._a.nbytes_stored())
        except Exception:  # noqa: BLE001 - informational only
            return None


class ZarrBackend(Backend):
    """Zarr v3 group holding an attnscope archive."""

    format = "zarr"

    def __init__(
        self, path: str, mode: str, root_meta: dict[str, Any] | None = None,
        *, workers: int | None = None,
    ) -> None:  # fmt: skip
        self.path = locate(path)
        self._workers = workers or ENCODE_THREADS
        self.writable = mode != "r"
        is_zip = self.path.endswith(".zip")
        url = self.path.remote
        exists = self.path.exists() if mode == "r" or not url else False  # no listing to write
        if mode == "r" and not exists:
            raise ArchiveNotFoundError(f"no archive at {self.path!r}")
        if url:
            self.path.refuse_hdf5(self.format)  # zip: local files only
            base: Any = remote.open_store(self.path, read_only=(mode == "r"))
        elif is_zip:
            if mode == "r":
                base = ZipStore(self.path, mode="r", read_only=True)
            else:
                base = ZipStore(self.path, mode="a" if exists and mode == "a" else "w")
        else:
            base = LocalStore(self.path, read_only=(mode == "r"))
        self._store = _CountingStore(base)
        self._commits_ready = False
        self._pool: ThreadPoolExecutor | None = None
        attrs = None if root_meta is None else {ROOT_KEY: _json(root_meta)}
        try:
            if mode == "w":
                # The caller cleared the path (keeping the lock folder); "a" creates the
                # group without deleting that folder as mode "w" would. The root metadata
                # goes into the group's one zarr.json write: a writer killed here leaves
                # either no group or an archive with its metadata.
                self._root = zarr.open_group(
                    store=self._store, mode="a", zarr_format=3, attributes=attrs
                )
            else:
                self._root = zarr.open_group(store=self._store, mode="r" if mode == "r" else "r+")
        except Exception as e:  # noqa: BLE001 - any failure here means "not a zarr group"
            raise ArchiveCorruptError(
                f"{self.path!r} is not a readable Zarr v3 group "
                f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
            ) from e

    @property
    def chunk_reads(self) -> int:  # type: ignore[override]
        return self._store.gets

    @property
    def bytes_read(self) -> int:
        return self._store.bytes_read

    # -- metadata ---------------------------------------------------------------------
    def read_root_meta(self) -> dict[str, Any]:
        meta = self._root.attrs.get(ROOT_KEY)
        if not isinstance(meta, dict):
            raise ArchiveCorruptError(
                f"{self.path!r} is a Zarr group but not an attnscope archive "
                f"(no {ROOT_KEY!r} object in its attributes)"
            )
        return dict(meta)

    def write_root_meta(self, meta: dict[str, Any]) -> None:
        self._root.attrs[ROOT_KEY] = _json(meta)

    # -- nodes ------------------------------------------------------------------------
    def _node(self, path: str) -> Any:
        return self._root[path]

    def has(self, path: str) -> bool:
        try:
            self._root[path]
        except KeyError:
            return False
        return True

    def delete(self, path: str) -> None:
        # Through the store: the node may lack its own zarr.json (a writer killed between
        # writing an array's and its parent group's metadata).
        from zarr.core.sync import sync

        sync(self._store.delete_dir(path))

    def list_children(self, path: str) -> list[str]:
        if not self.has(path):
            return []
        node = self._root[path]
        with _no_debris_warning():
            return sorted(list(node.array_keys()) + list(node.group_keys()))

    def create_array(self, path, shape, chunks, dtype, *, dims, attrs=None, compressor="zstd", level=None, overwrite=False):  # type: ignore[no-untyped-def]  # noqa: E501
        arr = self._root.create_array(
            path,
            shape=shape,
            chunks=chunks,
            dtype=np.dtype(dtype),
            compressors=_codecs(compressor, level),
            filters=None,
            fill_value=0,
            dimension_names=dims,
            attributes={ROOT_KEY: attrs or {}},
            config={"write_empty_chunks": True},
            overwrite=overwrite,
        )
        return _ZarrArray(arr, self)

    def get_array(self, path: str) -> ArrayHandle:
        node = self._root[path]
        if not isinstance(node, zarr.Array):
            raise ArchiveCorruptError(f"{path!r} in {self.path!r} is a group, expected an array")
        if self.writable:
            # Opened arrays get zarr's default config (write_empty_chunks=False), which
            # would drop an all-zero chunk on resume and make verify() report it missing.
            node = node.with_config({"write_empty_chunks": True})
        return _ZarrArray(node, self)

    def get_attrs(self, path: str) -> dict[str, Any]:
        got = self._root[path].attrs.get(ROOT_KEY, {})
        return dict(got) if isinstance(got, dict) else {}

    def set_attrs(self, path: str, attrs: dict[str, Any], *, group: bool = False) -> None:
        node = self._root.require_group(path) if group else self._root[path]
        node.attrs[ROOT_KEY] = json.loads(json.dumps(attrs))

    def resize_many(self, sizes: Sequence[tuple[ArrayHandle, int]]) -> None:
        """Grow several arrays in one event-loop trip (each rewrites its zarr.json)."""
        if len(sizes) <= 1 or not all(isinstance(h, _ZarrArray) for h, _n in sizes):
            super().resize_many(sizes)
            return
        from zarr.core.sync import sync

        async def _all() -> None:
            await asyncio.gather(
                *(
                    h._a._async_array.resize((n, *h.shape[1:]))  # type: ignore[attr-defined]
                    for h, n in sizes
                )
            )

        sync(_all())

    def write_many(self, writes: Sequence[Write]) -> None:
        """Write boxes of several arrays; returns when every chunk is written.

        Boxes of arrays with a direct plan (``LocalStore``, codec "zstd" or "none") are cut
        into chunks that a thread pool encodes and writes as files (see the module
        docstring). The rest go through zarr, all in one event-loop trip, whose codec
        pipeline encodes their chunks in its worker threads.
        """
        direct: list[tuple[_ZarrArray, tuple[slice, ...], np.ndarray]] = []
        rest: list[Write] = []
        for w in writes:
            h, sel, data = w
            if isinstance(h, _ZarrArray) and h._direct and h._direct.fits(h.shape, sel, data):
                direct.append((h, sel, data))
            else:
                rest.append(w)
        pending: list[Future[None]] = []
        try:
            if direct:
                self._write_direct(direct, pending)
            if rest:
                done = {id(h) for h, _s, _d in direct}
                if any(id(h) in done for h, _s, _d in rest):
                    self._drain(pending)  # the same array on both paths: keep the order
                self._write_zarr(rest)
            self._drain(pending)
        finally:
            for fut in pending:  # an error above: let no chunk write outlive the call
                fut.cancel()
            for fut in pending:
                if not fut.cancelled():
                    fut.exception()

    def _write_direct(
        self, jobs: Sequence[tuple[_ZarrArray, tuple[slice, ...], np.ndarray]], pending: list
    ) -> None:
        pool = self._chunk_pool()
        seen: set[int] = set()
        for h, sel, data in jobs:
            if id(h) in seen:
                self._drain(pending)  # a partly covered chunk must be read after its last write
            seen.add(id(h))
            d = h._direct
            assert d is not None
            for job in d.jobs(h.shape, sel, data):
                if pool is None:
                    d.store(*job)
                else:
                    pending.append(pool.submit(d.store, *job))

    @staticmethod
    def _drain(pending: list) -> None:
        """Wait for every submitted chunk; raise the first error once all have finished."""
        err: BaseException | None = None
        while pending:
            fut = pending.pop(0)
            try:
                fut.result()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                err = err or e
        if err is not None:
            raise err

    def _write_zarr(self, writes: Sequence[Write]) -> None:
        if len(writes) == 1 or not all(isinstance(h, _ZarrArray) for h, _s, _d in writes):
            for h, sel, data in writes:
                if isinstance(h, _ZarrArray):
                    h._a[sel] = data
                else:
                    h.write(sel, data)
            return
        from zarr.core.sync import sync

        # Boxes of different arrays run concurrently; boxes of one array one after another
        # (two boxes in one chunk are each a read-modify-write of it: concurrent, one
        # would lose the other's samples)
        per: dict[int, list[Write]] = {}
        for w in writes:
            per.setdefault(id(w[0]), []).append(w)

        async def _one(boxes: list[Write]) -> None:
            for h, sel, d in boxes:
                await h._setitem(sel, d)  # type: ignore[attr-defined]

        async def _all() -> None:
            await asyncio.gather(*(_one(boxes) for boxes in per.values()))

        sync(_all())

    def _chunk_pool(self) -> ThreadPoolExecutor | None:
        if self._workers < 2:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="attnscope-zarrenc")
        return self._pool

    # -- commits ----------------------------------------------------------------------
    def read_records(self) -> dict[str, dict[str, Any]]:
        if not self.has(COMMITS):
            return {}
        g = self._root[COMMITS]
        out = {}
        with _no_debris_warning():
            rids = list(g.group_keys())
        for rid in rids:
            out[rid] = parse_record(self.path, rid, g[rid].attrs.get(ROOT_KEY))
        return out

    def write_commit(self, rid: str, record: dict[str, Any]) -> None:
        # One small zarr.json per writer, written whole in one put (a new record's group
        # and its attributes are one document, so no kill leaves a group without them);
        # disjoint-range writers never touch the same file.
        if not self._commits_ready:
            if not self.has(COMMITS):
                self._root.require_group(COMMITS)
            self._commits_ready = True
        self._put_group_json(f"{COMMITS}/{rid}", record)

    def write_log(self, rid: str, seq: int, doc: dict[str, Any]) -> None:
        self._put_group_json(f"{COMMITS}/{rid}/{seq:08d}", doc)

    def read_log(self, rid: str, seq: int) -> dict[str, Any] | None:
        raw = self._get_bytes(f"{COMMITS}/{rid}/{seq:08d}/zarr.json")
        try:
            doc = json.loads(raw)["attributes"][ROOT_KEY] if raw is not None else None
        except (ValueError, KeyError, TypeError):
            return None
        return doc if isinstance(doc, dict) else None

    def _put_group_json(self, key: str, attrs: dict[str, Any]) -> None:
        """Write the zarr.json of group ``key`` holding ``attrs``: one atomic file or PUT."""
        doc = {"attributes": {ROOT_KEY: attrs}, "zarr_format": 3, "node_type": "group"}
        blob = json.dumps(doc, separators=(",", ":")).encode()
        base = self._store._store
        if isinstance(base, LocalStore):  # the chunk writer's atomic replace, as LocalStore does
            _atomic_put(os.path.join(str(base.root), *key.split("/"), "zarr.json"), blob)
            return
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        sync(base.set(f"{key}/zarr.json", default_buffer_prototype().buffer.from_bytes(blob)))

    def _get_bytes(self, key: str) -> bytes | None:
        base = self._store._store
        if isinstance(base, LocalStore):
            try:
                with open(os.path.join(str(base.root), *key.split("/")), "rb") as fh:
                    return fh.read()
            except (FileNotFoundError, NotADirectoryError):
                return None
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        buf = sync(base.get(key, prototype=default_buffer_prototype()))
        return None if buf is None else buf.to_bytes()

    def _list_chunks(self, path: str, ndim: int) -> list[tuple[int, ...]]:
        """Indices of the chunk files of array ``path`` (default "c/i/j/..." key encoding)."""
        base = self._store._store
        out = []
        if isinstance(base, LocalStore):
            root = os.path.join(str(base.root), *path.split("/"), "c")
            for d, _dirs, files in os.walk(root):
                rel = os.path.relpath(d, root)
                head = [] if rel == "." else rel.split(os.sep)
                for f in files:
                    parts = [*head, f]
                    if len(parts) == ndim and all(p.isdigit() for p in parts):
                        out.append(tuple(int(p) for p in parts))
            return out
        from zarr.core.sync import sync

        async def _keys() -> list[str]:
            return [k async for k in base.list_prefix(f"{path}/c/")]

        for key in sync(_keys()):
            parts = key[len(path) + 3 :].split("/")
            if len(parts) == ndim and all(p.isdigit() for p in parts):
                out.append(tuple(int(p) for p in parts))
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        try:
            self._store.close()
        except Exception:  # noqa: BLE001 - closing twice or a read-only store
            pass

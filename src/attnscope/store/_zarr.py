"""Zarr v3 backend: a directory store by default, ``.zip`` paths through ``ZipStore``.

Chunk files of a ``LocalStore`` are written atomically (temporary file + rename), so a
process killed mid-write leaves each chunk either old or new, never torn. Arrays are
unsharded (concurrent partial shard writes are unsafe, zarr-python #3413) and are
created with ``write_empty_chunks=True`` so that every chunk inside the committed
range exists on disk and a missing one means damage, not zeros.

Direct write path: for a ``LocalStore`` array whose codec chain is exactly ``bytes``
(little-endian) or ``bytes`` + ``zstd`` (what :func:`_codecs` creates for "none" and
"zstd"), :meth:`ZarrBackend.write_many` bypasses zarr's codec pipeline. Each chunk is
assembled, encoded with the same numcodecs ``Zstd(level, checksum)`` that zarr's
``ZstdCodec`` uses (read from the array's metadata) and written to the file named by the
array's own chunk key encoding, atomically (temporary file in the same directory +
``os.replace``, as ``LocalStore`` does; no fsync, also as ``LocalStore``), in a thread pool
(numcodecs and file writes release the GIL). A chunk the box covers only partly is read,
decoded and merged first (read-modify-write, as zarr does); a missing chunk reads as the
fill value. Every chunk is written, even an all-fill one. Other codecs (blosc), other
stores (``ZipStore``) and anything unexpected go through zarr as before.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import product
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore, WrapperStore, ZipStore

from attnscope.errors import ArchiveCorruptError, ArchiveNotFoundError, ConfigError
from attnscope.store._base import ArrayHandle, Backend, Write, chunk_grid

__all__ = ["ZarrBackend"]

ROOT_KEY = "attnscope"
COMMITS = "_commits"
# Threads of the direct chunk writer: one per core, at most 4 (as _hdf5.ENCODE_THREADS).
ENCODE_THREADS = max(1, min(4, os.cpu_count() or 1))


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


def _codecs(name: str) -> Any:
    from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec

    if name == "none":
        return None
    if name == "zstd":
        return ZstdCodec(level=1)
    if name == "blosc-zstd":
        return BloscCodec(cname="zstd", clevel=1, shuffle=BloscShuffle.shuffle)
    if name == "blosc-lz4":
        return BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle)
    raise ConfigError(
        f"unknown compressor {name!r}; expected one of zstd, none, blosc-zstd, blosc-lz4"
    )


class _Direct:
    """How to write encoded chunks of one array straight into a ``LocalStore`` directory."""

    __slots__ = ("root", "key", "codec", "fill")

    def __init__(self, root: str, key: Callable[[tuple[int, ...]], str], codec: Any, fill: Any):
        self.root = root  # the array's directory
        self.key = key  # zarr's own chunk key encoding, e.g. (0, 1) -> "c/0/1"
        self.codec = codec  # numcodecs.Zstd, or None for the bare little-endian bytes codec
        self.fill = fill  # fill value as a numpy scalar of the array's dtype


def _direct_plan(arr: zarr.Array, base: Any, dtype: np.dtype) -> _Direct | None:
    """A :class:`_Direct` when this module can encode the array's chunks exactly as zarr would.

    Only a ``LocalStore``, zarr v3, a regular chunk grid, C order, no storage transformers,
    a native little-endian fixed-size dtype, and the codec chain ``bytes`` or
    ``bytes`` + ``zstd``; anything else returns None (zarr's own write path).
    """
    try:
        import numcodecs
        from zarr.codecs import BytesCodec, ZstdCodec
        from zarr.core.chunk_grids import RegularChunkGrid

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
        if len(codecs) == 1:
            codec = None
        elif len(codecs) == 2 and type(codecs[1]) is ZstdCodec:
            z = codecs[1]
            codec = numcodecs.Zstd(level=int(z.level), checksum=bool(z.checksum))
        else:
            return None
        fill = np.asarray(md.fill_value, dtype=dtype)[()]
        root = os.path.join(str(base.root), *arr.path.split("/"))
        return _Direct(root, md.encode_chunk_key, codec, fill)
    except Exception:  # noqa: BLE001 - anything unexpected: let zarr write
        return None


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


class _ZarrArray(ArrayHandle):
    def __init__(self, arr: zarr.Array, backend: ZarrBackend | None = None) -> None:
        self._a = arr
        self._b = backend
        self.chunks = tuple(arr.chunks)
        self.dtype = np.dtype(
            arr.dtype.to_native_dtype() if hasattr(arr.dtype, "to_native_dtype") else arr.dtype
        )
        base = backend._store._store if backend is not None and backend.writable else None
        self._direct = None if base is None else _direct_plan(arr, base, self.dtype)

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return tuple(self._a.shape)

    def read(self, sel: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(self._a[sel])

    def write(self, sel: tuple[slice, ...], data: np.ndarray) -> None:
        if self._b is not None:
            self._b.write_many([(self, sel, data)])
        else:
            self._a[sel] = data

    def _direct_ok(self, sel: tuple[slice, ...], data: Any) -> bool:
        """Whether the direct path can write this box exactly as ``self._a[sel] = data``."""
        if self._direct is None or not isinstance(data, np.ndarray) or data.dtype != self.dtype:
            return False
        shape = self.shape
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

    def _direct_chunks(
        self, sel: tuple[slice, ...], data: np.ndarray
    ) -> Iterator[tuple[tuple[int, ...], np.ndarray, tuple[slice, ...] | None, bool]]:
        """``(coords, part, dst, merge)`` for every chunk a box touches.

        ``dst`` None: ``part`` is the whole chunk. Otherwise ``part`` goes to ``dst`` of a
        chunk that starts as the stored chunk (``merge``: the box covers only part of
        the chunk's in-bounds region) or as the fill value (an edge chunk covered whole).
        """
        shape, chunks = self.shape, self.chunks
        ranges = [
            range(s.start // c, (s.stop - 1) // c + 1) if s.stop > s.start else range(0)
            for s, c in zip(sel, chunks)
        ]
        for idx in product(*ranges):
            covered, edge = True, False
            src, dst = [], []
            for i, c, s, n in zip(idx, chunks, sel, shape):
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

    def _store_chunk(
        self, idx: tuple[int, ...], part: np.ndarray, dst: tuple[slice, ...] | None, merge: bool
    ) -> None:
        """Assemble, encode and atomically write one chunk (runs in a worker thread)."""
        d = self._direct
        assert d is not None
        path = os.path.join(d.root, d.key(idx))
        if dst is None:
            chunk = np.ascontiguousarray(part)
        else:
            chunk = self._load_chunk(path) if merge else None
            if chunk is None:
                chunk = np.full(self.chunks, d.fill, dtype=self.dtype)
            chunk[dst] = part
        _atomic_put(path, chunk if d.codec is None else d.codec.encode(chunk))

    def _load_chunk(self, path: str) -> np.ndarray | None:
        """The stored chunk as a writable array, or None where it does not exist."""
        d = self._direct
        assert d is not None
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return None
        n = int(np.prod(self.chunks)) * self.dtype.itemsize
        try:
            buf = raw if d.codec is None else d.codec.decode(raw)
            if len(buf) != n:
                raise ValueError(f"{len(buf)} bytes decoded, {n} expected")
        except Exception as e:  # noqa: BLE001 - any codec failure is damage
            raise ArchiveCorruptError(f"chunk {path!r} does not decode: {e}") from e
        return np.frombuffer(buf, dtype=self.dtype).reshape(self.chunks).copy()

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

    def __init__(self, path: str, mode: str) -> None:
        self.path = str(path)
        self.writable = mode != "r"
        is_zip = self.path.endswith(".zip")
        exists = os.path.exists(self.path)
        if mode == "r" and not exists:
            raise ArchiveNotFoundError(f"no archive at {self.path!r}")
        if is_zip:
            if mode == "r":
                base: Any = ZipStore(self.path, mode="r", read_only=True)
            else:
                base = ZipStore(self.path, mode="a" if exists and mode == "a" else "w")
        else:
            base = LocalStore(self.path, read_only=(mode == "r"))
        self._store = _CountingStore(base)
        self._commit_groups: dict[str, Any] = {}
        self._pool: ThreadPoolExecutor | None = None
        try:
            if mode == "w":
                # The caller cleared the path (keeping the lock folder); "a" creates the
                # group without deleting that folder as mode "w" would.
                self._root = zarr.open_group(store=self._store, mode="a", zarr_format=3)
            else:
                self._root = zarr.open_group(store=self._store, mode="r" if mode == "r" else "r+")
        except Exception as e:  # noqa: BLE001 - any failure here means "not a zarr group"
            raise ArchiveCorruptError(
                f"{self.path!r} is not a readable Zarr v3 group ({type(e).__name__}: {e})"
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
        # Round-trip through json so non-JSON values fail here, not in a reader.
        self._root.attrs[ROOT_KEY] = json.loads(json.dumps(meta))

    # -- nodes ------------------------------------------------------------------------
    def _node(self, path: str) -> Any:
        return self._root[path]

    def has(self, path: str) -> bool:
        try:
            self._root[path]
        except KeyError:
            return False
        return True

    def list_nodes(self) -> list[str]:
        out = []
        for stack in ("encoder", "decoder"):
            if not self.has(stack):
                continue
            sg = self._root[stack]
            for layer in sg.group_keys():
                lg = sg[layer]
                for kind in list(lg.array_keys()) + list(lg.group_keys()):
                    out.append(f"{stack}/{layer}/{kind}")
        return out

    def list_children(self, path: str) -> list[str]:
        if not self.has(path):
            return []
        node = self._root[path]
        return sorted(list(node.array_keys()) + list(node.group_keys()))

    def create_array(self, path, shape, chunks, dtype, *, dims, attrs=None, compressor="zstd"):  # type: ignore[no-untyped-def]
        comp = _codecs(compressor)
        arr = self._root.create_array(
            path,
            shape=shape,
            chunks=chunks,
            dtype=np.dtype(dtype),
            compressors=None if comp is None else comp,
            filters=None,
            fill_value=0,
            dimension_names=dims,
            attributes={ROOT_KEY: attrs or {}},
            config={"write_empty_chunks": True},
            overwrite=False,
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
            if isinstance(h, _ZarrArray) and h._direct_ok(sel, data):
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
            for job in h._direct_chunks(sel, data):
                if pool is None:
                    h._store_chunk(*job)
                else:
                    pending.append(pool.submit(h._store_chunk, *job))

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

        async def _all() -> None:
            await asyncio.gather(*(h._setitem(sel, d) for h, sel, d in writes))  # type: ignore[attr-defined]

        sync(_all())

    def _chunk_pool(self) -> ThreadPoolExecutor | None:
        if ENCODE_THREADS < 2:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="attnscope-zarrenc")
        return self._pool

    # -- commits ----------------------------------------------------------------------
    def read_commits(self) -> dict[str, tuple[int, int, int]]:
        if not self.has(COMMITS):
            return {}
        g = self._root[COMMITS]
        out = {}
        for rid in g.group_keys():
            rec = g[rid].attrs.get(ROOT_KEY)
            if not isinstance(rec, dict):
                raise ArchiveCorruptError(f"commit record {rid!r} in {self.path!r} is unreadable")
            try:
                out[rid] = (int(rec["start"]), int(rec["stop"]), int(rec["committed"]))
            except (KeyError, TypeError, ValueError) as e:
                raise ArchiveCorruptError(
                    f"commit record {rid!r} in {self.path!r} is malformed: {rec!r}"
                ) from e
        return out

    def write_commit(self, rid: str, start: int, stop: int, committed: int) -> None:
        # One small zarr.json per writer: disjoint-range writers never touch the same file.
        rec = {"start": int(start), "stop": int(stop), "committed": int(committed)}
        group = self._commit_groups.get(rid)
        base = self._store._store
        if group is None or not isinstance(base, LocalStore):
            if group is None:
                group = self._root.require_group(COMMITS).require_group(rid)
                self._commit_groups[rid] = group
            group.attrs[ROOT_KEY] = rec
            return
        # Fast path (every commit after the first): the record group exists and belongs to
        # this writer alone, so replace its zarr.json directly: the same document zarr
        # writes, atomically (temporary file + rename, like LocalStore), without an
        # event-loop round trip and a metadata read-merge (~3 ms -> ~0.1 ms).
        doc = {"attributes": {ROOT_KEY: rec}, "zarr_format": 3, "node_type": "group"}
        final = os.path.join(str(base.root), COMMITS, rid, "zarr.json")
        tmp = f"{final}.{uuid.uuid4().hex}.partial"
        try:
            with open(tmp, "wb") as fh:
                fh.write(json.dumps(doc, indent=2).encode())
            os.replace(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def missing_chunks(self, path: str, n: int) -> list[tuple[int, ...]]:
        arr = self._root[path]
        shape = (min(n, arr.shape[0]), *arr.shape[1:])
        grid = chunk_grid(shape, arr.chunks)
        base = self._store._store
        missing = []
        if isinstance(base, LocalStore):
            root = os.path.join(str(base.root), *path.split("/"), "c")
            for idx in product(*(range(g) for g in grid)):
                if not os.path.exists(os.path.join(root, *map(str, idx))):
                    missing.append(idx)
        else:
            from zarr.core.sync import sync

            async def _keys() -> set[str]:
                return {k async for k in base.list_prefix(f"{path}/c/")}

            keys = sync(_keys())
            for idx in product(*(range(g) for g in grid)):
                if f"{path}/c/" + "/".join(map(str, idx)) not in keys:
                    missing.append(idx)
        return missing

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        try:
            self._store.close()
        except Exception:  # noqa: BLE001 - closing twice or a read-only store
            pass

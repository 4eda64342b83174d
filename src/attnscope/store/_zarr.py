"""Zarr v3 backend: a directory store by default, ``.zip`` paths through ``ZipStore``.

Chunk files of a ``LocalStore`` are written atomically (temporary file + rename), so a
process killed mid-write leaves each chunk either old or new, never torn. Arrays are
unsharded (concurrent partial shard writes are unsafe, zarr-python #3413) and are
created with ``write_empty_chunks=True`` so that every chunk inside the committed
range exists on disk and a missing one means damage, not zeros.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Sequence
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


class _ZarrArray(ArrayHandle):
    def __init__(self, arr: zarr.Array) -> None:
        self._a = arr
        self.chunks = tuple(arr.chunks)
        self.dtype = np.dtype(
            arr.dtype.to_native_dtype() if hasattr(arr.dtype, "to_native_dtype") else arr.dtype
        )

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return tuple(self._a.shape)

    def read(self, sel: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(self._a[sel])

    def write(self, sel: tuple[slice, ...], data: np.ndarray) -> None:
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
        return _ZarrArray(arr)

    def get_array(self, path: str) -> ArrayHandle:
        node = self._root[path]
        if not isinstance(node, zarr.Array):
            raise ArchiveCorruptError(f"{path!r} in {self.path!r} is a group, expected an array")
        return _ZarrArray(node)

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
        """Write boxes of several arrays concurrently: one event-loop round trip per batch.

        zarr encodes each chunk in a worker thread (numcodecs releases the GIL), so the
        chunks of all arrays of a batch compress in parallel.
        """
        if len(writes) <= 1 or not all(isinstance(h, _ZarrArray) for h, _s, _d in writes):
            super().write_many(writes)
            return
        from zarr.core.sync import sync

        async def _all() -> None:
            await asyncio.gather(*(h._setitem(sel, d) for h, sel, d in writes))  # type: ignore[attr-defined]

        sync(_all())

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
        try:
            self._store.close()
        except Exception:  # noqa: BLE001 - closing twice or a read-only store
            pass

"""Root metadata of an archive: building and checking it, provenance, the format of a
path, opening the matching backend, and the committed prefix of the commit records."""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import platform
import socket
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

from attnscope.contracts import COMPRESSORS, DTYPES, FORMATS, MAX_LENGTHS, QUERY_ROWS, STACKS
from attnscope.errors import (
    ArchiveCorruptError,
    ArchiveNotFoundError,
    AttnscopeError,
    ConfigError,
    InputError,
)
from attnscope.store.backends.base import Backend
from attnscope.store.backends.location import Location, locate
from attnscope.store.backends.lock import locks_inside
from attnscope.store.codecs import check_level, storage_dtype
from attnscope.store.layout import TokenLayout
from attnscope.store.spec import ArchiveSpec
from attnscope.store.validation import check_tolerance

__all__ = [
    "refuse_existing",
    "refuse_existing_at",
    "SCHEMA_VERSION",
    "FORMAT_NAME",
    "MAIN",
    "archive_format",
    "sniff_format",
    "open_backend",
    "is_archive",
    "root_meta",
    "check_meta",
    "committed_prefix",
    "damage_is_corruption",
    "holds_no_data",
    "no_data_message",
    "INPUT_HASH_KEYS",
    "input_hashes",
]

#: newest schema this attnscope reads and writes: 2 = ragged (per-sample masks, max_lengths);
#: archives without max_lengths are still written as 1 (an older reader reads them right)
SCHEMA_VERSION = 2
FORMAT_NAME = "attnscope-archive"
#: commit record id of the whole-archive writer
MAIN = "main"
#: per-sample ids holding the SHA-256 of the sample's batch inputs, four big-endian uint64
#: words (written by capture with each batch, so committed with it)
INPUT_HASH_KEYS = tuple(f"input_sha256_{i}" for i in range(4))


def input_hashes(sample_ids: Mapping[str, Any]) -> list[str] | None:
    """Per sample, ``"sha256:<hex>"`` of its batch's inputs; None if not recorded."""
    if not all(k in sample_ids for k in INPUT_HASH_KEYS):
        return None
    words = np.stack([np.asarray(sample_ids[k], dtype=np.uint64) for k in INPUT_HASH_KEYS], 1)
    return ["sha256:" + row.astype(">u8").tobytes().hex() for row in words]


@contextmanager
def damage_is_corruption(path: str) -> Iterator[None]:
    """Turn any non-attnscope error raised inside into a one-line ArchiveCorruptError.

    Library errors on damaged files (``JSONDecodeError`` from a junk ``zarr.json``,
    ``OSError``/``KeyError`` from a truncated HDF5 file) would otherwise reach the user
    as tracebacks.
    """
    try:
        yield
    except AttnscopeError:
        raise
    except Exception as e:  # noqa: BLE001 - anything else means the archive is damaged
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ArchiveCorruptError(
            f"{path!r} is damaged and cannot be read ({type(e).__name__}: {msg[:200]})"
        ) from e


@functools.cache
def _installed(pkg: str) -> str | None:
    """The installed version of a package not imported (reads its metadata: ~10 ms)."""
    import importlib.metadata as im

    try:
        return im.version(pkg)
    except im.PackageNotFoundError:
        return None


def _provenance(seed: int | None, tags: dict | None, backend_lib: str) -> dict[str, Any]:
    def ver(pkg: str) -> str | None:
        mod = sys.modules.get(pkg)
        if mod is not None and hasattr(mod, "__version__"):
            return str(mod.__version__)
        return _installed(pkg)

    from attnscope import __version__

    return {
        "attnscope": __version__,
        "torch": ver("torch"),
        "numpy": np.__version__,
        backend_lib: ver(backend_lib),
        # every library a reader may ask about, whichever backend wrote the archive
        "libraries": {
            pkg: ver(pkg) for pkg in ("torch", "transformers", "numpy", "zarr", "h5py")
        },
        "python": platform.python_version(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "seed": seed,
        "tags": dict(tags or {}),
    }


def _json_ok(obj: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as e:
        raise InputError(f"{what} must be JSON-serialisable (no pickles): {e}") from e


def _opt_int(x: Any) -> int | None:
    return None if x is None else int(x)


def root_meta(spec: ArchiveSpec, layout: TokenLayout, fmt: str) -> dict[str, Any]:
    """The root metadata of a new archive (checks every option first).

    ``chunk_samples`` and ``batch_size`` record the chunk policy, so arrays created on a
    later first append are chunked like those created up front.
    """
    if spec.dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {spec.dtype!r}; expected one of {DTYPES}")
    if spec.compressor not in COMPRESSORS:
        raise ConfigError(f"unknown compressor {spec.compressor!r}; expected one of {COMPRESSORS}")
    level = check_level(spec.compressor, spec.level)
    topk = spec.sparse_topk
    if topk is not None and (isinstance(topk, bool) or int(topk) < 1):
        raise ConfigError(f"sparse_topk must be a positive int or None, got {topk!r}")
    for what in ("capacity", "chunk_samples", "batch_size", "query_block"):
        v = getattr(spec, what)
        low = 0 if what == "capacity" else 1
        if v is not None and (isinstance(v, bool) or int(v) < low):
            raise ConfigError(f"{what} must be an int >= {low} or None, got {v!r}")
    if not isinstance(layout, TokenLayout):
        raise InputError(f"layout must be a TokenLayout, got {type(layout).__name__}")
    tol = None if spec.tolerance is None else check_tolerance(spec.tolerance)
    max_lengths = _max_lengths(spec.max_lengths, layout)
    return {
        "format": FORMAT_NAME,
        "schema_version": 1 if max_lengths is None else 2,
        MAX_LENGTHS: max_lengths,
        QUERY_ROWS: _query_rows(spec.query_rows, layout),
        "layout": layout.to_json(),
        "dtype": spec.dtype,
        "storage_dtype": str(storage_dtype(spec.dtype)),
        "mode": "dense" if topk is None else "sparse",
        "topk": _opt_int(topk),
        "compressor": spec.compressor,
        "level": level,
        "chunk_samples": _opt_int(spec.chunk_samples),
        "batch_size": _opt_int(spec.batch_size),
        "query_block": _opt_int(spec.query_block),
        "capacity": _opt_int(spec.capacity),
        "validate": bool(spec.validate),
        "normalized": bool(spec.validate if spec.normalized is None else spec.normalized),
        "tolerance": tol,
        "model_config": _json_ok(spec.model_config or {}, "model_config"),
        "capture": _json_ok(spec.capture or {}, "capture"),
        "heads": _json_ok(spec.heads or {}, "heads"),
        "arrays": [],
        "provenance": _provenance(
            spec.seed, _json_ok(spec.tags, "tags"), "h5py" if fmt == "hdf5" else "zarr"
        ),
    }


def _max_lengths(given: Any, layout: TokenLayout) -> dict[str, int] | None:
    """Checked ``max_lengths``: sides of the layout, each equal to that side's length."""
    if given is None:
        return None
    if not isinstance(given, Mapping) or not given:
        raise ConfigError(
            f"max_lengths must be a non-empty mapping side -> tokens, e.g. {{'encoder': 128}}; "
            f"got {given!r}"
        )
    out = {}
    for side, n in given.items():
        if side not in STACKS:
            raise ConfigError(f"max_lengths: unknown side {side!r}; expected one of {STACKS}")
        lay = getattr(layout, side)
        if lay is None:
            raise ConfigError(f"max_lengths[{side!r}] given but the layout has no {side} side")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) < 1:
            raise ConfigError(f"max_lengths[{side!r}] must be an int >= 1, got {n!r}")
        if int(n) != lay.length:
            raise ConfigError(
                f"max_lengths[{side!r}] is {int(n)} but the {side} layout has {lay.length} "
                f"tokens; build the layout for the maximum, e.g. "
                f"SideLayout.from_lengths({{'text': {int(n)}}})"
            )
        out[side] = int(n)
    return out


def _query_rows(given: Any, layout: TokenLayout) -> dict[str, list[int]] | None:
    """Checked ``query_rows``: sides of the layout, ascending unique rows inside its length."""
    if given is None:
        return None
    if not isinstance(given, Mapping) or not given:
        raise ConfigError(
            f"query_rows must be a non-empty mapping side -> rows, e.g. {{'decoder': [7]}}; "
            f"got {given!r}"
        )
    out = {}
    for side, rows in given.items():
        lay = getattr(layout, side, None) if side in STACKS else None
        if lay is None:
            raise ConfigError(
                f"query_rows[{side!r}]: the layout has no such side; expected sides among "
                f"{[s for s in STACKS if getattr(layout, s) is not None]}"
            )
        try:
            vals = [int(r) for r in rows]
        except (TypeError, ValueError):
            raise ConfigError(f"query_rows[{side!r}] must be row indices, got {rows!r}") from None
        if not vals or vals != sorted(set(vals)) or vals[0] < 0 or vals[-1] >= lay.length:
            raise ConfigError(
                f"query_rows[{side!r}] must be ascending unique rows in [0, {lay.length}), "
                f"got {vals}"
            )
        out[str(side)] = vals
    return out


def archive_format(path: str | os.PathLike, format: str | None = None) -> str:
    """The format a new archive at ``path`` gets: ``format``, else ``.h5``/``.hdf5`` -> hdf5,
    anything else zarr. HDF5 at a URL raises :class:`ConfigError` (local files only)."""
    loc = locate(path)
    if format is not None:
        if format not in FORMATS:
            raise ConfigError(f"unknown format {format!r}; expected one of {FORMATS}")
        fmt = format
    else:
        fmt = "hdf5" if loc.lower().endswith((".h5", ".hdf5")) else "zarr"
    loc.refuse_hdf5(fmt)
    return fmt


def open_backend(
    path: str, fmt: str, mode: str, root_meta: dict[str, Any] | None = None,
    *, workers: int | None = None,
) -> Backend:  # fmt: skip
    """The backend of ``fmt`` opened at ``path`` (``"r"``, ``"a"`` or ``"w"``); mode ``"w"``
    with ``root_meta`` writes it (Zarr: in the same write that creates the root group).
    ``workers``: threads that encode and write chunks (Zarr; default one per core)."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    path = locate(path)
    path.refuse_hdf5(fmt)
    if fmt == "hdf5":
        from attnscope.store.backends.hdf5_store import HDF5Backend

        backend: Backend = HDF5Backend(path, mode)
        if root_meta is not None:
            try:
                backend.write_root_meta(root_meta)
            except BaseException:
                backend.close()
                raise
        return backend
    from attnscope.store.backends.zarr_store import ZarrBackend

    return ZarrBackend(path, mode, root_meta if mode == "w" else None, workers=workers)


def holds_no_data(path: str | os.PathLike) -> bool:
    """Whether ``path`` is what a writer stopped before its first commit leaves behind.

    A directory holding nothing but the writer lock folder (or nothing at all), or a
    missing file beside its sidecar lock folder (HDF5, zip): an empty archive. At a URL:
    keys exist and all belong to the lock folder.
    """
    return locate(path).holds_no_data()


def no_data_message(path: str | os.PathLike) -> str:
    """What :func:`holds_no_data` means, for users: one line naming what is there."""
    return locate(path).no_data_message()


def sniff_format(path: str | os.PathLike) -> str:
    """``"zarr"`` or ``"hdf5"`` for an existing archive, from what is stored."""
    loc = locate(path)
    if loc.holds_no_data():
        raise ArchiveNotFoundError(loc.no_data_message())
    return loc.sniff_format()


def is_archive(path: str) -> bool:
    """Whether ``path`` holds an attnscope archive (root metadata names our format)."""
    try:
        backend = open_backend(path, sniff_format(path), "r")
        try:
            return backend.read_root_meta().get("format") == FORMAT_NAME
        finally:
            backend.close()
    except Exception:  # noqa: BLE001 - anything unreadable is "not ours"
        return False


def check_meta(meta: dict[str, Any], path: str) -> TokenLayout:
    """Check root metadata read from ``path``; return its token layout."""
    if meta.get("format") != FORMAT_NAME:
        raise ArchiveCorruptError(
            f"{path!r}: root metadata 'format' is {meta.get('format')!r}, expected {FORMAT_NAME!r}"
        )
    ver = meta.get("schema_version")
    if not isinstance(ver, int) or not 1 <= ver <= SCHEMA_VERSION:
        raise ArchiveCorruptError(
            f"{path!r}: schema_version {ver!r} is not supported; this attnscope reads "
            f"versions 1..{SCHEMA_VERSION}"
        )
    if ver < 2 and meta.get(MAX_LENGTHS):
        raise ArchiveCorruptError(
            f"{path!r}: schema_version {ver} root metadata carries {MAX_LENGTHS!r} "
            "(ragged archives are schema 2); the metadata is damaged"
        )
    if meta.get("dtype") not in DTYPES:
        raise ArchiveCorruptError(
            f"{path!r}: stored dtype {meta.get('dtype')!r} is not one of {DTYPES}"
        )
    if meta.get("mode", "dense") not in ("dense", "sparse"):
        raise ArchiveCorruptError(f"{path!r}: mode {meta.get('mode')!r} is not dense or sparse")
    arrays = meta.get("arrays", [])
    if not isinstance(arrays, list) or not all(isinstance(a, str) for a in arrays):
        raise ArchiveCorruptError(f"{path!r}: root metadata 'arrays' is not a list of names")
    try:
        layout = TokenLayout.from_json(meta["layout"])
        if ver >= 2:
            _max_lengths(meta.get(MAX_LENGTHS), layout)
    except Exception as e:  # noqa: BLE001 - any malformed layout is corruption
        raise ArchiveCorruptError(
            f"{path!r}: token layout / max_lengths in root metadata is invalid: {e}"
        ) from e
    return layout


def committed_prefix(commits: Mapping[str, tuple[int, int, int]]) -> int:
    """Number of samples ``[0, n)`` covered without gap by the commit records."""
    spans = sorted((a, a + c) for a, _b, c in commits.values() if c > 0)
    n = 0
    for a, b in spans:
        if a > n:
            break
        n = max(n, b)
    return n


def refuse_existing(
    path: str | os.PathLike, *, format: str | None = None, overwrite: bool = False
) -> None:
    """Raise :class:`ConfigError` unless a new archive may be created at ``path``: nothing is
    there (or only a writer's lock folder), or ``overwrite`` and it is an archive."""
    loc = locate(path)
    refuse_existing_at(loc, locks_inside(loc, archive_format(loc, format)), overwrite)


def refuse_existing_at(path: Location, inside: bool, overwrite: bool) -> None:
    if path.remote:
        if not path.exists() or path.holds_no_data():
            return  # nothing under the URL, or only a writer's lock objects
    elif not path.exists():
        return
    elif inside and os.path.isdir(path) and path.empty_dir():  # type: ignore[attr-defined]
        return  # an empty directory (or one holding only our lock folder) is free
    if not overwrite:
        raise ConfigError(
            f"archive {path!r} already exists (replace it with overwrite / --overwrite, "
            f"or append to it with resume / --resume)"
        )
    if not is_archive(path):
        raise ConfigError(
            f"{path!r} exists but is not an attnscope archive; refusing to delete it "
            "(overwrite only replaces archives)"
        )

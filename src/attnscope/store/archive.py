"""Writer and reader of attention archives (format spec: ``docs/archive-format.md``).

One archive holds one array per (stack, layer, kind), shaped ``(N, H, T, S)`` =
sample, head, query, key, with ``N`` growing as batches are appended. Readers only
ever see the *committed* samples: a batch becomes visible once all of its data is
written, through a commit record written last.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from attnscope.contracts import DIMS, DTYPES, FORMATS, SAMPLE_IDS
from attnscope.errors import (
    ArchiveCorruptError,
    ArchiveError,
    ArchiveNotFoundError,
    ConfigError,
    InputError,
    SelectionError,
    ShapeError,
    ValidationError,
)
from attnscope.store._base import COMPRESSORS, Backend, MiB, choose_chunks
from attnscope.store._lock import LOCK_DIR_NAME, Lease
from attnscope.store.layout import KIND_AXES, KINDS, STACKS, TokenLayout
from attnscope.store.spec import ArchiveSpec, batch_chunk_samples

__all__ = [
    "SCHEMA_VERSION",
    "FORMAT_NAME",
    "ArchiveWriter",
    "AttentionArchive",
    "AttentionArray",
    "open_archive",
    "array_name",
    "parse_array_name",
]

SCHEMA_VERSION = 1
FORMAT_NAME = "attnscope-archive"
MAIN = "main"


# ---------------------------------------------------------------------------------------
# names


def array_name(stack: str, layer: int, kind: str) -> str:
    """Storage path of one attention array, e.g. ``"decoder/2/cross_attention"``."""
    if (stack, kind) not in KIND_AXES:
        raise SelectionError(
            f"unknown attention {stack}/{kind}; expected one of {['/'.join(x) for x in KIND_AXES]}"
        )
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
        raise SelectionError(f"layer must be a non-negative int, got {layer!r}")
    return f"{stack}/{int(layer)}/{kind}"


def parse_array_name(name: str) -> tuple[str, int, str]:
    """Inverse of :func:`array_name`: ``"encoder/0/self_attention"`` -> ``("encoder", 0, ...)``."""
    parts = str(name).split("/")
    if len(parts) != 3 or not parts[1].isdigit() or (parts[0], parts[2]) not in KIND_AXES:
        raise SelectionError(
            f"bad array name {name!r}; expected 'stack/layer/kind' with stack in {STACKS}, "
            f"an int layer and kind in {KINDS} (e.g. 'encoder/0/self_attention')"
        )
    return parts[0], int(parts[1]), parts[2]


def flatten_weights(weights: Mapping[str, Any]) -> dict[str, Any]:
    """Array name -> weights, from the model's nested dict or an already flat one.

    ``{"encoder": [{"self_attention": w}], "decoder": [...]}`` becomes
    ``{"encoder/0/self_attention": w, ...}``; ``None`` entries (not captured) are dropped.
    """
    if not isinstance(weights, Mapping):
        raise InputError(
            f"weights must be a dict (nested by stack or flat by array name), got "
            f"{type(weights).__name__}"
        )
    out: dict[str, Any] = {}
    if weights and all(k in STACKS for k in weights):
        for stack, layers in weights.items():
            if layers is None:
                continue
            if isinstance(layers, Mapping) or not hasattr(layers, "__len__"):
                raise InputError(
                    f"weights[{stack!r}] must be a list of per-layer dicts, got "
                    f"{type(layers).__name__}"
                )
            for layer, kinds in enumerate(layers):
                if kinds is None:
                    continue
                if not isinstance(kinds, Mapping):
                    raise InputError(
                        f"weights[{stack!r}][{layer}] must be a dict kind -> tensor, got "
                        f"{type(kinds).__name__}"
                    )
                for kind, w in kinds.items():
                    if w is not None:
                        out[array_name(stack, layer, kind)] = w
        return out
    unknown = [k for k in weights if not (isinstance(k, str) and "/" in k)]
    if unknown:
        raise InputError(
            f"unknown attention keys {unknown}; expected 'encoder'/'decoder' lists of "
            "{kind: tensor} dicts or flat 'stack/layer/kind' keys"
        )
    for name, w in weights.items():
        if w is not None:
            parse_array_name(name)
            out[name] = w
    return out


def _sort_key(name: str) -> tuple[int, int, int]:
    s, layer, k = parse_array_name(name)
    return STACKS.index(s), layer, KINDS.index(k)


# ---------------------------------------------------------------------------------------
# dtype helpers


def _storage_dtype(dtype: str) -> np.dtype:
    # zarr has no bfloat16 (zarr-python #2656): store its raw 16 bits as uint16.
    return np.dtype({"float16": "float16", "float32": "float32", "bfloat16": "uint16"}[dtype])


def _read_dtype(dtype: str) -> np.dtype:
    return np.dtype("float16" if dtype == "float16" else "float32")


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    u = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return (u >> np.uint32(16)).astype(np.uint16)


def _from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _encode(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return _to_bf16_bits(x)
    return np.asarray(x, dtype=dtype)


def _decode(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return _from_bf16_bits(x)
    return x


def _is_half(x: Any) -> bool:
    """Whether ``x`` (numpy or torch) holds 16-bit floats (looser row-sum tolerance)."""
    return any(s in str(getattr(x, "dtype", "")) for s in ("float16", "bfloat16", "half"))


def as_numpy(x: Any, what: str = "weights") -> np.ndarray:
    """numpy view of a numpy array or (duck-typed, never imported) torch tensor.

    The dtype is kept (float16 stays float16) except bfloat16, which numpy lacks: float32.
    """
    if hasattr(x, "detach"):
        t = x.detach()
        if "bfloat16" in str(getattr(t, "dtype", "")):
            t = t.float()
        return t.cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise InputError(f"{what}: expected a numpy array or torch tensor, got {type(x).__name__}")


# Largest bit pattern of a finite, non-negative float of each width (+Inf's pattern - 1).
_MAX_OK_BITS = {2: 0x7BFF, 4: 0x7F7FFFFF, 8: 0x7FEFFFFFFFFFFFFF}
_F16_LUT: np.ndarray | None = None
_SLAB_BYTES = 256 * 1024  # float32 scratch per slab: stays in L2


def _finite_nonneg(w: np.ndarray) -> bool:
    """True if every element is finite and >= 0 (``-0.0`` reports False), in one pass.

    Reads the raw bits as unsigned ints: a max-reduction over them is ~100x faster than
    ``np.isfinite`` + ``w < 0`` on float16.
    """
    lim = _MAX_OK_BITS.get(w.dtype.itemsize)
    if lim is None or w.dtype.kind != "f" or w.size == 0:
        return bool(np.isfinite(w).all() and not (w < 0).any())
    u = np.ascontiguousarray(w).view(f"u{w.dtype.itemsize}")
    return int(u.max()) <= lim


def _f16_lut() -> np.ndarray:
    global _F16_LUT
    if _F16_LUT is None:
        _F16_LUT = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
        _F16_LUT = _F16_LUT.astype(np.float32)
    return _F16_LUT


def _row_sums(w: np.ndarray) -> np.ndarray:
    """float32 sums of the last axis, shape ``w.shape[:-1]``.

    float32 input: one BLAS matrix-vector product with ones. 16-bit and float64 input:
    converted to float32 in L2-sized slabs of whole rows into one reused buffer (torch's
    vectorised half->float copy when torch is already loaded, else a 256 KiB lookup
    table), each slab summed by BLAS. numpy's own float16 casts and float16 reductions
    run at ~0.5 GB/s; this runs at several GB/s and allocates nothing per row.
    """
    s = w.shape[-1]
    rows = int(np.prod(w.shape[:-1]))
    x = np.ascontiguousarray(w).reshape(rows, s)
    ones = np.ones(s, dtype=np.float32)
    if x.dtype == np.float32 or rows == 0 or s == 0:
        return (x.astype(np.float32, copy=False) @ ones).reshape(w.shape[:-1])
    out = np.empty(rows, dtype=np.float32)
    step = max(1, _SLAB_BYTES // (4 * s))
    buf = np.empty((min(step, rows), s), dtype=np.float32)
    torch = sys.modules.get("torch") if x.dtype == np.float16 else None
    if torch is not None:
        tbuf, tx = torch.from_numpy(buf), torch.from_numpy(x)
    lut = _f16_lut() if x.dtype == np.float16 and torch is None else None
    u = x.view(np.uint16) if lut is not None else None
    for a in range(0, rows, step):
        b = min(rows, a + step)
        t = buf[: b - a]
        if torch is not None:
            tbuf[: b - a].copy_(tx[a:b])
        elif u is not None:
            np.take(lut, u[a:b], out=t)
        else:
            np.copyto(t, x[a:b], casting="unsafe")
        np.matmul(t, ones, out=out[a:b])
    return out.reshape(w.shape[:-1])


# ---------------------------------------------------------------------------------------
# metadata


def _provenance(seed: int | None, tags: dict | None, backend_lib: str) -> dict[str, Any]:
    import importlib.metadata as im

    def ver(pkg: str) -> str | None:
        mod = sys.modules.get(pkg)
        if mod is not None and hasattr(mod, "__version__"):
            return str(mod.__version__)
        try:
            return im.version(pkg)
        except im.PackageNotFoundError:
            return None

    from attnscope import __version__

    return {
        "attnscope": __version__,
        "torch": ver("torch"),
        "numpy": np.__version__,
        backend_lib: ver(backend_lib),
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


def archive_format(path: str | os.PathLike, format: str | None = None) -> str:
    """The format a new archive at ``path`` gets: ``format``, else ``.h5``/``.hdf5`` -> hdf5,
    anything else zarr."""
    if format is not None:
        if format not in FORMATS:
            raise ConfigError(f"unknown format {format!r}; expected one of {FORMATS}")
        return format
    return "hdf5" if os.fspath(path).lower().endswith((".h5", ".hdf5")) else "zarr"


def _open_backend(path: str, fmt: str, mode: str) -> Backend:
    if fmt == "hdf5":
        from attnscope.store._hdf5 import HDF5Backend

        return HDF5Backend(path, mode)
    from attnscope.store._zarr import ZarrBackend

    return ZarrBackend(path, mode)


def _sniff_format(path: str) -> str:
    if not os.path.exists(path):
        raise ArchiveNotFoundError(f"no archive at {path!r}")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "zarr.json")):
            raise ArchiveCorruptError(
                f"{path!r} is a directory without zarr.json: not an attnscope Zarr archive"
            )
        return "zarr"
    if path.lower().endswith(".zip"):
        return "zarr"
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head == b"\x89HDF\r\n\x1a\n" or path.lower().endswith((".h5", ".hdf5")):
        return "hdf5"
    raise ArchiveCorruptError(
        f"{path!r} is neither a Zarr directory/zip nor an HDF5 file: not an attnscope archive"
    )


def _is_archive(path: str) -> bool:
    """Whether ``path`` holds an attnscope archive (root metadata names our format)."""
    try:
        fmt = _sniff_format(path)
        backend = _open_backend(path, fmt, "r")
        try:
            return backend.read_root_meta().get("format") == FORMAT_NAME
        finally:
            backend.close()
    except Exception:  # noqa: BLE001 - anything unreadable is "not ours"
        return False


def _check_meta(meta: dict[str, Any], path: str) -> TokenLayout:
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
    if meta.get("dtype") not in DTYPES:
        raise ArchiveCorruptError(
            f"{path!r}: stored dtype {meta.get('dtype')!r} is not one of {DTYPES}"
        )
    if meta.get("mode", "dense") not in ("dense", "sparse"):
        raise ArchiveCorruptError(f"{path!r}: mode {meta.get('mode')!r} is not dense or sparse")
    try:
        return TokenLayout.from_json(meta["layout"])
    except Exception as e:  # noqa: BLE001 - any malformed layout is corruption
        raise ArchiveCorruptError(f"{path!r}: token layout in root metadata is invalid: {e}") from e


def committed_prefix(commits: Mapping[str, tuple[int, int, int]]) -> int:
    """Number of samples ``[0, n)`` covered without gap by the commit records."""
    spans = sorted((a, a + c) for a, _b, c in commits.values() if c > 0)
    n = 0
    for a, b in spans:
        if a > n:
            break
        n = max(n, b)
    return n


# ---------------------------------------------------------------------------------------
# writer


class _Spec:
    """What the writer knows about one attention node."""

    def __init__(self, name: str, h: int, t: int, s: int, heads: list[int]) -> None:
        self.name, self.h, self.t, self.s, self.heads = name, h, t, s, heads
        self.handles: dict[str, Any] = {}


class ArchiveWriter:
    """Append attention batches to an archive; a context manager.

    Create a new archive with :meth:`create`, or resume one with :meth:`open`. Each
    :meth:`append` writes one batch in place and then advances the committed count;
    nothing of a batch is visible to readers before that, and earlier batches are never
    held in memory.

    Examples
    --------
    >>> layout = TokenLayout(encoder=SideLayout.from_lengths({"text": 5}))  # doctest: +SKIP
    >>> with ArchiveWriter.create("run.zarr", layout) as w:                   # doctest: +SKIP
    ...     w.append({"encoder/0/self_attention": weights})  # (B, H, S, S)
    """

    def __init__(self) -> None:  # use create() / open()
        self._backend: Backend | None = None
        self._lease: Lease | None = None

    # -- construction -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        layout: TokenLayout,
        spec: ArchiveSpec | None = None,
        *,
        overwrite: bool = False,
        **options: Any,
    ) -> ArchiveWriter:
        """Create a new archive and return a writer holding its lock.

        Parameters
        ----------
        path
            Directory (Zarr, default), ``*.zarr.zip`` (Zarr zip, not crash-safe) or
            ``*.h5`` / ``*.hdf5`` (HDF5).
        layout
            Token layout of both sides; fixes ``T`` and ``S`` of every array.
        spec
            The options below as one :class:`ArchiveSpec`; keywords override its fields.
        format
            ``"zarr"`` or ``"hdf5"``; default from the path suffix.
        dtype
            Stored dtype: ``"float16"`` (default), ``"float32"`` or ``"bfloat16"``.
        model_config, capture, tags
            JSON-serialisable dicts stored verbatim in the root metadata.
        heads
            Array name -> original head indices kept (default: all heads, in order).
        seed
            Random seed of the run, recorded in the provenance.
        compressor
            One of ``"zstd"`` (default, level 1), ``"none"``, ``"blosc-zstd"``,
            ``"blosc-lz4"``.
        validate
            Check every batch for NaN/Inf, negative weights and rows not summing to 1.
        normalized
            Whether rows are softmax rows that sum to 1, so that :func:`verify` checks them;
            default ``validate``. A caller that validated upstream (``capture`` does, on
            the device) passes ``validate=False, normalized=True``.
        tolerance
            Allowed ``|row sum - 1|``; default 1e-2 for 16-bit input, 1e-3 otherwise.
        overwrite
            Replace an existing archive at ``path``.
        capacity
            Pre-size ``N`` (needed for concurrent disjoint-range writers).
        sparse_topk
            Keep only the top-k weights of each query row (sparse mode).
        arrays
            Array name -> ``(H, T, S)`` to create now rather than on the first append.
        chunk_samples
            Force the number of samples per chunk (e.g. 1 to align any ranges).
        batch_size
            Appends come in batches of this size: Zarr chunks along samples then divide it
            (:func:`batch_chunk_samples`), so no chunk is compressed twice.

        Returns
        -------
        ArchiveWriter
        """
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(ArchiveSpec)})
        if unknown:
            raise ConfigError(f"unknown archive option(s) {unknown}")
        spec = dataclasses.replace(spec or ArchiveSpec(), **options)
        dtype, compressor, sparse_topk = spec.dtype, spec.compressor, spec.sparse_topk
        chunk_samples, capacity, arrays = spec.chunk_samples, spec.capacity, spec.arrays
        validate, normalized = spec.validate, spec.normalized
        path = os.fspath(path)
        fmt = archive_format(path, spec.format)
        if chunk_samples is None and spec.batch_size and arrays and fmt == "zarr":
            chunk_samples = batch_chunk_samples(arrays, dtype, int(spec.batch_size))
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")
        if compressor not in COMPRESSORS:
            raise ConfigError(f"unknown compressor {compressor!r}; expected one of {COMPRESSORS}")
        if sparse_topk is not None and (isinstance(sparse_topk, bool) or int(sparse_topk) < 1):
            raise ConfigError(f"sparse_topk must be a positive int or None, got {sparse_topk!r}")
        if fmt == "hdf5" and chunk_samples not in (None, 1):
            warnings.warn(
                f"chunk_samples={chunk_samples} ignored: HDF5 archives keep one sample per "
                "chunk so that committed data is never rewritten in place",
                stacklevel=2,
            )
            chunk_samples = 1
        if capacity is not None and int(capacity) < 0:
            raise ConfigError(f"capacity must be >= 0, got {capacity}")
        if not isinstance(layout, TokenLayout):
            raise InputError(f"layout must be a TokenLayout, got {type(layout).__name__}")
        inside = fmt == "zarr" and not path.lower().endswith(".zip")
        if os.path.exists(path) and not (
            inside and os.path.isdir(path) and set(os.listdir(path)) <= {LOCK_DIR_NAME}
        ):
            if not overwrite:
                raise ConfigError(
                    f"{path!r} already exists; pass overwrite=True to replace it or use "
                    f"ArchiveWriter.open(path) to append to it"
                )
            if not _is_archive(path):
                raise ConfigError(
                    f"{path!r} exists but is not an attnscope archive; refusing to delete it "
                    "(overwrite=True only replaces archives)"
                )
        meta = {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "layout": layout.to_json(),
            "dtype": dtype,
            "storage_dtype": str(_storage_dtype(dtype)),
            "mode": "dense" if sparse_topk is None else "sparse",
            "topk": None if sparse_topk is None else int(sparse_topk),
            "compressor": compressor,
            "chunk_samples": None if chunk_samples is None else int(chunk_samples),
            "capacity": None if capacity is None else int(capacity),
            "validate": bool(validate),
            "normalized": bool(validate if normalized is None else normalized),
            "tolerance": spec.tolerance,
            "model_config": _json_ok(spec.model_config or {}, "model_config"),
            "capture": _json_ok(spec.capture or {}, "capture"),
            "heads": _json_ok(spec.heads or {}, "heads"),
            "provenance": _provenance(
                spec.seed, _json_ok(spec.tags, "tags"), "h5py" if fmt == "hdf5" else "zarr"
            ),
        }
        self = cls()
        self._lease = self._hold(Lease(path, None, inside=inside))
        try:
            if os.path.exists(path):
                if os.path.isdir(path):
                    for entry in os.listdir(path):
                        if entry != LOCK_DIR_NAME:
                            full = os.path.join(path, entry)
                            (shutil.rmtree if os.path.isdir(full) else os.remove)(full)
                else:
                    os.remove(path)
            backend = _open_backend(path, fmt, "w")
            backend.write_root_meta(meta)
            backend.write_commit(MAIN, 0, 0, 0)
            backend.flush()
            self._init(path, fmt, backend, meta, layout, start=0, stop=None, rid=MAIN, count=0)
            for name, hts in (arrays or {}).items():
                if len(hts) != 3:
                    raise ShapeError(f"arrays[{name!r}] must be (H, T, S), got {hts!r}")
                self._create_node(name, *map(int, hts), n=int(capacity or 0))
        except BaseException:
            if self._backend is not None:
                self._backend.close()
            # Leave no half-created archive behind (the lock is still ours here).
            if os.path.isdir(path):
                for entry in os.listdir(path):
                    if entry != LOCK_DIR_NAME:
                        full = os.path.join(path, entry)
                        (shutil.rmtree if os.path.isdir(full) else os.remove)(full)
            elif os.path.exists(path):
                os.remove(path)
            self._lease.release()
            raise
        return self

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        mode: str = "a",
        *,
        sample_range: tuple[int, int] | None = None,
        format: str | None = None,
    ) -> ArchiveWriter:
        """Reopen an archive to append after its committed samples.

        Parameters
        ----------
        path
            An existing archive.
        mode
            Only ``"a"`` (append) is supported; use :meth:`create` for a new archive.
        sample_range
            ``(start, stop)``: write only samples ``[start, stop)``, concurrently with
            other writers of disjoint ranges (Zarr only; needs ``capacity`` and arrays
            created up front). A range writer resumes after its own committed samples.
        format
            Override format detection.
        """
        path = os.fspath(path)
        if mode != "a":
            raise ConfigError(f"ArchiveWriter.open mode must be 'a', got {mode!r}; use create()")
        fmt = format or _sniff_format(path)
        if fmt not in FORMATS:
            raise ConfigError(f"unknown format {fmt!r}; expected one of {FORMATS}")
        inside = fmt == "zarr" and not path.lower().endswith(".zip")
        if sample_range is not None:
            if fmt != "zarr" or not inside:
                raise ConfigError(
                    f"sample_range writers need a Zarr directory archive; {path!r} is {fmt}"
                    f"{' zip' if fmt == 'zarr' else ''} (one HDF5 file has one writer)"
                )
            a, b = (int(x) for x in sample_range)
            if not 0 <= a < b:
                raise ConfigError(
                    f"sample_range must satisfy 0 <= start < stop, got {sample_range!r}"
                )
            sample_range = (a, b)
        self = cls()
        self._lease = self._hold(Lease(path, sample_range, inside=inside))
        try:
            backend = _open_backend(path, fmt, "a")
            self._backend = backend
            meta = backend.read_root_meta()
            layout = _check_meta(meta, path)
            commits = backend.read_commits()
            if sample_range is None:
                n = committed_prefix(commits)
                self._init(path, fmt, backend, meta, layout, start=0, stop=None, rid=MAIN, count=n)
            else:
                a, b = sample_range
                rid = f"range-{a}-{b}"
                count = commits.get(rid, (a, b, 0))[2]
                main = commits.get(MAIN, (0, 0, 0))
                if main[2] > a:
                    raise ConfigError(
                        f"sample_range {sample_range} overlaps the {main[2]} samples already "
                        f"committed by the main writer"
                    )
                for other, (oa, ob, oc) in commits.items():
                    if other not in (rid, MAIN) and oc > 0 and oa < b and a < ob:
                        raise ConfigError(
                            f"sample_range {sample_range} overlaps committed range [{oa}, {ob})"
                        )
                self._init(path, fmt, backend, meta, layout, start=a, stop=b, rid=rid, count=count)
                for spec in self._specs.values():
                    self._check_range_fits(spec)
        except BaseException:
            self._lease.release()
            if self._backend is not None:
                self._backend.close()
            raise
        return self

    def _init(self, path, fmt, backend, meta, layout, *, start, stop, rid, count) -> None:  # type: ignore[no-untyped-def]
        self.path = path
        self.format = fmt
        self._backend = backend
        self._meta = meta
        self.layout = layout
        self._dtype = meta["dtype"]
        self._sparse = meta.get("mode") == "sparse"
        self._topk = meta.get("topk")
        self._start = start
        self._stop = stop
        self._rid = rid
        self._count = count
        self._specs: dict[str, _Spec] = {}
        self._id_keys: list[str] | None = None
        self._id_handles: dict[str, Any] = {}
        # (array name, part) -> (first sample, copy of samples [first, committed)) of the
        # last partly filled chunk this writer wrote; see append().
        self._tails: dict[tuple[str, str], tuple[int, np.ndarray]] = {}
        self._closed = False
        self._load_existing()

    def _load_existing(self) -> None:
        b = self._backend
        assert b is not None
        for name in b.list_nodes():
            attrs = b.get_attrs(name)
            h, t, s = (int(x) for x in attrs["hts"])
            spec = _Spec(name, h, t, s, list(attrs.get("heads", range(h))))
            for part in ["values", "indices", "residual"] if self._sparse else [""]:
                spec.handles[part] = b.get_array(f"{name}/{part}" if part else name)
            self._specs[name] = spec
        keys = b.list_children(SAMPLE_IDS)
        self._id_keys = keys or None

    # -- properties ---------------------------------------------------------------------
    @property
    def committed(self) -> int:
        """Samples committed by this writer (whole archive, or within its sample_range)."""
        return self._count

    @property
    def sample_range(self) -> tuple[int, int] | None:
        return None if self._stop is None else (self._start, self._stop)

    # -- append -------------------------------------------------------------------------
    def append(
        self, weights: Mapping[str, Any], *, sample_ids: Mapping[str, Any] | None = None
    ) -> int:
        """Write one batch and commit it.

        Parameters
        ----------
        weights
            Either the model's nested dict ``{"encoder": [{"self_attention": (B, H, S, S)},
            ...], "decoder": [{"self_attention": (B, H, T, T), "cross_attention":
            (B, H, T, S)}, ...]}`` (``None`` entries = not captured) or a flat dict
            ``{"encoder/0/self_attention": (B, H, S, S), ...}``. Values are numpy arrays
            or torch tensors; in sparse mode also ``{"values": (B, H, T, k),
            "indices": (B, H, T, k)}`` dicts of precomputed top-k.
        sample_ids
            Optional per-sample ids, e.g. ``{"episode": (B,), "step": (B,)}`` (numeric).

        Returns
        -------
        int
            The new committed count (see :attr:`committed`).
        """
        if self._closed:
            raise ArchiveError(f"writer of {self.path!r} is closed")
        items = self._flatten(weights)
        if not items:
            raise ShapeError("append() got no attention arrays (all entries None or empty dict)")
        prepared, bsz = self._prepare(items)
        ids = self._prepare_ids(sample_ids, bsz)
        # Everything is validated; from here on only writes happen.
        pos = self._start + self._count
        end = pos + bsz
        if self._stop is not None and end > self._stop:
            raise ShapeError(
                f"batch of {bsz} samples does not fit sample_range [{self._start}, {self._stop}): "
                f"{self._stop - pos} slots left"
            )
        # Collect every box of the batch first and hand them to the backend in one call
        # (Zarr writes them concurrently in one event-loop trip, HDF5 encodes chunks in
        # a thread pool); the commit record follows only after that call returned.
        writes: list[tuple[Any, tuple[slice, ...], np.ndarray]] = []
        tails: dict[tuple[str, str], tuple[int, np.ndarray] | None] = {}
        b = self._backend
        assert b is not None
        grow: list[tuple[Any, int]] = []
        for name, parts in prepared.items():
            spec = self._specs.get(name)
            if spec is None:
                spec = self._create_node(
                    name, *parts["_hts"], n=max(end, int(self._meta.get("capacity") or 0))
                )
            for handle in spec.handles.values():
                if handle.shape[0] < end:
                    # Grow geometrically, in whole chunks: each resize rewrites array
                    # metadata, which costs more than the data of a small batch.
                    cs = handle.chunks[0]
                    n = max(end, 2 * handle.shape[0])
                    grow.append((handle, -(-n // cs) * cs))
        if grow:
            b.resize_many(grow)
        for name, parts in prepared.items():
            spec = self._specs[name]
            for part, handle in spec.handles.items():
                cs = handle.chunks[0]
                data, lo = parts[part], pos
                key = (name, part)
                if cs > 1 and handle.merge_tails:
                    # Several samples per chunk: prepend the in-memory copy of this
                    # writer's own samples already in the last, partly filled chunk, so
                    # the backend writes whole chunks instead of reading the chunk back,
                    # decoding it and merging (read-modify-write).
                    tail = self._tails.get(key)
                    if tail is not None and pos % cs and tail[0] + len(tail[1]) == pos:
                        data, lo = np.concatenate([tail[1], data]), tail[0]
                    c0 = end - end % cs
                    tails[key] = (c0, data[c0 - lo :].copy()) if end % cs and c0 >= lo else None
                sel = (slice(lo, end),) + tuple(slice(0, d) for d in data.shape[1:])
                writes.append((handle, sel, data))
        for key, arr in ids.items():
            h = self._id_handles.get(key)
            if h is None:
                path = f"{SAMPLE_IDS}/{key}"
                if not b.has(path):
                    h = b.create_array(
                        path, (0,), (4096,), arr.dtype, dims=("sample",), compressor="none"
                    )
                    self._id_keys = sorted(set(self._id_keys or []) | {key})
                else:
                    h = b.get_array(path)
                self._id_handles[key] = h
            if h.shape[0] < end:
                h.resize(max(end, 2 * h.shape[0]))
            writes.append((h, (slice(pos, end),), arr))
        try:
            b.write_many(writes)
        except BaseException:
            self._tails.clear()  # unknown state on disk: fall back to read-modify-write
            raise
        for key, tail in tails.items():
            if tail is None:
                self._tails.pop(key, None)
            else:
                self._tails[key] = tail
        self._count += bsz
        assert self._backend is not None
        self._backend.write_commit(
            self._rid,
            self._start,
            self._stop if self._stop is not None else self._start + self._count,
            self._count,
        )
        return self._count

    def _flatten(self, weights: Mapping[str, Any]) -> dict[str, Any]:
        return flatten_weights(weights)

    def _prepare(self, items: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], int]:
        bsz = None
        prepared: dict[str, dict[str, Any]] = {}
        for name in sorted(items, key=_sort_key):
            w = items[name]
            stack, _layer, kind = parse_array_name(name)
            if isinstance(w, Mapping):
                if not self._sparse:
                    raise InputError(
                        f"{name}: got a dict {sorted(w)} but this archive is dense; pass the "
                        f"(B, H, T, S) weights"
                    )
                half = _is_half(w.get("values"))
                vals = as_numpy(w.get("values"), f"{name}['values']")
                idx = as_numpy(w.get("indices"), f"{name}['indices']")
                vals = vals.astype(np.float32, copy=False)
                if vals.ndim != 4 or idx.shape != vals.shape:
                    raise ShapeError(
                        f"{name}: values and indices must both be (B, H, T, k); got "
                        f"{vals.shape} and {idx.shape}"
                    )
                s = self._expect_s(name, stack, kind, w.get("n_keys"))
                b, h, t, k = vals.shape
                dense = None
            else:
                half = _is_half(w)
                dense = as_numpy(w, name)
                if dense.ndim != 4:
                    raise ShapeError(
                        f"{name}: expected a 4-d (B, H, T, S) array, got shape {dense.shape}"
                    )
                if not np.issubdtype(dense.dtype, np.floating):
                    raise InputError(f"{name}: expected floating-point weights, got {dense.dtype}")
                b, h, t, s = dense.shape
            if bsz is None:
                bsz = b
            elif b != bsz:
                raise ShapeError(f"{name}: batch size {b} differs from {bsz} of the other arrays")
            self._check_shape(name, stack, kind, h, t, s)
            tol = self._meta.get("tolerance")
            tol = (1e-2 if half else 1e-3) if tol is None else tol
            if dense is not None:
                if self._meta.get("validate", True):
                    self._validate_dense(name, dense, tol)
                if self._sparse:
                    k = int(self._topk)
                    if k > s:
                        raise ConfigError(f"{name}: sparse_topk={k} exceeds the {s} keys")
                    idx = (
                        np.argpartition(dense, s - k, axis=-1)[..., s - k :]
                        if k < s
                        else (np.broadcast_to(np.arange(s), dense.shape).copy())
                    )
                    idx = np.sort(idx, axis=-1)
                    vals = np.take_along_axis(dense, idx, axis=-1).astype(np.float32)
            else:
                if vals.shape[-1] != self._topk:
                    raise ShapeError(
                        f"{name}: expected k={self._topk} kept weights per row, "
                        f"got {vals.shape[-1]}"
                    )
                if not np.issubdtype(idx.dtype, np.integer) or (
                    idx.size and (idx.min() < 0 or idx.max() >= s)
                ):
                    raise ValidationError(f"{name}: indices must be integers in [0, {s})")
                if self._meta.get("validate", True):
                    self._validate_dense(name, vals, tol, rows_le_one=True)
            parts: dict[str, Any] = {"_hts": (h, t, s)}
            if self._sparse:
                parts["values"] = _encode(vals, self._dtype)
                parts["indices"] = idx.astype(np.int16 if s < 32768 else np.int32)
                parts["residual"] = np.clip(
                    1.0 - vals.sum(axis=-1, dtype=np.float64), 0, None
                ).astype(np.float32)
            else:
                parts[""] = _encode(dense, self._dtype)
            prepared[name] = parts
        # Once arrays exist, every batch must carry the same set: a missing one would read
        # back as zeros for these samples.
        if self._specs and (self._count > 0 or self._start > 0):
            have, got = set(self._specs), set(prepared)
            if have != got:
                raise ShapeError(
                    f"batch arrays {sorted(got)} differ from the archive's {sorted(have)}; "
                    f"missing: {sorted(have - got)}, unexpected: {sorted(got - have)}"
                )
        if self._stop is not None:
            for name in prepared:
                if name not in self._specs:
                    raise ConfigError(
                        f"{name}: a sample_range writer cannot create arrays; pass "
                        f"arrays={{...: (H, T, S)}} and capacity to ArchiveWriter.create"
                    )
        assert bsz is not None
        return prepared, bsz

    def _expect_s(self, name: str, stack: str, kind: str, given: Any) -> int:
        if name in self._specs:
            return self._specs[name].s
        if given is not None:
            return int(given)
        _q, kside = KIND_AXES[(stack, kind)]
        side = getattr(self.layout, kside)
        if side is None:
            raise ShapeError(f"{name}: cannot infer the number of keys; pass 'n_keys' in the dict")
        return side.length

    def _check_shape(self, name: str, stack: str, kind: str, h: int, t: int, s: int) -> None:
        spec = self._specs.get(name)
        if spec is not None:
            if (h, t, s) != (spec.h, spec.t, spec.s):
                raise ShapeError(
                    f"{name}: got (B, H, T, S) = (*, {h}, {t}, {s}), but the archive holds "
                    f"(*, {spec.h}, {spec.t}, {spec.s})"
                )
            return
        qside, kside = KIND_AXES[(stack, kind)]
        for side, got, dim in ((qside, t, "T (query)"), (kside, s, "S (key)")):
            lay = getattr(self.layout, side)
            if lay is not None and lay.length != got:
                raise ShapeError(
                    f"{name}: {dim} length {got} does not match the {side} layout's "
                    f"{lay.length} tokens"
                )
        heads = self._meta.get("heads", {}).get(name)
        if heads is not None and len(heads) != h:
            raise ShapeError(f"{name}: got {h} heads but heads[{name!r}] lists {len(heads)}")

    def _validate_dense(
        self, name: str, w: np.ndarray, tol: float, *, rows_le_one: bool = False
    ) -> None:
        base = self._start + self._count

        def where(mask: np.ndarray) -> str:
            i = np.argwhere(mask)[0]
            return f"sample {base + int(i[0])}, head {int(i[1])}, query row {int(i[2])}"

        # One cheap pass over the raw bits: every weight finite and >= 0 iff the largest
        # bit pattern is below +Inf's (sign bit clear, exponent not all ones). Only when
        # that fails (or on -0.0) do the slower exact checks run to locate the problem.
        if not _finite_nonneg(w):
            finite = np.isfinite(w)
            if not finite.all():
                bad = ~finite.all(axis=-1)
                kind = "NaN" if np.isnan(w).any() else "Inf"
                raise ValidationError(f"{name}: {kind} weight at {where(bad)}; nothing was written")
            neg = w < 0
            if neg.any():
                raise ValidationError(
                    f"{name}: negative weight at {where(neg.any(axis=-1))}; attention weights "
                    f"must be >= 0; nothing was written"
                )
        sums = _row_sums(w)
        off = (sums > 1 + tol) if rows_le_one else (np.abs(sums - 1) > tol)
        if off.any():
            i = tuple(np.argwhere(off)[0])
            raise ValidationError(
                f"{name}: row at {where(off)} sums to {float(sums[i]):.6g}, expected "
                f"{'<= 1' if rows_le_one else '1'} within {tol:g}; pass validate=False to "
                f"store unnormalised weights; nothing was written"
            )

    def _prepare_ids(self, ids: Mapping[str, Any] | None, bsz: int) -> dict[str, np.ndarray]:
        if not ids:
            if self._id_keys and (self._count or self._start):
                raise ShapeError(
                    f"sample_ids {self._id_keys} were given before; pass them for every batch"
                )
            return {}
        out = {}
        for key, v in ids.items():
            if not isinstance(key, str) or not key or "/" in key:
                raise InputError(f"sample_ids key must be a non-empty str without '/', got {key!r}")
            arr = np.asarray(as_numpy(v, f"sample_ids[{key!r}]") if hasattr(v, "detach") else v)
            if arr.shape != (bsz,):
                raise ShapeError(f"sample_ids[{key!r}] must have shape ({bsz},), got {arr.shape}")
            if arr.dtype.kind not in "biuf":
                raise InputError(
                    f"sample_ids[{key!r}] must be numeric (int, float, bool), got {arr.dtype}"
                )
            out[key] = arr
        if self._id_keys and set(out) != set(self._id_keys):
            raise ShapeError(f"sample_ids keys {sorted(out)} differ from earlier {self._id_keys}")
        return out

    def _create_node(self, name: str, h: int, t: int, s: int, *, n: int) -> _Spec:
        b = self._backend
        assert b is not None
        stack, layer, kind = parse_array_name(name)
        self._check_shape(name, stack, kind, h, t, s)
        heads = self._meta.get("heads", {}).get(name) or list(range(h))
        attrs = {
            "stack": stack,
            "layer": layer,
            "kind": kind,
            "hts": [h, t, s],
            "heads": [int(x) for x in heads],
            "dims": list(DIMS),
        }
        sdt = _storage_dtype(self._dtype)
        comp = self._meta.get("compressor", "zstd")
        # HDF5 grows a rewritten chunk in place at the end of the file; a crash before the
        # next flush leaves it undecodable. One sample per chunk means a chunk holding
        # committed samples is never rewritten (Zarr renames whole chunk files instead).
        cs = 1 if self.format == "hdf5" else self._meta.get("chunk_samples")
        spec = _Spec(name, h, t, s, attrs["heads"])
        if self._sparse:
            k = int(self._topk)
            chunks = choose_chunks(h, t, k, sdt.itemsize, chunk_samples=cs)
            b.set_attrs(name, {**attrs, "topk": k}, group=True)
            idt = np.dtype(np.int16 if s < 32768 else np.int32)
            spec.handles["values"] = b.create_array(
                f"{name}/values",
                (n, h, t, k),
                chunks,
                sdt,
                dims=DIMS[:3] + ("rank",),
                compressor=comp,
            )
            spec.handles["indices"] = b.create_array(
                f"{name}/indices",
                (n, h, t, k),
                chunks,
                idt,
                dims=DIMS[:3] + ("rank",),
                compressor=comp,
            )
            spec.handles["residual"] = b.create_array(
                f"{name}/residual",
                (n, h, t),
                chunks[:3],
                np.dtype(np.float32),
                dims=DIMS[:3],
                compressor=comp,
            )
        else:
            chunks = choose_chunks(h, t, s, sdt.itemsize, chunk_samples=cs)
            spec.handles[""] = b.create_array(
                name, (n, h, t, s), chunks, sdt, dims=DIMS, attrs=attrs, compressor=comp
            )
        self._specs[name] = spec
        return spec

    def _check_range_fits(self, spec: _Spec) -> None:
        a, b = self._start, self._stop
        assert b is not None
        for part, handle in spec.handles.items():
            n, cs = handle.shape[0], handle.chunks[0]
            if n < b:
                raise ConfigError(
                    f"{spec.name}{'/' + part if part else ''}: sample_range stop {b} exceeds "
                    f"the archive capacity {n}; create it with capacity >= {b}"
                )
            if a % cs or (b % cs and b != n):
                raise ConfigError(
                    f"{spec.name}: sample_range ({a}, {b}) is not aligned to the {cs}-sample "
                    f"chunks (two writers would share a chunk); use multiples of {cs} or "
                    f"create with chunk_samples=1"
                )

    # -- closing ------------------------------------------------------------------------
    def _hold(self, lease: Lease) -> Lease:
        """Acquire ``lease``; it is also released if this writer is dropped unclosed."""
        lease.acquire()
        weakref.finalize(self, lease.release)
        return lease

    def close(self) -> None:
        """Release the lock and close the store; safe to call more than once."""
        self._closed = True
        try:
            if self._backend is not None:
                backend, self._backend = self._backend, None
                try:
                    backend.flush()
                finally:
                    backend.close()
        finally:
            if self._lease is not None:
                self._lease.release()

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"ArchiveWriter({self.path!r}, format={self.format!r}, "
            f"committed={self._count}, {state})"
        )


# ---------------------------------------------------------------------------------------
# reader


def _norm_index(key: Any, shape: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[Any, ...]]:
    """Basic numpy index -> (bounding box of step-1 slices, index to apply to the box)."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = next(j for j, k in enumerate(key) if k is Ellipsis)
        fill = len(shape) - (len(key) - 1)
        key = key[:i] + (slice(None),) * fill + key[i + 1 :]
    if len(key) > len(shape):
        raise SelectionError(f"too many indices: got {len(key)} for dims {DIMS}")
    key = key + (slice(None),) * (len(shape) - len(key))
    box, post = [], []
    for k, n, dim in zip(key, shape, DIMS):
        if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            i = int(k) + n if k < 0 else int(k)
            if not 0 <= i < n:
                raise SelectionError(f"{dim} index {int(k)} out of range for {n} {dim}s")
            box.append(slice(i, i + 1))
            post.append(0)
        elif isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step > 0:
                lo, hi = start, max(start, stop)
                box.append(slice(lo, hi))
                post.append(slice(None, None, step))
            else:
                rng = range(start, stop, step)
                if len(rng) == 0:
                    box.append(slice(0, 0))
                    post.append(slice(None))
                else:
                    lo, hi = rng[-1], rng[0] + 1
                    box.append(slice(lo, hi))
                    post.append(slice(None, None, step))
        else:
            raise SelectionError(
                f"unsupported index {k!r} for {dim}: use ints, slices or '...' (basic indexing)"
            )
    return tuple(box), tuple(post)


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
        self.is_sparse = archive.mode == "sparse"
        self._ldtype = archive.dtype
        if self.is_sparse:
            self._values = b.get_array(f"{name}/values")
            self._indices = b.get_array(f"{name}/indices")
            self._residual = b.get_array(f"{name}/residual")
            self._main = self._values
        else:
            self._main = b.get_array(name)
            if tuple(self._main.shape[1:]) != (h, t, s):
                raise ArchiveCorruptError(
                    f"{name}: stored shape {self._main.shape} disagrees with its "
                    f"(H, T, S) {(h, t, s)}"
                )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.archive.n_samples, *self._hts)

    @property
    def dtype(self) -> np.dtype:
        return _read_dtype(self._ldtype)

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

    def _read_box(self, box: tuple[slice, ...]) -> np.ndarray:
        if not self.is_sparse:
            return _decode(self._main.read(box), self._ldtype)
        vals, idx, _ = self._read_sparse(box[:3])
        n, h, t, _k = vals.shape
        out = np.zeros((n, h, t, self._hts[2]), dtype=self.dtype)
        np.put_along_axis(out, idx.astype(np.intp), vals.astype(self.dtype), axis=-1)
        return out[..., box[3]]

    def _read_sparse(self, box3: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = self._values.shape[3]
        full = box3 + (slice(0, k),)
        vals = _decode(self._values.read(full), self._ldtype)
        return vals, self._indices.read(full), self._residual.read(box3)

    def __getitem__(self, key: Any) -> np.ndarray:
        box, post = _norm_index(key, self.shape)
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
        self.path = os.fspath(path)
        self.format = format or _sniff_format(self.path)
        if self.format not in FORMATS:
            raise ConfigError(f"unknown format {self.format!r}; expected one of {FORMATS}")
        self._backend = _open_backend(self.path, self.format, "r")
        try:
            self._root = self._backend.read_root_meta()
            self.layout = _check_meta(self._root, self.path)
            self._commits = self._backend.read_commits()
            self.n_samples = committed_prefix(self._commits)
            self._names = sorted(self._backend.list_nodes(), key=_sort_key)
        except Exception:
            self._backend.close()
            raise
        self._cache: dict[str, AttentionArray] = {}
        self._borrowed = False

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
            "archive": str(self.path),
            "schema_version": self.schema_version,
            "n_samples": self.n_samples,
            "fingerprint": h.hexdigest()[:16],
        }

    # -- arrays -------------------------------------------------------------------------
    def arrays(self) -> list[str]:
        """Array names sorted by (stack, layer, kind)."""
        return list(self._names)

    def layers(self, stack: str) -> list[int]:
        if stack not in STACKS:
            raise SelectionError(f"unknown stack {stack!r}; expected one of {STACKS}")
        return sorted({parse_array_name(n)[1] for n in self._names if n.startswith(stack + "/")})

    def kinds(self, stack: str, layer: int) -> list[str]:
        pre = f"{stack}/{int(layer)}/"
        return [n[len(pre) :] for n in self._names if n.startswith(pre)]

    def attention(
        self, stack: str, layer: int | None = None, kind: str | None = None
    ) -> AttentionArray:
        """Lazy array of ``stack/layer/kind`` (or pass one array name)."""
        name = stack if layer is None and kind is None else array_name(stack, layer, kind)  # type: ignore[arg-type]
        if name not in self._cache:
            if name not in self._names:
                raise SelectionError(
                    f"archive {self.path!r} has no array {name!r}; it holds {self._names}"
                )
            self._cache[name] = AttentionArray(self, name)
        return self._cache[name]

    def __getitem__(self, name: str) -> AttentionArray:
        return self.attention(name)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def heads(
        self, name_or_stack: str, layer: int | None = None, kind: str | None = None
    ) -> list[int]:
        """Original head indices kept in one array."""
        return list(self.attention(name_or_stack, layer, kind).heads)

    @property
    def sample_ids(self) -> dict[str, np.ndarray]:
        """Per-sample ids of the committed samples, ``{key: (N,)}``; ``{}`` if none."""
        out = {}
        for key in self._backend.list_children(SAMPLE_IDS):
            h = self._backend.get_array(f"{SAMPLE_IDS}/{key}")
            n = min(self.n_samples, h.shape[0])
            out[key] = h.read((slice(0, n),))
        return out

    # -- out of core --------------------------------------------------------------------
    def to_dask(self, name: str) -> Any:
        """Dask array ``(N, H, T, S)`` over the committed samples, chunked like storage."""
        import dask.array as da

        arr = self.attention(name)
        chunks = tuple(min(c, max(n, 1)) for c, n in zip(arr.chunks, arr.shape))
        return da.from_array(
            arr,
            chunks=chunks,
            asarray=True,
            fancy=False,
            name=f"attnscope-{name}-{self.identity()['fingerprint']}",
            meta=np.empty((0, 0, 0, 0), dtype=arr.dtype),
        )

    def to_xarray(self, name: str | None = None) -> Any:
        """Labelled, lazy (dask-backed) view.

        With ``name``: a ``DataArray`` with dims ``("sample", "head", "query", "key")``,
        coords ``head`` = original head ids, ``query``/``key`` = token labels,
        ``query_segment``/``key_segment`` = segment name per token, and ``sample_ids``.

        Without: a ``Dataset`` of every array. Query/key dims are then named by side so
        arrays of different lengths coexist: ``encoder_query``/``encoder_key``,
        ``decoder_query``/``decoder_key`` (cross-attention: ``decoder_query`` x
        ``encoder_key``); heads share ``head`` if all arrays kept the same heads, else
        each array has ``<name>/head``.
        """
        import xarray as xr

        if name is not None:
            return self._data_array(name, "query", "key", "head")
        names = self.arrays()
        same_heads = len({tuple(self.attention(n).heads) for n in names}) <= 1
        variables = {}
        for n in names:
            stack, _l, kind = parse_array_name(n)
            qs, ks = KIND_AXES[(stack, kind)]
            variables[n] = self._data_array(
                n, f"{qs}_query", f"{ks}_key", "head" if same_heads else f"{n}/head"
            )
        ds = xr.Dataset(variables)
        ds.attrs.update(self._xr_attrs())
        return ds

    def _xr_attrs(self) -> dict[str, Any]:
        return {
            "archive": str(self.path),
            "schema_version": self.schema_version,
            "dtype": self.dtype,
            "fingerprint": self.identity()["fingerprint"],
        }

    def _data_array(self, name: str, qdim: str, kdim: str, hdim: str) -> Any:
        import xarray as xr

        arr = self.attention(name)
        ql, kl = self.layout.axes(arr.stack, arr.kind)
        coords: dict[str, Any] = {
            "sample": np.arange(arr.shape[0]),
            hdim: np.asarray(arr.heads),
            qdim: list(ql.labels),
            kdim: list(kl.labels),
            f"{qdim}_segment": (qdim, [ql.segments[i].name for i in ql.segment_ids()]),
            f"{kdim}_segment": (kdim, [kl.segments[i].name for i in kl.segment_ids()]),
        }
        for key, v in self.sample_ids.items():
            coords[f"sample_{key}"] = ("sample", v)
        attrs = {
            **self._xr_attrs(),
            "array": name,
            "stack": arr.stack,
            "layer": arr.layer,
            "kind": arr.kind,
            "query_segments": json.dumps([[s.name, s.start, s.stop] for s in ql.segments]),
            "key_segments": json.dumps([[s.name, s.start, s.stop] for s in kl.segments]),
        }
        return xr.DataArray(
            self.to_dask(name),
            dims=("sample", hdim, qdim, kdim),
            coords=coords,
            name=name,
            attrs=attrs,
        )

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
        Zarr directory / zip or HDF5 file written by :class:`ArchiveWriter`, or an open
        :class:`AttentionArchive`.
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

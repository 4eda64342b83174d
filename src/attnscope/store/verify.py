"""``info`` and ``verify``: the library side of ``attnscope info`` / ``attnscope verify``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnscope.contracts import KIND_AXES, QUERY_ROWS, SAMPLE_IDS
from attnscope.errors import ArchiveCorruptError
from attnscope.store.backends.base import MiB
from attnscope.store.backends.location import locate
from attnscope.store.commitlog import verify_records
from attnscope.store.integrity import structure_problems
from attnscope.store.meta import holds_no_data, input_hashes, no_data_message
from attnscope.store.reader import AttentionArchive, open_archive
from attnscope.store.validation import check_tolerance

__all__ = ["VerifyReport", "verify", "info", "format_info"]

MAX_PER_ARRAY = 5


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`. ``ok`` is True when ``problems`` is empty.

    Each problem is one line naming the array (or part of the archive) and what is wrong.
    """

    path: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    n_samples: int = 0
    arrays_checked: int = 0
    notes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.ok

    def summary(self) -> str:
        """One line: ``OK ...`` or the first problem (and how many more)."""
        if self.ok:
            return (
                f"OK {self.path}: {self.arrays_checked} arrays, {self.n_samples} committed samples"
            )
        more = f" (+{len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return f"CORRUPT {self.path}: {self.problems[0]}{more}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "problems": list(self.problems),
            "n_samples": self.n_samples,
            "arrays_checked": self.arrays_checked,
            "notes": list(self.notes),
        }


def verify(
    path: str | os.PathLike,
    *,
    tolerance: float = 1e-2,
    check_data: bool = True,
    max_bytes: int = 64 * MiB,
) -> VerifyReport:
    """Check an archive's structure, committed counts, chunks and (optionally) data.

    Parameters
    ----------
    path
        The archive.
    tolerance
        Allowed ``|row sum - 1|`` of stored rows (float16 storage rounds each weight);
        a finite number >= 0.
    check_data
        Read every committed sample: checksums, NaN/Inf, negative weights, row sums.
    max_bytes
        Memory bound of one read block.

    Returns
    -------
    VerifyReport

    Raises
    ------
    ConfigError
        ``tolerance`` is NaN, infinite or negative.
    ArchiveNotFoundError
        Nothing at ``path``.
    ArchiveCorruptError
        Not an attnscope archive, or too damaged to open (e.g. truncated HDF5 header).
    """
    tol = check_tolerance(tolerance)
    path = locate(path)
    if holds_no_data(path):
        return VerifyReport(path=path, ok=True, notes=[no_data_message(path)])
    with open_archive(path) as a:
        rep = VerifyReport(path=path, ok=True, n_samples=a.n_samples)
        _check(a, rep, tol, check_data, max_bytes)
    rep.ok = not rep.problems
    return rep


def _check(
    a: AttentionArchive, rep: VerifyReport, tol: float, check_data: bool, max_bytes: int
) -> None:
    p = rep.problems
    n = a.n_samples
    structure = structure_problems(a)  # what every data command refuses, no data read
    p.extend(structure.problems)
    meta = a.metadata
    rows_checked = bool(meta.get("normalized", meta.get("validate", True)))
    if not rows_checked:
        rep.notes.append(
            "row sums not checked: rows not declared normalized (written with validate=False)"
        )
    if "arrays" not in meta:
        rep.notes.append("array list not recorded (older archive): deleted arrays not checked")
    for name in a.arrays:
        if name in structure.unreadable:
            continue
        rep.arrays_checked += 1
        if check_data and n:
            _check_data(name, a.attention(name), rep, tol, rows_checked, max_bytes)
    _check_tokens(a, rep)
    if not any(x.startswith(SAMPLE_IDS) or x.startswith("sample_ids[") for x in p):
        _safe_ids(a, rep)  # the ids decode (their lengths and chunks: structure_problems)
    _check_log(a, rep, check_data)


def _check_log(a: AttentionArchive, rep: VerifyReport, check_data: bool) -> None:
    """The commit log: records against their documents and, with ``check_data``, every
    committed region's digest and every array's attributes (docs/archive-format.md)."""
    backend = a._backend
    if check_data:  # the cheap record check ran with the structure: no line twice
        problems, logged = verify_records(a.path, backend)
        rep.problems.extend(x for x in problems if x not in rep.problems)
    else:
        logged = any("batches" in r for r in backend.read_records().values())
    if not logged:
        rep.notes.append(
            "no commit log (archive written before it): chunk placement and side data not bound"
        )


def _check_tokens(a: AttentionArchive, rep: VerifyReport) -> None:
    """Masks (every sample has a real token), ids and labels of each side decode."""
    for side in ("encoder", "decoder"):
        if getattr(a.layout, side) is None:
            continue
        try:
            if a.ragged:
                empty = np.flatnonzero(a.lengths(side) == 0)
                if len(empty):
                    rep.problems.append(f"{side} mask: sample {int(empty[0])} has no real token")
            step = 4096
            for a0 in range(0, a.n_samples, step):
                a.labels(side, slice(a0, a0 + step))
                a._side_rows(side, "ids", slice(a0, min(a.n_samples, a0 + step)))
        except Exception as e:  # noqa: BLE001 - unreadable token data is damage
            rep.problems.append(f"{side} tokens unreadable ({type(e).__name__}: {_line(e)})")


def _real_rows(arr: Any, sl: slice) -> np.ndarray | None:
    """``(n, T)`` bool real query rows of samples ``sl`` (None: every row is real)."""
    if not arr.archive.ragged:
        return None
    qs, _ks = KIND_AXES[(arr.stack, arr.kind)]
    m = arr.archive.masks(qs, sl)
    return m if arr.query_rows is None else m[:, arr.query_rows]


def _line(e: BaseException) -> str:
    """First line of an error message: problems are one line each."""
    return (str(e).splitlines() or [""])[0][:200]


def _safe_ids(a: AttentionArchive, rep: VerifyReport) -> dict[str, np.ndarray]:
    try:
        return a.sample_ids
    except Exception as e:  # noqa: BLE001
        rep.problems.append(f"sample_ids unreadable ({type(e).__name__}: {_line(e)})")
        return {}


def _check_data(
    name: str, arr: Any, rep: VerifyReport, tol: float, rows: bool, max_bytes: int
) -> None:
    found = 0
    try:
        if arr.is_sparse:
            n = arr.shape[0]
            step = max(arr.chunks[0], 1024)
            for a0 in range(0, n, step):
                v, i, r = arr.topk_arrays(slice(a0, min(n, a0 + step)))
                v = v.astype(np.float32)
                if not np.isfinite(v).all() or not np.isfinite(r).all():
                    rep.problems.append(f"{name}: NaN/Inf in samples {a0}..{a0 + len(v) - 1}")
                    return
                if (v < 0).any() or (r < 0).any():
                    rep.problems.append(
                        f"{name}: negative weight in samples {a0}..{a0 + len(v) - 1}"
                    )
                    return
                if rows:
                    tot = v.sum(-1) + r
                    off = np.abs(tot - 1) > tol
                    real = _real_rows(arr, slice(a0, a0 + len(v)))
                    if real is not None:
                        off &= real[:, None, :]
                    bad = np.argwhere(off)
                    if len(bad):
                        s_, h_, t_ = (int(x) for x in bad[0])
                        rep.problems.append(
                            f"{name}: sample {a0 + s_}, head {h_}, row {t_}: kept + residual = "
                            f"{float(tot[s_, h_, t_]):.4g}, expected 1 within {tol:g}"
                        )
                        return
            return
        for sl, block in arr.iter_blocks(max_bytes=max_bytes):
            where = None
            fin = np.isfinite(block)
            if not fin.all():
                where, what = np.argwhere(~fin)[0], "NaN/Inf weight"
            elif (block < 0).any():
                where, what = np.argwhere(block < 0)[0], "negative weight"
            elif rows:
                sums = block.sum(axis=-1, dtype=np.float32)
                off = np.abs(sums - 1) > tol
                real = _real_rows(arr, sl)
                if real is not None:
                    off &= real[:, None, :]
                if off.any():
                    where = np.argwhere(off)[0]
                    got = float(sums[tuple(where[:3])])
                    what = f"row sums to {got:.4g}, expected 1 within {tol:g}"
            if where is not None:
                rep.problems.append(
                    f"{name}: sample {sl.start + int(where[0])}, head {int(where[1])}, row "
                    f"{int(where[2])}: {what}"
                )
                found += 1
                if found >= MAX_PER_ARRAY:
                    return
    except ArchiveCorruptError as e:  # a chunk that is missing or fails its checksum
        rep.problems.append(f"{name}: data unreadable ({e})")
    except Exception as e:  # noqa: BLE001 - anything else failing to decode is damage too
        rep.problems.append(f"{name}: data unreadable ({type(e).__name__}: {_line(e)})")


def info(path: str | os.PathLike) -> dict[str, Any]:
    """JSON-able summary of an archive (what ``attnscope info --json`` prints).

    Raises
    ------
    ArchiveNotFoundError, ArchiveCorruptError
        As :func:`open_archive`.
    """
    path = locate(path)
    if holds_no_data(path):
        return _empty_info(path)
    with open_archive(path) as a:
        meta = a.metadata
        arrays = []
        for name in a.arrays:
            arr = a.attention(name)
            stored = arr.stored_nbytes()
            arrays.append(
                {
                    "name": name,
                    "shape": list(arr.shape),
                    "chunks": list(arr.chunks),
                    "heads": list(arr.heads),
                    QUERY_ROWS: None if arr.query_rows is None else arr.query_rows.tolist(),
                    "dtype": str(arr.dtype),
                    "logical_bytes": arr.nbytes,
                    "stored_bytes": stored,
                }
            )
        layout = {}
        for side in ("encoder", "decoder"):
            lay = getattr(a.layout, side)
            layout[side] = (
                None
                if lay is None
                else {
                    "length": lay.length,
                    "segments": [[s.name, s.start, s.stop] for s in lay.segments],
                }
            )
        return {
            "path": path,
            "format": a.format,
            "schema_version": a.schema_version,
            "n_samples": a.n_samples,
            "dtype": a.dtype,
            "mode": a.mode,
            "topk": a.topk,
            "compressor": meta.get("compressor"),
            "size_bytes": path.disk_size(),
            "fingerprint": a.identity()["fingerprint"],
            "layout": layout,
            "arrays": arrays,
            "sample_ids": sorted(a.sample_ids),
            "ragged": a.ragged,
            "max_lengths": meta.get("max_lengths"),
            QUERY_ROWS: meta.get(QUERY_ROWS),
            "tokens": a.token_fields(),
            "commits": meta["commits"],
            "model_config": meta.get("model_config", {}),
            "capture": meta.get("capture", {}),
            "provenance": meta.get("provenance", {}),
            "input_hashes": _batch_hashes(a.sample_ids, meta.get("batch_size")),
        }


def _empty_info(path: str) -> dict[str, Any]:
    """:func:`info` of a folder a writer left before its first commit: an empty archive."""
    return {
        "path": path,
        "format": None,
        "schema_version": None,
        "n_samples": 0,
        "dtype": None,
        "mode": None,
        "topk": None,
        "compressor": None,
        "size_bytes": path.disk_size(),
        "fingerprint": None,
        "layout": {},
        "arrays": [],
        "sample_ids": [],
        "ragged": False,
        "max_lengths": None,
        "tokens": {},
        "commits": {},
        "model_config": {},
        "capture": {},
        "provenance": {},
        "input_hashes": None,
        "note": no_data_message(path),
    }


def _short_rows(rows: list[int]) -> str:
    return ", ".join(map(str, rows)) if len(rows) <= 12 else (
        f"{', '.join(map(str, rows[:6]))}, ..., {', '.join(map(str, rows[-3:]))}"
    )


def _mb(x: int | None) -> str:
    return "?" if x is None else f"{x / MiB:.1f} MiB"


def _batch_hashes(sample_ids: dict[str, Any], batch_size: int | None) -> list[str] | None:
    """The input hash of each committed batch, in order (one per ``batch_size`` samples;
    without it, consecutive repeats merged)."""
    per_sample = input_hashes(sample_ids)
    if per_sample is None:
        return None
    if batch_size:
        return per_sample[:: int(batch_size)]
    return [h for i, h in enumerate(per_sample) if i == 0 or per_sample[i - 1] != h]


def _capture_provenance(cap: dict[str, Any], hashes: list[str] | None) -> list[str]:
    """``info`` lines on how the numbers were captured (model, weights, code, inputs)."""
    p = cap.get("provenance") or {}
    lines = []
    if p or cap.get("param_hash"):
        state = {True: "train()", False: "eval()"}.get(p.get("training"), "?")
        lines.append(
            f"  captured from {p.get('model_class', '?')} in {state} on {p.get('device')} "
            f"(compute {p.get('compute_dtype')}, stored {p.get('storage_dtype')}), "
            f"weights {cap.get('param_hash')} ({cap.get('n_params')} parameters)"
        )
    if p:
        lines.append(f"  weights: {weights_line(p.get('weights'))}")
    impl: dict[str, str] = p.get("attention_implementation") or {}
    if impl:
        groups: dict[str, list[str]] = {}
        for name, how in impl.items():
            groups.setdefault(how, []).append(name)
        for how, names in groups.items():
            lines.append(f"  attention {how}: {', '.join(names)}")
    if p:
        git = p.get("git")
        lines.append(
            "  code: not in a git work tree"
            if not git
            else f"  code: git {git['commit']}{' (dirty)' if git.get('dirty') else ''} in "
            f"{git.get('cwd')}"
        )
    if hashes is not None:
        lines.append(f"  input hashes ({len(hashes)} batches): " + ", ".join(
            h[: len("sha256:") + 12] for h in hashes[:4]
        ) + (", ..." if len(hashes) > 4 else ""))
    return lines


def weights_line(w: dict[str, Any] | None) -> str:
    """Where a capture's weights came from, in words (``capture.provenance.weights``)."""
    if not w:
        return "not recorded (a model passed to capture(); see the parameter hash)"
    if w.get("source") == "pretrained":
        hub = f" (hub id {w['hub_id']}, local cache)" if w.get("hub_id") else ""
        dtype = f", loaded as {w['dtype']}" if w.get("dtype") else ""
        rand = w.get("uninitialised")
        rand = f"; random (not in the checkpoint, read by no attention): {rand}" if rand else ""
        return f"pretrained from {w.get('from')}{hub}{dtype}{rand}"
    if w.get("source") == "random":
        cfg = f" (model built from {w['config']})" if w.get("config") else ""
        return f"random, seed {w.get('seed')}{cfg}"
    return str(w)


def format_info(d: dict[str, Any]) -> str:
    """Human-readable rendering of :func:`info`'s dict."""
    if d.get("note"):
        return f"{d['path']}: empty archive, 0 samples\n  {d['note']}"
    lines = [
        f"{d['path']}  ({d['format']}, schema v{d['schema_version']}, "
        f"{_mb(d['size_bytes'])} on disk)",
        f"  samples: {d['n_samples']} committed   dtype: {d['dtype']}   mode: {d['mode']}"
        + (f" (top-{d['topk']})" if d.get("topk") else "")
        + f"   compressor: {d.get('compressor')}",
    ]
    for side, lay in d["layout"].items():
        if lay is not None:
            segs = ", ".join(f"{n}[{a}:{b}]" for n, a, b in lay["segments"])
            lines.append(f"  {side}: {lay['length']} tokens  {segs}")
    if d.get("ragged"):
        lines.append(f"  ragged: max_lengths {d.get('max_lengths')} (per-sample masks)")
    for side, rows in (d.get(QUERY_ROWS) or {}).items():
        lines.append(f"  {side} query rows kept ({len(rows)}): {_short_rows(rows)}")
    for side, fields in (d.get("tokens") or {}).items():
        lines.append(f"  {side} tokens per sample: {', '.join(fields)}")
    if d["sample_ids"]:
        lines.append(f"  sample ids: {', '.join(d['sample_ids'])}")
    lines.append(f"  arrays ({len(d['arrays'])}):")
    for arr in d["arrays"]:
        ratio = ""
        if arr["stored_bytes"] and arr["logical_bytes"]:
            ratio = f"  x{arr['logical_bytes'] / arr['stored_bytes']:.2f}"
        lines.append(
            f"    {arr['name']:<28} {'x'.join(map(str, arr['shape']))}  chunks "
            f"{'x'.join(map(str, arr['chunks']))}  {_mb(arr['stored_bytes'])}{ratio}"
        )
    prov = d.get("provenance") or {}
    if prov:
        lines.append(
            f"  written {prov.get('created_utc')} on {prov.get('host')} by attnscope "
            f"{prov.get('attnscope')} (torch {prov.get('torch')}, seed {prov.get('seed')})"
        )
        if prov.get("tags"):
            lines.append(f"  tags: {prov['tags']}")
        libs = prov.get("libraries") or {}
        if libs:
            lines.append("  libraries: " + ", ".join(f"{k} {v}" for k, v in libs.items() if v))
    lines += _capture_provenance(d.get("capture") or {}, d.get("input_hashes"))
    if d.get("model_config"):
        lines.append(f"  model: {d['model_config']}")
    return "\n".join(lines)

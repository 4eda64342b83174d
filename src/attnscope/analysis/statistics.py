"""The guide's ``save_attention_statistics`` JSON, from tensors in memory or from an archive.

Schema (exactly the guide's, section 7)::

    {"encoder": [{"layer": 0, "type": "self_attention",
                  "mean": 0.034, "std": 0.028, "min": 0.001, "max": 0.215,
                  "shape": [8, 29, 29]}],
     "decoder": [{"layer": 0, "type": "self_attention", ...},
                 {"layer": 0, "type": "cross_attention", ...}]}

Decisions the guide leaves open:

* ``mean``/``std``/``min``/``max`` pool every element of the array over **all samples**
  of the batch (or archive), all heads, all query rows and all keys — zeros of a causal
  mask included, as ``tensor.mean()`` on the whole tensor would.
* ``std`` is the population standard deviation (``ddof=0``, like ``numpy.std``); torch's
  ``tensor.std()`` uses ``ddof=1``, which differs by a factor ``sqrt(n / (n - 1))``,
  below 1e-4 relative for any real attention tensor.
* ``shape`` is the per-sample shape ``[H, T, S]`` (the guide's ``[8, 29, 29]`` is 8 heads),
  not including the batch or sample count.
* An array captured with a row policy (``query_rows``) pools its stored rows only; its
  entry then also carries ``"query_rows"``, the original rows (``shape`` is ``[H, R, S]``).
* Both ``"encoder"`` and ``"decoder"`` keys are always present (an empty list for a missing
  stack); entries are ordered by layer, ``self_attention`` before ``cross_attention``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from attnscope.analysis import metrics as M
from attnscope.analysis._engine import StatsAccumulator
from attnscope.analysis.blocks import iter_array_blocks
from attnscope.contracts import STACKS
from attnscope.errors import InputError, ShapeError
from attnscope.store import (
    AttentionArchive,
    as_numpy,
    check_structure,
    flatten_weights,
    open_archive,
    parse_array_name,
)

__all__ = ["statistics_json", "statistics_entry"]

_KIND_ORDER = {"self_attention": 0, "cross_attention": 1}


def statistics_entry(layer: int, kind: str, acc: StatsAccumulator, shape: Iterable[int]) -> dict:
    """One list entry of the guide's statistics JSON."""
    return {
        "layer": int(layer),
        "type": str(kind),
        "mean": float(acc.mean),
        "std": float(acc.std),
        "min": float(acc.min),
        "max": float(acc.max),
        "shape": [int(v) for v in shape],
    }


def _accumulate(x: np.ndarray, acc: StatsAccumulator, cells: np.ndarray | None = None) -> None:
    """Add a block; ``cells`` ``(n, T, S)`` bool keeps only real (query, key) cells."""
    xf = M.as_float32(x)
    if cells is not None:
        xf = xf.transpose(0, 2, 3, 1)[cells]  # (real cells, H)
    if xf.size == 0:
        return
    flat = xf.reshape(-1, xf.shape[-1])
    total = float(flat.sum(axis=-1, dtype=np.float32).astype(np.float64).sum())
    sumsq = float(np.vecdot(flat, flat).astype(np.float64).sum())
    acc.add_partial(xf.size, total, sumsq, float(flat.min()), float(flat.max()))


def _entries_from_nested(weights: Mapping[str, Any]) -> dict[str, list[dict]]:
    items = [(*parse_array_name(n), v) for n, v in flatten_weights(weights).items()]
    out: dict[str, list[dict]] = {s: [] for s in STACKS}
    for stack, layer, kind, val in sorted(
        items, key=lambda it: (it[0], it[1], _KIND_ORDER.get(it[2], 9), it[2])
    ):
        arr = as_numpy(val, f"{stack}/{layer}/{kind}")
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            raise ShapeError(
                f"{stack}/{layer}/{kind} must have shape (B, H, T, S) or (H, T, S); got {arr.shape}"
            )
        acc = StatsAccumulator()
        _accumulate(arr, acc)
        out[stack].append(statistics_entry(layer, kind, acc, arr.shape[1:]))
    return out


def _entries_from_archive(archive: Any, *, max_bytes: int = 64 << 20) -> dict[str, list[dict]]:
    with open_archive(archive) as a:
        check_structure(a)
        accs: dict[str, tuple[StatsAccumulator, Any]] = {}
        for name in a.arrays:
            arr = a[name]
            acc = StatsAccumulator()
            for x, cells in iter_array_blocks(arr, max_bytes=max_bytes):
                _accumulate(x, acc, cells)
            accs[name] = (acc, arr)
        return entries_from_accumulators(accs)


def entries_from_accumulators(accs: Mapping[str, tuple[StatsAccumulator, Any]]) -> dict:
    """Build the JSON document from per-array accumulators keyed by array name."""
    out: dict[str, list[dict]] = {s: [] for s in STACKS}
    rows = []
    for _name, (acc, arr) in accs.items():
        kept = getattr(arr, "query_rows", None)
        rows.append((arr.stack, int(arr.layer), arr.kind, acc, tuple(arr.shape[1:]), kept))
    for stack, layer, kind, acc, shape, kept in sorted(
        rows, key=lambda r: (r[0], r[1], _KIND_ORDER.get(r[2], 9), r[2])
    ):
        entry = statistics_entry(layer, kind, acc, shape)
        if kept is not None:
            entry["query_rows"] = [int(r) for r in kept]
        out.setdefault(stack, []).append(entry)
    return out


def statistics_json(
    weights_or_archive: Any, save_path: str | os.PathLike[str] | None = None
) -> dict:
    """Summary statistics of every attention array, in the guide's JSON schema.

    Parameters
    ----------
    weights_or_archive : dict, AttentionArchive, str or Path
        Either the guide's nested weights ``{"encoder": [{"self_attention": (B, H, T, S)}],
        "decoder": [{"self_attention": ..., "cross_attention": ...}]}`` (torch tensors or
        numpy arrays; a flat ``{"encoder/0/self_attention": arr}`` dict works too), or an
        archive / archive path, which is read chunk by chunk (out of core).
    save_path : str or Path, optional
        Also write the JSON there (UTF-8, indented).

    Returns
    -------
    dict
        ``{"encoder": [entry, ...], "decoder": [entry, ...]}``, each entry
        ``{"layer", "type", "mean", "std", "min", "max", "shape"}`` with ``shape`` the
        per-sample ``[H, T, S]`` and statistics pooled over all samples.

    Examples
    --------
    >>> import numpy as np
    >>> w = {"encoder": [{"self_attention": np.full((2, 8, 29, 29), 1 / 29)}]}
    >>> statistics_json(w)["encoder"][0]["shape"]
    [8, 29, 29]
    """
    if isinstance(weights_or_archive, Mapping):
        doc = _entries_from_nested(weights_or_archive)
    elif isinstance(weights_or_archive, (str, os.PathLike, AttentionArchive)):
        doc = _entries_from_archive(weights_or_archive)
    else:
        raise InputError(
            "statistics_json expects the nested attention dict, an AttentionArchive or an "
            f"archive path; got {type(weights_or_archive).__name__}"
        )
    if save_path is not None:
        write_statistics(doc, save_path)
    return doc


def write_statistics(
    doc: Mapping[str, Any], save_path: str | os.PathLike[str], folder: Any = None
) -> Path:
    """Write a statistics document as indented UTF-8 JSON (``save_path``: a file, or its
    name in ``folder``, an ``analysis._folder.TableFolder``, which may be at a URL)."""
    if folder is not None:
        text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
        return folder.write_text(os.fspath(save_path), text)  # type: ignore[no-any-return]
    path = Path(save_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path

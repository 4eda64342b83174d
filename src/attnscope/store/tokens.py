"""Per-sample token data: padding masks, token ids and token labels of each side.

Schema-2 ("ragged") archives keep one mask per side and sample, so batches of different
lengths share one archive: the writer pads each batch to the archive's maximum and
zeroes every padded query row and key column (padded cells then compress to almost
nothing). Any archive may also keep each sample's token ids and labels. Layout under the
root (``contracts``): ``_tokens/<side>/mask (N, L) uint8``, ``ids (N, L) int64``,
``label_spans (N, 2) int64`` and ``labels/<commit record id> (bytes,) uint8`` (each
sample's labels as one UTF-8 JSON array). See ``docs/archive-format.md``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnscope.contracts import (
    KIND_AXES,
    MAX_LENGTHS,
    PAD_ID,
    PAD_LABEL,
    STACKS,
    TOKEN_FIELDS,
    TOKEN_IDS,
    TOKEN_LABEL_SPANS,
    TOKEN_LABELS,
    TOKEN_MASK,
    TOKENS,
)
from attnscope.errors import ConfigError, InputError, SelectionError, ShapeError
from attnscope.store.backends.base import ArrayHandle, Backend, Write
from attnscope.store.codecs import as_numpy
from attnscope.store.layout import TokenLayout
from attnscope.store.names import parse_array_name, rows_of

__all__ = ["SideBatch", "SideRules", "SideStore", "side_path", "decode_labels"]

#: per-sample arrays of a side, with their dtypes (labels are a blob per writer)
PARTS = {TOKEN_MASK: np.dtype(np.uint8), TOKEN_IDS: np.dtype(np.int64)}
_DIMS = {
    TOKEN_MASK: ("sample", "token"),
    TOKEN_IDS: ("sample", "token"),
    TOKEN_LABEL_SPANS: ("sample", "bound"),
    TOKEN_LABELS: ("byte",),
}
BLOB_CHUNK = 64 * 1024
ZARR_SAMPLE_CHUNK = 1024
HDF5_SAMPLE_CHUNK = 256


def side_path(side: str, part: str, rid: str | None = None) -> str:
    """Storage path of one part of a side's token data."""
    return f"{TOKENS}/{side}/{part}" + (f"/{rid}" if rid else "")


@dataclass
class SideBatch:
    """One batch after :meth:`SideRules.prepare`: padded weights plus per-side data."""

    items: dict[str, Any]
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (B, T) real query rows
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # side -> (B, L) uint8
    ids: dict[str, np.ndarray] = field(default_factory=dict)  # side -> (B, L) int64
    labels: dict[str, list[list[str]]] = field(default_factory=dict)  # side -> B lists


def _batch_size(items: Mapping[str, Any]) -> int | None:
    for v in items.values():
        x = v.get("values") if isinstance(v, Mapping) else v
        shape = getattr(x, "shape", None)
        if shape is not None and len(shape) == 4:
            return int(shape[0])
    return None


class SideRules:
    """How an archive's batches are padded and checked against its sides."""

    def __init__(self, layout: TokenLayout, meta: Mapping[str, Any]) -> None:
        self.layout = layout
        self.max_lengths: dict[str, int] = dict(meta.get(MAX_LENGTHS) or {})
        self.ragged = bool(self.max_lengths)
        self.sides = [s for s in STACKS if getattr(layout, s) is not None]
        self.meta = meta

    def length(self, side: str) -> int:
        return int(getattr(self.layout, side).length)

    def prepare(
        self,
        items: Mapping[str, Any],
        masks: Mapping[str, Any] | None,
        tokens: Mapping[str, Any] | None,
        *,
        committed: int,
    ) -> SideBatch:
        """Check masks and tokens against the batch; pad and zero the weights."""
        masks = dict(masks or {})
        tokens = dict(tokens or {})
        for what, given in (("masks", masks), ("tokens", tokens)):
            for side in given:
                if side not in self.sides:
                    raise SelectionError(
                        f"{what} for side {side!r}, but this archive's sides are {self.sides}"
                    )
        if masks and not self.ragged:
            raise ConfigError(
                "masks need a ragged archive: create it with max_lengths={side: maximum} "
                "(the layout's lengths, for batches padded to one length)"
            )
        bsz = _batch_size(items)
        out = SideBatch(items=dict(items))
        if not self.ragged:  # fixed lengths: BatchRules checks the weights' shapes
            self._tokens(out, tokens, {}, bsz)
            return out
        lens = self._batch_lengths(items, masks, tokens, committed)
        for side in self.sides:
            got = masks.get(side)
            lb = lens.get(side, self.length(side))
            m = np.zeros((bsz or 0, self.length(side)), dtype=bool)
            m[:, :lb] = True if got is None else self._mask(side, got, bsz, lb)
            empty = np.flatnonzero(~m.any(axis=1))
            if bsz and len(empty):
                raise ShapeError(
                    f"masks[{side!r}]: sample {int(empty[0])} of the batch has no real token; "
                    "every sample needs at least one"
                )
            out.masks[side] = m.astype(np.uint8)
        for name in items:
            stack, _layer, kind = parse_array_name(name)
            qs, ks = KIND_AXES[(stack, kind)]
            if qs not in out.masks or ks not in out.masks:
                continue
            qm, km = out.masks[qs].astype(bool), out.masks[ks].astype(bool)
            rows = rows_of(self.meta, name)
            if rows is not None:  # the array holds the kept rows only: their masks
                qm = qm[:, rows]
            out.items[name] = _pad(name, items[name], qm, km)
            out.rows[name] = qm
        self._tokens(out, tokens, lens, bsz)
        return out

    def _batch_lengths(
        self, items: Mapping[str, Any], masks: Mapping[str, Any], tokens: Mapping[str, Any],
        committed: int,
    ) -> dict[str, int]:
        """Each side's length in this batch (from the weights, else masks, else tokens)."""
        seen: dict[str, tuple[int, str]] = {}
        for name, v in items.items():
            stack, _layer, kind = parse_array_name(name)
            qs, ks = KIND_AXES[(stack, kind)]
            x = v.get("values") if isinstance(v, Mapping) else v
            shape = tuple(getattr(x, "shape", ()))
            if len(shape) != 4:
                continue  # BatchRules names the bad shape
            # an array keeping some query rows (query_rows) says nothing of the query length
            pairs = [] if rows_of(self.meta, name) is not None else [(qs, shape[2])]
            if not isinstance(v, Mapping):
                pairs.append((ks, shape[3]))
            elif v.get("n_keys") is not None:
                pairs.append((ks, int(v["n_keys"])))
            for side, n in pairs:
                if side in seen and seen[side][0] != n:
                    raise ShapeError(
                        f"{side} side: arrays disagree on this batch's length: "
                        f"{seen[side][1]} has {seen[side][0]} tokens, {name} has {n}"
                    )
                seen.setdefault(side, (int(n), name))
        lens = {side: n for side, (n, _name) in seen.items()}
        for side, m in masks.items():
            lens.setdefault(side, int(np.shape(m)[-1]) if np.ndim(m) == 2 else -1)
        for side, t in tokens.items():
            ids = t.get("ids") if isinstance(t, Mapping) else None
            labels = t.get("labels") if isinstance(t, Mapping) else None
            if ids is not None and np.ndim(ids) == 2:
                lens.setdefault(side, int(np.shape(ids)[1]))
            elif labels and isinstance(labels[0], (list, tuple)):
                lens.setdefault(side, len(labels[0]))
        for side, n in lens.items():
            cap = self.length(side)
            if n > cap or (n != cap and side not in self.max_lengths and n >= 0):
                what = (
                    f"longer than the archive's maximum max_lengths[{side!r}] = {cap}"
                    if side in self.max_lengths
                    else f"not the {cap} tokens this archive holds on that side"
                    + ("" if self.ragged else " (create it with max_lengths for ragged batches)")
                )
                raise ShapeError(
                    f"batch has {n} {side} tokens, {what}; nothing was written (the "
                    f"{committed} committed samples are kept)"
                )
        return lens

    @staticmethod
    def _mask(side: str, got: Any, bsz: int | None, lb: int) -> np.ndarray:
        m = as_numpy(got, f"masks[{side!r}]") if hasattr(got, "detach") else np.asarray(got)
        if m.shape != (bsz, lb):
            raise ShapeError(
                f"masks[{side!r}] must have shape (B, L) = ({bsz}, {lb}) like the weights' "
                f"{side} side, got {m.shape}"
            )
        if m.dtype != bool:
            if m.dtype.kind not in "iu" or (m.size and (m.min() < 0 or m.max() > 1)):
                raise InputError(
                    f"masks[{side!r}] must be bool (True = real token) or 0/1, got {m.dtype}"
                )
            m = m.astype(bool)
        return m

    def _tokens(
        self, out: SideBatch, tokens: Mapping[str, Any], lens: Mapping[str, int], bsz: int | None
    ) -> None:
        for side, t in tokens.items():
            if not isinstance(t, Mapping) or not t or set(t) - set(TOKEN_FIELDS):
                raise InputError(
                    f"tokens[{side!r}] must be a dict with some of {list(TOKEN_FIELDS)}, "
                    f"got {t!r:.80}"
                )
            lb, full = lens.get(side, self.length(side)), self.length(side)
            if t.get("ids") is not None:
                ids = t["ids"]
                ids = as_numpy(ids, f"tokens[{side!r}]['ids']") if hasattr(ids, "detach") else ids
                ids = np.asarray(ids)
                if ids.shape != (bsz, lb):
                    raise ShapeError(
                        f"tokens[{side!r}]['ids'] must have shape (B, L) = ({bsz}, {lb}), "
                        f"got {ids.shape}"
                    )
                if ids.dtype.kind not in "iu":
                    raise InputError(f"tokens[{side!r}]['ids'] must be integers, got {ids.dtype}")
                padded = np.full((bsz, full), PAD_ID, dtype=np.int64)
                padded[:, :lb] = ids
                out.ids[side] = padded
            if t.get("labels") is not None:
                out.labels[side] = _labels(side, t["labels"], bsz, lb)


def _labels(side: str, labels: Any, bsz: int | None, lb: int) -> list[list[str]]:
    what = f"tokens[{side!r}]['labels']"
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise InputError(f"{what} must be a list of B lists of str, got {type(labels).__name__}")
    if len(labels) != bsz:
        raise ShapeError(f"{what} holds {len(labels)} samples, expected the batch's {bsz}")
    out = []
    for i, row in enumerate(labels):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise InputError(f"{what}[{i}] must be a list of str, got {type(row).__name__}")
        if len(row) != lb:
            raise ShapeError(
                f"{what}[{i}] has {len(row)} labels, expected the batch's {lb} {side} tokens"
            )
        if not all(isinstance(x, str) for x in row):
            bad = next(x for x in row if not isinstance(x, str))
            raise InputError(f"{what}[{i}] must hold str, got {type(bad).__name__} {bad!r:.40}")
        out.append(list(row))
    return out


def _pad(name: str, w: Any, qm: np.ndarray, km: np.ndarray) -> Any:
    """Weights padded to ``(B, H, T, S)`` with every padded row and key zeroed."""
    t, s = qm.shape[1], km.shape[1]
    if isinstance(w, Mapping):
        vals = as_numpy(w.get("values"), f"{name}['values']")
        idx = as_numpy(w.get("indices"), f"{name}['indices']")
        if vals.ndim != 4 or idx.shape != vals.shape:
            return w  # BatchRules names the bad shape
        b, h, tb, k = vals.shape
        v = np.zeros((b, h, t, k), dtype=vals.dtype)
        v[:, :, :tb] = vals
        i = np.broadcast_to(np.arange(k, dtype=idx.dtype), (b, h, t, k)).copy()
        i[:, :, :tb] = idx
        keep = np.take_along_axis(
            km[:, None, None, :], np.clip(i, 0, s - 1).astype(np.intp), axis=-1
        )
        np.copyto(v, 0, where=~(keep & qm[:, None, :, None]))
        return {**w, "values": v, "indices": i, "n_keys": s}
    x = as_numpy(w, name)
    if x.ndim != 4:
        return x
    b, h, tb, sb = x.shape
    if (tb, sb) == (t, s) and qm.all() and km.all():
        return x
    out = np.zeros((b, h, t, s), dtype=x.dtype)
    out[:, :, :tb, :sb] = x
    # assignment, not a product: padded rows may hold NaN (a fully masked softmax row)
    np.copyto(out, 0, where=~(qm[:, None, :, None] & km[:, None, None, :]))
    return out


class SideStore:
    """Writes a batch's masks, ids and labels beside its weights (before its commit)."""

    def __init__(self, backend: Backend, fmt: str, meta: Mapping[str, Any], rid: str) -> None:
        self._b = backend
        self._fmt = fmt
        self._rid = rid
        self._capacity = int(meta.get("capacity") or 0)
        self._handles: dict[str, ArrayHandle] = {}
        self._blob_end: dict[str, int] = {}
        self.fields: dict[str, set[str]] = {}  # side -> stored parts (incl. "labels")
        for side in STACKS:
            have = set(backend.list_children(f"{TOKENS}/{side}"))
            parts = {p for p in (TOKEN_MASK, TOKEN_IDS) if p in have}
            if TOKEN_LABEL_SPANS in have:
                parts.add(TOKEN_LABELS)
            if parts:
                self.fields[side] = parts

    def check(self, batch: SideBatch, committed: int) -> None:
        """The batch must carry the token fields earlier batches carried (no gaps)."""
        got: dict[str, set[str]] = {}
        for side in batch.ids:
            got.setdefault(side, set()).add(TOKEN_IDS)
        for side in batch.labels:
            got.setdefault(side, set()).add(TOKEN_LABELS)
        have = {s: p - {TOKEN_MASK} for s, p in self.fields.items() if p - {TOKEN_MASK}}
        if (have or committed) and got != have:
            def show(d: Mapping[str, set[str]]) -> str:
                return str({s: sorted(p) for s, p in sorted(d.items())}) if d else "none"

            raise ShapeError(
                f"tokens of this batch ({show(got)}) differ from those of the {committed} "
                f"samples already committed ({show(have)}); pass the same sides and fields "
                "with every batch"
            )

    def resume(self, start: int, count: int, others: Sequence[tuple[int, int]] = ()) -> None:
        """Find where this writer's label blobs end (after its last committed sample).

        ``others``: ``[a, b)`` spans of samples other writers committed inside
        ``[start, start + count)`` (range writers below the main writer's position); their
        spans point into those writers' blobs, so the main writer skips them.
        """
        last = start + count - 1
        for a, b in sorted(others, reverse=True):
            if a <= last < b:
                last = a - 1
        if last < start:
            return  # none of the committed samples is this writer's own
        for side, parts in self.fields.items():
            if TOKEN_LABELS in parts:
                spans = self._handle(side, TOKEN_LABEL_SPANS, 0, (2,), np.int64, last + 1)
                self._blob_end[side] = int(spans.read((slice(last, last + 1), slice(0, 2)))[0, 1])

    def _sample_chunk(self, chunk_hint: int) -> int:
        if self._fmt == "hdf5":
            return HDF5_SAMPLE_CHUNK
        # With pre-sized archives (sample-range writers) no chunk may straddle two ranges,
        # which are aligned to the attention arrays' sample chunks.
        return math.gcd(ZARR_SAMPLE_CHUNK, chunk_hint) if self._capacity else ZARR_SAMPLE_CHUNK

    def _handle(
        self, side: str, part: str, cs: int, tail: tuple[int, ...], dtype: Any, end: int,
        rid: str | None = None,
    ) -> ArrayHandle:
        path = side_path(side, part, rid)
        h = self._handles.get(path)
        if h is None:
            if self._b.has(path):
                h = self._b.get_array(path)
            else:
                n = max(end, self._capacity) if rid is None else end
                h = self._b.create_array(
                    path,
                    (n, *tail),
                    (cs, *tail),
                    np.dtype(dtype),
                    dims=_DIMS[part],
                    # HDF5 rewrites a partly filled chunk in place; uncompressed chunks keep
                    # their size, so the rewrite never moves committed bytes.
                    compressor="none" if self._fmt == "hdf5" else "zstd",
                )
                self.fields.setdefault(side, set()).add(
                    TOKEN_LABELS if part in (TOKEN_LABEL_SPANS, TOKEN_LABELS) else part
                )
            self._handles[path] = h
        if h.shape[0] < end:
            c = h.chunks[0]
            h.resize(-(-max(end, 2 * h.shape[0]) // c) * c)
        return h

    def writes(self, batch: SideBatch, pos: int, end: int, chunk_hint: int) -> list[Write]:
        """The boxes of this batch's side data; nothing here commits."""
        cs = self._sample_chunk(chunk_hint)
        out: list[Write] = []
        for part, data in [(TOKEN_MASK, batch.masks), (TOKEN_IDS, batch.ids)]:
            for side, arr in data.items():
                h = self._handle(side, part, cs, (arr.shape[1],), PARTS[part], end)
                out.append((h, (slice(pos, end), slice(0, arr.shape[1])), arr))
        for side, rows in batch.labels.items():
            blobs = [json.dumps(r, ensure_ascii=False).encode() for r in rows]
            start = self._blob_end.get(side, 0)
            bounds = np.cumsum([0, *map(len, blobs)]) + start
            spans = np.stack([bounds[:-1], bounds[1:]], axis=1).astype(np.int64)
            h = self._handle(side, TOKEN_LABEL_SPANS, cs, (2,), np.int64, end)
            out.append((h, (slice(pos, end), slice(0, 2)), spans))
            stop = int(bounds[-1])
            if stop > start:
                blob = np.frombuffer(b"".join(blobs), dtype=np.uint8)
                bh = self._handle(side, TOKEN_LABELS, BLOB_CHUNK, (), np.uint8, stop, self._rid)
                out.append((bh, (slice(start, stop),), blob))
            self._blob_end[side] = stop
        return out


def decode_labels(blob: bytes, length: int, where: str) -> list[str]:
    """One sample's stored labels, padded with PAD_LABEL to the side's ``length``."""
    try:
        got = json.loads(blob.decode("utf-8"))
        if not isinstance(got, list) or not all(isinstance(x, str) for x in got):
            raise ValueError("not a JSON array of strings")
    except ValueError as e:
        from attnscope.errors import ArchiveCorruptError

        raise ArchiveCorruptError(f"{where}: stored labels do not decode ({e})") from e
    return got + [PAD_LABEL] * (length - len(got))

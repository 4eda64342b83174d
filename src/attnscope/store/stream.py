"""One batch written in blocks of query rows, committed once every row is in.

Long-context capture (see docs/capture.md, "Query blocks") produces a layer's weights
``(B, H, T, S)`` as blocks of query rows ``(B, H, rb, S)``; each block is written as it
comes, so no more than one block is held anywhere. Nothing of the batch is visible until
:meth:`BatchStream.commit` has checked that every array got all its rows and written the
commit record: a crash in between leaves the archive at its last committed batch, and
the next writer overwrites the uncommitted boxes.

Example
-------
>>> with ArchiveWriter.create("run.zarr", layout) as w:          # doctest: +SKIP
...     s = w.stream(batch_size=1)
...     for r0 in range(0, T, 256):
...         s.put("encoder/0/self_attention", r0, weights[:, :, r0:r0 + 256])
...     s.commit()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from attnscope.contracts import KIND_AXES
from attnscope.errors import ArchiveError, ConfigError, InputError, ShapeError
from attnscope.store.batch import BatchRules
from attnscope.store.codecs import as_numpy, encode, is_half
from attnscope.store.names import parse_array_name, rows_of
from attnscope.store.tokens import _pad
from attnscope.store.validation import check_weights

if TYPE_CHECKING:
    from attnscope.store.layout import TokenLayout

# The ArchiveWriter (store/writer.py) whose batch this is; typed Any here because the
# writer module imports this one (its `stream()` makes a BatchStream).
ArchiveWriter = Any

__all__ = ["BatchStream", "relayout"]


def relayout(writer: ArchiveWriter, layout: TokenLayout) -> None:
    """Replace the token layout of an archive that has nothing committed yet.

    A streamed first batch creates its archive at its first block, when later layers
    (and so a side of the layout) may not have run yet; the full layout follows before
    the first commit.
    """
    if layout.to_json() == writer._meta.get("layout"):
        return
    if writer._count or writer._start:
        raise ArchiveError(f"{writer.path!r} holds committed samples; its layout is fixed")
    rules = type(writer._rules)(layout, writer._meta)
    for name, node in writer._nodes.items():
        rules.check_shape(name, node.h, node.t, node.s, {})
    writer._meta["layout"] = layout.to_json()
    writer.layout, writer._rules = layout, rules
    writer._sides = type(writer._sides)(layout, writer._meta)
    assert writer._backend is not None
    writer._backend.write_root_meta(writer._meta)


def _axes(name: str) -> tuple[str, str]:
    """The (query, key) sides of array ``name``."""
    stack, _layer, kind = parse_array_name(name)
    return KIND_AXES[(stack, kind)]


class BatchStream:
    """A batch of ``batch_size`` samples written array by array, block by block.

    Made by :meth:`ArchiveWriter.stream`. Blocks of one array must come in row order
    (``row0`` = the rows written so far); arrays may interleave. In a ragged archive the
    batch's ``masks`` (side -> ``(B, L_b)``) come first: each block ``(B, H, rb, L_b)`` is
    padded to the archive's keys with padded rows and keys zeroed, and the commit writes
    the rows past ``L_b`` as zeros.
    """

    def __init__(
        self, writer: ArchiveWriter, batch_size: int, masks: Mapping[str, Any] | None = None
    ) -> None:
        if int(batch_size) < 1:
            raise ShapeError(f"batch_size must be >= 1, got {batch_size}")
        self.w = writer
        self.bsz = int(batch_size)
        self.pos = writer._start + writer._count
        self.end = self.pos + self.bsz
        writer._check_fits(self.pos, self.end)
        self.done: dict[str, int] = {}  # array name -> rows written so far
        self.regions: list = []  # digests of the boxes written (the commit log)
        self.n_rows: dict[str, int] = {}  # array name -> T given while the layout lacks it
        self.bytes = 0
        self._open = True
        # ragged archives: side -> (B, L_max) bool real tokens, and the batch's L_b
        self.masks: dict[str, np.ndarray] = {}
        self.lb: dict[str, int] = {}
        sides = writer._sides
        if not sides.ragged:
            if masks:
                raise ConfigError("masks need a ragged archive (created with max_lengths)")
            return
        for side in sides.sides:
            got = (masks or {}).get(side)
            if got is None:
                raise ShapeError(
                    f"{writer.path!r} is ragged: pass masks={{{side!r}: (B, L)}} for the "
                    "batch's real tokens on every side"
                )
            lb = int(np.shape(got)[-1])
            m = sides._mask(side, got, self.bsz, lb)
            if lb > sides.length(side):
                raise ShapeError(
                    f"batch has {lb} {side} tokens, more than the archive's maximum "
                    f"{sides.length(side)}; nothing was written"
                )
            self.masks[side] = np.zeros((self.bsz, sides.length(side)), dtype=bool)
            self.masks[side][:, :lb] = m
            self.lb[side] = lb

    def _expected_t(self, name: str, given: int | None = None) -> int:
        """Query rows of array ``name``: stored, else the layout's, else ``given``."""
        node = self.w._nodes.get(name)
        if node is not None:
            return node.t
        kept = rows_of(self.w._meta, name)  # a row policy: the array holds its kept rows
        if kept is not None:
            return len(kept)
        side = _axes(name)[0]
        lay = getattr(self.w.layout, side)
        if lay is not None:
            return int(lay.length)
        if given is None:
            raise ShapeError(f"{name}: the layout has no {side} side; pass n_rows to put()")
        self.n_rows[name] = int(given)
        return int(given)

    def put(self, name: str, row0: int, block: Any, *, n_rows: int | None = None) -> None:
        """Write rows ``[row0, row0 + rb)`` of array ``name`` for every sample of the batch.

        ``block``: ``(B, H, rb, S)`` weights (numpy or torch), or in a sparse archive
        ``{"values": (B, H, rb, k), "indices": (B, H, rb, k)}``. A ragged batch may put
        ``rb = 0`` rows: an array of which it holds no (kept) real row. ``n_rows``: the array's
        query rows T, needed only while the layout lacks its query side (a first batch
        whose layout is completed by :func:`relayout` before the commit).
        """
        if not self._open:
            raise ArchiveError("this batch stream is committed or abandoned; start another")
        w, rules = self.w, self.w._rules
        t = self._expected_t(name, n_rows if n_rows is not None else self.n_rows.get(name))
        if row0 != self.done.get(name, 0):
            raise ShapeError(
                f"{name}: block starts at row {row0}, expected row {self.done.get(name, 0)} "
                "(blocks of one array come in row order)"
            )
        if isinstance(block, Mapping):
            if not rules.sparse:
                raise InputError(f"{name}: got a dict {sorted(block)} but this archive is dense")
            half = is_half(block.get("values"))
            vals = as_numpy(block.get("values"), f"{name}['values']").astype(np.float32, copy=False)
            idx = as_numpy(block.get("indices"), f"{name}['indices']")
            if vals.ndim != 4 or idx.shape != vals.shape:
                raise ShapeError(f"{name}: values and indices must both be (B, H, rb, k)")
            b, h, rb, _k = vals.shape
            s = rules._expect_s(name, *parse_array_name(name)[::2], None, self._known())
            rules._check_topk(name, vals, idx, s)
            dense = None
        else:
            half = is_half(block)
            dense = as_numpy(block, name)
            if dense.ndim != 4 or not np.issubdtype(dense.dtype, np.floating):
                raise ShapeError(
                    f"{name}: expected a floating (B, H, rb, S) block, got {dense.dtype} "
                    f"{dense.shape}"
                )
            b, h, rb, s = dense.shape
        if b != self.bsz:
            raise ShapeError(f"{name}: block has {b} samples, the batch {self.bsz}")
        if rb < 0 or row0 + rb > t or (rb == 0 and row0 == 0 and not self.masks):
            raise ShapeError(f"{name}: rows {row0}..{row0 + rb - 1} outside the {t} query rows")
        real = None  # ragged: (B, rb) real query rows of the block
        if self.masks:
            qs, ks = _axes(name)
            if dense is not None and s != self.lb[ks]:
                raise ShapeError(f"{name}: block has {s} keys, the batch's {ks} side {self.lb[ks]}")
            kept = rows_of(w._meta, name)
            at = np.arange(row0, row0 + rb) if kept is None else np.array(kept[row0:row0 + rb], int)
            real = self.masks[qs][:, at]
            padded = _pad(name, block if dense is not None else {"values": vals, "indices": idx},
                          real, self.masks[ks])  # fmt: skip
            if dense is not None:
                dense, s = padded, padded.shape[-1]
            else:
                vals, idx, s = padded["values"], padded["indices"], int(padded["n_keys"])
        rules.check_shape(name, h, t, s, self._known())
        if rules.validate:
            tol = (1e-2 if half else 1e-3) if rules.tolerance is None else rules.tolerance
            if dense is not None:
                check_weights(name, dense, tol, first_sample=self.pos, rows=real)
            else:
                check_weights(name, vals, tol, first_sample=self.pos, rows_le_one=True, rows=real)
        if rules.sparse:
            if dense is not None:
                vals, idx = rules._topk(name, dense, s)
            res = np.clip(1.0 - vals.sum(axis=-1, dtype=np.float64), 0, None)
            if real is not None:
                res *= real[:, None, :]  # a padded row holds no mass at all
            parts = {
                "values": encode(vals, rules.dtype),
                "indices": idx.astype(np.int16 if s < 32768 else np.int32),
                "residual": res.astype(np.float32),
            }
        else:
            parts = {"": encode(dense, rules.dtype)}
        w._ensure_nodes({name: {"_hts": (h, t, s)}}, self.end)
        if rb:
            self._write(name, row0, parts)
        self.done[name] = row0 + rb

    def _write(self, name: str, row0: int, parts: Mapping[str, np.ndarray]) -> None:
        w, writes = self.w, []
        for part, handle in w._nodes[name].handles.items():
            data = parts[part]
            sel = (slice(self.pos, self.end), slice(0, data.shape[1]))
            sel += (slice(row0, row0 + data.shape[2]),)
            sel += tuple(slice(0, d) for d in data.shape[3:])
            writes.append((handle, sel, data))
            w._tails.pop((name, part), None)  # a box write, not a whole-chunk tail
            self.bytes += data.nbytes
        assert w._backend is not None
        self.regions += w._log.regions(writes)
        w._backend.write_many(writes)

    def _model_rows(self, name: str, t: int) -> int:
        """Rows of ``name`` the model gives for this batch: a ragged batch stops at its
        length (the rest are padding, written as zeros by :meth:`commit`)."""
        if not self.masks:
            return t
        qs = _axes(name)[0]
        kept = rows_of(self.w._meta, name)
        lb = self.lb[qs]
        return lb if kept is None else int(np.sum(np.asarray(kept) < lb))

    def _zero_rows(self, name: str, r0: int) -> None:
        """Write rows ``[r0, T)`` of ``name`` as padding (zeros), a bounded box at a time."""
        node = self.w._nodes[name]
        for a in range(r0, node.t, 64):
            rb = min(64, node.t - a)
            parts = {}
            for part, handle in node.handles.items():
                shape = (self.bsz, node.h, rb, *handle.shape[3:])
                parts[part] = np.zeros(shape, dtype=handle.dtype)
                if part == "indices":  # as the store pads: every key index once
                    parts[part][:] = np.arange(shape[-1], dtype=handle.dtype)
            self._write(name, a, parts)

    def _known(self) -> dict[str, tuple[int, int, int]]:
        return {n: (x.h, x.t, x.s) for n, x in self.w._nodes.items()}

    def commit(
        self,
        *,
        sample_ids: Mapping[str, Any] | None = None,
        tokens: Mapping[str, Mapping[str, Any]] | None = None,
        frames: Mapping[str, Any] | None = None,
    ) -> int:
        """Check every array is complete, write the batch's side data, then commit it.

        Returns the new committed count.
        """
        if not self._open:
            raise ArchiveError("this batch stream is already committed or abandoned")
        w = self.w
        if not self.done:
            raise ShapeError("commit() of a batch stream that got no blocks")
        full = {n: self._expected_t(n, self.n_rows.get(n)) for n in self.done}
        want = {n: self._model_rows(n, t) for n, t in full.items()}
        # a ragged batch gives rows up to its length, or all of them already padded
        short = {n: (r, want[n]) for n, r in self.done.items() if r not in (want[n], full[n])}
        if short:
            n, (r, t) = next(iter(short.items()))
            raise ShapeError(f"{n}: {r} of its {t} query rows were written; nothing committed")
        later = bool(w._count or w._start)
        if later and set(self.done) != set(w._nodes):
            have, got = set(w._nodes), set(self.done)
            raise ShapeError(
                f"batch arrays differ from the archive's: missing {sorted(have - got)}, "
                f"unexpected {sorted(got - have)}; nothing committed"
            )
        for n, r in self.done.items():
            if r < w._nodes[n].t:  # ragged: the rows past this batch's length
                self._zero_rows(n, r)
        # zero-head stand-ins carry each array's batch lengths to the side rules
        stand_in = {n: np.empty((self.bsz, 0, *self._lengths(n)), np.float32) for n in self.done}
        masks = {side: m[:, : self.lb[side]] for side, m in self.masks.items()} or None
        side = w._sides.prepare(stand_in, masks, tokens, committed=w._count)
        w._side_store.check(side, w._count)
        ids = BatchRules.prepare_ids(sample_ids, self.bsz, w._id_keys, later=later)
        frm = w._frames.prepare(frames, self.bsz, w._count)
        self._open = False
        w._finish(side, ids, frm, self.pos, self.end, [], {}, written=self.regions)
        return w.flush()

    def _lengths(self, name: str) -> tuple[int, int]:
        """The batch's (query, key) lengths of ``name`` (zeros: fixed-length, unused)."""
        if not self.masks:
            return 0, 0
        qs, ks = _axes(name)
        kept = rows_of(self.w._meta, name)  # such an array says nothing of its query length
        return (self.lb[qs] if kept is None else len(kept)), self.lb[ks]

    def abandon(self) -> None:
        """Drop the batch: its boxes stay unreferenced until a later batch overwrites them."""
        self._open = False

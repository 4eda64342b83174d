"""The hook sink of a capture job: what happens to each weight tensor on the device.

An adapter calls the :class:`Recorder` with ``(array name, weights (B, H, T, S))`` for
every selected attention module. The recorder keeps the selected heads, drops samples an
earlier run already committed, checks the rows in full precision, takes the top-k keys
in sparse mode, casts to the stored dtype and starts the copy to the host, all before
anything leaves the device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from attnscope.capture.blocks import BLOCK_BYTES, block_rows
from attnscope.capture.options import TORCH_DTYPES
from attnscope.contracts import KIND_AXES
from attnscope.errors import ConfigError, SelectionError, ValidationError
from attnscope.store import choose_chunks

__all__ = [
    "Recorder", "HostCopier", "Captured", "ROW_SUM_TOLERANCE", "row_sum_tolerance", "trim",
]  # fmt: skip

# array name -> host tensor (B, H, T, S), or (values (B, H, T, k), indices (B, H, T, k))
Captured = dict[str, Any]

# |row sum - 1| allowed for float32 weights; the explicit softmax path is within 1e-6.
ROW_SUM_TOLERANCE = 1e-3


def row_sum_tolerance(dtype: torch.dtype) -> float:
    """|row sum - 1| allowed for weights the model computed in ``dtype``.

    A model in float16/bfloat16 returns its softmax rounded to that dtype: each weight
    carries a relative error of at most the unit roundoff ``u = eps / 2``, so a row of
    weights summing to 1 sums to within ``u`` of 1 after rounding, whatever its length.
    The tolerance is ``eps = 2u`` (twice the bound), and never below the float32 1e-3:
    bfloat16 (8 significant bits) -> 2**-7 = 7.8e-3; float16 -> 1e-3 (eps 9.8e-4);
    float32 / float64 -> 1e-3.
    """
    if not dtype.is_floating_point:
        return ROW_SUM_TOLERANCE
    return max(ROW_SUM_TOLERANCE, float(torch.finfo(dtype).eps))


class HostCopier:
    """Device -> host copies. On CUDA: pinned buffers, non-blocking, one event per batch."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return t.contiguous()
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        return buf

    def fence(self) -> Any:
        """An event the writer thread waits on before reading this batch's buffers."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record()
        return ev


class Recorder:
    """Sink for one job's weights; :meth:`begin` / :meth:`finish` bracket each batch.

    Parameters
    ----------
    heads
        Original head indices to keep (``None``: all), checked against each array's
        head count the first time the array is seen.
    dtype
        Stored dtype name (``contracts.DTYPES``); the cast happens on the device.
    topk
        Sparse mode: keep the ``topk`` largest weights of each query row and their keys.
    validate
        Flag NaN/Inf, negative weights and rows not summing to 1 (one host sync per batch).
    device
        Where the model runs; decides how the host copy is made.
    defer_rows
        A row policy awaits the first batch's layout: that batch's weights wait on the
        device (after head selection) until :meth:`set_rows` gives the rows to keep.
    """

    def __init__(
        self,
        *,
        heads: Sequence[int] | None,
        dtype: str,
        topk: int | None,
        validate: bool,
        device: torch.device,
        defer_rows: bool = False,
    ) -> None:
        self.heads = None if heads is None else list(heads)
        self.dtype = TORCH_DTYPES[dtype]
        self.topk = topk
        self.validate = validate
        self.copier = HostCopier(device)
        self._head_index: torch.Tensor | None = None
        self._heads_checked: set[str] = set()
        # query side -> kept rows (ascending, on the side's padded axis); None: every row
        self.rows: dict[str, np.ndarray] | None = None
        self._row_index: dict[tuple[str, int, Any], torch.Tensor] = {}
        self.pending: list[tuple[str, torch.Tensor]] | None = [] if defer_rows else None
        #: rows per block (None: automatic, see capture.blocks); used only with `stream`
        self.query_block: int | None = None
        #: selected arrays per batch: with `stream`, whole arrays go out one by one when
        #: the batch's would exceed one block together
        self.n_arrays = 1
        #: consumer of streamed blocks ``(name, r0, host data, fence, T)``; None: no blocks
        self.stream: Callable[[str, int, Any, Any, int], None] | None = None
        self.begin(0)

    def begin(self, drop: int) -> None:
        """Start a batch whose first ``drop`` samples are already committed."""
        self.drop = drop
        self.captured: Captured = {}
        self.shapes: dict[str, tuple[int, ...]] = {}  # the model's (B, H, T, S) per array
        self._checks: dict[str, tuple[torch.Tensor, float]] = {}
        self.streamed: set[str] = set()  # arrays of this batch handed to `stream` in blocks
        self._sent: set[str] = set()  # streamed arrays that sent a block this batch

    def __call__(self, name: str, w: torch.Tensor) -> None:
        self.shapes[name] = tuple(w.shape)
        w = self._heads_and_drop(name, w)
        if self.pending is not None:
            self.pending.append((name, w))
            return
        data = self._keep(name, w := self._select_rows(name, w))
        if self.stream is not None and self.n_arrays * w.numel() * 4 > BLOCK_BYTES:
            # the batch's arrays together would exceed one block: each goes out as it comes
            self.streamed.add(name)
            self.stream(name, 0, data, self.copier.fence(), int(w.shape[2]))
            return
        self.captured[name] = data

    def block_rows(self, b: int, h: int, t: int, s: int) -> int:
        """Rows per block for the model's weights ``(b, h, t, s)``; ``t``: one whole array.

        Below ``t`` only when a stream consumer is set and the array exceeds the block
        budget (or ``query_block``); rounded down to whole chunk rows of the archive.
        """
        if self.stream is None:
            return t
        rows = block_rows(b, h, t, s, self.query_block)
        if rows >= t:
            return t
        hs = len(self.heads) if self.heads is not None else h
        align = choose_chunks(hs, t, s, self.dtype.itemsize, query_block=self.query_block)[2]
        return rows if rows < align else rows // align * align

    def block(self, name: str, r0: int, w: torch.Tensor, t: int) -> None:
        """Rows ``[r0, r0 + rb)`` of array ``name`` (``t`` rows), as weights ``(B, H, rb, S)``.

        Processed like a whole array (a row policy keeps the block's kept rows, placed
        after the kept rows of earlier blocks), then handed to :attr:`stream` with its copy
        fence; the row checks of every block are combined and read back in :meth:`finish`.
        """
        assert self.stream is not None and self.pending is None
        self.shapes[name] = (w.shape[0], w.shape[1], t, w.shape[3])
        self.streamed.add(name)
        w = self._heads_and_drop(name, w)
        kept = self._side_rows(name)
        n_rows = t
        if kept is not None:  # the block's kept rows, after the kept rows of earlier blocks
            inside = kept[(kept >= r0) & (kept < r0 + w.shape[2])]
            last = r0 + w.shape[2] >= t
            if not len(inside) and not (last and name not in self._sent):
                return  # (a ragged batch may hold none: its last block declares the array)
            local = torch.as_tensor(inside - r0, device=w.device)
            n_rows, r0 = len(kept), int(np.searchsorted(kept, r0))
            w = w.index_select(2, local)
        self._sent.add(name)
        self.stream(name, r0, self._keep(name, w), self.copier.fence(), n_rows)

    def _heads_and_drop(self, name: str, w: torch.Tensor) -> torch.Tensor:
        if self.heads is not None:
            if name not in self._heads_checked:  # arrays may differ in head count
                _check_heads(self.heads, w.shape[1], name)
                self._heads_checked.add(name)
            if self._head_index is None or self._head_index.device != w.device:
                self._head_index = torch.tensor(self.heads, device=w.device)
            w = w.index_select(1, self._head_index)
        return w[self.drop :] if self.drop else w

    def _keep(self, name: str, w: torch.Tensor) -> Any:
        """Validation, top-k, cast and host copy of one array's selected heads and rows."""
        if self.validate:
            tol = row_sum_tolerance(w.dtype)
            flags = _device_checks(w, tol)
            if name in self._checks:  # a later block of a streamed array
                flags = flags | self._checks[name][0]
            self._checks[name] = (flags, tol)
        if self.topk is None:
            return self.copier(w.to(self.dtype))
        if self.topk > w.shape[-1]:
            raise ConfigError(f"topk={self.topk} is larger than the {w.shape[-1]} keys of {name}")
        vals, idx = w.float().topk(self.topk, dim=-1, sorted=True)
        itype = torch.int16 if w.shape[-1] < 2**15 else torch.int32
        return (self.copier(vals.to(self.dtype)), self.copier(idx.to(itype)))

    def set_rows(self, rows: Mapping[str, np.ndarray]) -> None:
        """Keep only these query rows per side from now on (a resolved row policy), and
        process the weights that waited for them."""
        self.rows = {k: np.asarray(v, dtype=np.int64) for k, v in rows.items()}
        pending, self.pending = self.pending or [], None
        for name, w in pending:
            self.captured[name] = self._keep(name, self._select_rows(name, w))

    def _select_rows(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """``(B, H, T, S)`` -> ``(B, H, R, S)``: the kept rows of the array's query side.

        Rows index the side's padded axis; a shorter (ragged) batch has no row past its
        length: it is filled from the last row and zeroed by the store as padding (its
        mask is False there).
        """
        rows = self._side_rows(name)
        if rows is None:
            return w
        side = KIND_AXES[tuple(name.split("/")[::2])][0]
        t = int(w.shape[2])
        key = (side, t, w.device)
        idx = self._row_index.get(key)
        if idx is None:
            idx = torch.as_tensor(np.minimum(rows, t - 1), device=w.device)
            self._row_index[key] = idx
        return w.index_select(2, idx)

    def _side_rows(self, name: str) -> np.ndarray | None:
        """The kept rows of the array's query side (None: every row)."""
        if not self.rows:
            return None
        stack, _layer, kind = name.split("/")
        return self.rows.get(KIND_AXES[(stack, kind)][0])

    def finish(self, wanted: Sequence[str], first_sample: int) -> tuple[Captured, Any]:
        """``(captured arrays, fence)`` of the batch; raise if an array is missing or bad."""
        missing = [n for n in wanted if n not in self.captured and n not in self.streamed]
        if missing:
            raise SelectionError(f"the model produced no weights for {missing}")
        if self._checks:
            _raise_on_bad_weights(self._checks, first_sample)
        return self.captured, self.copier.fence()

    def array_shapes(self) -> dict[str, tuple[int, int, int]]:
        """Stored ``(H, T, S)`` of each array, from the model's ``(B, H, T, S)`` shapes."""
        return {
            n: (len(self.heads) if self.heads is not None else int(s[1]), int(s[2]), int(s[3]))
            for n, s in self.shapes.items()
        }

    def kept_shapes(self, hts: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """``hts`` with T = the kept rows of each array whose query side has a row policy."""
        out = dict(hts)
        for n, (h, t, s) in hts.items():
            stack, _layer, kind = n.split("/")
            rows = (self.rows or {}).get(KIND_AXES[(stack, kind)][0])
            out[n] = (h, t if rows is None else len(rows), s)
        return out


def trim(captured: Captured, n: int) -> Captured:
    """The captured arrays without their first ``n`` samples."""
    return {k: (v[0][n:], v[1][n:]) if isinstance(v, tuple) else v[n:] for k, v in captured.items()}


def _check_heads(heads: Sequence[int], n: int, name: str) -> None:
    bad = [h for h in heads if not 0 <= h < n]
    if bad:
        raise SelectionError(f"head(s) {bad} out of range for {name}: it has heads 0..{n - 1}")


def _device_checks(w: torch.Tensor, tol: float) -> torch.Tensor:
    """Per-sample flags ``(B, 3)``: non-finite, negative, row sum off by > tolerance.

    Computed on the weights' device in full precision; read back once per batch.
    """
    flat = w.flatten(1)
    return torch.stack(
        [
            ~torch.isfinite(flat).all(1),
            (flat < 0).any(1),
            ((w.sum(-1, dtype=torch.float32) - 1).abs() > tol).flatten(1).any(1),
        ],
        dim=1,
    )


def _raise_on_bad_weights(
    checks: dict[str, tuple[torch.Tensor, float]], first_sample: int
) -> None:
    """One device->host sync per batch; on a problem, name the array, sample and issue."""
    names = list(checks)
    flags = torch.stack([checks[n][0] for n in names]).cpu()  # (arrays, B, 3)
    if not flags.any():
        return
    a, b, k = (int(i) for i in flags.nonzero()[0])
    problem = [
        "has NaN or Inf weights",
        "has negative weights",
        f"has rows that do not sum to 1 (tolerance {checks[names[a]][1]:.2g})",
    ][k]
    raise ValidationError(
        f"{names[a]}: sample {first_sample + b} {problem}; nothing of this batch was written "
        "(pass validate=False to store such weights anyway, e.g. with attention dropout)"
    )

"""Archive diff: where two archives of the same layout attend differently.

Two checkpoints, two prompts or two episodes captured with the same arrays, heads and
token layout: per (array, head, sample), and for the mean over heads (``head = -1``), the
Jensen-Shannon divergence between A's and B's attention rows and the change of their
entropy, into the ``diff`` table. Archives of different layouts are refused with a message
naming what differs. Never imports torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from attnscope.analysis.blocks import dense_block, key_mask, sample_slices, sparse_causal
from attnscope.analysis.metrics import as_float32, row_entropy
from attnscope.analysis.rollout import ParquetSink
from attnscope.contracts import AVERAGE_HEAD, HEAD_INDEX, KIND_AXES, MEAN_HEAD_TABLES
from attnscope.errors import ConfigError
from attnscope.store import check_structure, open_archive

__all__ = ["check_same_layout", "diff_archives", "js_rows"]

DIFF = "diff"
_LN2 = float(np.log(2.0))


def js_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence of each row of ``a`` against the same row of ``b``, nats.

    ``JS(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m)``, ``m = (p + q) / 2``, computed per key as
    ``1/2 [p log1p((p - q) / (p + q)) + q log1p((q - p) / (p + q))]`` in float64: every term
    is >= 0 and exactly 0 where ``p == q``, so identical rows give exactly 0 and nearly
    identical rows lose nothing to cancellation. In ``[0, ln 2]``.

    Parameters
    ----------
    a, b : np.ndarray
        ``(..., S)`` rows (probability distributions), same shape.

    Returns
    -------
    np.ndarray
        ``(...)`` float64.
    """
    p = np.asarray(a, dtype=np.float64)
    q = np.asarray(b, dtype=np.float64)
    if p.shape != q.shape:
        raise ConfigError(f"js_rows needs two arrays of one shape, got {p.shape} and {q.shape}")
    s = p + q
    d = np.divide(p - q, s, out=np.zeros_like(s), where=s > 0)
    # p log1p(d) with p = 0 is 0 (d = -1 there would give 0 * -inf)
    tp = np.zeros_like(s)
    np.multiply(p, np.log1p(d, out=np.zeros_like(s), where=p > 0), out=tp, where=p > 0)
    tq = np.zeros_like(s)
    np.multiply(q, np.log1p(-d, out=np.zeros_like(s), where=q > 0), out=tq, where=q > 0)
    return np.clip(0.5 * (tp + tq).sum(axis=-1), 0.0, _LN2)


def _layout_segments(a: Any, side: str) -> list[tuple[str, int, int]] | None:
    lay = getattr(a.layout, side)
    return None if lay is None else [(s.name, s.start, s.stop) for s in lay.segments]


def check_same_layout(a: Any, b: Any, *, max_bytes: int = 64 << 20) -> None:
    """Refuse two archives whose attention cannot be compared cell by cell.

    Same sample count, same arrays, per array the same ``(H, T, S)`` and stored head ids,
    the same token segments on each side, and in ragged archives the same real-token mask
    for every sample. Token labels may differ (two prompts). Raises :class:`ConfigError`
    naming the first difference.
    """
    if a.n_samples != b.n_samples:
        raise ConfigError(
            f"archives differ in sample count: A has {a.n_samples}, B has {b.n_samples}"
        )
    na, nb = set(a.arrays), set(b.arrays)
    if na != nb:
        raise ConfigError(
            f"archives differ in arrays: only in A {sorted(na - nb)}, only in B {sorted(nb - na)}"
        )
    for name in a.arrays:
        xa, xb = a.attention(name), b.attention(name)
        ra, rb = (_kept(x) for x in (xa, xb))
        if ra != rb:
            raise ConfigError(
                f"array {name} differs in kept query rows (capture row policy): A {ra}, B {rb}"
            )
        if xa.shape[1:] != xb.shape[1:]:
            raise ConfigError(
                f"array {name} differs in shape (H, T, S): A {xa.shape[1:]}, B {xb.shape[1:]}"
            )
        if list(xa.heads) != list(xb.heads):
            raise ConfigError(f"array {name} differs in heads: A {xa.heads}, B {xb.heads}")
    for side in ("encoder", "decoder"):
        sa, sb = _layout_segments(a, side), _layout_segments(b, side)
        if sa != sb:
            raise ConfigError(f"archives differ in {side} segments: A {sa}, B {sb}")
    if a.ragged != b.ragged:
        raise ConfigError(
            f"archives differ in padding: A ragged={a.ragged}, B ragged={b.ragged}"
        )
    if not a.ragged:
        return
    step = max(1, max_bytes // max(1, sum(a.layout.side(s).length for s in _sides(a))))
    for side in _sides(a):
        for start in range(0, a.n_samples, step):
            sl = slice(start, min(a.n_samples, start + step))
            ma, mb = a.masks(side, sl), b.masks(side, sl)
            bad = np.flatnonzero((ma != mb).any(axis=1))
            if bad.size:
                i = start + int(bad[0])
                ra, rb = ma[bad[0]], mb[bad[0]]
                pos = int(np.flatnonzero(ra != rb)[0])
                where = (
                    f"A has {int(ra.sum())} real tokens, B {int(rb.sum())}"
                    if ra.sum() != rb.sum()
                    else f"both have {int(ra.sum())} real tokens, but at different positions"
                )
                raise ConfigError(
                    f"archives differ in the {side} token mask of sample {i}: {where}; first "
                    f"at position {pos} (A {'real' if ra[pos] else 'padding'}, B "
                    f"{'real' if rb[pos] else 'padding'}); diff archives padded the same way "
                    "(e.g. both right-padded)"
                )


def _kept(x: Any) -> str | list[int]:
    rows = getattr(x, "query_rows", None)
    return "all rows" if rows is None else [int(r) for r in rows]


def _sides(a: Any) -> list[str]:
    return [s for s in ("encoder", "decoder") if getattr(a.layout, s) is not None]


def _with_mean(block: np.ndarray) -> np.ndarray:
    """``(n, H, T, S)`` float32 -> ``(n, H + 1, T, S)``, the head mean last."""
    x = as_float32(block) if block.dtype != np.float32 else block
    return np.concatenate([x, x.mean(axis=1, keepdims=True)], axis=1)


def _diff_rows(
    xa: np.ndarray, xb: np.ndarray, rows: np.ndarray
) -> dict[str, np.ndarray]:
    """Per (sample, head) of ``(n, h, T, S)`` blocks: js, entropies, max |B - A| over real rows.

    ``rows`` ``(n, T)`` bool: the real query rows (padded keys hold 0 in both archives).
    """
    same = (xa == xb).all(axis=-1)  # identical rows: JS and entropy change exactly 0
    js = js_rows(xa, xb)
    ea, eb = row_entropy(xa).astype(np.float64), row_entropy(xb).astype(np.float64)
    change = np.where(same, 0.0, eb - ea)
    w = np.broadcast_to(rows[:, None, :], js.shape).astype(np.float64)
    count = w.sum(axis=-1)

    def mean(v: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return (v * w).sum(axis=-1) / count

    gap = np.abs(xb - xa).max(axis=-1, initial=0.0)
    gap = np.where(rows[:, None, :], gap, 0.0).max(axis=-1, initial=0.0)
    return {
        "n_queries": rows.sum(axis=-1)[:, None].repeat(js.shape[1], axis=1),
        "js": mean(js),
        "entropy_a": mean(ea),
        "entropy_b": mean(eb),
        "entropy_change": mean(change),
        "max_abs_diff": gap,
    }


def _blocks(
    a: Any, b: Any, name: str, max_bytes: int
) -> Iterator[tuple[slice, np.ndarray, np.ndarray, np.ndarray]]:
    xa, xb = a.attention(name), b.attention(name)
    qs, _ = KIND_AXES[(xa.stack, xa.kind)]
    ca, cb = sparse_causal(xa), sparse_causal(xb)  # once per array, not per block
    for sl in sample_slices(xa, max(1, max_bytes // 8)):  # ~8 block-sized temporaries
        rows = a.masks(qs, sl)
        if xa.query_rows is not None:  # the stored rows only (a capture row policy)
            rows = rows[:, xa.query_rows]
        da = dense_block(xa, sl, causal=ca, kmask=key_mask(xa, sl))
        db = dense_block(xb, sl, causal=cb, kmask=key_mask(xb, sl))
        yield sl, _with_mean(da), _with_mean(db), rows


def diff_archives(
    a: Any,
    b: Any,
    out_dir: str | os.PathLike[str],
    *,
    max_bytes: int = 64 << 20,
) -> Path:
    """Write ``out_dir/diff.parquet``: how archive B's attention differs from A's.

    Per (array, sample, head), and for the mean over heads (``mean_head_diff.parquet``
    beside it, :data:`~attnscope.contracts.MEAN_HEAD_TABLES`), over the real
    query rows of the sample: ``js`` (mean Jensen-Shannon divergence of B's row against
    A's, natural log, in ``[0, ln 2]``), ``entropy_a`` / ``entropy_b`` (mean row entropy,
    nats), ``entropy_change`` (B - A) and ``max_abs_diff`` (largest ``|B - A|`` cell).

    Parameters
    ----------
    a, b : AttentionArchive or path
        Two archives of the same layout (:func:`check_same_layout`; refused otherwise).
    out_dir : str or Path
    max_bytes : int
        Size of the sample blocks read at once from each archive.

    Returns
    -------
    Path
        The table. Its ``archive_fingerprint`` column and ``attnscope.identity`` metadata
        are A's (``load_table(out_dir, "diff", archive=A)`` checks it is current); B's are
        in ``archive_fingerprint_b`` and the ``attnscope.identity_b`` metadata.

    Examples
    --------
    >>> diff_archives("ckpt1.zarr", "ckpt2.zarr", "diff/")  # doctest: +SKIP
    """
    with open_archive(a) as arc_a, open_archive(b) as arc_b:
        check_structure(arc_a)
        check_structure(arc_b)
        check_same_layout(arc_a, arc_b, max_bytes=max_bytes)
        id_a, id_b = arc_a.identity(), arc_b.identity()
        fa, fb = str(id_a["fingerprint"]), str(id_b["fingerprint"])
        extra = {"attnscope.identity_b": id_b}
        with ParquetSink(out_dir, DIFF, id_a, extra) as sink, ParquetSink(
                out_dir, MEAN_HEAD_TABLES[DIFF], id_a, extra) as mean_sink:
            for name in arc_a.arrays:
                arr = arc_a.attention(name)
                heads = np.asarray([*arr.heads, AVERAGE_HEAD], dtype=np.int64)
                for sl, xa, xb, rows in _blocks(arc_a, arc_b, name, max_bytes):
                    got = _diff_rows(xa, xb, rows)
                    n, h = got["js"].shape
                    m = n * h
                    cols = {
                        "archive_fingerprint": np.full(m, fa),
                        "stack": np.full(m, arr.stack),
                        "layer": np.full(m, arr.layer, dtype=np.int32),
                        "kind": np.full(m, arr.kind),
                        "archive_fingerprint_b": np.full(m, fb),
                        "sample": np.repeat(np.arange(sl.start, sl.stop, dtype=np.int64), h),
                        HEAD_INDEX: np.tile(heads, n),
                        **{k: v.ravel() for k, v in got.items()},
                    }
                    is_mean = cols[HEAD_INDEX] == AVERAGE_HEAD  # to their own table
                    sink.write({k: v[~is_mean] for k, v in cols.items()})
                    mean_sink.write({k: v[is_mean] for k, v in cols.items()
                                     if k != HEAD_INDEX})
        return sink.path


def table_identity_b(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Archive B's identity stored in a diff table's Parquet metadata."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(b"attnscope.identity_b")
    if raw is None:
        raise ConfigError(f"{path} has no attnscope.identity_b metadata; expected a diff table")
    return json.loads(raw)

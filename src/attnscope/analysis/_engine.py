"""Per-block analysis: one ``(n, H, T, S)`` block in, small metric columns out.

Everything a block needs travels in an :class:`ArraySpec` (plain, picklable data), so the
same :func:`analyze_block` runs in the main thread, a thread pool, or a Dask worker.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnscope.analysis import metrics as M
from attnscope.contracts import AVERAGE_HEAD
from attnscope.errors import InputError

__all__ = ["ArraySpec", "StatsAccumulator", "analyze_block", "densify_topk"]



@dataclass(frozen=True)
class ArraySpec:
    """What :func:`analyze_block` needs to know about one attention array."""

    name: str
    stack: str
    layer: int
    kind: str
    heads: tuple[int, ...]  # original head ids of the block's head axis
    n_queries: int
    n_keys: int
    causal: bool
    q_seg_ids: tuple[int, ...]
    k_seg_ids: tuple[int, ...]
    q_seg_names: tuple[str, ...]
    k_seg_names: tuple[str, ...]
    q_labels: tuple[str, ...]
    k_labels: tuple[str, ...]
    topk: int
    sink_token: int
    similarity: str | None  # "js", "cosine" or None
    row_stats: bool = True
    head_index: tuple[int, ...] | None = None  # positions to keep on the stored head axis
    sparse: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass
class StatsAccumulator:
    """Streaming count / mean / M2 / min / max (Chan et al. parallel combination)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float = float("inf")
    max: float = float("-inf")

    def add_partial(self, count: int, total: float, sumsq: float, lo: float, hi: float) -> None:
        if count == 0:
            return
        b_mean = total / count
        b_m2 = max(sumsq - total * b_mean, 0.0)
        self.merge(StatsAccumulator(count, b_mean, b_m2, lo, hi))

    def merge(self, other: StatsAccumulator) -> None:
        if other.count == 0:
            return
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / n
        self.m2 += other.m2 + delta * delta * self.count * other.count / n
        self.count = n
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    @property
    def std(self) -> float:
        """Population standard deviation (ddof=0, like ``numpy.std``)."""
        return float(np.sqrt(self.m2 / self.count)) if self.count else float("nan")


def _causal_mask(t: int, s: int) -> np.ndarray:
    return np.arange(s)[None, :] < M.allowed_keys(t, s, True)[:, None]


def densify_topk(
    values: np.ndarray,
    indices: np.ndarray,
    residual: np.ndarray | None,
    n_keys: int,
    *,
    causal: bool = False,
) -> np.ndarray:
    """Rebuild approximate dense rows from a sparse (top-k) archive.

    The stored top-k weights go back to their keys; the ``residual`` mass (what the
    dropped keys held) is spread uniformly over the other keys the row may attend to. That
    keeps rows summing to 1 and keeps the row maximum and any top pair within the stored
    ``k`` exact; entropy, distance, segment mass and head similarity become approximations
    (entropy an upper bound for the dropped part).

    Parameters
    ----------
    values, indices : np.ndarray
        ``(n, H, T, k)`` top-k weights and their key indices.
    residual : np.ndarray or None
        ``(n, H, T)`` mass outside the top-k; None leaves it out.
    n_keys : int
        ``S``.
    causal : bool
        Spread the residual over the causally allowed keys only.

    Returns
    -------
    np.ndarray
        ``(n, H, T, S)`` float32.
    """
    vals = M.as_float32(values)
    n, h, t, _ = vals.shape
    dense = np.zeros((n, h, t, n_keys), dtype=np.float32)
    np.put_along_axis(dense, np.asarray(indices, dtype=np.int64), vals, axis=-1)
    if residual is None:
        return dense
    res = M.as_float32(residual)
    rest = dense == 0
    if causal:
        rest &= _causal_mask(t, n_keys)
    cnt = rest.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        fill = np.where(cnt > 0, res / np.maximum(cnt, 1), 0).astype(np.float32)
    dense += rest * fill[..., None]
    return dense


def _masked_agg(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean / min / max over the last axis ignoring NaN, without all-NaN warnings."""
    ok = ~np.isnan(x)
    cnt = ok.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok, x, 0).sum(axis=-1) / cnt
    lo = np.where(ok, x, np.inf).min(axis=-1)
    hi = np.where(ok, x, -np.inf).max(axis=-1)
    lo[cnt == 0] = np.nan
    hi[cnt == 0] = np.nan
    return mean.astype(np.float32), lo.astype(np.float32), hi.astype(np.float32)


# Float32 bytes of one slab ((samples, H + 1, T, S)) that every metric is computed on in
# turn, so the data stays in this core's L2 cache between passes (see docs/benchmarks.md).
SLAB_BYTES = 512 * 1024


@functools.lru_cache(maxsize=64)
def _block_cache(spec: ArraySpec) -> dict[str, Any]:
    t, s = spec.n_queries, spec.n_keys
    qoh = np.zeros((t, len(spec.q_seg_names)), dtype=np.float32)
    qoh[np.arange(t), spec.q_seg_ids] = 1
    koh = np.zeros((s, len(spec.k_seg_names)), dtype=np.float32)
    koh[np.arange(s), spec.k_seg_ids] = 1
    return {
        "dist": M.distance_matrix(t, s),
        "qoh": qoh,
        "koh": koh,
        "qcount": qoh.sum(axis=0)[:, None],
    }


def _load(src: np.ndarray, dst: np.ndarray) -> None:
    """Convert ``src`` into the float32 view ``dst`` (float16 through the lookup table)."""
    if src.dtype == np.float16:
        np.take(M._F16_TABLE, np.ascontiguousarray(src).view(np.uint16), out=dst)
    elif src.dtype.kind in "fiub":
        np.copyto(dst, src, casting="unsafe")
    else:
        raise InputError(f"attention must be a real numeric array, got dtype {src.dtype}")


def _compute(src: np.ndarray, spec: ArraySpec) -> dict[str, np.ndarray]:
    """Every per-row and per-matrix quantity of ``src`` ``(n, H, T, S)`` plus its head mean.

    One fused pass: slabs of a few samples are converted to float32 next to their head
    average (head ``H`` of a ``(m, H + 1, T, S)`` buffer), and every metric runs on the slab
    while it is cache-resident. Outputs are ``(n, H + 1, ...)``, the average head last.
    """
    n, h, t, s = src.shape
    hh = h + 1
    cache = _block_cache(spec)
    # At most a quarter of the block per slab: the slab's scratch buffers (about four
    # slabs) then stay within the block's own size, whatever block_bytes is.
    ns = max(1, min(n // 4, SLAB_BYTES // max(1, hh * t * s * 4)))
    buf = np.empty((ns, hh, t, s), dtype=np.float32)
    logs = np.empty_like(buf)
    f32 = np.float32
    ent = np.empty((n, hh, t), f32)
    rmax = np.empty((n, hh, t), f32)
    dist = np.empty((n, hh, t), f32)
    sink = np.empty((n, hh, t), f32)
    rowsum = np.empty((n, hh, t), f32)
    sumsq = np.empty((n, hh, t), f32)
    mn = np.empty((n, hh), f32)
    nk = len(spec.k_seg_names)
    segrow = np.empty((n, hh, t, nk), f32)
    k = spec.topk
    tq = np.empty((n, hh, k), np.int64)
    tk = np.empty((n, hh, k), np.int64)
    tw = np.empty((n, hh, k), f32)
    sim = None
    if spec.similarity is not None and h > 1:
        sim = np.zeros((n, h, h), f32)
        pair = np.empty(ns * (h - 1) * t * s, f32) if spec.similarity == "js" else None
        plog = np.empty_like(pair) if pair is not None else None
    for i in range(0, n, ns):
        m = min(ns, n - i)
        sl = slice(i, i + m)
        x = buf[:m]
        lg = logs[:m]
        _load(src[sl], x[:, :h])
        np.mean(x[:, :h], axis=1, dtype=f32, out=x[:, h])
        # entropy: -sum p log(p + tiny), see metrics.row_entropy
        np.add(x, M._TINY, out=lg)
        np.log(lg, out=lg)
        e = ent[sl]
        np.vecdot(x, lg, out=e)
        np.negative(e, out=e)
        np.maximum(e, 0, out=e)
        np.max(x, axis=-1, out=rmax[sl])
        np.vecdot(x, cache["dist"], out=dist[sl])
        sink[sl] = x[..., spec.sink_token]
        np.sum(x, axis=-1, dtype=f32, out=rowsum[sl])
        np.vecdot(x, x, out=sumsq[sl])
        np.min(x.reshape(m, hh, t * s), axis=-1, out=mn[sl])
        np.matmul(x, cache["koh"], out=segrow[sl])
        tq[sl], tk[sl], tw[sl] = M.top_k_pairs_block(x, k, row_max=rmax[sl])
        if sim is not None:
            if spec.similarity == "js":
                M._js_into(x[:, :h], e[:, :h], rowsum[sl, :h], sim[sl], pair, plog)
            else:
                sim[sl] = M.head_similarity_cosine(x[:, :h])
    return {
        "ent": ent,
        "rmax": rmax,
        "dist": dist,
        "sink": sink,
        "rowsum": rowsum,
        "sumsq": sumsq,
        "min": mn,
        "segrow": segrow,
        "top": (tq, tk, tw),
        "sim": sim,
    }


def _sample_head_index(
    samples: np.ndarray, head_ids: np.ndarray, inner: int, name: str
) -> dict[str, np.ndarray]:
    """Key columns of rows ordered (sample, head, ``name``) with ``inner`` values of ``name``."""
    n, hh = len(samples), len(head_ids)
    return {
        "sample": np.repeat(samples, hh * inner),
        "head": np.tile(np.repeat(head_ids, inner), n),
        name: np.tile(np.arange(inner, dtype=np.int64), n * hh),
    }


def analyze_block(block: Any, spec: ArraySpec, sample0: int) -> dict[str, Any]:
    """All metrics of one block of samples.

    Parameters
    ----------
    block : np.ndarray or tuple
        Dense ``(n, H, T, S)`` weights, or for sparse archives a tuple
        ``(values (n, H, T, k), indices (n, H, T, k), residual (n, H, T))``.
    spec : ArraySpec
        The array's metadata and analysis options.
    sample0 : int
        Archive index of the block's first sample.

    Returns
    -------
    dict
        ``{"tables": {table: {column: np.ndarray}}, "stats": (count, total, sumsq, min,
        max), "nbytes": int}`` where the stats cover the real heads only.
    """
    if isinstance(block, tuple):
        nbytes = int(sum(np.asarray(b).nbytes for b in block))
        src = densify_topk(*block, spec.n_keys, causal=spec.causal)
    else:
        src = np.asarray(block)
        nbytes = int(src.nbytes)
    if spec.head_index is not None:
        src = src[:, list(spec.head_index)]  # a copy, at the stored dtype
    n, h, t, s = src.shape
    hh = h + 1
    r = _compute(src, spec)
    ent = r["ent"]
    nent = M._normalize_entropy(ent, s, spec.causal)
    rmax = r["rmax"]
    total = r["rowsum"].astype(np.float64).sum(axis=-1)  # (n, hh)
    sq = r["sumsq"].astype(np.float64).sum(axis=-1)
    cnt = t * s
    mean = total / cnt
    std = np.sqrt(np.maximum(sq / cnt - mean * mean, 0))
    nmean, nmin, nmax = _masked_agg(nent)
    mx = rmax.max(axis=-1)

    head_ids = np.array([*spec.heads, AVERAGE_HEAD], dtype=np.int64)
    samples = np.arange(sample0, sample0 + n, dtype=np.int64)
    tables: dict[str, dict[str, np.ndarray]] = {}
    head_cols = {
        "sample": np.repeat(samples, hh),
        "head": np.tile(head_ids, n),
        "entropy_mean": ent.mean(axis=-1),
        "entropy_min": ent.min(axis=-1),
        "entropy_max": ent.max(axis=-1),
        "norm_entropy_mean": nmean,
        "norm_entropy_min": nmin,
        "norm_entropy_max": nmax,
        "row_max_mean": rmax.mean(axis=-1),
        "row_max_min": rmax.min(axis=-1),
        "mean_distance": r["dist"].mean(axis=-1),
        "sink_score": r["sink"].mean(axis=-1),
        "mean": mean,
        "std": std,
        "min": r["min"],
        "max": mx,
    }
    tables["head_stats"] = {key: v.reshape(-1) for key, v in head_cols.items()}

    if spec.row_stats:
        tables["row_stats"] = {
            **_sample_head_index(samples, head_ids, t, "query"),
            "entropy": ent.reshape(-1),
            "norm_entropy": nent.reshape(-1),
            "row_max": rmax.reshape(-1),
            "mean_distance": r["dist"].reshape(-1),
            "sink_score": r["sink"].reshape(-1),
        }

    k = spec.topk
    tq, tk, tw = r["top"]
    tables["top_pairs"] = {
        **_sample_head_index(samples, head_ids, k, "rank"),
        "query": tq.reshape(-1),
        "key": tk.reshape(-1),
        "weight": tw.reshape(-1),
    }

    cache = _block_cache(spec)
    nq, nk = len(spec.q_seg_names), len(spec.k_seg_names)
    seg = (np.einsum("nhtk,tq->nhqk", r["segrow"], cache["qoh"]) / cache["qcount"]).astype(
        np.float32
    )  # (n, hh, nq, nk)
    tables["segment_mass"] = {
        "sample": np.repeat(samples, hh * nq * nk),
        "head": np.tile(np.repeat(head_ids, nq * nk), n),
        "query_segment": np.tile(np.repeat(np.arange(nq), nk), n * hh),
        "key_segment": np.tile(np.arange(nk), n * hh * nq),
        "mass": seg.reshape(-1),
    }

    sim = r["sim"]
    if sim is not None:
        ia, ib = np.triu_indices(h, 1)
        hid = np.asarray(spec.heads, dtype=np.int64)
        npairs = ia.size
        tables["head_similarity"] = {
            "sample": np.repeat(samples, npairs),
            "head_a": np.tile(hid[ia], n),
            "head_b": np.tile(hid[ib], n),
            spec.similarity: sim[:, ia, ib].reshape(-1),
        }

    real_min = r["min"][:, :h]
    real_max = mx[:, :h]
    stats = (
        int(n * h * t * s),
        float(total[:, :h].sum()),
        float(sq[:, :h].sum()),
        float(real_min.min()) if real_min.size else float("inf"),
        float(real_max.max()) if real_max.size else float("-inf"),
    )
    return {"tables": tables, "stats": stats, "nbytes": nbytes, "n": n}

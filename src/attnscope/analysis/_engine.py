"""Per-block analysis: one ``(n, H, T, S)`` block in, small metric columns out.

Everything a block needs travels in an :class:`ArraySpec` (plain, picklable data), so the
same :func:`analyze_block` runs in the main thread, a thread pool, or a Dask worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnscope.analysis import metrics as M

__all__ = ["ArraySpec", "StatsAccumulator", "analyze_block", "densify_topk"]

AVERAGE_HEAD = -1  # head id of the rows computed on the mean over the (selected) heads


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


def _per_head(x: np.ndarray, spec: ArraySpec, cache: dict[str, Any]) -> dict[str, np.ndarray]:
    """Row and head metrics of ``x`` ``(n, h, T, S)`` float32."""
    n, h, t, s = x.shape
    work = cache.get("work")
    if work is None or work.shape != x.shape:
        work = np.empty_like(x)
        cache["work"] = work
    ent = M.row_entropy(x, work=work)
    nent = M._normalize_entropy(ent, s, spec.causal)
    rmax = x.max(axis=-1)
    dist = np.vecdot(x, cache["dist"])
    sink = x[..., spec.sink_token].copy()
    rowsum = x.sum(axis=-1, dtype=np.float32)
    sumsq = np.vecdot(x, x)
    flat = x.reshape(n, h, t * s)
    total = rowsum.astype(np.float64).sum(axis=-1)
    sq = sumsq.astype(np.float64).sum(axis=-1)
    cnt = t * s
    mean = total / cnt
    std = np.sqrt(np.maximum(sq / cnt - mean * mean, 0))
    nmean, nmin, nmax = _masked_agg(nent)
    out = {
        "ent": ent,
        "nent": nent,
        "rmax": rmax,
        "dist": dist,
        "sink": sink,
        "entropy_mean": ent.mean(axis=-1),
        "entropy_min": ent.min(axis=-1),
        "entropy_max": ent.max(axis=-1),
        "norm_entropy_mean": nmean,
        "norm_entropy_min": nmin,
        "norm_entropy_max": nmax,
        "row_max_mean": rmax.mean(axis=-1),
        "row_max_min": rmax.min(axis=-1),
        "mean_distance": dist.mean(axis=-1),
        "sink_score": sink.mean(axis=-1),
        "mean": mean,
        "std": std,
        "min": flat.min(axis=-1),
        "max": rmax.max(axis=-1),
        "_total": total,
        "_sumsq": sq,
    }
    out["seg"] = np.einsum("nhtk,tq->nhqk", x @ cache["koh"], cache["qoh"]) / cache["qcount"]
    out["top"] = M.top_k_pairs_block(x, spec.topk)
    return out


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
        x = densify_topk(*block, spec.n_keys, causal=spec.causal)
    else:
        block = np.asarray(block)
        nbytes = int(block.nbytes)
        x = M.as_float32(block)
    if spec.head_index is not None:
        x = np.ascontiguousarray(x[:, list(spec.head_index)])
    n, h, t, s = x.shape
    cache = _block_cache(spec)
    real = _per_head(x, spec, cache)
    avg = _per_head(x.mean(axis=1, keepdims=True, dtype=np.float32), spec, cache)

    head_ids = np.array([*spec.heads, AVERAGE_HEAD], dtype=np.int64)
    hh = h + 1
    samples = np.arange(sample0, sample0 + n, dtype=np.int64)

    def cat(key: str) -> np.ndarray:
        return np.concatenate([real[key], avg[key]], axis=1)

    tables: dict[str, dict[str, np.ndarray]] = {}
    head_cols = {
        "sample": np.repeat(samples, hh),
        "head": np.tile(head_ids, n),
    }
    for key in (
        "entropy_mean",
        "entropy_min",
        "entropy_max",
        "norm_entropy_mean",
        "norm_entropy_min",
        "norm_entropy_max",
        "row_max_mean",
        "row_max_min",
        "mean_distance",
        "sink_score",
        "mean",
        "std",
        "min",
        "max",
    ):
        head_cols[key] = cat(key).reshape(-1)
    tables["head_stats"] = head_cols

    if spec.row_stats:
        tables["row_stats"] = {
            "sample": np.repeat(samples, hh * t),
            "head": np.tile(np.repeat(head_ids, t), n),
            "query": np.tile(np.arange(t, dtype=np.int64), n * hh),
            "entropy": cat("ent").reshape(-1),
            "norm_entropy": cat("nent").reshape(-1),
            "row_max": cat("rmax").reshape(-1),
            "mean_distance": cat("dist").reshape(-1),
            "sink_score": cat("sink").reshape(-1),
        }

    k = spec.topk
    tq = np.concatenate([real["top"][0], avg["top"][0]], axis=1)
    tk = np.concatenate([real["top"][1], avg["top"][1]], axis=1)
    tw = np.concatenate([real["top"][2], avg["top"][2]], axis=1)
    tables["top_pairs"] = {
        "sample": np.repeat(samples, hh * k),
        "head": np.tile(np.repeat(head_ids, k), n),
        "rank": np.tile(np.arange(k, dtype=np.int64), n * hh),
        "query": tq.reshape(-1),
        "key": tk.reshape(-1),
        "weight": tw.reshape(-1),
    }

    nq, nk = len(spec.q_seg_names), len(spec.k_seg_names)
    seg = cat("seg").astype(np.float32)  # (n, hh, nq, nk)
    tables["segment_mass"] = {
        "sample": np.repeat(samples, hh * nq * nk),
        "head": np.tile(np.repeat(head_ids, nq * nk), n),
        "query_segment": np.tile(np.repeat(np.arange(nq), nk), n * hh),
        "key_segment": np.tile(np.arange(nk), n * hh * nq),
        "mass": seg.reshape(-1),
    }

    if spec.similarity is not None and h > 1:
        if spec.similarity == "js":
            sim = M.head_similarity_js(x, entropy=real["ent"])
        else:
            sim = M.head_similarity_cosine(x)
        ia, ib = np.triu_indices(h, 1)
        hid = np.asarray(spec.heads, dtype=np.int64)
        npairs = ia.size
        tables["head_similarity"] = {
            "sample": np.repeat(samples, npairs),
            "head_a": np.tile(hid[ia], n),
            "head_b": np.tile(hid[ib], n),
            spec.similarity: sim[:, ia, ib].reshape(-1),
        }

    stats = (
        int(n * h * t * s),
        float(real["_total"].sum()),
        float(real["_sumsq"].sum()),
        float(real["min"].min()) if real["min"].size else float("inf"),
        float(real["max"].max()) if real["max"].size else float("-inf"),
    )
    return {"tables": tables, "stats": stats, "nbytes": nbytes, "n": n}

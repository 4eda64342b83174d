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
from attnscope.contracts import AVERAGE_HEAD, HEAD_INDEX
from attnscope.errors import InputError

__all__ = ["ArraySpec", "BlockTokens", "StatsAccumulator", "analyze_block", "densify_topk"]


@dataclass(frozen=True)
class BlockTokens:
    """Per-sample token data of one block: real-token masks and labels (None: not stored).

    ``qmask`` ``(n, T)`` / ``kmask`` ``(n, S)`` bool, True = real token; ``qlabels`` /
    ``klabels``: one label list per sample (``T`` / ``S`` long).
    """

    qmask: np.ndarray | None = None
    kmask: np.ndarray | None = None
    qlabels: list[list[str]] | None = None
    klabels: list[list[str]] | None = None


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
    # original query positions of the stored rows (an array captured with a row policy);
    # None: every row. q_seg_ids / q_labels are those of the kept rows.
    query_rows: tuple[int, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def query_pos(self) -> np.ndarray:
        """``(T,)`` int64 original query position of each stored row."""
        if self.query_rows is None:
            return np.arange(self.n_queries, dtype=np.int64)
        return np.asarray(self.query_rows, dtype=np.int64)


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


def _causal_mask(t: int, s: int, rows: Any = None) -> np.ndarray:
    return np.arange(s)[None, :] < _allowed_keys(t, s, True, rows)[:, None]


def _allowed_keys(t: int, s: int, causal: bool, rows: Any = None) -> np.ndarray:
    """:func:`metrics.allowed_keys`, for stored rows at original positions ``rows`` (a row
    policy keeps causal self-attention rows of a square matrix: row ``r`` sees ``r + 1``)."""
    if rows is None or not causal:
        return M.allowed_keys(t, s, causal)
    return np.clip(np.asarray(rows, dtype=np.int64) + 1, 1, s)


def densify_topk(
    values: np.ndarray,
    indices: np.ndarray,
    residual: np.ndarray | None,
    n_keys: int,
    *,
    causal: bool = False,
    kmask: np.ndarray | None = None,
    rows: Any = None,
) -> np.ndarray:
    """Rebuild approximate dense rows from a sparse (top-k) archive.

    The stored top-k weights go back to their keys; the ``residual`` mass (what the
    dropped keys held) is spread uniformly over the other keys the row may attend to
    (causally allowed when ``causal``, real when ``kmask`` is given, padded keys never). That
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
    kmask : np.ndarray, optional
        ``(n, S)`` bool, True = real key (ragged archives): the residual goes to real keys
        only, so each row still sums to 1 over its real keys.
    rows : sequence of int, optional
        Original query positions of the ``T`` stored rows (a row policy), for ``causal``.

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
        rest &= _causal_mask(t, n_keys, rows)
    if kmask is not None:
        rest &= np.asarray(kmask, dtype=bool)[:, None, None, :]
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
    qpos = spec.query_pos().astype(np.float32)
    return {
        "dist": np.abs(qpos[:, None] - np.arange(s, dtype=np.float32)),
        "qoh": qoh,
        "koh": koh,
        "koh1": np.concatenate([koh, np.ones((s, 1), dtype=np.float32)], axis=1),
        "qcount": qoh.sum(axis=0)[:, None],
    }


def _load(src: np.ndarray, dst: np.ndarray) -> None:
    """Convert ``src`` into the float32 view ``dst`` (float16 through the lookup table)."""
    if src.dtype == np.float16:
        M._f16_into(np.ascontiguousarray(src).view(np.uint16), dst)
    elif src.dtype.kind in "fiub":
        np.copyto(dst, src, casting="unsafe")
    else:
        raise InputError(f"attention must be a real numeric array, got dtype {src.dtype}")


def _compute(
    src: np.ndarray,
    spec: ArraySpec,
    cells: np.ndarray | None = None,
    sink_idx: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Every per-row and per-matrix quantity of ``src`` ``(n, H, T, S)`` plus its head mean.

    One fused pass: slabs of a few samples are converted to float32 next to their head
    average (head ``H`` of a ``(m, H + 1, T, S)`` buffer), and every metric runs on the slab
    while it is cache-resident. Outputs are ``(n, H + 1, ...)``, the average head last.
    Padded samples: ``cells`` ``(n, T, S)`` bool marks the real (query, key) cells (the
    matrix minimum and the top pairs see only those; padded cells are stored as zeros, so
    row quantities need no mask), ``sink_idx`` ``(n,)`` each sample's sink key (-1: none).
    """
    n, h, t, s = src.shape
    hh = h + 1
    cache = _block_cache(spec)
    # At most a quarter of the block per slab: the slab's scratch buffers (about four
    # slabs) then stay within the block's own size, whatever block_bytes is.
    ns = max(1, min(n // 4, SLAB_BYTES // max(1, hh * t * s * 4)))
    buf = np.empty((ns, hh, t, s), dtype=np.float32)
    shifted = np.empty_like(buf)  # buf + tiny: the entropy's log argument, reused by JS
    logs = np.empty_like(buf)
    nk = len(spec.k_seg_names)
    # one matmul gives the segment masses and (last column) the row sums
    seg_sum = np.empty((ns, hh, t, nk + 1), dtype=np.float32)
    f32 = np.float32
    ent = np.empty((n, hh, t), f32)
    rmax = np.empty((n, hh, t), f32)
    dist = np.empty((n, hh, t), f32)
    sink = np.empty((n, hh, t), f32)
    rowsum = np.empty((n, hh, t), f32)
    sumsq = np.empty((n, hh, t), f32)
    mn = np.empty((n, hh), f32)
    segrow = np.empty((n, hh, t, nk), f32)
    k = spec.topk
    tq = np.empty((n, hh, k), np.int64)
    tk = np.empty((n, hh, k), np.int64)
    tw = np.empty((n, hh, k), f32)
    sim = None
    if spec.similarity is not None and h > 1:
        # (n, pairs): JS gets (n, pairs, T) sums of s log s first, finished per block
        npairs = h * (h - 1) // 2
        sim = np.empty((n, npairs, t) if spec.similarity == "js" else (n, npairs), f32)
        pair = np.empty(ns * (h - 1) * t * s, f32) if spec.similarity == "js" else None
        plog = np.empty_like(pair) if pair is not None else None
    for i in range(0, n, ns):
        m = min(ns, n - i)
        sl = slice(i, i + m)
        x = buf[:m]
        xt = shifted[:m]
        lg = logs[:m]
        _load(src[sl], x[:, :h])
        np.mean(x[:, :h], axis=1, dtype=f32, out=x[:, h])
        # entropy: -sum p log(p + tiny), see metrics.row_entropy
        np.add(x, M._TINY, out=xt)
        np.log(xt, out=lg)
        e = ent[sl]
        np.vecdot(x, lg, out=e)
        np.negative(e, out=e)
        np.maximum(e, 0, out=e)
        np.max(x, axis=-1, out=rmax[sl])
        np.vecdot(x, cache["dist"], out=dist[sl])
        if sink_idx is None:
            sink[sl] = x[..., spec.sink_token]
        else:
            j = np.maximum(sink_idx[sl], 0)[:, None, None, None]
            sink[sl] = np.take_along_axis(x, j, axis=-1)[..., 0]
            sink[sl][sink_idx[sl] < 0] = np.nan
        np.vecdot(x, x, out=sumsq[sl])
        ss = seg_sum[:m]
        np.matmul(x, cache["koh1"], out=ss)
        segrow[sl] = ss[..., :nk]
        rowsum[sl] = ss[..., nk]
        if cells is None:
            np.min(x.reshape(m, hh, t * s), axis=-1, out=mn[sl])
            tq[sl], tk[sl], tw[sl] = M.top_k_pairs_block(x, k, row_max=rmax[sl])
        else:
            c = cells[sl][:, None]
            np.min(np.where(c, x, np.inf).reshape(m, hh, t * s), axis=-1, out=mn[sl])
            # padding ranks below every real weight (-1) and is dropped from the table
            tq[sl], tk[sl], tw[sl] = M.top_k_pairs_block(np.where(c, x, f32(-1)), k)
        if sim is not None:
            if spec.similarity == "js":
                M._js_mix_terms(x[:, :h], sim[sl], pair, plog, xt[:, :h])
            else:
                ia, ib = np.triu_indices(h, 1)
                sim[sl] = M.head_similarity_cosine(x[:, :h])[:, ia, ib]
    if sim is not None and spec.similarity == "js":
        rows = None if cells is None else cells.any(axis=-1)
        sim = M._js_finish(sim, ent[:, :h], rowsum[:, :h], rows)
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
        HEAD_INDEX: np.tile(np.repeat(head_ids, inner), n),
        name: np.tile(np.arange(inner, dtype=np.int64), n * hh),
    }


def _allowed(qm: np.ndarray, km: np.ndarray, causal: bool, rows: Any = None) -> np.ndarray:
    """``(n, T)`` real keys each query row may attend to (causal: those up to the row;
    ``rows``: the original positions of stored rows)."""
    t, s = qm.shape[1], km.shape[1]
    if not causal:
        return np.broadcast_to(km.sum(axis=1)[:, None], qm.shape)
    pos = np.clip(np.arange(t) + (s - t) if rows is None else np.asarray(rows), 0, s - 1)
    return np.cumsum(km, axis=1)[:, pos]


def _sink_index(km: np.ndarray, token: int) -> np.ndarray:
    """``(n,)`` key index of each sample's ``token``-th real key (-1 where it has fewer)."""
    order = np.cumsum(km, axis=1) - 1  # rank of each real key among its sample's real keys
    hit = km & (order == token)
    return np.where(hit.any(axis=1), hit.argmax(axis=1), -1)


def _rows_agg(x: np.ndarray, rows: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Mean / min / max over the real query rows (and non-NaN values) of ``(n, hh, T)``."""
    if rows is None and not np.isnan(x).any():
        return x.mean(axis=-1), x.min(axis=-1), x.max(axis=-1)
    return _masked_agg(x if rows is None else np.where(rows[:, None, :], x, np.nan))


def _original_queries(cols: dict[str, np.ndarray], spec: ArraySpec) -> None:
    """``query`` becomes the original position of each stored row; ``_qloc`` keeps the
    stored row (what the spec's per-row segment ids and labels index)."""
    cols["_qloc"] = cols["query"]
    if spec.query_rows is not None:
        cols["query"] = spec.query_pos()[cols["query"]]


def _labels(tok: BlockTokens | None, spec: ArraySpec) -> tuple[tuple[str, ...], ...]:
    """Query and key label tuples; per-sample labels are concatenated, sample-major."""
    q = spec.q_labels if tok is None or tok.qlabels is None else sum(tok.qlabels, [])
    k = spec.k_labels if tok is None or tok.klabels is None else sum(tok.klabels, [])
    return tuple(q), tuple(k)


def analyze_block(
    block: Any, spec: ArraySpec, sample0: int, tokens: BlockTokens | None = None
) -> dict[str, Any]:
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
    tokens : BlockTokens, optional
        The block's real-token masks and per-sample labels. Padded query rows then appear
        in no table and no statistic; entropy is normalised by each row's real allowed
        keys; top pairs never include padding; the sink is each sample's
        ``sink_token``-th real key.

    Returns
    -------
    dict
        ``{"tables": {table: {column: np.ndarray}}, "labels": (query labels, key labels),
        "stats": (count, total, sumsq, min, max), "nbytes": int}`` where the stats cover
        the real heads and real cells only. Columns ``_qlab`` / ``_klab`` index the labels.
    """
    qm = None if tokens is None else tokens.qmask
    km = None if tokens is None else tokens.kmask
    if isinstance(block, tuple):
        nbytes = int(sum(np.asarray(b).nbytes for b in block))
        src = densify_topk(
            *block, spec.n_keys, causal=spec.causal, kmask=km, rows=spec.query_rows
        )
    else:
        src = np.asarray(block)
        nbytes = int(src.nbytes)
    if spec.head_index is not None:
        src = src[:, list(spec.head_index)]  # a copy, at the stored dtype
    n, h, t, s = src.shape
    hh = h + 1
    masked = qm is not None and km is not None
    if masked:
        qm, km = np.asarray(qm, dtype=bool), np.asarray(km, dtype=bool)
        cells = qm[:, :, None] & km[:, None, :]
        r = _compute(src, spec, cells, _sink_index(km, spec.sink_token))
        allowed = _allowed(qm, km, spec.causal, spec.query_rows)[:, None, :]
        nq, nk = qm.sum(axis=1), km.sum(axis=1)
        cnt = (nq * nk)[:, None]
    else:
        r = _compute(src, spec)
        allowed = _allowed_keys(t, s, spec.causal, spec.query_rows)
        nq, nk = np.full(n, t), np.full(n, s)
        cnt = t * s
    ent = r["ent"]
    with np.errstate(divide="ignore", invalid="ignore"):
        nent = (ent / np.log(allowed).astype(np.float32)).astype(np.float32)
    nent = np.where(np.broadcast_to(allowed, ent.shape) <= 1, np.float32(np.nan), nent)
    rmax = r["rmax"]
    total = r["rowsum"].astype(np.float64).sum(axis=-1)  # (n, hh)
    sq = r["sumsq"].astype(np.float64).sum(axis=-1)
    mean = total / cnt
    std = np.sqrt(np.maximum(sq / cnt - mean * mean, 0))
    nmean, nmin, nmax = _masked_agg(
        nent if qm is None else np.where(qm[:, None, :], nent, np.nan)
    )
    e_mean, e_min, e_max = _rows_agg(ent, qm)
    m_mean, m_min, m_max = _rows_agg(rmax, qm)

    head_ids = np.array([*spec.heads, AVERAGE_HEAD], dtype=np.int64)
    samples = np.arange(sample0, sample0 + n, dtype=np.int64)
    tables: dict[str, dict[str, np.ndarray]] = {}
    head_cols = {
        "sample": np.repeat(samples, hh),
        HEAD_INDEX: np.tile(head_ids, n),
        "n_queries": np.repeat(nq, hh).astype(np.int32),
        "n_keys": np.repeat(nk, hh).astype(np.int32),
        "entropy_mean": e_mean,
        "entropy_min": e_min,
        "entropy_max": e_max,
        "norm_entropy_mean": nmean,
        "norm_entropy_min": nmin,
        "norm_entropy_max": nmax,
        "row_max_mean": m_mean,
        "row_max_min": m_min,
        "mean_distance": _rows_agg(r["dist"], qm)[0],
        "sink_score": _rows_agg(r["sink"], qm)[0],
        "mean": mean,
        "std": std,
        "min": r["min"],
        "max": m_max,
    }
    tables["head_stats"] = {key: np.asarray(v).reshape(-1) for key, v in head_cols.items()}
    # sample-major flat label index of (local sample, token) when labels are per sample
    per_q = tokens is not None and tokens.qlabels is not None
    per_k = tokens is not None and tokens.klabels is not None

    if spec.row_stats:
        cols = {
            **_sample_head_index(samples, head_ids, t, "query"),
            "entropy": ent.reshape(-1),
            "norm_entropy": nent.reshape(-1),
            "row_max": rmax.reshape(-1),
            "mean_distance": r["dist"].reshape(-1),
            "sink_score": r["sink"].reshape(-1),
        }
        cols["_qlab"] = cols["query"] + ((cols["sample"] - sample0) * t if per_q else 0)
        _original_queries(cols, spec)
        if qm is not None:
            keep = np.broadcast_to(qm[:, None, :], (n, hh, t)).reshape(-1)
            cols = {key: v[keep] for key, v in cols.items()}
        tables["row_stats"] = cols

    k = spec.topk
    tq, tk, tw = r["top"]
    cols = {
        **_sample_head_index(samples, head_ids, k, "rank"),
        "query": tq.reshape(-1),
        "key": tk.reshape(-1),
        "weight": tw.reshape(-1),
    }
    local = cols["sample"] - sample0
    cols["_qlab"] = cols["query"] + (local * t if per_q else 0)
    cols["_klab"] = cols["key"] + (local * s if per_k else 0)
    # keys each pair's query row may attend to (1: a forced cell, e.g. causal row 0)
    n_allowed = np.broadcast_to(np.asarray(allowed).reshape(-1, t), (n, t))
    cols["allowed_keys"] = n_allowed[local, cols["query"]].astype(np.int64)
    _original_queries(cols, spec)
    if masked:
        keep = cols["weight"] >= 0
        cols = {key: v[keep] for key, v in cols.items()}
    tables["top_pairs"] = cols

    cache = _block_cache(spec)
    nqs, nks = len(spec.q_seg_names), len(spec.k_seg_names)
    segrow = r["segrow"] if qm is None else r["segrow"] * qm[:, None, :, None]
    qcount = (cache["qoh"].sum(axis=0) if qm is None else qm @ cache["qoh"])  # (nqs,) / (n, nqs)
    qcount = np.broadcast_to(qcount, (n, nqs))
    with np.errstate(divide="ignore", invalid="ignore"):
        seg = (
            np.einsum("nhtk,tq->nhqk", segrow, cache["qoh"]) / qcount[:, None, :, None]
        ).astype(np.float32)  # (n, hh, nqs, nks)
    cols = {
        "sample": np.repeat(samples, hh * nqs * nks),
        HEAD_INDEX: np.tile(np.repeat(head_ids, nqs * nks), n),
        "query_segment": np.tile(np.repeat(np.arange(nqs), nks), n * hh),
        "key_segment": np.tile(np.arange(nks), n * hh * nqs),
        "mass": seg.reshape(-1),
    }
    if qm is not None or spec.query_rows is not None:
        # a query segment with no real (or no kept) row in a sample has no mass
        keep = np.broadcast_to(qcount[:, None, :, None] > 0, seg.shape).reshape(-1)
        cols = {key: v[keep] for key, v in cols.items()}
    tables["segment_mass"] = cols

    sim = r["sim"]
    if sim is not None:
        ia, ib = np.triu_indices(h, 1)
        hid = np.asarray(spec.heads, dtype=np.int64)
        npairs = ia.size
        tables["head_similarity"] = {
            "sample": np.repeat(samples, npairs),
            "head_a": np.tile(hid[ia], n),
            "head_b": np.tile(hid[ib], n),
            spec.similarity: sim.reshape(-1),
        }

    real_min = r["min"][:, :h]
    real_max = m_max[:, :h]
    stats = (
        int(h * np.sum(nq * nk)),
        float(total[:, :h].sum()),
        float(sq[:, :h].sum()),
        float(real_min.min()) if real_min.size else float("inf"),
        float(real_max.max()) if real_max.size else float("-inf"),
    )
    return {
        "tables": tables,
        "labels": _labels(tokens, spec),
        "stats": stats,
        "nbytes": nbytes,
        "n": n,
    }

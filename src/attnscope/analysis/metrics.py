"""Pure attention metrics on in-memory blocks.

Every function takes a block of attention weights shaped ``(n, H, T, S)`` =
(sample, head, query, key) — or a single ``(T, S)`` matrix where stated — and
returns plain numpy arrays. Nothing here knows about archives, so the render
stage can call these on whatever it has loaded.

Rows are assumed to be probability distributions over keys (softmax output:
non-negative, summing to 1). Metrics are computed in float32 with float64
reductions where a sum runs over a whole block; call :func:`as_float32` first
to convert float16 blocks quickly.
"""

from __future__ import annotations

import numpy as np

from attnscope.errors import ConfigError, InputError, ShapeError, ValidationError

__all__ = [
    "as_float32",
    "allowed_keys",
    "row_entropy",
    "normalized_entropy",
    "row_max",
    "mean_distance",
    "sink_score",
    "segment_mass",
    "head_similarity_js",
    "head_similarity_cosine",
    "top_k_pairs",
    "top_k_pairs_block",
]

# Added inside the log so that p = 0 contributes 0 * log(tiny) = 0 (no NaN from 0 * -inf)
# and float32 subnormals never reach np.log, where they are slow. Its effect on any
# p >= 1e-20 is below float32 resolution.
_TINY = np.float32(1e-30)

# float16 -> float32 through a 65536-entry table: numpy's own cast takes a slow path on
# float16 subnormals, which soft attention is full of (see MEASURED.md); the table gather
# runs ~4x faster on this machine and is bit-exact (NaN/Inf included).
_F16_TABLE = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
# Faster still for what attention holds (non-negative, finite): the float16 bits shifted
# into a float32's place are the value times 2**-112 (subnormals included, since float32
# has 8 more exponent bits), so one integer shift and one multiply are exact.
_F16_SCALE = np.float32(2.0**112)
_F16_INF = 0x7C00  # bits of +inf; anything at or above it is inf, NaN or negative


def _f16_into(bits: np.ndarray, out: np.ndarray) -> None:
    """Convert float16 ``bits`` (viewed as uint16) into the float32 array ``out``, exactly.

    The shift path needs every value non-negative and finite (one max over the bits,
    ~0.2 ms per MiB); otherwise the lookup table, which is exact for every value.
    """
    if bits.size and int(bits.max()) < _F16_INF:
        np.left_shift(bits, 13, out=out.view(np.uint32), dtype=np.uint32)
        np.multiply(out, _F16_SCALE, out=out)
    else:
        np.take(_F16_TABLE, bits, out=out)


def as_float32(block: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Return ``block`` as a C-contiguous float32 array, converting float16 quickly.

    Parameters
    ----------
    block : np.ndarray
        Any real array, typically ``(n, H, T, S)`` float16 or float32.
    out : np.ndarray, optional
        A float32 buffer of the same shape to convert into (reused across blocks).

    Returns
    -------
    np.ndarray
        float32 array, same shape as ``block``; ``block`` itself when it is
        already contiguous float32 and ``out`` is None.
    """
    block = np.asarray(block)
    if block.dtype == np.float16:
        idx = np.ascontiguousarray(block).view(np.uint16)
        if out is None:
            out = np.empty(block.shape, dtype=np.float32)
        _f16_into(idx, out)
        return out
    if block.dtype.kind not in "fiub":
        raise InputError(f"attention must be a real numeric array, got dtype {block.dtype}")
    if out is None:
        return np.ascontiguousarray(block, dtype=np.float32)
    np.copyto(out, block, casting="unsafe")
    return out


def _check_block(block: np.ndarray, name: str = "block") -> np.ndarray:
    if not isinstance(block, np.ndarray):
        raise InputError(f"{name} must be a numpy array, got {type(block).__name__}")
    if block.ndim != 4:
        raise ShapeError(
            f"{name} must have shape (n, H, T, S) = (sample, head, query, key); "
            f"got {block.ndim} dims {tuple(block.shape)}"
        )
    return block


def allowed_keys(n_queries: int, n_keys: int, causal: bool) -> np.ndarray:
    """Number of keys each query row may attend to.

    Parameters
    ----------
    n_queries, n_keys : int
        ``T`` and ``S``.
    causal : bool
        If true, query ``q`` may see keys ``0 .. q + (S - T)`` (the usual causal mask,
        right-aligned so a KV cache with ``S > T`` works too); otherwise all ``S`` keys.

    Returns
    -------
    np.ndarray
        ``(T,)`` int64, each in ``[1, S]``.
    """
    if not causal:
        return np.full(n_queries, n_keys, dtype=np.int64)
    return np.clip(np.arange(n_queries) + 1 + (n_keys - n_queries), 1, n_keys).astype(np.int64)


def row_entropy(
    block: np.ndarray,
    *,
    causal: bool = False,
    normalized: bool = False,
    work: np.ndarray | None = None,
) -> np.ndarray:
    """Shannon entropy of each attention row, in nats.

    ``H(q) = -sum_k p[q, k] log p[q, k]`` with ``0 log 0 = 0``. A one-hot row has entropy
    0, a uniform row over ``n`` keys ``log n``.

    Parameters
    ----------
    block : np.ndarray
        ``(n, H, T, S)`` attention weights (float32 preferred).
    causal : bool
        Only used when ``normalized``: divide by ``log`` of the number of keys the row
        may attend to under a causal mask (see :func:`allowed_keys`) instead of ``log S``.
    normalized : bool
        Return ``H(q) / log(n_allowed(q))`` in ``[0, 1]`` (1 = uniform over the allowed
        keys). Rows with a single allowed key have no spread to measure: NaN.
    work : np.ndarray, optional
        float32 scratch buffer of the block's shape, reused to avoid an allocation.

    Returns
    -------
    np.ndarray
        ``(n, H, T)`` float32.
    """
    _check_block(block)
    x = block if block.dtype == np.float32 else as_float32(block)
    if work is None:
        work = np.empty_like(x)
    np.add(x, _TINY, out=work)
    np.log(work, out=work)
    ent = np.vecdot(x, work)
    np.negative(ent, out=ent)
    # -p log p is >= 0 per term; float rounding of tiny terms can leave -0.0 / -1e-9.
    np.maximum(ent, 0, out=ent)
    if normalized:
        return _normalize_entropy(ent, x.shape[-1], causal)
    return ent


def _normalize_entropy(ent: np.ndarray, n_keys: int, causal: bool) -> np.ndarray:
    n_allowed = allowed_keys(ent.shape[-1], n_keys, causal)
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = np.log(n_allowed).astype(np.float32)
        out = ent / denom
    out[..., n_allowed <= 1] = np.nan
    return out.astype(np.float32, copy=False)


def normalized_entropy(block: np.ndarray, *, causal: bool = False) -> np.ndarray:
    """Row entropy divided by ``log`` of the number of keys the row may attend to.

    Parameters
    ----------
    block : np.ndarray
        ``(n, H, T, S)`` attention weights.
    causal : bool
        Use the causal count of allowed keys (``q + 1`` for ``T == S``), so early rows of a
        decoder are comparable with late ones.

    Returns
    -------
    np.ndarray
        ``(n, H, T)`` float32 in ``[0, 1]``; NaN for rows with one allowed key.
    """
    return row_entropy(block, causal=causal, normalized=True)


def row_max(block: np.ndarray) -> np.ndarray:
    """Largest weight of each row (how peaked the row is).

    Parameters
    ----------
    block : np.ndarray
        ``(n, H, T, S)``.

    Returns
    -------
    np.ndarray
        ``(n, H, T)``, same dtype as ``block``.
    """
    return _check_block(block).max(axis=-1)


def distance_matrix(n_queries: int, n_keys: int) -> np.ndarray:
    """``(T, S)`` float32 matrix of ``|q - k|`` (token positions, not segments)."""
    return np.abs(
        np.arange(n_queries, dtype=np.float32)[:, None] - np.arange(n_keys, dtype=np.float32)
    )


def mean_distance(block: np.ndarray, *, distances: np.ndarray | None = None) -> np.ndarray:
    """Attention-weighted mean distance ``sum_k p[q, k] |q - k|`` of each row.

    For self-attention this is how far (in tokens) a query looks on average. For
    cross-attention query and key index different sequences, so the number is only a
    position-alignment measure (0 = diagonal).

    Parameters
    ----------
    block : np.ndarray
        ``(n, H, T, S)``, rows summing to 1.
    distances : np.ndarray, optional
        Precomputed ``(T, S)`` float32 ``|q - k|`` (see :func:`distance_matrix`).

    Returns
    -------
    np.ndarray
        ``(n, H, T)`` float32, in tokens.
    """
    _check_block(block)
    x = block if block.dtype == np.float32 else as_float32(block)
    if distances is None:
        distances = distance_matrix(x.shape[2], x.shape[3])
    return np.vecdot(x, distances)


def sink_score(block: np.ndarray, token: int | list[int] = 0) -> np.ndarray:
    """Share of each row's mass that lands on a sink token (or a set of tokens).

    Parameters
    ----------
    block : np.ndarray
        ``(n, H, T, S)``.
    token : int or list of int
        Key index (default the first token, the usual attention sink); several indices
        are summed.

    Returns
    -------
    np.ndarray
        ``(n, H, T)`` float32 in ``[0, 1]``.
    """
    _check_block(block)
    n_keys = block.shape[-1]
    toks = [token] if isinstance(token, (int, np.integer)) else list(token)
    for t in toks:
        if not -n_keys <= int(t) < n_keys:
            raise ConfigError(f"sink token {t} out of range; expected 0 <= token < {n_keys}")
    out = block[..., toks].astype(np.float32).sum(axis=-1)
    return out


def _one_hot(ids: np.ndarray, n: int, name: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ShapeError(f"{name} must be 1-D, got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise ConfigError(f"{name} must lie in [0, {n}); got range [{ids.min()}, {ids.max()}]")
    oh = np.zeros((ids.size, n), dtype=np.float32)
    oh[np.arange(ids.size), ids] = 1.0
    return oh


def segment_mass(
    block: np.ndarray,
    q_seg_ids: np.ndarray,
    k_seg_ids: np.ndarray,
    n_q_segs: int,
    n_k_segs: int,
) -> np.ndarray:
    """Modality-to-modality attention mass.

    ``mass[i, j]`` = mean over the query rows of segment ``i`` of the total weight those
    rows put on the keys of segment ``j``. Each row of the result sums to 1 when the
    attention rows do; a segment with no query rows gives NaN.

    Parameters
    ----------
    block : np.ndarray
        ``(n, H, T, S)``.
    q_seg_ids : np.ndarray
        ``(T,)`` segment index of each query token (``SideLayout.segment_ids()``).
    k_seg_ids : np.ndarray
        ``(S,)`` segment index of each key token.
    n_q_segs, n_k_segs : int
        Number of query / key segments.

    Returns
    -------
    np.ndarray
        ``(n, H, n_q_segs, n_k_segs)`` float32.
    """
    _check_block(block)
    x = block if block.dtype == np.float32 else as_float32(block)
    _, _, t, s = x.shape
    if len(q_seg_ids) != t or len(k_seg_ids) != s:
        raise ShapeError(
            f"segment ids must have lengths (T={t}, S={s}); "
            f"got ({len(q_seg_ids)}, {len(k_seg_ids)})"
        )
    qoh = _one_hot(q_seg_ids, n_q_segs, "q_seg_ids")
    koh = _one_hot(k_seg_ids, n_k_segs, "k_seg_ids")
    per_row = x @ koh  # (n, H, T, Sk): mass of each row on each key segment
    counts = qoh.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mass = np.einsum("nhtk,tq->nhqk", per_row, qoh) / counts[:, None]
    return mass.astype(np.float32, copy=False)


def head_similarity_js(
    block: np.ndarray,
    *,
    entropy: np.ndarray | None = None,
    work: np.ndarray | None = None,
) -> np.ndarray:
    """Jensen-Shannon divergence between heads, averaged over query rows.

    ``JS(a, b) = mean_q [H(M_q) - (H(A_q) + H(B_q)) / 2]`` with ``M = (A + B) / 2``, in
    nats, in ``[0, log 2]``; 0 = identical heads. Costs one ``log`` per element per head
    pair, i.e. ``O(H^2)``.

    Parameters
    ----------
    block : np.ndarray
        ``(n, H, T, S)``.
    entropy : np.ndarray, optional
        ``(n, H, T)`` row entropies of ``block`` if already computed.
    work : np.ndarray, optional
        Unused; kept for backward compatibility.

    Returns
    -------
    np.ndarray
        ``(n, H, H)`` float32, symmetric, zero diagonal.
    """
    _check_block(block)
    x = block if block.dtype == np.float32 else as_float32(block)
    n, h, t, s = x.shape
    if entropy is None:
        entropy = row_entropy(x)
    out = np.zeros((n, h, h), dtype=np.float32)
    _js_into(x, entropy, x.sum(axis=-1, dtype=np.float32), out)
    return out


_HALF_LN2 = np.float32(0.5 * np.log(2.0))


def _js_mix_terms(
    x: np.ndarray,
    out: np.ndarray,
    pair: np.ndarray | None = None,
    logs: np.ndarray | None = None,
    shifted: np.ndarray | None = None,
) -> None:
    """Fill ``out`` ``(n, P, T)`` with ``sum_k s log s``, ``s = a + b``, for every head pair.

    Pairs ``(a, b > a)`` in ``np.triu_indices(H, 1)`` order; all pairs of one ``a`` go in
    one add, one ``log`` and one dot product. ``pair`` / ``logs`` are optional float32
    scratch buffers of at least ``(n, H - 1, T, S)`` elements. ``shifted``: ``x + _TINY``
    if the caller has it (the entropy pass makes it), so a pair's ``a + b + 2 tiny`` is one
    add instead of two; ``(a + b + 2 tiny) log(a + b + 2 tiny)`` differs from
    ``(a + b) log(a + b + 2 tiny)`` by ~1e-28 per zero cell and not at all elsewhere
    (float16 weights are >= 6e-8).
    """
    n, h, t, s = x.shape
    size = n * (h - 1) * t * s
    if pair is None or pair.size < size:
        pair = np.empty(size, dtype=np.float32)
    if logs is None or logs.size < size:
        logs = np.empty(size, dtype=np.float32)
    tiny2 = np.float32(2 * _TINY)
    off = 0
    for a in range(h - 1):
        m = h - 1 - a
        p = pair.reshape(-1)[: n * m * t * s].reshape(n, m, t, s)
        lg = logs.reshape(-1)[: n * m * t * s].reshape(n, m, t, s)
        if shifted is None:
            np.add(x[:, a : a + 1], x[:, a + 1 :], out=p)
            np.add(p, tiny2, out=lg)
            np.log(lg, out=lg)
        else:
            np.add(shifted[:, a : a + 1], shifted[:, a + 1 : h], out=p)
            np.log(p, out=lg)
        np.vecdot(p, lg, out=out[:, off : off + m])
        off += m


def _js_finish(
    slogs: np.ndarray, entropy: np.ndarray, rowsum: np.ndarray, rows: np.ndarray | None = None
) -> np.ndarray:
    """JS divergence ``(n, P)`` of every head pair from :func:`_js_mix_terms`' ``(n, P, T)``.

    With ``s = a + b`` (so ``M = s / 2``): ``H(M) = -sum M log M
    = -(1/2) sum s log s + (log 2 / 2) (sum a + sum b)``; ``JS = H(M) - (H(A) + H(B)) / 2``
    per row, clipped at 0 (rounding), averaged over the rows (``rows`` ``(n, T)`` bool:
    over these query rows only, the real rows of padded samples).
    """
    h = entropy.shape[1]
    ia, ib = np.triu_indices(h, 1)
    half = np.float32(0.5)
    h_mix = _HALF_LN2 * (rowsum[:, ia] + rowsum[:, ib]) - half * slogs
    js = h_mix - half * (entropy[:, ia] + entropy[:, ib])
    np.maximum(js, 0, out=js)
    if rows is None:
        return js.mean(axis=-1)  # (n, P)
    val = np.vecdot(js, rows[:, None, :].astype(np.float32))
    val /= np.maximum(rows.sum(axis=-1), 1)[:, None]
    return val


def _js_into(
    x: np.ndarray,
    entropy: np.ndarray,
    rowsum: np.ndarray,
    out: np.ndarray,
    rows: np.ndarray | None = None,
) -> None:
    """Fill ``out`` ``(n, H, H)`` with the JS divergences of ``x`` ``(n, H, T, S)`` float32
    (see :func:`_js_mix_terms` and :func:`_js_finish`)."""
    n, h, t, _s = x.shape
    if h < 2:
        return
    ia, ib = np.triu_indices(h, 1)
    slogs = np.empty((n, ia.size, t), dtype=np.float32)
    _js_mix_terms(x, slogs)
    val = _js_finish(slogs, entropy, rowsum, rows)
    out[:, ia, ib] = val
    out[:, ib, ia] = val


def head_similarity_cosine(block: np.ndarray) -> np.ndarray:
    """Cosine similarity between heads' flattened ``(T, S)`` maps.

    A cheap alternative to :func:`head_similarity_js` (one matrix product per sample):
    1 = identical direction, 0 = disjoint support.

    Parameters
    ----------
    block : np.ndarray
        ``(n, H, T, S)``.

    Returns
    -------
    np.ndarray
        ``(n, H, H)`` float32; NaN where a head is all zeros.
    """
    _check_block(block)
    x = block if block.dtype == np.float32 else as_float32(block)
    n, h, t, s = x.shape
    flat = x.reshape(n, h, t * s)
    gram = np.matmul(flat, flat.transpose(0, 2, 1)).astype(np.float64)
    norms = np.sqrt(np.diagonal(gram, axis1=1, axis2=2))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = gram / (norms[:, :, None] * norms[:, None, :])
    return cos.astype(np.float32)


def top_k_pairs(matrix: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` largest (query, key, weight) entries of one attention matrix.

    Same result as the guide's ``np.argsort(matrix.flatten())[-k:][::-1]``, except that
    ties are broken deterministically by the smaller flat index first.

    Parameters
    ----------
    matrix : np.ndarray
        ``(T, S)`` attention weights (one head, or a head average).
    k : int
        Number of pairs, ``1 <= k <= T * S``.

    Returns
    -------
    query : np.ndarray
        ``(k,)`` int64 query indices, by weight descending.
    key : np.ndarray
        ``(k,)`` int64 key indices.
    weight : np.ndarray
        ``(k,)`` weights (float32).
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise ShapeError(f"matrix must have shape (T, S); got {matrix.shape}")
    q, kk, w = top_k_pairs_block(matrix[None, None], k)
    return q[0, 0], kk[0, 0], w[0, 0]


def top_k_pairs_block(
    block: np.ndarray, k: int, *, row_max: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`top_k_pairs` for every ``(sample, head)`` matrix of a block.

    Avoids a full sort: the ``k``-th largest entry of a matrix is at least the ``k``-th
    largest of its row maxima, so only entries above that threshold are ranked, and only
    rows whose maximum reaches it (usually about ``k`` rows) are scanned.

    Parameters
    ----------
    block : np.ndarray
        ``(n, H, T, S)``.
    k : int
        Pairs per matrix, ``1 <= k <= T * S``.
    row_max : np.ndarray, optional
        ``(n, H, T)`` row maxima of ``block`` if already computed.

    Returns
    -------
    query, key : np.ndarray
        ``(n, H, k)`` int64.
    weight : np.ndarray
        ``(n, H, k)`` float32, descending along the last axis.
    """
    _check_block(block)
    n, h, t, s = block.shape
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise ConfigError(f"k must be an integer, got {k!r}")
    if not 1 <= k <= t * s:
        raise ConfigError(
            f"k={k} is out of range for a {t}x{s} attention matrix; expected 1 <= k <= {t * s}"
        )
    x = block if block.dtype == np.float32 else as_float32(block)
    m = n * h
    flat = x.reshape(m, t * s)
    if k <= t:
        rmax = (x.max(axis=-1) if row_max is None else np.asarray(row_max)).reshape(m, t)
        tau = np.partition(rmax, t - k, axis=-1)[:, t - k]
        # An entry >= tau lies in a row whose max is >= tau (or NaN: its other entries
        # may still qualify), so only those rows are compared entry by entry.
        rmat, rrow = np.nonzero((rmax >= tau[:, None]) | np.isnan(rmax))
        sub = x.reshape(m, t, s)[rmat, rrow]  # (R, S)
        ri, col = np.nonzero(sub >= tau[rmat][:, None])
        mat = rmat[ri]
        pos = rrow[ri] * s + col
    else:
        mat = np.repeat(np.arange(m), t * s)
        pos = np.tile(np.arange(t * s), m)
    vals = flat[mat, pos]
    counts = np.bincount(mat, minlength=m)
    if counts.min(initial=k) < k:
        # Only NaN entries fail both comparisons above.
        raise ValidationError(f"attention matrix has NaN weights; cannot rank the top {k} pairs")
    # Order: matrix, weight descending, flat index ascending (deterministic ties).
    order = np.lexsort((pos, -vals, mat))
    mat, pos, vals = mat[order], pos[order], vals[order]
    starts = np.searchsorted(mat, np.arange(m))
    take = (starts[:, None] + np.arange(k)[None, :]).reshape(-1)
    sel_pos = pos[take].reshape(n, h, k)
    return (
        (sel_pos // s).astype(np.int64),
        (sel_pos % s).astype(np.int64),
        vals[take].reshape(n, h, k).astype(np.float32, copy=False),
    )

"""Attention rollout (Abnar & Zuidema 2020) of the stored attention, one sample at a time.

Abnar, S. and Zuidema, W. (2020). "Quantifying Attention Flow in Transformers". ACL 2020,
pp. 4190-4197. https://aclanthology.org/2020.acl-main.385

Per layer the head-averaged attention ``A`` (mean over the stored heads) is adjusted for
the residual connection, ``Ã = 0.5 A + 0.5 I`` (rows renormalised), and the layers are
multiplied from the first to the last: ``R = Ã_{L-1} ... Ã_1 Ã_0``. ``R[q, k]`` is the share
of output token ``q`` that flows from input token ``k``; every row sums to 1.

Encoder-decoder archives continue through the decoder on the joint graph of decoder and
encoder tokens (each decoder layer: self-attention, then cross-attention, each sub-layer
with its residual): see :func:`encoder_decoder_rollout` and ``docs/analysis-tables.md``.

Padded tokens of ragged archives are dropped before anything is multiplied. Never imports
torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attnscope.analysis.blocks import dense_block, sample_slices, sparse_causal
from attnscope.analysis.tables import TABLE_SCHEMAS
from attnscope.contracts import IDENTITY_KEY, TABLE_VERSION_KEY, TABLE_VERSIONS
from attnscope.errors import SelectionError, ShapeError
from attnscope.store import check_structure, open_archive
from attnscope.store.names import array_name

__all__ = [
    "ParquetSink",
    "attention_rollout",
    "dense_block",
    "encoder_decoder_rollout",
    "residual_attention",
    "rollout_archive",
    "rollout_arrays",
    "sample_rollout",
]

ROLLOUT = "rollout"
#: model-config keys giving each stack's depth (reference model, then Hugging Face names)
_DEPTH_KEYS = {
    "encoder": ("num_encoder_layers", "encoder_layers", "num_layers", "num_hidden_layers",
                "n_layer", "n_layers"),
    "decoder": ("num_decoder_layers", "decoder_layers", "num_hidden_layers", "n_layer",
                "n_layers", "num_layers"),
}


# --- the method on in-memory matrices -------------------------------------------------------
def _rows_normalised(a: np.ndarray) -> np.ndarray:
    s = a.sum(axis=-1, keepdims=True)
    return np.divide(a, s, out=np.zeros_like(a), where=s > 0)


def residual_attention(attention: Any) -> np.ndarray:
    """``0.5 A + 0.5 I`` with rows renormalised: one layer's attention plus its residual.

    Parameters
    ----------
    attention : array-like
        ``(T, T)`` head-averaged self-attention. Rows are renormalised first (float16
        storage drifts from 1); an all-zero row becomes the identity row.

    Returns
    -------
    np.ndarray
        ``(T, T)`` float64, rows summing to 1.
    """
    a = np.asarray(attention, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ShapeError(f"rollout needs square (T, T) self-attention, got shape {a.shape}")
    r = 0.5 * _rows_normalised(a) + 0.5 * np.eye(a.shape[0])
    return _rows_normalised(r)


def attention_rollout(layers: Sequence[Any]) -> np.ndarray:
    """Rollout ``Ã_{L-1} ... Ã_0`` of head-averaged ``(T, T)`` attention, first layer first.

    Examples
    --------
    >>> import numpy as np
    >>> attention_rollout([np.eye(3), np.eye(3)]).tolist() == np.eye(3).tolist()
    True
    """
    if not layers:
        raise SelectionError("rollout needs at least one layer, got none")
    out = None
    for a in layers:
        r = residual_attention(a)
        if out is not None and r.shape != out.shape:
            raise ShapeError(f"rollout layers disagree: {r.shape} after {out.shape}")
        out = r if out is None else r @ out
    return out  # type: ignore[return-value]


def encoder_decoder_rollout(
    encoder: Sequence[Any], decoder_self: Sequence[Any], cross: Sequence[Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rollout through an encoder and on through a decoder's self- and cross-attention.

    The nodes are the decoder's input tokens and the encoder's input tokens. ``R_dd``
    ``(T, T)`` and ``R_de`` ``(T, S)`` hold how much of each decoder token flows from each
    decoder input token and each encoder input token; they start as ``I`` and ``0``. Per
    decoder layer:

    * self-attention (residual-adjusted ``Ã``): ``R_dd <- Ã R_dd``, ``R_de <- Ã R_de``;
    * cross-attention ``C`` (rows renormalised) with its residual, half the token itself and
      half what it reads from the encoder output, whose tokens are ``R_e`` (the encoder's
      rollout) of the encoder inputs: ``R_dd <- 0.5 R_dd``, ``R_de <- 0.5 R_de + 0.5 C R_e``.

    Every row of ``[R_dd | R_de]`` sums to 1.

    Returns
    -------
    tuple of np.ndarray
        ``(R_e (S, S), R_dd (T, T), R_de (T, S))``, float64.
    """
    if len(decoder_self) != len(cross):
        raise ShapeError(
            f"decoder has {len(decoder_self)} self-attention layers but {len(cross)} "
            "cross-attention layers; expected one of each per layer"
        )
    r_e = attention_rollout(encoder)
    s = r_e.shape[0]
    r_dd = r_de = None
    for a_self, a_cross in zip(decoder_self, cross, strict=True):
        r = residual_attention(a_self)
        if r_dd is None:
            r_dd, r_de = np.eye(r.shape[0]), np.zeros((r.shape[0], s))
        r_dd, r_de = r @ r_dd, r @ r_de
        c = _rows_normalised(np.asarray(a_cross, dtype=np.float64))
        if c.shape != (r.shape[0], s):
            raise ShapeError(
                f"cross-attention is {c.shape}; expected (decoder tokens, encoder tokens) = "
                f"{(r.shape[0], s)}"
            )
        r_dd, r_de = 0.5 * r_dd, 0.5 * r_de + 0.5 * (c @ r_e)
    if r_dd is None:
        raise SelectionError("decoder rollout needs at least one decoder layer, got none")
    return r_e, r_dd, r_de  # type: ignore[return-value]


# --- archives -------------------------------------------------------------------------------
def _depth(config: Any, stack: str) -> int | None:
    cfg = config.get("hf_config", config) if isinstance(config, dict) else {}
    for key in _DEPTH_KEYS[stack]:
        v = cfg.get(key) if isinstance(cfg, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _stack_names(archive: Any, stack: str, kind: str) -> list[str]:
    """Every layer's ``stack/layer/kind``, refusing a stack with a layer missing."""
    stored = archive.layers.get(stack, ())
    depth = _depth(archive.metadata.get("model_config") or {}, stack)
    want = range(depth if depth is not None else (max(stored) + 1 if stored else 0))
    names = [array_name(stack, i, kind) for i in want]
    missing = [n for n in names if n not in archive]
    if missing:
        raise SelectionError(
            f"rollout needs every layer of the {stack} stack ({len(names)} layers) but the "
            f"archive lacks {', '.join(missing)}; capture all layers (no --layers selection)"
        )
    return names


def rollout_arrays(archive: Any) -> dict[str, list[str]]:
    """The arrays a rollout of ``archive`` multiplies: ``{"encoder": [...], "decoder": [...],
    "cross": [...]}`` (empty lists for a stack it does not have).

    Raises :class:`SelectionError` when a stack has a layer missing, or when cross-attention
    is stored without the encoder's or the decoder's self-attention it needs.
    """
    def has(stack: str, kind: str) -> bool:
        return any(n.startswith(f"{stack}/") and n.endswith("/" + kind) for n in archive.arrays)

    out: dict[str, list[str]] = {"encoder": [], "decoder": [], "cross": []}
    if has("encoder", "self_attention"):
        out["encoder"] = _stack_names(archive, "encoder", "self_attention")
    if has("decoder", "self_attention"):
        out["decoder"] = _stack_names(archive, "decoder", "self_attention")
    if has("decoder", "cross_attention"):
        out["cross"] = [n.replace("self_attention", "cross_attention") for n in out["decoder"]]
        missing = [n for n in out["cross"] if n not in archive] or [
            f"{st}/*/self_attention" for st in ("encoder", "decoder") if not out[st]
        ]
        if missing:
            raise SelectionError(
                "rollout through cross-attention needs every decoder layer's self- and "
                "cross-attention and every encoder layer's self-attention; the archive lacks "
                + ", ".join(missing)
            )
    if not any(out.values()):
        raise SelectionError(f"archive {archive.path!r} holds no self-attention to roll out")
    for name in (n for names in out.values() for n in names):
        rows = archive.attention(name).query_rows
        if rows is not None:
            raise SelectionError(
                f"rollout multiplies full (T, T) matrices, but {name} keeps only query rows "
                f"{_short(rows)} (captured with a row policy); capture without --rows for a "
                "rollout"
            )
    return out


def _short(rows: Any) -> str:
    r = [int(x) for x in rows]
    return str(r) if len(r) <= 8 else f"[{', '.join(map(str, r[:5]))}, ..., {r[-1]}] ({len(r)})"


def _heads_index(arr: Any, heads: Sequence[int] | None) -> list[int]:
    if heads is None:
        return list(range(arr.shape[1]))
    got = [arr.heads.index(h) for h in heads if h in arr.heads]
    if len(got) != len(heads) or not got:
        raise SelectionError(
            f"heads {list(heads)} are not all stored in {arr.name}; it holds heads {arr.heads}"
        )
    return got


def _mean_heads(block: np.ndarray, idx: list[int]) -> np.ndarray:
    """``(n, H, T, S)`` -> ``(n, T, S)`` float64 mean over the heads ``idx``."""
    return np.asarray(block, dtype=np.float64)[:, idx].mean(axis=1)


def _positions(mask: np.ndarray | None, n: int) -> np.ndarray:
    return np.arange(n) if mask is None else np.flatnonzero(mask)


def _matrices(
    per_array: dict[str, np.ndarray], names: dict[str, list[str]], j: int,
    qpos: dict[str, np.ndarray],
) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Sample ``j`` of a block: ``(stack, kind) -> (rollout, query positions, key positions)``."""
    enc_p, dec_p = qpos.get("encoder"), qpos.get("decoder")

    def real(name: str, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return per_array[name][j][np.ix_(rows, cols)]

    out = {}
    enc = [real(n, enc_p, enc_p) for n in names["encoder"]] if names["encoder"] else []
    dec = [real(n, dec_p, dec_p) for n in names["decoder"]] if names["decoder"] else []
    if names["cross"]:
        cross = [real(n, dec_p, enc_p) for n in names["cross"]]
        r_e, r_dd, r_de = encoder_decoder_rollout(enc, dec, cross)
        out[("encoder", "self_attention")] = (r_e, enc_p, enc_p)
        out[("decoder", "self_attention")] = (r_dd, dec_p, dec_p)
        out[("decoder", "cross_attention")] = (r_de, dec_p, enc_p)
        return out
    if enc:
        out[("encoder", "self_attention")] = (attention_rollout(enc), enc_p, enc_p)
    if dec:
        out[("decoder", "self_attention")] = (attention_rollout(dec), dec_p, dec_p)
    return out


def _iter_rollouts(
    a: Any, samples: Sequence[int], heads: Sequence[int] | None, max_bytes: int
) -> Iterable[tuple[int, dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]]]]:
    """``(sample, {(stack, kind): (rollout, query positions, key positions)})`` per sample."""
    names = rollout_arrays(a)
    every = [n for group in names.values() for n in group]
    arrays = {n: a.attention(n) for n in every}
    idx = {n: _heads_index(arr, heads) for n, arr in arrays.items()}
    causal = {n: sparse_causal(arr) for n, arr in arrays.items()}  # once per array
    sides = [s for s in ("encoder", "decoder") if names[s]]
    wanted = set(int(i) for i in samples)
    first = arrays[every[0]]
    for sl in sample_slices(first, max(1, max_bytes // len(every))):
        ids = [i for i in range(sl.start, sl.stop) if i in wanted]
        if not ids:
            continue
        sub = slice(ids[0], ids[-1] + 1)
        block = {
            n: _mean_heads(dense_block(arr, sub, causal=causal[n]), idx[n])
            for n, arr in arrays.items()
        }
        masks = {s: a.masks(s, sub) if a.ragged else None for s in sides}
        for i in ids:
            j = i - sub.start
            pos = {
                s: _positions(None if masks[s] is None else masks[s][j], a.layout.side(s).length)
                for s in sides
            }
            yield i, _matrices(block, names, j, pos)


def _check_samples(samples: Sequence[int] | None, n: int) -> list[int]:
    if samples is None:
        return list(range(n))
    out = sorted({int(i) for i in samples})
    bad = [i for i in out if not 0 <= i < n]
    if bad or not out:
        raise SelectionError(f"samples {list(samples)} out of range; the archive has {n} samples")
    return out


def sample_rollout(
    archive: Any, sample: int = 0, *, heads: Sequence[int] | None = None
) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The rollout matrices of one sample, in memory.

    Returns
    -------
    dict
        ``(stack, kind) -> (R, query positions, key positions)``: ``("encoder",
        "self_attention")`` the encoder's rollout, ``("decoder", "self_attention")`` the
        decoder's, ``("decoder", "cross_attention")`` the encoder tokens' share in each
        decoder token. Positions are the stored positions of the real tokens.
    """
    with open_archive(archive) as a:
        check_structure(a, every_chunk=False)  # reads one sample
        (i,) = _check_samples([sample], a.n_samples)
        return dict(_iter_rollouts(a, [i], heads, 64 << 20))[i]


class ParquetSink:
    """Streams record batches into ``out_dir/<name>.parquet`` via a ``.partial`` file, with
    the archive identity (and any ``extra`` JSON) in the Parquet schema metadata."""

    def __init__(self, out_dir: Any, name: str, identity: dict[str, Any],
                 extra: dict[str, Any] | None = None) -> None:
        self.path = Path(out_dir) / f"{name}.parquet"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        meta = {IDENTITY_KEY: json.dumps(identity, sort_keys=True)}
        if TABLE_VERSIONS.get(name, 1) > 1:
            meta[TABLE_VERSION_KEY] = str(TABLE_VERSIONS[name])
        meta.update({k: json.dumps(v, sort_keys=True) for k, v in (extra or {}).items()})
        self.schema = TABLE_SCHEMAS[name].with_metadata(meta)
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._writer = pq.ParquetWriter(
            self._partial, self.schema, compression="zstd",
            use_dictionary=[f.name for f in self.schema if not pa.types.is_floating(f.type)],
        )

    def write(self, columns: dict[str, Any]) -> None:
        arrays = [pa.array(columns[f.name]).cast(f.type) for f in self.schema]
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self._writer.close()
        if exc_type is None:
            os.replace(self._partial, self.path)
        else:
            self._partial.unlink(missing_ok=True)


def _side_names(a: Any, side: str, sample: int) -> tuple[list[str], np.ndarray, list[str]]:
    """(labels by stored position, segment index by stored position, segment names)."""
    lay = a.sample_layout(sample).side(side)
    return list(lay.labels), np.asarray(lay.segment_ids(), dtype=np.int64), [
        s.name for s in lay.segments
    ]


def rollout_archive(
    archive: Any,
    out_dir: str | os.PathLike[str],
    *,
    samples: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    max_bytes: int = 256 << 20,
) -> Path:
    """Write ``out_dir/rollout.parquet``: the attention rollout of every (selected) sample.

    Abnar & Zuidema (2020), "Quantifying Attention Flow in Transformers". Head-averaged
    over the stored heads (or ``heads``, original ids stored in every array), residual
    adjusted (``0.5 A + 0.5 I``), multiplied across every layer of a stack; encoder-decoder
    archives continue through the decoder (:func:`encoder_decoder_rollout`). Padded tokens
    of ragged archives are left out. Every layer of a rolled-out stack must be stored.

    Parameters
    ----------
    archive : AttentionArchive or path
    out_dir : str or Path
    samples : list of int, optional
        Samples to roll out (default: all).
    heads : list of int, optional
        Original head ids to average (default: every stored head).
    max_bytes : int
        Samples are read in chunk-aligned blocks of about this many bytes over all arrays;
        the rollout itself runs one sample at a time.

    Returns
    -------
    Path
        The table (columns: ``contracts.TABLE_COLUMNS["rollout"]``).

    Examples
    --------
    >>> rollout_archive("run.zarr", "tables", samples=[0, 1])  # doctest: +SKIP
    >>> load_table("tables", "rollout", archive="run.zarr")  # doctest: +SKIP
    """
    with open_archive(archive) as a:
        check_structure(a)
        ids = _check_samples(samples, a.n_samples)
        names = rollout_arrays(a)
        last = {
            ("encoder", "self_attention"): len(names["encoder"]) - 1,
            ("decoder", "self_attention"): len(names["decoder"]) - 1,
            ("decoder", "cross_attention"): len(names["decoder"]) - 1,
        }
        ident = a.identity()
        fp = str(ident["fingerprint"])
        extra = {"attnscope.rollout": {"heads": None if heads is None else list(heads),
                                       "arrays": names}}
        with ParquetSink(out_dir, ROLLOUT, ident, extra) as sink:
            for i, mats in _iter_rollouts(a, ids, heads, max_bytes):
                side: dict[str, tuple[list[str], np.ndarray, list[str]]] = {}
                for (stack, kind), (r, qp, kp) in mats.items():
                    qs, ks = ("decoder", "encoder") if kind == "cross_attention" else (stack,) * 2
                    for s in (qs, ks):
                        if s not in side:
                            side[s] = _side_names(a, s, i)
                    q = np.repeat(qp, len(kp))
                    k = np.tile(kp, len(qp))
                    ql, qseg, qnames = side[qs]
                    kl, kseg, knames = side[ks]
                    n = q.size
                    sink.write({
                        "archive_fingerprint": [fp] * n,
                        "stack": [stack] * n,
                        "layer": np.full(n, last[(stack, kind)], dtype=np.int32),
                        "kind": [kind] * n,
                        "sample": np.full(n, i, dtype=np.int64),
                        "query": q,
                        "key": k,
                        "score": r.astype(np.float32).ravel(),
                        "query_label": np.asarray(ql, dtype=object)[q],
                        "key_label": np.asarray(kl, dtype=object)[k],
                        "query_segment": np.asarray(qnames, dtype=object)[qseg[q]],
                        "key_segment": np.asarray(knames, dtype=object)[kseg[k]],
                    })
        return sink.path

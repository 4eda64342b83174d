"""What one appended batch must look like: shapes, validation, sparse top-k, encoding.

:class:`BatchRules` holds an archive's fixed options (layout, dtype, mode, tolerance);
the writer hands it each batch together with what the archive already holds, and gets
back the arrays to store. Nothing here touches storage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from attnscope.contracts import KIND_AXES
from attnscope.errors import ConfigError, InputError, ShapeError, ValidationError
from attnscope.store.codecs import as_numpy, encode, is_half
from attnscope.store.layout import TokenLayout
from attnscope.store.names import parse_array_name, rows_of, sort_key
from attnscope.store.validation import check_weights

__all__ = ["BatchRules", "Prepared"]

#: array name -> {part: data to store ("" dense; values/indices/residual sparse), "_hts": (H, T, S)}
Prepared = dict[str, dict[str, Any]]


class BatchRules:
    """The checks and conversions every batch of one archive goes through."""

    def __init__(self, layout: TokenLayout, meta: Mapping[str, Any]) -> None:
        self.layout = layout
        self.dtype: str = meta["dtype"]
        self.sparse = meta.get("mode") == "sparse"
        self.topk: int | None = meta.get("topk")
        self.validate = bool(meta.get("validate", True))
        self.tolerance: float | None = meta.get("tolerance")
        self.heads: Mapping[str, list[int]] = meta.get("heads") or {}
        self.meta = meta

    def prepare(
        self,
        items: Mapping[str, Any],
        known: Mapping[str, tuple[int, int, int]],
        *,
        first_sample: int,
        complete: bool,
        range_writer: bool,
        rows: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[Prepared, int]:
        """Check and encode a flat batch; return ``(prepared, batch size)``.

        ``known``: (H, T, S) of the arrays the archive holds. ``complete``: every batch
        must carry exactly those arrays (a missing one would read back as zeros).
        ``range_writer``: a sample-range writer, which cannot create arrays.
        ``rows``: name -> ``(B, T)`` bool real query rows (ragged archives); only those
        are checked for row sums, and padded rows of sparse arrays keep no residual.
        """
        bsz = None
        prepared: Prepared = {}
        for name in sorted(items, key=sort_key):
            parts, b = self._prepare_one(
                name, items[name], known, first_sample, (rows or {}).get(name)
            )
            if bsz is None:
                bsz = b
            elif b != bsz:
                raise ShapeError(f"{name}: batch size {b} differs from {bsz} of the other arrays")
            prepared[name] = parts
        if known and complete and set(known) != set(prepared):
            have, got = set(known), set(prepared)
            raise ShapeError(
                f"batch arrays {sorted(got)} differ from the archive's {sorted(have)}; "
                f"missing: {sorted(have - got)}, unexpected: {sorted(got - have)}"
            )
        if range_writer:
            for name in prepared:
                if name not in known:
                    raise ConfigError(
                        f"{name}: a sample_range writer cannot create arrays; pass "
                        f"arrays={{...: (H, T, S)}} and capacity to ArchiveWriter.create"
                    )
        assert bsz is not None
        return prepared, bsz

    def _prepare_one(
        self,
        name: str,
        w: Any,
        known: Mapping[str, tuple[int, int, int]],
        first: int,
        rows: np.ndarray | None = None,
    ) -> tuple[dict[str, Any], int]:
        stack, _layer, kind = parse_array_name(name)
        if isinstance(w, Mapping):
            if not self.sparse:
                raise InputError(
                    f"{name}: got a dict {sorted(w)} but this archive is dense; pass the "
                    f"(B, H, T, S) weights"
                )
            half = is_half(w.get("values"))
            vals = as_numpy(w.get("values"), f"{name}['values']").astype(np.float32, copy=False)
            idx = as_numpy(w.get("indices"), f"{name}['indices']")
            if vals.ndim != 4 or idx.shape != vals.shape:
                raise ShapeError(
                    f"{name}: values and indices must both be (B, H, T, k); got "
                    f"{vals.shape} and {idx.shape}"
                )
            s = self._expect_s(name, stack, kind, w.get("n_keys"), known)
            b, h, t, _k = vals.shape
            dense = None
        else:
            half = is_half(w)
            dense = as_numpy(w, name)
            if dense.ndim != 4:
                raise ShapeError(
                    f"{name}: expected a 4-d (B, H, T, S) array, got shape {dense.shape}"
                )
            if not np.issubdtype(dense.dtype, np.floating):
                raise InputError(f"{name}: expected floating-point weights, got {dense.dtype}")
            b, h, t, s = dense.shape
        self.check_shape(name, h, t, s, known)
        tol = (1e-2 if half else 1e-3) if self.tolerance is None else self.tolerance
        if dense is not None:
            if self.validate:
                check_weights(name, dense, tol, first_sample=first, rows=rows)
            if self.sparse:
                vals, idx = self._topk(name, dense, s)
        else:
            self._check_topk(name, vals, idx, s)
            if self.validate:
                check_weights(name, vals, tol, first_sample=first, rows_le_one=True, rows=rows)
        parts: dict[str, Any] = {"_hts": (h, t, s)}
        if self.sparse:
            parts["values"] = encode(vals, self.dtype)
            parts["indices"] = idx.astype(np.int16 if s < 32768 else np.int32)
            res = np.clip(1.0 - vals.sum(axis=-1, dtype=np.float64), 0, None).astype(np.float32)
            if rows is not None:
                res *= rows[:, None, :]  # a padded row holds no mass at all
            parts["residual"] = res
        else:
            parts[""] = encode(dense, self.dtype)
        return parts, b

    def _topk(self, name: str, dense: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
        k = int(self.topk)  # type: ignore[arg-type]
        if k > s:
            raise ConfigError(f"{name}: sparse_topk={k} exceeds the {s} keys")
        idx = (
            np.argpartition(dense, s - k, axis=-1)[..., s - k :]
            if k < s
            else np.broadcast_to(np.arange(s), dense.shape).copy()
        )
        idx = np.sort(idx, axis=-1)
        return np.take_along_axis(dense, idx, axis=-1).astype(np.float32), idx

    def _check_topk(self, name: str, vals: np.ndarray, idx: np.ndarray, s: int) -> None:
        if vals.shape[-1] != self.topk:
            raise ShapeError(
                f"{name}: expected k={self.topk} kept weights per row, got {vals.shape[-1]}"
            )
        if not np.issubdtype(idx.dtype, np.integer) or (
            idx.size and (idx.min() < 0 or idx.max() >= s)
        ):
            raise ValidationError(f"{name}: indices must be integers in [0, {s})")

    def _expect_s(
        self, name: str, stack: str, kind: str, given: Any, known: Mapping[str, tuple]
    ) -> int:
        if name in known:
            return int(known[name][2])
        if given is not None:
            return int(given)
        _q, kside = KIND_AXES[(stack, kind)]
        side = getattr(self.layout, kside)
        if side is None:
            raise ShapeError(f"{name}: cannot infer the number of keys; pass 'n_keys' in the dict")
        return side.length

    def check_shape(
        self, name: str, h: int, t: int, s: int, known: Mapping[str, tuple[int, int, int]]
    ) -> None:
        """(H, T, S) of ``name`` must match the stored array, else the layout and heads."""
        if name in known:
            if (h, t, s) != tuple(known[name]):
                kh, kt, ks = known[name]
                raise ShapeError(
                    f"{name}: got (B, H, T, S) = (*, {h}, {t}, {s}), but the archive holds "
                    f"(*, {kh}, {kt}, {ks})"
                    + ("" if (kt, ks) == (t, s) else "; batches of other lengths need an archive "
                       "created with max_lengths (padded per sample)")
                )
            return
        stack, _layer, kind = parse_array_name(name)
        qside, kside = KIND_AXES[(stack, kind)]
        rows = rows_of(self.meta, name)
        if rows is not None and t != len(rows):
            raise ShapeError(
                f"{name}: T (query) length {t} does not match the {len(rows)} {qside} rows "
                f"this archive keeps (query_rows[{qside!r}])"
            )
        for side, got, dim in ((qside, t, "T (query)"), (kside, s, "S (key)")):
            lay = getattr(self.layout, side)
            if rows is not None and side == qside and dim.startswith("T"):
                continue
            if lay is not None and lay.length != got:
                raise ShapeError(
                    f"{name}: {dim} length {got} does not match the {side} layout's "
                    f"{lay.length} tokens"
                )
        heads = self.heads.get(name)
        if heads is not None and len(heads) != h:
            raise ShapeError(f"{name}: got {h} heads but heads[{name!r}] lists {len(heads)}")

    @staticmethod
    def prepare_ids(
        ids: Mapping[str, Any] | None, bsz: int, earlier: list[str] | None, *, later: bool
    ) -> dict[str, np.ndarray]:
        """Check per-sample ids ``{key: (B,)}`` against the keys of ``earlier`` batches."""
        if not ids:
            if earlier and later:
                raise ShapeError(
                    f"sample_ids {earlier} were given before; pass them for every batch"
                )
            return {}
        out = {}
        for key, v in ids.items():
            if not isinstance(key, str) or not key or "/" in key:
                raise InputError(f"sample_ids key must be a non-empty str without '/', got {key!r}")
            arr = np.asarray(as_numpy(v, f"sample_ids[{key!r}]") if hasattr(v, "detach") else v)
            if arr.shape != (bsz,):
                raise ShapeError(f"sample_ids[{key!r}] must have shape ({bsz},), got {arr.shape}")
            if arr.dtype.kind not in "biuf":
                raise InputError(
                    f"sample_ids[{key!r}] must be numeric (int, float, bool), got {arr.dtype}"
                )
            out[key] = arr
        if earlier and set(out) != set(earlier):
            raise ShapeError(f"sample_ids keys {sorted(out)} differ from earlier {earlier}")
        return out

"""Out-of-core views of an archive: dask arrays and labelled xarray Datasets.

dask and xarray are imported only inside these functions (``attnscope[dask]``; without it
a one-line :class:`~attnscope.errors.MissingExtraError`). Every chunk they read goes
through :class:`~attnscope.store.reader.AttentionArray` indexing, so damaged chunks raise
ArchiveCorruptError there too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from attnscope._extras import require
from attnscope.contracts import KIND_AXES, TOKEN_IDS
from attnscope.errors import SelectionError
from attnscope.store.catalog import KIND_ALIASES
from attnscope.store.names import parse_array_name

# The archive arguments are AttentionArchive objects; not imported here, since the reader
# imports this module to implement AttentionArchive.to_dask / to_xarray.
AttentionArchive = Any

__all__ = ["to_dask", "to_xarray"]

#: samples per chunk of the per-sample token coordinates and masks
_TOKEN_CHUNK = 4096


def to_dask(archive: AttentionArchive, key: Any) -> Any:
    """Dask array ``(N, H, T, S)`` of ``archive[key]`` over the committed samples, chunked
    like storage."""
    da = require("dask.array", "archive.to_dask()")
    arr = archive.attention(key)
    chunks = tuple(min(c, max(n, 1)) for c, n in zip(arr.chunks, arr.shape))
    return da.from_array(
        arr,
        chunks=chunks,
        asarray=True,
        fancy=False,
        name=f"attnscope-{arr.name}-{archive.identity()['fingerprint']}",
        meta=np.empty((0, 0, 0, 0), dtype=arr.dtype),
    )


def to_xarray(
    archive: AttentionArchive,
    stack: str | None = None,
    kind: str | None = None,
    *,
    masked: bool = True,
) -> Any:
    """Lazy (dask-backed) ``xarray.Dataset`` of one attention (stack, kind), every stored
    layer along a ``layer`` dimension.

    Parameters
    ----------
    archive
        An open :class:`~attnscope.store.reader.AttentionArchive`.
    stack
        ``"encoder"`` or ``"decoder"``; may be left out when the archive holds one stack.
    kind
        ``"self_attention"`` / ``"cross_attention"`` (or ``"self"`` / ``"cross"``); may be
        left out when the stack holds one kind.
    masked
        Padded positions of a ragged archive read as NaN in ``attention`` (so
        ``mean``/``sum``, which skip NaN, count real tokens only); False keeps the stored
        values (zeros there) and leaves masking to ``ds.attention.where(ds.mask)``.

    Returns
    -------
    xarray.Dataset
        Data variables: ``attention`` ``(layer, sample, head, query, key)`` and ``mask``
        ``(sample, query, key)`` bool, True where both tokens are real (all True in an
        archive that is not ragged). Index coordinates: ``layer`` (layer numbers),
        ``sample`` (0..N-1), ``head`` (original head numbers; a head one layer did not
        keep is NaN there), ``query`` (original query positions: a row policy keeps some)
        and ``key`` (positions). Other coordinates: ``query_segment`` / ``key_segment``
        (segment name of each position), ``query_token`` ``(sample, query)`` and
        ``key_token`` ``(sample, key)`` (each sample's own token labels; ``""`` where
        padded; lazy, so ``where(cond, drop=True)`` on them needs ``cond.compute()``),
        ``query_token_id`` / ``key_token_id`` when ids were stored (-1 where
        padded), and ``sample_<key>`` for each stored sample id. Attributes: the archive's
        identity, ``stack``, ``kind``, ``query_side`` / ``key_side`` and
        ``query_segments`` / ``key_segments`` (JSON ``[name, start, stop]`` along the dims),
        on the Dataset and on ``attention``.

    Raises
    ------
    SelectionError
        ``stack``/``kind`` name nothing stored, or are needed and left out (the message
        lists the choices).
    MissingExtraError
        xarray or dask is not installed (``pip install 'attnscope[dask]'``).

    Examples
    --------
    >>> ds = archive.to_xarray("encoder")                          # doctest: +SKIP
    >>> ds.attention.sel(layer=2, head=3).mean("query")           # real queries only
    >>> ds.attention.where(ds.query_token == "[CLS]").max("key")   # per-sample tokens
    """
    xr = require("xarray", "archive.to_xarray()")
    require("dask.array", "archive.to_xarray()")
    stack, kind, layers = _pick(archive, stack, kind)
    qside, kside = KIND_AXES[(stack, kind)]
    per_layer = []
    for layer in layers:
        arr = archive.attention(stack, layer, kind)
        per_layer.append(xr.DataArray(
            to_dask(archive, arr.name),
            dims=("sample", "head", "query", "key"),
            coords={"head": np.asarray(arr.heads, dtype=np.int64), "query": arr.query_index(),
                    "key": np.arange(arr.shape[3], dtype=np.int64)},
        ))
    # join="outer": a head that one layer did not keep is NaN there, never a shifted head
    att = xr.concat(per_layer, dim="layer", join="outer").assign_coords(
        layer=np.asarray(layers, dtype=np.int64))
    rows, n = arr.query_rows, arr.shape[0]
    ql, kl = archive.layout.axes(stack, kind)
    qlen, klen = len(ql.labels), len(kl.labels)
    qmask = _per_sample(lambda sl: archive.masks(qside, sl), n, qlen, bool, rows)
    kmask = _per_sample(lambda sl: archive.masks(kside, sl), n, klen, bool, None)
    mask = xr.DataArray(qmask, dims=("sample", "query")) & xr.DataArray(
        kmask, dims=("sample", "key"))
    if masked and archive.ragged:
        att = att.where(mask)
    qseg = ql.segment_ids()
    coords: dict[str, Any] = {
        "sample": np.arange(n, dtype=np.int64),
        "query_segment": ("query", [ql.segments[qseg[i]].name for i in arr.query_index()]),
        "key_segment": ("key", [kl.segments[i].name for i in kl.segment_ids()]),
        "query_token": (("sample", "query"), _tokens(archive, qside, n, qlen, rows, ql)),
        "key_token": (("sample", "key"), _tokens(archive, kside, n, klen, None, kl)),
    }
    fields = archive.token_fields()
    for dim, side, length, keep in (("query", qside, qlen, rows), ("key", kside, klen, None)):
        if TOKEN_IDS in fields.get(side, []):
            coords[f"{dim}_token_id"] = (("sample", dim), _per_sample(
                lambda sl, side=side: archive._side_rows(side, TOKEN_IDS, sl), n, length,
                np.int64, keep))
    for key, v in archive.sample_ids.items():
        coords[f"sample_{key}"] = ("sample", v)
    attrs = {
        **_attrs(archive), "stack": stack, "kind": kind, "query_side": qside, "key_side": kside,
        "query_segments": json.dumps(_query_segments(ql, rows)),
        "key_segments": json.dumps([[x.name, x.start, x.stop] for x in kl.segments]),
    }
    att.attrs.update(attrs)  # ds.attention carries them too
    ds = xr.Dataset({"attention": att, "mask": mask}, coords=coords, attrs=attrs)
    return ds.transpose("layer", "sample", "head", "query", "key")


def _pick(archive: AttentionArchive, stack: str | None, kind: str | None
          ) -> tuple[str, str, list[int]]:
    """``(stack, kind, layers)`` of the Dataset asked for, defaults filled in."""
    stored: dict[tuple[str, str], list[int]] = {}
    for name in archive.arrays:
        s, layer, k = parse_array_name(name)
        stored.setdefault((s, k), []).append(layer)
    choices = [f"{s}/{k}" for s, k in stored]
    if isinstance(stack, str) and stack.count("/") == 2:
        raise SelectionError(
            f"to_xarray takes a stack and a kind and returns every layer; for {stack!r} use "
            "archive.to_xarray(stack, kind).sel(layer=...), or archive.to_dask(name)"
        )
    kind = KIND_ALIASES.get(kind, kind) if isinstance(kind, str) else kind
    got = [(s, k) for s, k in stored
           if (stack is None or s == stack) and (kind is None or k == kind)]
    if len(got) != 1:
        what = "nothing stored" if not got else f"{[f'{s}/{k}' for s, k in got]}"
        raise SelectionError(
            f"to_xarray(stack={stack!r}, kind={kind!r}) matches {what}; give stack and kind "
            f"among {choices}"
        )
    return got[0][0], got[0][1], sorted(stored[got[0]])


class _SampleRows:
    """``(N, L)`` array-like over ``read(sample slice) -> (n, L_side)``, its columns
    ``keep`` (a row policy's kept rows) or all, for ``dask.array.from_array``."""

    ndim = 2

    def __init__(self, read: Callable[[slice], np.ndarray], n: int, length: int,
                 dtype: Any, keep: np.ndarray | None) -> None:
        self._read, self._keep = read, keep
        self.dtype = np.dtype(dtype)
        self.shape = (n, length if keep is None else len(keep))

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        got = np.asarray(self._read(rows), dtype=self.dtype)
        return (got if self._keep is None else got[:, self._keep])[:, cols]


def _per_sample(read: Callable[[slice], np.ndarray], n: int, length: int, dtype: Any,
                keep: np.ndarray | None) -> Any:
    import dask.array as da

    src = _SampleRows(read, n, length, dtype, keep)
    return da.from_array(src, chunks=(min(_TOKEN_CHUNK, max(n, 1)), max(src.shape[1], 1)),
                         asarray=True, fancy=False, meta=np.empty((0, 0), dtype=src.dtype))


def _tokens(archive: AttentionArchive, side: str, n: int, length: int,
            keep: np.ndarray | None, lay: Any) -> Any:
    """Lazy ``(N, L)`` object array of each sample's token labels on ``side`` (the
    layout's labels for every sample when none were stored per sample)."""
    if "labels" not in archive.token_fields().get(side, []):
        import dask.array as da

        labels = np.asarray(lay.labels, dtype=object)
        labels = labels if keep is None else labels[keep]
        labels = da.from_array(labels, chunks=max(len(labels), 1))
        return da.broadcast_to(labels, (n, len(labels)),
                               chunks=(min(_TOKEN_CHUNK, max(n, 1)), max(len(labels), 1)))
    return _per_sample(lambda sl: np.asarray(archive.labels(side, sl), dtype=object).reshape(
        -1, length), n, length, object, keep)


def _attrs(archive: AttentionArchive) -> dict[str, Any]:
    return {
        "archive": str(archive.path),
        "schema_version": archive.schema_version,
        "dtype": archive.dtype,
        "fingerprint": archive.identity()["fingerprint"],
    }


def _query_segments(ql: Any, rows: Any) -> list[list[Any]]:
    """``[name, start, stop]`` of each query segment along the ``query`` dim: the layout's
    positions, or for an array keeping some rows (a row policy) the segment's kept rows
    counted among the kept rows (segments without a kept row left out; the original
    positions are the ``query`` coordinate)."""
    if rows is None:
        return [[s.name, s.start, s.stop] for s in ql.segments]
    rows = np.asarray(rows, dtype=np.int64)
    out = []
    for s in ql.segments:
        start, stop = (int(i) for i in np.searchsorted(rows, [s.start, s.stop]))
        if stop > start:
            out.append([s.name, start, stop])
    return out

"""Out-of-core views of an archive: dask arrays and labelled xarray objects.

dask and xarray are imported only inside these functions. Every chunk they read goes
through :class:`~attnscope.store.reader.AttentionArray` indexing, so damaged chunks raise
ArchiveCorruptError there too.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from attnscope.contracts import KIND_AXES
from attnscope.store.names import parse_array_name

# The archive arguments are AttentionArchive objects; not imported here, since the reader
# imports this module (lazily) to implement AttentionArchive.to_dask / to_xarray.
AttentionArchive = Any

__all__ = ["to_dask", "to_xarray"]


def to_dask(archive: AttentionArchive, name: str) -> Any:
    """Dask array ``(N, H, T, S)`` over the committed samples, chunked like storage."""
    import dask.array as da

    arr = archive.attention(name)
    chunks = tuple(min(c, max(n, 1)) for c, n in zip(arr.chunks, arr.shape))
    return da.from_array(
        arr,
        chunks=chunks,
        asarray=True,
        fancy=False,
        name=f"attnscope-{name}-{archive.identity()['fingerprint']}",
        meta=np.empty((0, 0, 0, 0), dtype=arr.dtype),
    )


def to_xarray(archive: AttentionArchive, name: str | None = None) -> Any:
    """Labelled, lazy (dask-backed) view.

    With ``name``: a ``DataArray`` with dims ``("sample", "head", "query", "key")``,
    coords ``head`` = original head ids, ``query``/``key`` = token labels,
    ``query_segment``/``key_segment`` = segment name per token, and ``sample_ids``;
    attrs ``query_segments``/``key_segments`` = JSON ``[name, start, stop]`` along the dims.
    An array keeping some query rows (a row policy) has ``query_position`` = each stored
    row's original position, and its ``query_segments`` count the kept rows (a segment's
    kept rows, contiguous along ``query``; segments without one left out).

    Without: a ``Dataset`` of every array. Query/key dims are then named by side so
    arrays of different lengths coexist: ``encoder_query``/``encoder_key``,
    ``decoder_query``/``decoder_key`` (cross-attention: ``decoder_query`` x
    ``encoder_key``); heads share ``head`` if all arrays kept the same heads, else
    each array has ``<name>/head``.
    """
    import xarray as xr

    if name is not None:
        return _data_array(archive, name, "query", "key", "head")
    names = archive.arrays()
    same_heads = len({tuple(archive.attention(n).heads) for n in names}) <= 1
    variables = {}
    for n in names:
        stack, _l, kind = parse_array_name(n)
        qs, ks = KIND_AXES[(stack, kind)]
        hdim = "head" if same_heads else f"{n}/head"
        variables[n] = _data_array(archive, n, f"{qs}_query", f"{ks}_key", hdim)
    ds = xr.Dataset(variables)
    ds.attrs.update(_attrs(archive))
    return ds


def _attrs(archive: AttentionArchive) -> dict[str, Any]:
    return {
        "archive": str(archive.path),
        "schema_version": archive.schema_version,
        "dtype": archive.dtype,
        "fingerprint": archive.identity()["fingerprint"],
    }


def _data_array(archive: AttentionArchive, name: str, qdim: str, kdim: str, hdim: str) -> Any:
    import xarray as xr

    arr = archive.attention(name)
    ql, kl = archive.layout.axes(arr.stack, arr.kind)
    qrows = arr.query_index()  # original rows (a row policy keeps some)
    qseg = ql.segment_ids()
    coords: dict[str, Any] = {
        "sample": np.arange(arr.shape[0]),
        hdim: np.asarray(arr.heads),
        qdim: [ql.labels[i] for i in qrows],
        kdim: list(kl.labels),
        f"{qdim}_segment": (qdim, [ql.segments[qseg[i]].name for i in qrows]),
        f"{kdim}_segment": (kdim, [kl.segments[i].name for i in kl.segment_ids()]),
    }
    if arr.query_rows is not None:  # the original positions of the kept rows
        coords[f"{qdim}_position"] = (qdim, qrows)
    for key, v in archive.sample_ids.items():
        coords[f"sample_{key}"] = ("sample", v)
    attrs = {
        **_attrs(archive),
        "array": name,
        "stack": arr.stack,
        "layer": arr.layer,
        "kind": arr.kind,
        "query_segments": json.dumps(_query_segments(ql, arr.query_rows)),
        "key_segments": json.dumps([[s.name, s.start, s.stop] for s in kl.segments]),
    }
    return xr.DataArray(
        archive.to_dask(name),
        dims=("sample", hdim, qdim, kdim),
        coords=coords,
        name=name,
        attrs=attrs,
    )


def _query_segments(ql: Any, rows: Any) -> list[list[Any]]:
    """``[name, start, stop]`` of each query segment along the ``query`` dim: the layout's
    positions, or for an array keeping some rows (a row policy) the segment's kept rows
    counted among the kept rows (segments without a kept row left out; the original
    positions are the ``*_position`` coordinate)."""
    if rows is None:
        return [[s.name, s.start, s.stop] for s in ql.segments]
    rows = np.asarray(rows, dtype=np.int64)
    out = []
    for s in ql.segments:
        start, stop = (int(i) for i in np.searchsorted(rows, [s.start, s.stop]))
        if stop > start:
            out.append([s.name, start, stop])
    return out

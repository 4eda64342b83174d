"""Parquet table schemas, the streaming writer, and stale-table detection.

Each table is long format, one row group per analysed block, written through
:class:`pyarrow.parquet.ParquetWriter` so memory stays bounded. Every table carries
the archive identity twice: an ``archive_fingerprint`` column and the full identity
JSON in the Parquet schema metadata (key ``attnscope.identity``). Column reference:
``docs/analysis-tables.md``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from attnscope.analysis._engine import ArraySpec
from attnscope.analysis._folder import TableFolder
from attnscope.contracts import (
    AVERAGE_HEAD,
    HEAD_INDEX,
    IDENTITY_KEY,
    MEAN_HEAD_TABLES,
    TABLE_COLUMNS,
    TABLE_VERSION_KEY,
    TABLE_VERSIONS,
    TABLES,
)
from attnscope.errors import ArchiveError, ConfigError, SelectionError, StaleTableError
from attnscope.store import open_archive
from attnscope.store.backends.location import locate

__all__ = [
    "TABLES",
    "TABLE_SCHEMAS",
    "TableWriter",
    "load_table",
    "StaleTableError",
    "table_exists",
]

_ARROW_TYPES = {
    "string": pa.string(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
}
#: Arrow schemas of the tables, built from :data:`attnscope.contracts.TABLE_COLUMNS`
TABLE_SCHEMAS: dict[str, pa.Schema] = {
    table: pa.schema([(name, _ARROW_TYPES[typ]) for name, typ in cols])
    for table, cols in TABLE_COLUMNS.items()
}
_IDENTITY_KEY = IDENTITY_KEY.encode()


def _version(table: str) -> dict[bytes, bytes]:
    """Schema metadata naming the table's column version (tables at version 1: none)."""
    v = TABLE_VERSIONS.get(table, 1)
    return {TABLE_VERSION_KEY.encode(): str(v).encode()} if v > 1 else {}


def _const(value: Any, n: int, typ: pa.DataType) -> pa.Array:
    # A one-entry dictionary expanded in C++: no Python list of n strings.
    dic = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([value]))
    return dic.cast(typ)


def _lookup(idx: np.ndarray, names: tuple[str, ...]) -> pa.Array:
    dic = pa.DictionaryArray.from_arrays(
        pa.array(np.asarray(idx, dtype=np.int32)), pa.array(list(names), type=pa.string())
    )
    return dic.cast(pa.string())


class TableWriter:
    """Streams block results into ``<out_dir>/<table>.parquet`` (via ``.partial`` files).

    Files only get their final names in :meth:`commit`, so an interrupted run never
    leaves a complete-looking but partial table behind. ``out_dir`` may be an fsspec URL
    (``s3://bucket/tables``): see ``analysis/_folder.py``.
    """

    def __init__(
        self, out_dir: str | os.PathLike[str] | TableFolder, identity: dict[str, Any],
        similarity: str | None,
    ) -> None:
        self.folder = TableFolder(out_dir)
        self.folder.prepare()
        self.identity = identity
        self.similarity = similarity
        self._writers: dict[str, pq.ParquetWriter] = {}
        meta = {_IDENTITY_KEY: json.dumps(identity, sort_keys=True).encode()}
        self._schemas = {k: v.with_metadata({**meta, **_version(k)})
                         for k, v in TABLE_SCHEMAS.items()}

    def tables(self) -> list[str]:
        out = ["head_stats", "row_stats", "top_pairs", "segment_mass"]
        out += [MEAN_HEAD_TABLES[t] for t in out]
        return out + (["head_similarity"] if self.similarity else [])

    def _partial(self, name: str) -> str:
        return f"{name}.parquet.partial"

    def _writer(self, name: str) -> pq.ParquetWriter:
        w = self._writers.get(name)
        if w is None:
            schema = self._schemas[name]
            where, fs = self.folder.parquet_target(self._partial(name))
            w = pq.ParquetWriter(
                where,
                schema,
                filesystem=fs,
                compression="zstd",
                # Dictionary-encode the repetitive columns only: for float metrics Parquet's
                # dictionary attempt hashes every value before falling back (~10x the cost
                # of the plain write, measured on row_stats; docs/benchmarks.md).
                use_dictionary=[f.name for f in schema if not pa.types.is_floating(f.type)],
            )
            self._writers[name] = w
        return w

    def write(self, spec: ArraySpec, result: dict[str, Any]) -> None:
        for name, cols in result["tables"].items():
            labels = result.get("labels") or (spec.q_labels, spec.k_labels)
            table = self._to_table(name, spec, cols, labels)
            for part, rows in split_mean_head(name, table).items():
                rows = rows.replace_schema_metadata(self._schemas[part].metadata)
                w = self.folder.call(self._writer, part)  # at a URL: storage errors in one line
                self.folder.call(w.write_table, rows)

    def _to_table(
        self,
        name: str,
        spec: ArraySpec,
        cols: dict[str, np.ndarray],
        labels: tuple[tuple[str, ...], tuple[str, ...]],
    ) -> pa.Table:
        schema = self._schemas[name]
        n = len(cols["sample"])
        data: dict[str, pa.Array] = {
            "archive_fingerprint": _const(str(self.identity.get("fingerprint")), n, pa.string()),
            "stack": _const(spec.stack, n, pa.string()),
            "layer": pa.array(np.full(n, spec.layer, dtype=np.int32)),
            "kind": _const(spec.kind, n, pa.string()),
        }
        for key, arr in cols.items():
            if key in ("query_segment", "key_segment") or key.startswith("_"):
                continue
            data[key] = pa.array(arr)
        if name == "head_stats":
            data["causal"] = pa.array(np.full(n, spec.causal, dtype=bool))
        elif name == "row_stats":
            q = cols.get("_qloc", cols["query"])  # the stored row (kept rows: not the query)
            data["query_label"] = _lookup(cols["_qlab"], labels[0])
            data["query_segment"] = _lookup(np.asarray(spec.q_seg_ids)[q], spec.q_seg_names)
        elif name == "top_pairs":
            q, k = cols.get("_qloc", cols["query"]), cols["key"]
            data["query_label"] = _lookup(cols["_qlab"], labels[0])
            data["key_label"] = _lookup(cols["_klab"], labels[1])
            data["query_segment"] = _lookup(np.asarray(spec.q_seg_ids)[q], spec.q_seg_names)
            data["key_segment"] = _lookup(np.asarray(spec.k_seg_ids)[k], spec.k_seg_names)
        elif name == "segment_mass":
            data["query_segment"] = _lookup(cols["query_segment"], spec.q_seg_names)
            data["key_segment"] = _lookup(cols["key_segment"], spec.k_seg_names)
        elif name == "head_similarity":
            for m in ("js", "cosine"):
                if m not in data:
                    data[m] = pa.nulls(n, pa.float32())
        arrays = [data[f.name].cast(f.type) for f in schema]
        return pa.Table.from_arrays(arrays, schema=schema)

    def commit(self) -> dict[str, Any]:
        """Close the writers and give every table its final name (empty tables included).

        Returns ``{table: Path}`` (a ``RemoteLocation`` for a folder at a URL)."""
        out: dict[str, Any] = {}
        for name in self.tables():
            w = self._writers.get(name)
            if w is None:
                where, fs = self.folder.parquet_target(self._partial(name))
                empty = self._schemas[name].empty_table()
                self.folder.call(pq.write_table, empty, where, filesystem=fs)
            else:
                self.folder.call(w.close)  # at a URL: the object is uploaded here
                del self._writers[name]
            self.folder.replace(self._partial(name), f"{name}.parquet")
            out[name] = self.folder.file(f"{name}.parquet")
        return out

    def abort(self) -> None:
        """Close the writers and delete every partial file, also when closing fails (a
        full disk fails the close's last write; the error on its way out is the one
        reported)."""
        for w in self._writers.values():
            try:
                w.close()
            except Exception:  # noqa: BLE001 - the file is deleted below either way
                pass
        self._writers.clear()
        for name in self.tables():
            try:
                self.folder.remove(self._partial(name))
            except Exception:  # noqa: BLE001 - storage gone: the error on its way out wins
                pass


def split_mean_head(name: str, table: pa.Table) -> dict[str, pa.Table]:
    """A block of per-head table ``name`` whose ``head_index`` holds :data:`AVERAGE_HEAD` on
    its mean-over-heads rows, split into ``{name: the real heads' rows, mean table: the mean
    rows without head_index}`` (:data:`MEAN_HEAD_TABLES`); other tables as they are."""
    mean = MEAN_HEAD_TABLES.get(name)
    if mean is None:
        return {name: table}
    is_mean = pc.equal(table[HEAD_INDEX], AVERAGE_HEAD)
    return {
        name: table.filter(pc.invert(is_mean)),
        mean: table.filter(is_mean).drop_columns([HEAD_INDEX]),
    }


def _resolve(path: Any) -> str:
    if path is None:
        return ""
    loc = locate(path)
    return str(loc) if loc.remote else str(Path(loc).resolve())


def table_exists(out_dir: str | os.PathLike[str], name: str) -> bool:
    """Whether the tables folder ``out_dir`` (a local folder or a URL) holds ``name``
    (e.g. ``"timeline.parquet"``)."""
    return TableFolder(out_dir).exists(name)


def table_identity(
    path: str | os.PathLike[str], folder: TableFolder | None = None
) -> dict[str, Any]:
    """The archive identity stored in a table's Parquet metadata (``path``: a file, or
    its name in ``folder``)."""
    schema = pq.read_schema(path) if folder is None else folder.read_schema(os.fspath(path))
    meta = schema.metadata or {}
    raw = meta.get(_IDENTITY_KEY)
    if raw is None:
        raise ArchiveError(
            f"{path} has no {IDENTITY_KEY} metadata; not an attnscope table"
        )
    return json.loads(raw)


#: mean table -> its per-head table (old tables kept the mean rows there as ``head == -1``)
_BASE_OF = {mean: table for table, mean in MEAN_HEAD_TABLES.items()}
#: the per-head tables' head column before version 2 (mean rows: AVERAGE_HEAD)
_OLD_HEAD = "head"


def load_table(
    out_dir: str | os.PathLike[str],
    name: str,
    archive: Any = None,
    *,
    columns: list[str] | None = None,
    with_mean_head: bool = False,
) -> Any:
    """Read one analysis table as a pandas DataFrame, optionally checking it is current.

    Per-head tables (``head_stats``, ``row_stats``, ``top_pairs``, ``segment_mass``,
    ``diff``, ``timeline``) hold real heads only, named by ``head_index``; the metrics of the
    mean over the heads are the ``mean_head_*`` tables (:data:`MEAN_HEAD_TABLES`). Tables
    written before (version 1; top_pairs 2: a ``head`` column, the mean rows at
    ``head == -1``) read the same way.

    Parameters
    ----------
    out_dir : str or Path
        The directory :func:`attnscope.analysis.analyze` wrote to (or its URL).
    name : str
        Table name, one of :data:`TABLES` (with or without ``.parquet``).
    archive : AttentionArchive or path, optional
        If given, the table's stored identity must match ``archive.identity()``
        (fingerprint, committed sample count and resolved path), else
        :class:`StaleTableError`.
    columns : list of str, optional
        Read only these columns.
    with_mean_head : bool
        For a per-head table: append the mean table's rows, with ``head_index`` =
        :data:`~attnscope.contracts.AVERAGE_HEAD` (-1), as the figures draw them. Filter
        them out (``df[df.head_index >= 0]``) before pooling heads.

    Returns
    -------
    pandas.DataFrame

    Examples
    --------
    >>> df = load_table("out", "head_stats", archive="run.zarr")  # doctest: +SKIP
    >>> df.groupby("layer").entropy_mean.mean()                   # real heads only
    >>> load_table("out", "mean_head_stats")                      # the head-averaged map's
    """
    name = name.removesuffix(".parquet")
    if name not in TABLE_SCHEMAS:
        raise SelectionError(f"unknown table {name!r}; expected one of {list(TABLES)}")
    if columns is not None and not isinstance(columns, list):
        raise ConfigError(f"columns must be a list of names, got {type(columns).__name__}")
    known = [c for c, _t in TABLE_COLUMNS[name]]
    if columns is not None and (bad := [c for c in columns if c not in known]):
        raise SelectionError(f"table {name!r} has no column(s) {bad}; its columns: {known}")
    if with_mean_head:
        if name not in MEAN_HEAD_TABLES:
            raise ConfigError(
                f"with_mean_head needs a per-head table, one of {list(MEAN_HEAD_TABLES)}; "
                f"got {name!r}"
            )
        heads = load_table(out_dir, name, archive, columns=columns)
        cols = None if columns is None else [c for c in columns if c != HEAD_INDEX]
        mean = load_table(out_dir, MEAN_HEAD_TABLES[name], archive, columns=cols)
        if columns is None or HEAD_INDEX in columns:
            mean.insert(int(heads.columns.get_loc(HEAD_INDEX)), HEAD_INDEX,
                        np.full(len(mean), AVERAGE_HEAD, dtype=np.int64))
        return _concat(heads, mean)
    folder = TableFolder(out_dir)
    file = f"{name}.parquet"
    base = f"{_BASE_OF.get(name, name)}.parquet"
    if (not folder.exists(file) and name in _BASE_OF and folder.exists(base)
            and _is_old(folder, base)):  # fmt: skip
        file = base  # a table of version 1: its mean rows live in the per-head table
    path = folder.file(file)
    if not folder.exists(file):
        raise FileNotFoundError(
            f"no table {path}; run attnscope analyze first (similarity tables need "
            "head_similarity set)"
        )
    if archive is not None:
        with open_archive(archive) as a:
            want = a.identity()
        got = table_identity(file, folder)
        for key in ("fingerprint", "n_samples", "archive"):
            g, w = got.get(key), want.get(key)
            if key == "archive":
                g, w = _resolve(g), _resolve(w)
            if g != w:
                raise StaleTableError(
                    f"{path} is stale: it was computed from {got.get('archive')!r} with "
                    f"{key}={got.get(key)!r}, but the archive now has {key}={want.get(key)!r}; "
                    "re-run attnscope analyze"
                )
    if not _is_old(folder, file):
        return folder.read_table(file, columns=columns).to_pandas()
    return _read_old(folder, file, name, columns)


def _is_old(folder: TableFolder, file: str) -> bool:
    """Whether a per-head table predates version 2 (``head`` column, mean rows inside)."""
    return _OLD_HEAD in folder.read_schema(file).names


def _read_old(folder: TableFolder, file: str, name: str, columns: list[str] | None) -> Any:
    """A table of version 1 (top_pairs: 2) read as the current version: ``head`` renamed
    ``head_index`` and the rows split between the per-head and the mean table."""
    mean = name in _BASE_OF
    want = [c for c, _t in TABLE_COLUMNS[name]] if columns is None else columns
    old = folder.read_schema(file).names
    read = [_OLD_HEAD if c == HEAD_INDEX else c for c in want if c in old or c == HEAD_INDEX]
    op = "==" if mean else "!="
    table = folder.read_table(file, columns=list(dict.fromkeys([*read, _OLD_HEAD])),
                              filters=[(_OLD_HEAD, op, AVERAGE_HEAD)])
    if mean or HEAD_INDEX not in want:
        table = table.drop_columns([_OLD_HEAD])
    else:
        table = table.rename_columns([HEAD_INDEX if c == _OLD_HEAD else c
                                      for c in table.column_names])
    return table.select([c for c in want if c in table.column_names]).to_pandas()


def _concat(a: Any, b: Any) -> Any:
    """Rows of ``a`` then ``b`` (same columns), a fresh index."""
    import pandas as pd

    return pd.concat([a, b], ignore_index=True)

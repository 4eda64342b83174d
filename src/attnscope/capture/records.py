"""Sentences from the files real datasets come in: one text (and a target) per row.

``attnscope capture --inputs FILE --text-field F [--target-field G]`` reads

* ``.jsonl``: one JSON object per line; a row's id is its 0-based line number (blank
  lines are skipped, and keep their number);
* ``.csv``: a header line, then one row per record; a row's id is its 0-based data row;
* ``.parquet``: a table with a string column per field; a row's id is its row index;
* ``.txt``: one sentence per line (no fields); a row's id is its 0-based line number;
* a folder saved by Hugging Face ``datasets`` (``Dataset.save_to_disk``), read with
  ``datasets.load_from_disk`` (the ``[datasets]`` extra); a row's id is its index.

Rows keep the file's order: nothing is sorted, so sample ``i`` of the archive is the
``i``-th row read, and its row id is stored beside it (sample id :data:`ROW_ID`). Every
refusal is one :class:`~attnscope.errors.InputError` line naming the file, the row and
what was expected, raised before any model runs.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attnscope._extras import require
from attnscope.contracts import ROW_ID
from attnscope.errors import InputError

__all__ = ["RECORD_SUFFIXES", "ROW_ID", "Records", "is_records", "load_records"]

#: file suffixes read as rows of text (a saved ``datasets`` folder is one too)
RECORD_SUFFIXES = (".jsonl", ".csv", ".parquet", ".txt")
DEFAULT_FIELD = "text"


@dataclass(frozen=True)
class Records:
    """The rows of an inputs file, in file order.

    ``texts[i]`` (and ``targets[i]``) come from the row whose id is ``rows[i]``.
    """

    texts: list[str]
    targets: list[str] | None
    rows: np.ndarray  # (N,) int64 row ids from the file

    def __len__(self) -> int:
        return len(self.texts)


def is_records(path: Path) -> bool:
    """Whether ``path`` holds rows of text (a suffix of :data:`RECORD_SUFFIXES`, or a
    folder saved by ``datasets``)."""
    path = Path(path)
    if path.is_dir():
        return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
    return path.suffix in RECORD_SUFFIXES


def load_records(
    path: Path, text_field: str | None = None, target_field: str | None = None
) -> Records:
    """Read the ``text_field`` (default ``"text"``) and ``target_field`` of every row.

    Raises
    ------
    InputError
        An unreadable or empty file, a line that is not JSON, a field that is not in the
        file, a value that is not a string.
    """
    path = Path(path)
    text_field = text_field or DEFAULT_FIELD
    if path.is_dir():
        rows = _dataset_rows(path, text_field, target_field)
    elif path.suffix == ".txt":
        if target_field is not None:
            raise InputError(
                f"{path} is a .txt file (one sentence per line, no fields); --target-field "
                "needs .jsonl, .csv, .parquet or a saved datasets folder"
            )
        rows = ((no, {text_field: line}) for no, line in _lines(path) if line.strip())
    elif path.suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif path.suffix == ".csv":
        rows = _csv_rows(path)
    elif path.suffix == ".parquet":
        rows = _parquet_rows(path, [f for f in (text_field, target_field) if f])
    else:
        raise InputError(
            f"inputs {path}: {path.suffix!r} is not a text format; expected one of "
            f"{', '.join(RECORD_SUFFIXES)} or a folder saved by datasets.save_to_disk"
        )
    return _collect(path, rows, text_field, target_field)


def _collect(
    path: Path,
    rows: Iterable[tuple[int, dict[str, Any]]],
    text_field: str,
    target_field: str | None,
) -> Records:
    texts: list[str] = []
    targets: list[str] = []
    ids: list[int] = []
    for row_id, row in rows:
        texts.append(_field(path, row_id, row, text_field, "--text-field"))
        if target_field is not None:
            targets.append(_field(path, row_id, row, target_field, "--target-field"))
        ids.append(row_id)
    if not texts:
        what = "sentence" if path.suffix == ".txt" else f"record with a {text_field!r} field"
        raise InputError(f"{path} holds no rows (empty or blank lines only); expected one "
                         f"{what} per row")  # fmt: skip
    return Records(texts, targets if target_field is not None else None,
                   np.asarray(ids, dtype=np.int64))  # fmt: skip


def _field(path: Path, row_id: int, row: dict[str, Any], name: str, option: str) -> str:
    if name not in row:
        raise InputError(
            f"{path} row {row_id}: {option} {name!r} is not a field of it; its fields are "
            f"{sorted(row)}"
        )
    value = row[name]
    if not isinstance(value, str):
        raise InputError(
            f"{path} row {row_id}: field {name!r} is {str(value)[:40]!r} "
            f"({type(value).__name__}); expected a string"
        )
    return value


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path} as UTF-8 text: {e}") from e
    return enumerate(text.splitlines())


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for no, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(
                f"{path} row {no} (line {no + 1}) is not JSON ({e.msg}); expected one JSON "
                'object per line, e.g. {"text": "attention is all you need"}'
            ) from e
        if not isinstance(obj, dict):
            raise InputError(
                f"{path} row {no} (line {no + 1}) holds a JSON {type(obj).__name__}; expected "
                'an object per line, e.g. {"text": "attention is all you need"}'
            )
        yield no, obj


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:  # a BOM is no field name
            reader = csv.DictReader(f)
            for no, row in enumerate(reader):
                # a row with fewer cells than the header: its missing cells are not text
                yield no, {k: v for k, v in row.items() if k is not None}
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"cannot read {path} as CSV (UTF-8, a header line): {e}") from e


def _parquet_rows(path: Path, fields: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"cannot read {path} as Parquet: {e}") from e
    for name in fields:
        if name not in schema.names:
            raise InputError(
                f"{path}: {name!r} is not a column of it; its columns are {schema.names}"
            )
        typ = schema.field(name).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
            raise InputError(
                f"{path}: column {name!r} holds {typ}; expected a string column of text"
            )
    table = pq.read_table(path, columns=list(fields))
    return enumerate(table.to_pylist())


def _dataset_rows(
    path: Path, text_field: str, target_field: str | None
) -> Iterator[tuple[int, dict[str, Any]]]:
    datasets = require("datasets", "--inputs DATASET_FOLDER")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a bad folder
        raise InputError(
            f"cannot load {path} with datasets.load_from_disk ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}); expected a folder written by save_to_disk"
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        raise InputError(
            f"{path} holds the splits {sorted(ds)}; expected one split: pass its folder, "
            f"e.g. {path / sorted(ds)[0]}"
        )
    fields = [f for f in (text_field, target_field) if f]
    for name in fields:
        if name not in ds.column_names:
            raise InputError(
                f"{path}: {name!r} is not a field of the dataset; its fields are "
                f"{ds.column_names}"
            )
        feat = ds.features[name]
        if getattr(feat, "dtype", None) not in ("string", "large_string"):
            raise InputError(
                f"{path}: field {name!r} holds {feat}; expected a string field of text"
            )
    return enumerate(ds.select_columns(fields).to_list())

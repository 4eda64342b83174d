"""Attention archive: chunked Zarr v3 / HDF5 store behind one interface.

See ``docs/archive-format.md`` for the on-disk format. Only this package imports zarr
and h5py (h5py, dask and xarray lazily, inside the functions that need them).
"""

from attnscope.store._base import choose_chunks
from attnscope.store.archive import (
    SCHEMA_VERSION,
    ArchiveWriter,
    AttentionArchive,
    AttentionArray,
    archive_format,
    array_name,
    as_numpy,
    flatten_weights,
    open_archive,
    parse_array_name,
)
from attnscope.store.layout import Segment, SideLayout, TokenLayout
from attnscope.store.spec import ArchiveSpec, batch_chunk_samples
from attnscope.store.verify import VerifyReport, format_info, info, verify

__all__ = [
    "ArchiveWriter",
    "ArchiveSpec",
    "batch_chunk_samples",
    "AttentionArchive",
    "AttentionArray",
    "open_archive",
    "info",
    "format_info",
    "verify",
    "VerifyReport",
    "TokenLayout",
    "SideLayout",
    "Segment",
    "SCHEMA_VERSION",
    "array_name",
    "parse_array_name",
    "choose_chunks",
    "archive_format",
    "flatten_weights",
    "as_numpy",
]

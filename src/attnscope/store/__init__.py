"""Attention archive: chunked Zarr v3 / HDF5 store behind one interface.

See ``docs/archive-format.md`` for the on-disk format. Only this package imports zarr
and h5py (h5py, dask and xarray lazily, inside the functions that need them).

Modules, one job each: ``names`` (array names), ``codecs`` (dtype encodings),
``validation`` (checks of appended weights), ``meta`` (root metadata, format sniffing),
``batch`` (what one appended batch must look like), ``writer`` (``ArchiveWriter``),
``reader`` (``open_archive``, ``AttentionArchive``, ``AttentionArray``), ``catalog``
(``archive.arrays/layers/kinds/heads`` and the keys ``archive[...]`` takes), ``views``
(dask / xarray), ``integrity`` (``check_structure``: the structural check every data
command runs), ``verify`` (``verify`` / ``info``). ``backends/`` is where bytes live: ``location``
(a path or URL resolved once at the door), ``base`` (the backend interface),
``zarr_store`` and ``hdf5_store`` its two implementations, ``lock`` the writer leases,
``remote`` archives at fsspec URLs (``s3://bucket/run.zarr``; Zarr only).
"""

from attnscope.store.backends.base import choose_chunks
from attnscope.store.backends.remote import set_storage_options
from attnscope.store.codecs import as_numpy
from attnscope.store.integrity import check_structure
from attnscope.store.layout import Segment, SideLayout, TokenLayout
from attnscope.store.meta import SCHEMA_VERSION, archive_format, holds_no_data, refuse_existing
from attnscope.store.names import array_name, flatten_weights, parse_array_name
from attnscope.store.reader import AttentionArchive, AttentionArray, open_archive
from attnscope.store.spec import ArchiveSpec, batch_chunk_samples
from attnscope.store.verify import VerifyReport, format_info, info, verify
from attnscope.store.writer import ArchiveWriter

__all__ = [
    "ArchiveWriter",
    "refuse_existing",
    "ArchiveSpec",
    "batch_chunk_samples",
    "AttentionArchive",
    "AttentionArray",
    "open_archive",
    "check_structure",
    "set_storage_options",
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
    "holds_no_data",
    "flatten_weights",
    "as_numpy",
]

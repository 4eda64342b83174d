"""What an archive will cost on disk, measured by writing batches into a scratch archive.

Used by ``capture(..., dry_run=True)``: the batch is encoded with the archive's own
format, chunk policy and compressor (:meth:`ArchiveWriter.create` with the run's
:class:`ArchiveSpec`) in a temporary directory that is removed afterwards. Two appends of
the same batch separate what the archive writes once (metadata, commit records) from
what every batch adds (its chunks).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from attnscope.store.backends.location import locate
from attnscope.store.backends.lock import LOCK_DIR_NAME
from attnscope.store.layout import TokenLayout
from attnscope.store.meta import archive_format
from attnscope.store.spec import ArchiveSpec

__all__ = ["Footprint", "measure_footprint", "check_writable"]


@dataclass(frozen=True)
class Footprint:
    """On-disk cost of an archive: a fixed part plus a part per appended batch."""

    fixed_bytes: int  # metadata and commit records, written once
    fixed_files: int
    fixed_chunks: int
    batch_bytes: int  # compressed bytes each batch adds
    batch_files: int
    batch_chunks: int

    def total(self, n_batches: int) -> tuple[int, int, int]:
        """``(bytes, files, chunks)`` of an archive of ``n_batches`` such batches."""
        return (
            self.fixed_bytes + n_batches * self.batch_bytes,
            self.fixed_files + n_batches * self.batch_files,
            self.fixed_chunks + n_batches * self.batch_chunks,
        )


def measure_footprint(
    path: str | os.PathLike[str],
    layout: TokenLayout,
    spec: ArchiveSpec,
    weights: Mapping[str, Any],
    **append: Any,
) -> Footprint:
    """Encode one batch twice into a scratch archive shaped like the one at ``path``.

    ``weights`` and ``append`` (``sample_ids``, ``masks``, ``tokens``) are what
    :meth:`ArchiveWriter.append` takes. Nothing is written at ``path``.
    """
    from attnscope.store.writer import ArchiveWriter

    fmt = archive_format(path, spec.format)
    suffix = ".h5" if fmt == "hdf5" else ".zarr"
    scratch = tempfile.mkdtemp(prefix="attnscope-dryrun-")
    try:
        target = os.path.join(scratch, "probe" + suffix)
        sizes = []
        with ArchiveWriter.create(target, layout, spec) as w:
            for _ in range(2):
                w.append(weights, **append)
                sizes.append(_measure(target, fmt))
        (b1, f1, c1), (b2, f2, c2) = sizes
        return Footprint(
            fixed_bytes=max(0, 2 * b1 - b2), fixed_files=max(0, 2 * f1 - f2),
            fixed_chunks=max(0, 2 * c1 - c2),
            batch_bytes=b2 - b1, batch_files=f2 - f1, batch_chunks=c2 - c1,
        )  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _measure(path: str, fmt: str) -> tuple[int, int, int]:
    """``(bytes, files, chunks)`` on disk, lock folders left out."""
    if fmt == "hdf5":
        import h5py

        chunks = 0

        def count(_name: str, obj: Any) -> None:
            nonlocal chunks
            if isinstance(obj, h5py.Dataset) and obj.chunks is not None:
                chunks += obj.id.get_num_chunks()

        with h5py.File(path, "r", locking=False) as f:
            f.visititems(count)
        return os.path.getsize(path), 1, chunks
    size = files = chunks = 0
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if d != LOCK_DIR_NAME]
        for n in names:
            size += os.path.getsize(os.path.join(root, n))
            files += 1
            chunks += n != "zarr.json" and not n.startswith(".")
    return size, files, chunks


def check_writable(path: str | os.PathLike[str]) -> str:
    """The nearest existing parent of ``path`` (or ``path`` itself), if this process may
    create the archive there; a one-line :class:`ConfigError` otherwise. Creates nothing.
    A URL is checked for its backend, credentials and bucket, and returned as is."""
    return locate(path).check_writable()

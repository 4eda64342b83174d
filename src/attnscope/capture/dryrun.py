"""``capture(..., dry_run=True)``: what a capture job would write, from one real batch.

The first batch runs through the real model, selection, cast and top-k; its arrays are
then encoded with the archive's own format, chunk policy and compressor in a scratch
directory that is removed (:func:`attnscope.store.footprint.measure_footprint`). Nothing
is created at the destination: no folder, no lock, no file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from attnscope.capture.writer import stored_nbytes
from attnscope.store.backends.location import locate
from attnscope.store.footprint import Footprint
from attnscope.store.spec import ArchiveSpec

__all__ = ["DryRunReport", "planned_samples", "report"]

MB = 1e6


@dataclass(frozen=True)
class DryRunReport:
    """What a capture job would write, measured on its first batch. Nothing was written."""

    archive: str  # the destination (untouched)
    archive_format: str  # "zarr" | "hdf5"
    dtype: str  # stored dtype
    batch_size: int  # samples of the measured batch
    # array name -> bytes per sample in the stored dtype (sparse: values + indices)
    bytes_per_sample: dict[str, int]
    # samples the job will write: len(batches) * batch size, or total=; None: unknown
    samples: int | None
    batches: int | None  # batches the job will write; None: unknown
    bytes_uncompressed: int  # of the whole job (per batch when samples is None)
    bytes_compressed: int  # measured by encoding the batch; whole job or per batch
    files: int  # files the job will create at most (per batch when samples is None)
    chunks: int  # chunks the job will create (per batch when samples is None)
    free_bytes: int | None  # free space at the destination's nearest existing parent; None: a URL
    footprint: Footprint = field(repr=False)  # the measured fixed and per-batch parts

    @property
    def per_batch_only(self) -> bool:
        """No sample count was known: the figures are those of one batch."""
        return self.samples is None

    @property
    def warning(self) -> str | None:
        """One line when the compressed total exceeds the free space at the destination."""
        if self.free_bytes is None or self.bytes_compressed <= self.free_bytes:
            return None
        return (
            f"warning: the archive needs about {self.bytes_compressed / MB:.1f} MB but only "
            f"{self.free_bytes / MB:.1f} MB are free at {self.archive!r}"
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["warning"] = self.warning
        return d

    def format(self) -> str:
        """The report as text (what ``attnscope capture --dry-run`` prints)."""
        scope = (
            "per batch (pass total= / --total, or a sized batch source, for the whole job)"
            if self.per_batch_only
            else f"{self.samples} samples in {self.batches} batches"
        )
        ratio = self.bytes_uncompressed / self.bytes_compressed if self.bytes_compressed else 0
        lines = [
            f"dry run: nothing written at {self.archive!r} ({self.archive_format}, {self.dtype}, "
            f"batch size {self.batch_size})",
            "  bytes per sample (stored dtype):",
        ]
        width = max(map(len, self.bytes_per_sample), default=0)
        lines += [f"    {n:<{width}}  {b:,} B" for n, b in self.bytes_per_sample.items()]
        lines += [
            f"  {scope}:",
            f"    uncompressed {self.bytes_uncompressed / MB:,.1f} MB, compressed "
            f"{self.bytes_compressed / MB:,.1f} MB (x{ratio:.2f}, measured on batch 0)",
            f"    {self.chunks:,} chunks in at most {self.files:,} files (one commit-log "
            "document per commit; batches committed together share one)",
            "  free at destination: "
            + ("not known (object storage)" if self.free_bytes is None
               else f"{self.free_bytes / MB:,.1f} MB"),
        ]
        if self.warning:
            lines.append(self.warning)
        return "\n".join(lines)


def planned_samples(batches: Any, bsz: int, total: int | None) -> int | None:
    """Samples the job will write: ``len(batches) * bsz`` when sized, else ``total``."""
    try:
        return len(batches) * bsz
    except TypeError:
        return total


def report(
    archive: str,
    fmt: str,
    dtype: str,
    bsz: int,
    per_sample: Mapping[str, int],
    samples: int | None,
    fp: Footprint,
    where: str,
) -> DryRunReport:
    """Scale the measured batch to the job (or keep it per batch)."""
    n_batches = None if samples is None else -(-samples // bsz)
    k = 1 if n_batches is None else n_batches
    nbytes, files, chunks = fp.total(k)
    raw = sum(per_sample.values()) * (bsz if samples is None else samples)
    return DryRunReport(
        archive=archive, archive_format=fmt, dtype=dtype, batch_size=bsz,
        bytes_per_sample=dict(per_sample), samples=samples, batches=n_batches,
        bytes_uncompressed=raw, bytes_compressed=nbytes, files=files, chunks=chunks,
        free_bytes=locate(where).free_bytes(), footprint=fp,
    )  # fmt: skip


def stored_per_sample(spec: ArchiveSpec, captured: Any, bsz: int) -> dict[str, int]:
    """Bytes per sample of each array as stored: dense arrays at the archive's maximum
    lengths (a ragged batch is padded), sparse ones as captured (values + indices)."""
    if spec.sparse_topk is not None or not spec.arrays:
        return {n: stored_nbytes({n: v}) // bsz for n, v in captured.items()}
    itemsize = 4 if spec.dtype == "float32" else 2
    return {n: int(np.prod(hts)) * itemsize for n, hts in spec.arrays.items()}

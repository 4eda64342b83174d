"""What a new archive holds besides its token layout: the typed options of
:meth:`ArchiveWriter.create <attnscope.store.ArchiveWriter.create>`."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from attnscope.errors import ConfigError
from attnscope.store.backends.base import choose_chunks

__all__ = ["ArchiveSpec", "batch_chunk_samples", "resolve_spec"]


@dataclass(frozen=True)
class ArchiveSpec:
    """Options of a new archive (all stored in its root metadata).

    Field meanings are those of :meth:`ArchiveWriter.create`, which takes either a spec or
    the same names as keywords.
    """

    format: str | None = None  # "zarr" | "hdf5"; default from the path suffix
    dtype: str = "float16"  # stored dtype, one of contracts.DTYPES
    model_config: dict | None = None  # JSON, stored verbatim
    capture: dict | None = None  # JSON: the capture settings
    heads: dict[str, list[int]] | None = None  # array name -> original head indices kept
    tags: dict | None = None  # JSON: user tags, in the provenance
    seed: int | None = None  # random seed of the run, in the provenance
    compressor: str = "zstd"  # one of contracts.COMPRESSORS
    level: int | None = None  # compression level; None: the compressor's default (contracts)
    validate: bool = True  # check every appended batch (NaN/Inf, negatives, row sums)
    normalized: bool | None = None  # rows are softmax rows (verify checks sums); default validate
    tolerance: float | None = None  # allowed |row sum - 1|; default by dtype
    capacity: int | None = None  # pre-size N (concurrent disjoint-range writers)
    sparse_topk: int | None = None  # keep only the top-k keys of each query row
    arrays: Mapping[str, tuple[int, int, int]] | None = None  # name -> (H, T, S) created now
    chunk_samples: int | None = None  # force samples per chunk
    batch_size: int | None = None  # appends come in batches of this size (chunk policy)
    query_block: int | None = None  # rows come in blocks of this size (BatchStream; chunk policy)
    # side ("encoder"/"decoder") -> maximum tokens: a ragged archive (schema 2) whose
    # batches may be shorter (padded by the writer) and which stores per-sample masks;
    # each maximum must equal that side's layout length
    max_lengths: Mapping[str, int] | None = None
    # side -> ascending unique query rows kept (a capture row policy): every array whose
    # query side is named stores only those rows, (N, H, R, S); None: every row
    query_rows: Mapping[str, Sequence[int]] | None = None


def batch_chunk_samples(
    arrays: Mapping[str, tuple[int, int, int]], dtype: str, batch_size: int
) -> int:
    """Samples per chunk for archives appended to in batches of ``batch_size``: the default
    chunking's choice, cut to divide the batch size.

    A chunk filled by one append is compressed once; one that straddles appends is re-read
    and re-compressed by each of them. Dividing the batch size also keeps multi-process
    ranks (which start at batch boundaries) on separate chunks.
    """
    itemsize = 4 if dtype == "float32" else 2
    return math.gcd(min(choose_chunks(*v, itemsize)[0] for v in arrays.values()), batch_size)


def resolve_spec(spec: ArchiveSpec | None, options: Mapping[str, Any], fmt: str) -> ArchiveSpec:
    """``spec`` with keyword overrides, and the chunk policy of ``fmt`` applied."""
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(ArchiveSpec)})
    if unknown:
        names = sorted(f.name for f in dataclasses.fields(ArchiveSpec))
        raise ConfigError(f"unknown archive option(s) {unknown}; expected some of {names}")
    spec = dataclasses.replace(spec or ArchiveSpec(), **options)
    if fmt == "hdf5":
        if spec.chunk_samples not in (None, 1):
            warnings.warn(
                f"chunk_samples={spec.chunk_samples} ignored: HDF5 archives keep one sample "
                "per chunk so that committed data is never rewritten in place",
                stacklevel=3,
            )
        return dataclasses.replace(spec, chunk_samples=1)
    if spec.chunk_samples is None and spec.batch_size and spec.arrays:
        if isinstance(spec.batch_size, bool) or int(spec.batch_size) < 1:
            raise ConfigError(f"batch_size must be an int >= 1 or None, got {spec.batch_size!r}")
        cs = batch_chunk_samples(spec.arrays, spec.dtype, int(spec.batch_size))
        return dataclasses.replace(spec, chunk_samples=cs)
    return spec

"""Multi-process capture: one rank's contiguous share of the batches of one Zarr archive."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnscope.capture.options import CaptureOptions
from attnscope.errors import AttnscopeError, CaptureError, ConfigError
from attnscope.store import ArchiveSpec, ArchiveWriter, TokenLayout, open_archive

__all__ = ["Shard", "shard_for"]


@dataclass(frozen=True)
class Shard:
    """One rank's contiguous share of the batches, and how it joins the shared archive."""

    rank: int
    n_batches: int  # batches of the whole job, over all ranks
    first_batch: int  # first batch this rank runs
    stop_batch: int  # one past the last batch this rank runs
    total: int | None  # samples of the whole job, when known
    wait_s: float  # how long ranks > 0 wait for rank 0 to create the archive

    def owns(self, batch_index: int) -> bool:
        return self.first_batch <= batch_index < self.stop_batch

    def open_writer(
        self,
        path: Path,
        layout: TokenLayout,
        spec: ArchiveSpec,
        check: Callable[[dict[str, Any]], None],
    ) -> ArchiveWriter:
        """Rank 0 creates the archive at full capacity; every rank then opens its range.

        ``check(metadata)`` runs on the archive before this rank writes to it (the archive
        may be one of an earlier, interrupted job).
        """
        bsz = int(spec.batch_size or 1)
        capacity = self.total if self.total is not None else self.n_batches * bsz
        if self.rank == 0 and not path.exists():
            spec = dataclasses.replace(spec, capacity=capacity)
            ArchiveWriter.create(path, layout, spec).close()
        deadline = time.monotonic() + self.wait_s
        while (meta := _created(path)) is None:
            if time.monotonic() > deadline:
                raise CaptureError(
                    f"rank {self.rank}: archive {path} was not created by rank 0 within "
                    f"{self.wait_s} s"
                )
            time.sleep(0.2)
        check(meta)
        a = self.first_batch * bsz
        return ArchiveWriter.open(path, sample_range=(a, min(capacity, self.stop_batch * bsz)))


def _created(path: Path) -> dict[str, Any] | None:
    """The archive's metadata once rank 0 has created its arrays, else None."""
    try:
        with open_archive(path) as arch:
            return arch.metadata if arch.arrays() else None
    except AttnscopeError:
        return None


def shard_for(batches: Any, opts: CaptureOptions) -> Shard | None:
    """This process's share of ``batches``, or None for a single-process capture."""
    if not opts.sharded:
        return None
    try:
        n = len(batches)
    except TypeError:
        raise ConfigError(
            "multi-process capture needs batches with a len() (e.g. a list or DataLoader), "
            f"got {type(batches).__name__}"
        ) from None
    if opts.sample_ids is not None:
        raise ConfigError("sample_ids are not supported in multi-process capture yet")
    rank, world = int(opts.rank), int(opts.world_size)  # type: ignore[arg-type]
    return Shard(rank, n, rank * n // world, (rank + 1) * n // world, opts.total, opts.wait_s)

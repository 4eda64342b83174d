"""Multi-process capture: one rank's contiguous share of the batches of one Zarr archive."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnscope.capture.identity import CaptureIdentity
from attnscope.capture.options import CaptureOptions
from attnscope.errors import ArchiveLockedError, AttnscopeError, CaptureError, ConfigError
from attnscope.store import (
    ArchiveSpec,
    ArchiveWriter,
    TokenLayout,
    holds_no_data,
    open_archive,
)

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
        identity: CaptureIdentity,
    ) -> ArchiveWriter:
        """Rank 0 creates the archive at full capacity; every rank then opens its range.

        Before this rank writes to it (the archive may be one of an earlier, interrupted
        job), it runs what a resume checks on the archive: ``identity`` (options, model
        config and weights), the token layout and the batch size, refused in one line
        naming the rank (the job compares the committed inputs batch by batch).

        The archive is ready for the ranks once its root metadata lists its arrays (the
        last step of creating it) and its creator's whole-archive lease is released: until
        then a rank waits, up to ``wait_s``. A rank restarted after a kill rejoins the same
        way and resumes after its own committed samples; rank 0 redoes a creation that was
        killed before it completed.
        """
        bsz = int(spec.batch_size or 1)
        capacity = self.total if self.total is not None else self.n_batches * bsz
        if self.rank == 0:
            state = _creation(path)
            if state != "made":
                spec = dataclasses.replace(spec, capacity=capacity)
                ArchiveWriter.create(path, layout, spec, overwrite=state == "redo").close()
        rng = (self.first_batch * bsz, min(capacity, self.stop_batch * bsz))
        deadline = time.monotonic() + self.wait_s
        why = "it was not created by rank 0"
        while True:
            meta, err = _created(path)
            if meta is not None:
                self._check(meta, identity, layout, bsz)
                self._check_world(meta, bsz)
                try:
                    return ArchiveWriter.open(path, sample_range=rng)
                except ArchiveLockedError as e:
                    if not e.whole:  # another process runs this rank's samples
                        raise ArchiveLockedError(
                            f"rank {self.rank}: {e} (two processes given rank {self.rank}? "
                            "expected one process per rank)"
                        ) from None
                    why = f"a whole-archive writer still holds it ({e})"
            elif err is not None:
                why = f"it is not readable yet ({err})"
            if time.monotonic() > deadline:
                raise CaptureError(
                    f"rank {self.rank}: archive {path} was not ready within {self.wait_s} s: "
                    f"{why}"
                )
            time.sleep(0.2)

    def created_meta(self, path: Path) -> dict[str, Any]:
        """The root metadata of the archive rank 0 created, waiting for it up to
        ``wait_s`` (how ranks > 0 learn what rank 0 decided, e.g. a ragged archive's
        maxima)."""
        deadline = time.monotonic() + self.wait_s
        while True:
            meta, err = _created(path)
            if meta is not None:
                return meta
            if time.monotonic() > deadline:
                why = "it was not created by rank 0" if err is None else f"{err}"
                raise CaptureError(
                    f"rank {self.rank}: archive {path} was not ready within {self.wait_s} s: "
                    f"{why}"
                )
            time.sleep(0.2)

    def _check_world(self, meta: dict[str, Any], bsz: int) -> None:
        """Refuse a world size that does not match the ranks the archive was made for
        (its capacity and the sample ranges its ranks committed)."""
        cap = meta.get("capacity")
        want = self.total if self.total is not None else self.n_batches * bsz
        if isinstance(cap, int) and cap != want:
            raise ConfigError(
                f"rank {self.rank}: the archive holds {cap} samples but this run's batches "
                f"give {want}; rejoin with the batches that made it"
            )
        found = sorted(_ranges(meta))
        mine = (self.first_batch * bsz, min(want, self.stop_batch * bsz))
        bad = [r for r in found if r != mine and r[0] < mine[1] and mine[0] < r[1]]
        if bad:
            raise ConfigError(
                f"rank {self.rank}: world size does not match the archive's shards: this "
                f"rank's samples {_show(mine)} overlap the committed shard {_show(bad[0])} of "
                f"another rank (shards found: {', '.join(map(_show, found))}); rejoin with "
                "the world size (--world-size) that wrote the archive"
            )


    def _check(
        self, meta: dict[str, Any], identity: CaptureIdentity, layout: TokenLayout, bsz: int
    ) -> None:
        have = meta.get("batch_size")
        try:
            identity.check(meta)
            CaptureIdentity.check_layout(meta, layout)
            if isinstance(have, int) and have != bsz:
                raise ConfigError(
                    f"resume: batch size differs: archive has {have}, this run's batches "
                    f"have {bsz}; rejoin with the batch size (--batch-size {have}) and "
                    "inputs that wrote the archive"
                )
        except ConfigError as e:
            raise ConfigError(f"rank {self.rank}: {e}") from None


def _show(r: tuple[int, int]) -> str:
    return f"[{r[0]}, {r[1]})"


def _ranges(meta: dict[str, Any]) -> list[tuple[int, int]]:
    """Sample ranges of the range writers (ranks) that committed to the archive."""
    out = []
    for rid, rec in (meta.get("commits") or {}).items():
        if rid.startswith("range-") and len(rec) == 3 and int(rec[2]) > 0:
            out.append((int(rec[0]), int(rec[1])))
    return out


def _creation(path: Path) -> str:
    """Rank 0's view of ``path``: ``"new"`` (nothing, or only the debris of a creation
    killed before its root metadata), ``"redo"`` (an archive whose creation was killed
    before its arrays were listed: nothing was committed to it), or ``"made"``."""
    if not path.exists() or holds_no_data(path):
        return "new"
    meta, _err = _created(path)
    if meta is not None:
        return "made"
    try:
        with open_archive(path) as arch:
            empty = not arch.metadata.get("arrays") and not any(
                c > 0 for _a, _b, c in arch.commits.values()
            )
    except AttnscopeError:
        return "made"  # not ours to replace: opening it reports what is wrong
    return "redo" if empty else "made"


def _created(path: Path) -> tuple[dict[str, Any] | None, AttnscopeError | None]:
    """``(metadata, None)`` once rank 0 has created the archive (its root metadata lists
    its arrays), else ``(None, the error of opening it, if any)``."""
    try:
        with open_archive(path) as arch:
            meta = arch.metadata
            return (meta if meta.get("arrays") and arch.arrays else None), None
    except AttnscopeError as e:
        return None, e


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

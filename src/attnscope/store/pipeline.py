"""The write pipeline behind :meth:`ArchiveWriter.submit`: batches are written and committed
by a background thread while the caller prepares the next ones.

Stages, each overlapping the others::

    caller thread     validate, cast, plan the boxes of batch k+1          (ArchiveWriter)
    committer thread  batches k..k+m queued: coalesce their boxes per array, region
                      digests, one write_many (the backend's encoder pool fans the chunks
                      out over every core), one log document, one commit record
    encoder pool      zstd + file writes, chunk by chunk (codecs release the GIL)

Commits stay in order and one commit never covers a batch whose data is not written:
a kill at any moment leaves the archive at its last commit record. Several batches
that are queued together are committed by one record (a *group commit*), which is what
makes tiny batches cheap: the fixed cost of a commit (a log document and an atomic
record replace) is paid once per group, not once per batch.

Host memory is bounded: batches being written or waiting hold at most ``max_bytes`` of
data (a single larger batch is admitted alone); :meth:`put` blocks until it fits.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnscope.errors import ArchiveError, ConfigError
from attnscope.store.backends.base import Write

__all__ = ["INFLIGHT_MB", "PendingBatch", "WritePipeline", "coalesce", "data_writes", "run_options"]

#: default bound on the data of batches in flight, MiB (``inflight_mb``)
INFLIGHT_MB = 512
#: batches one group commit may cover at most (bounds the latency of the first of them)
MAX_GROUP = 64


@dataclass
class PendingBatch:
    """One batch handed to the pipeline: samples ``[pos, end)`` and every box it writes."""

    pos: int
    end: int
    writes: list[Write]
    nbytes: int = 0
    extra_regions: list = field(default_factory=list)  # digests of boxes already written


def coalesce(writes: Sequence[Write]) -> list[Write]:
    """Merge consecutive boxes of one array that continue each other along samples.

    Box ``[a, b)`` followed by ``[c, d)`` with ``a <= c < b <= d`` and the same other
    sides (the second may start with the in-memory tail of the first's last chunk) become
    one box ``[a, d)``: a chunk shared by two batches is then encoded and written once.
    Each merged box is concatenated once (pieces are collected first).
    """
    boxes: list[list[Any]] = []  # [handle, sel, pieces]; pieces: arrays placed end to end
    last: dict[int, int] = {}  # id(handle) -> index in boxes of its latest box
    for h, sel, data in writes:
        i = last.get(id(h))
        if i is not None:
            _h, sel0, pieces = boxes[i]
            a, b, c = sel0[0].start, sel0[0].stop, sel[0].start
            # only a box that starts inside the previous one (a shared chunk's tail) is
            # merged: boxes that meet on a chunk boundary are written as they are (no copy)
            if sel0[1:] == sel[1:] and a <= c < b <= sel[0].stop:
                if c < b:  # drop the samples [c, b) the new box brings again
                    keep = pieces[-1].shape[0] - (b - c)
                    pieces[-1] = pieces[-1][:keep]
                pieces.append(data)
                boxes[i][1] = (slice(a, sel[0].stop), *sel[1:])
                continue
        last[id(h)] = len(boxes)
        boxes.append([h, sel, [data]])
    return [
        (h, sel, pieces[0] if len(pieces) == 1 else np.concatenate(pieces))
        for h, sel, pieces in boxes
    ]


class WritePipeline:
    """A committer thread that writes queued batches in order and commits them in groups.

    ``write(group)`` writes the boxes of a list of batches and commits them (called in
    the committer thread; see :meth:`ArchiveWriter._write_group`); ``max_bytes`` bounds
    the data of batches queued or being written.
    """

    def __init__(
        self, write: Callable[[list[PendingBatch]], None], max_bytes: int, *, inline: bool = False
    ) -> None:
        # a weak reference: a writer dropped unclosed is collected (and releases its lock)
        self._write = weakref.WeakMethod(write)  # type: ignore[arg-type]
        self.max_bytes = int(max_bytes)
        # inline: each batch is written in the caller's thread (HDF5: h5py runs one call at
        # a time under its global lock and encodes in C holding the GIL, so a second thread
        # would overlap nothing; one thread also keeps a failed file's handling simple)
        self.inline = inline
        self._queue: deque[PendingBatch] = deque()
        self._cv = threading.Condition()
        self._inflight = 0  # bytes queued or being written
        self.peak_bytes = 0  # the most bytes ever in flight (the bound's witness in tests)
        self._busy = False
        self._error: BaseException | None = None
        self._closed = False  # set by close(): nothing more is put
        self.raised = False  # the error reached the caller once
        self._thread: threading.Thread | None = None

    def put(self, batch: PendingBatch) -> None:
        """Queue ``batch``; blocks while the bytes in flight would exceed the bound."""
        if self.inline:
            self._raise()
            self.peak_bytes = max(self.peak_bytes, batch.nbytes)
            write = self._write()
            assert write is not None
            try:
                write([batch])
            except BaseException as e:
                self._error, self.raised = e, True
                raise
            return
        with self._cv:
            self._raise()
            while self._inflight and self._inflight + batch.nbytes > self.max_bytes:
                self._cv.wait()
                self._raise()
            self._queue.append(batch)
            self._inflight += batch.nbytes
            self.peak_bytes = max(self.peak_bytes, self._inflight)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="attnscope-commit", daemon=True
                )
                self._thread.start()
            self._cv.notify_all()

    def wait(self) -> None:
        """Return once every queued batch is committed; raise the pipeline's error if any."""
        with self._cv:
            while (self._queue or self._busy) and self._error is None:
                self._cv.wait()
            self._raise()

    @property
    def failed(self) -> BaseException | None:
        return self._error

    def _raise(self) -> None:
        if self._error is not None:
            self.raised = True
            raise self._error

    def close(self) -> None:
        """Write what is queued and let the thread end (errors stay for :meth:`wait`)."""
        with self._cv:
            self._closed = True
            while self._thread is not None:
                self._cv.wait()

    def _loop(self) -> None:
        # Runs while batches are queued, then ends (a new one starts with the next put):
        # an idle writer holds no thread.
        while True:
            with self._cv:
                if not self._queue:
                    self._thread = None
                    self._cv.notify_all()
                    return
                group = [self._queue.popleft() for _ in range(min(MAX_GROUP, len(self._queue)))]
                self._busy = True
            try:
                write = self._write()
                if write is None:
                    raise ArchiveError("the archive writer was dropped with batches queued")
                write(group)
                del write
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                with self._cv:
                    self._error = e
                    self._queue.clear()
                    self._inflight = 0
                    self._busy = False
                    self._thread = None
                    self._cv.notify_all()
                return
            with self._cv:
                self._inflight -= sum(b.nbytes for b in group)
                self._busy = False
                self._cv.notify_all()


def run_options(options: dict[str, Any]) -> dict[str, Any]:
    """Pop the options of this run (not of the archive) from ``options``, checked."""
    workers = options.pop("workers", None)
    inflight = options.pop("inflight_mb", None)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):  # fmt: skip
        raise ConfigError(f"workers must be an int >= 1 or None (one per core), got {workers!r}")
    if inflight is not None and (isinstance(inflight, bool) or not inflight > 0):
        raise ConfigError(f"inflight_mb must be a number > 0 or None, got {inflight!r}")
    return {"workers": workers, "inflight_mb": inflight}


def data_writes(
    nodes: dict[str, Any], tails_now: dict[tuple[str, str], tuple[int, np.ndarray]],
    prepared: dict[str, dict[str, np.ndarray]], pos: int, end: int,
) -> tuple[list[Write], dict[tuple[str, str], tuple[int, np.ndarray] | None]]:  # fmt: skip
    """The boxes of one batch's attention (samples ``[pos, end)``) and the new tails.

    Where a chunk holds several samples, each box starts with the in-memory copy of the
    writer's own samples already in the last, partly filled chunk (``tails_now``), so the
    backend writes whole chunks instead of reading the chunk back, decoding it and merging
    (read-modify-write); the returned tails are those the next batch will need (None: the
    batch ends on a chunk boundary).
    """
    writes: list[Write] = []
    tails: dict[tuple[str, str], tuple[int, np.ndarray] | None] = {}
    for name, parts in prepared.items():
        for part, handle in nodes[name].handles.items():
            cs = handle.chunks[0]
            data, lo = parts[part], pos
            key = (name, part)
            if cs > 1 and handle.merge_tails:
                tail = tails_now.get(key)
                if tail is not None and pos % cs and tail[0] + len(tail[1]) == pos:
                    data, lo = np.concatenate([tail[1], data]), tail[0]
                c0 = end - end % cs
                tails[key] = (c0, data[c0 - lo :].copy()) if end % cs and c0 >= lo else None
            sel = (slice(lo, end),) + tuple(slice(0, d) for d in data.shape[1:])
            writes.append((handle, sel, data))
    return writes, tails

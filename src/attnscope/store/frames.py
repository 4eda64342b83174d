"""Camera frames stored with the samples: ``_frames/<camera>`` ``(N, h, w, 3)`` uint8.

A frame is what the camera saw when the sample was captured, so an overlay can be drawn
over it without a folder of PNGs (docs/archive-format.md, Frames). Each camera is one array,
one sample per chunk (zstd), written by :meth:`ArchiveWriter.append` with the batch's
weights and visible only once the batch's commit record is written: a crash before the
commit leaves the frames of the uncommitted samples invisible, exactly like their weights.

:func:`attnscope.store.attach.attach_frames` adds a camera to an archive whose samples
are already committed (a capture that did not pass frames): its array is written with
``complete: false``, marked complete only after every frame is written, so a crash in
between hides the camera.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from attnscope.contracts import FRAMES
from attnscope.errors import ConfigError, SelectionError, ShapeError
from attnscope.store.backends.base import ArrayHandle, Backend, Write
from attnscope.store.codecs import as_numpy

__all__ = ["FrameStore", "frame_cameras", "frame_handle", "frame_path"]

_DIMS = ("sample", "y", "x", "channel")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: array attribute of a camera added by attach_frames; False until every frame is written
COMPLETE = "complete"


def frame_path(camera: str) -> str:
    return f"{FRAMES}/{camera}"


def _check_frames(camera: Any, arr: Any, n: int | None) -> np.ndarray:
    """One camera's frames as ``(B, h, w, 3)`` uint8, or a one-line error."""
    if not isinstance(camera, str) or not _NAME.match(camera):
        raise ConfigError(
            f"camera name {camera!r} is not valid; expected letters, digits, '_', '.' or '-'"
        )
    x = as_numpy(arr)
    if x.ndim != 4 or x.shape[3] != 3 or 0 in x.shape:
        raise ShapeError(f"frames[{camera!r}] has shape {x.shape}; expected (B, h, w, 3)")
    if x.dtype != np.uint8:
        raise ShapeError(f"frames[{camera!r}] has dtype {x.dtype}; expected uint8 (0-255 RGB)")
    if n is not None and x.shape[0] != n:
        raise ShapeError(f"frames[{camera!r}] has {x.shape[0]} frames; expected {n}, one a sample")
    return np.ascontiguousarray(x)


class FrameStore:
    """Writes a batch's frames beside its weights (before its commit)."""

    def __init__(self, backend: Backend, meta: Mapping[str, Any]) -> None:
        self._b = backend
        self._capacity = int(meta.get("capacity") or 0)
        self._handles: dict[str, ArrayHandle] = {}
        self.cameras = set(backend.list_children(FRAMES))

    def prepare(
        self, frames: Mapping[str, Any] | None, bsz: int, committed: int
    ) -> dict[str, np.ndarray]:
        """Check a batch's frames: ``bsz`` per camera, the cameras and frame sizes of the
        samples already committed (no gaps)."""
        got = {c: _check_frames(c, x, bsz) for c, x in (frames or {}).items()}
        if (committed or self.cameras) and set(got) != self.cameras:
            raise ShapeError(
                f"frames of this batch (cameras {sorted(got) or 'none'}) differ from those of "
                f"the {committed} samples already committed ({sorted(self.cameras) or 'none'}); "
                "pass the same cameras with every batch"
            )
        for cam, x in got.items():
            h = self._handle(cam, x, 0)
            if tuple(h.shape[1:]) != x.shape[1:]:
                raise ShapeError(
                    f"frames[{cam!r}] are {x.shape[1:]}; the archive stores {tuple(h.shape[1:])}"
                )
        return got

    def _handle(self, cam: str, x: np.ndarray, end: int) -> ArrayHandle:
        h = self._handles.get(cam)
        if h is None and self._b.has(frame_path(cam)):
            h = self._handles[cam] = self._b.get_array(frame_path(cam))
        if h is None:
            if end == 0:  # called from prepare(): nothing stored yet, nothing to compare
                return _Shape(x)  # type: ignore[return-value]
            h = self._handles[cam] = self._b.create_array(
                frame_path(cam), (max(end, self._capacity), *x.shape[1:]),
                (1, *x.shape[1:]), np.dtype(np.uint8), dims=_DIMS, compressor="zstd",
            )
            self.cameras.add(cam)
        return h

    def writes(self, frames: Mapping[str, np.ndarray], pos: int, end: int) -> list[Write]:
        """The boxes of this batch's frames; nothing here commits."""
        out: list[Write] = []
        for cam, x in frames.items():
            h = self._handle(cam, x, end)
            if h.shape[0] < end:
                h.resize(max(end, 2 * h.shape[0]))
            out.append((h, (slice(pos, end), *(slice(0, d) for d in x.shape[1:])), x))
        return out


class _Shape:
    """Stand-in handle for a camera not stored yet (its shape is the batch's)."""

    def __init__(self, x: np.ndarray) -> None:
        self.shape = x.shape


def frame_cameras(backend: Backend) -> list[str]:
    """Cameras with stored (complete) frames."""
    return [c for c in backend.list_children(FRAMES)
            if backend.get_attrs(frame_path(c)).get(COMPLETE, True)]


def frame_handle(backend: Backend, camera: str, sample: Any, n: int) -> ArrayHandle | None:
    """The stored frames of ``camera`` holding ``sample`` (of ``n`` committed); None when
    not stored (or left incomplete)."""
    if isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or not (
            0 <= sample < n):
        raise SelectionError(f"sample {sample!r} out of range: samples are 0..{n - 1}")
    h = backend.get_array(frame_path(camera)) if camera in frame_cameras(backend) else None
    return h if h is not None and h.shape[0] > sample else None

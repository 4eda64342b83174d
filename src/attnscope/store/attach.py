"""Adding camera frames to an archive whose samples are already committed."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from attnscope.errors import ConfigError, ShapeError
from attnscope.store.frames import _DIMS, COMPLETE, _check_frames, frame_cameras, frame_path
from attnscope.store.writer import ArchiveWriter

__all__ = ["attach_frames"]


def attach_frames(path: str | os.PathLike, camera: str, frames: Any) -> None:
    """Store ``frames`` ``(N, h, w, 3)`` uint8 of ``camera`` for the ``N`` committed samples
    of the archive at ``path`` (under the writer lease; refused when the camera exists).

    Examples
    --------
    >>> attach_frames("run.zarr", "agentview", frames)  # doctest: +SKIP
    """
    w = ArchiveWriter.open(path)
    try:
        b = w._backend
        assert b is not None
        x = _check_frames(camera, frames, w.committed)
        if camera in frame_cameras(b):
            raise ConfigError(f"{str(path)!r} already stores frames of camera {camera!r}")
        if b.has(frame_path(camera)):  # left incomplete by a crash: written again
            h = b.get_array(frame_path(camera))
            if tuple(h.shape) != x.shape:
                h.resize(x.shape[0])
            if tuple(h.shape) != x.shape:
                raise ShapeError(f"frames are {x.shape}; the stored ones {tuple(h.shape)}")
        else:
            h = b.create_array(frame_path(camera), x.shape, (1, *x.shape[1:]),
                               np.dtype(np.uint8), dims=_DIMS, attrs={COMPLETE: False},
                               compressor="zstd")
        b.write_many([(h, tuple(slice(0, d) for d in x.shape), x)])
        b.flush()
        b.set_attrs(frame_path(camera), {COMPLETE: True})
    finally:
        w.close()

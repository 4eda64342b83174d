"""The writer thread of a capture job: appends captured batches behind a bounded queue."""

from __future__ import annotations

import errno
import queue
import threading
from typing import Any

import numpy as np
import torch

from attnscope.capture.recorder import Captured
from attnscope.errors import AttnscopeError, CaptureError
from attnscope.store import ArchiveWriter
from attnscope.store.stream import BatchStream, relayout

__all__ = ["WriterThread", "storage_error", "stored_nbytes", "to_host"]


class WriterThread:
    """Append batches to ``writer`` from a background thread.

    :meth:`put` blocks while ``depth`` batches wait, so host memory stays bounded however
    many batches run. The first error of the thread is kept, the queue is drained so the
    producer never blocks, and :meth:`raise_if_failed` re-raises it in the producer.
    """

    def __init__(self, writer: ArchiveWriter, depth: int) -> None:
        self.writer = writer
        self.bytes = 0  # uncompressed bytes written, counted in the stored dtype
        self.samples = 0  # samples written
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stream: BatchStream | None = None  # the streamed batch being written

    def put(
        self,
        arrays: Captured,
        ids: dict[str, np.ndarray] | None,
        fence: Any,
        *,
        masks: dict[str, np.ndarray] | None = None,
        tokens: dict[str, dict[str, Any]] | None = None,
        layout: Any = None,
    ) -> None:
        """Queue one batch (blocks while the queue is full).

        ``masks`` (side -> ``(B, L_b)`` bool) and ``tokens`` (side -> ``{"labels", "ids"}``)
        go with the batch's ``append``: the store checks them there, before writing.
        ``layout``: the archive's first batch's full layout (see :meth:`commit_stream`).
        """
        self._start()
        self._queue.put(("batch", arrays, ids, fence, masks, tokens, layout))

    def put_block(
        self, bsz: int, name: str, r0: int, data: Any, fence: Any, t: int, masks: Any = None
    ) -> None:
        """Queue rows ``[r0, r0 + rb)`` of array ``name`` (``t`` rows) of a streamed batch.

        The first block of a batch starts a :class:`~attnscope.store.stream.BatchStream` of
        ``bsz`` samples (``masks``: its real tokens per side, for a ragged archive); at most
        ``depth`` blocks wait, so host memory stays one block deep.
        """
        self._start()
        self._queue.put(("block", bsz, name, r0, data, fence, t, masks))

    def commit_stream(
        self, bsz: int, arrays: Captured, ids: dict[str, np.ndarray] | None, fence: Any, *,
        tokens: dict[str, dict[str, Any]] | None = None, layout: Any = None,
    ) -> None:  # fmt: skip
        """Queue the end of a streamed batch: its whole arrays, ids and tokens, then commit.

        ``layout``: the full token layout, for a first batch whose archive was created
        before every layer had run (see :func:`attnscope.store.stream.relayout`).
        """
        self._start()
        self._queue.put(("commit", bsz, arrays, ids, fence, tokens, layout))

    def _start(self) -> None:
        self.raise_if_failed()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="attnscope-writer", daemon=True)
            self._thread.start()

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Write what is queued, commit it, and stop the thread (the archive writer stays
        open); a write error of the last batches is kept for :meth:`raise_if_failed`."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._error is None:
            try:
                self.writer.flush()
            except BaseException as e:  # noqa: BLE001 - re-raised by raise_if_failed
                self._error = self._as_error(e)

    def _as_error(self, e: BaseException) -> BaseException:
        if isinstance(e, OSError) and not isinstance(e, AttnscopeError):
            try:  # the count the message gives is final: no batch is still in flight
                self.writer.flush()
            except BaseException:  # noqa: BLE001, S110 - the error at hand is the one to report
                pass
            return storage_error(e, self.writer.path, self.writer.committed)
        return e

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain after an error so the producer never blocks
            try:
                self._do(item)
            except BaseException as e:  # noqa: BLE001 - re-raised in the producer thread
                self._stream = None
                self._error = self._as_error(e)


    def _do(self, item: tuple) -> None:
        kind, *rest = item
        if kind == "batch":
            arrays, ids, fence, masks, tokens, layout = rest
            if fence is not None:
                fence.synchronize()
            if layout is not None and not self.writer.committed:
                relayout(self.writer, layout)
            # handed to the store's write pipeline: encoded and committed in the
            # background, several batches at once, while the next batch is captured
            self.writer.submit(to_host(arrays), sample_ids=ids, masks=masks, tokens=tokens)
            self.bytes += stored_nbytes(arrays)
            self.samples += _n_samples(next(iter(arrays.values())))
            return
        if self._stream is None:
            self._stream = self.writer.stream(rest[0], rest[-1] if kind == "block" else None)
        if kind == "block":
            _bsz, name, r0, data, fence, t, _masks = rest
            if fence is not None:
                fence.synchronize()
            self._stream.put(name, r0, _host(data), n_rows=t)
            self.bytes += stored_nbytes({name: data})
            return
        bsz, arrays, ids, fence, tokens, layout = rest
        if fence is not None:
            fence.synchronize()
        if layout is not None and not self.writer.committed:
            relayout(self.writer, layout)
        for name, data in to_host(arrays).items():
            self._stream.put(name, 0, data)
        self.bytes += stored_nbytes(arrays)
        stream, self._stream = self._stream, None
        stream.commit(sample_ids=ids, tokens=tokens)
        self.samples += bsz


# errno -> (what happened, what to do); the committed samples are safe either way
_ADVICE = {
    errno.ENOSPC: ("disk full", "free space"),
    errno.EDQUOT: ("disk quota exceeded", "free space (or raise the quota)"),
    errno.EROFS: ("read-only file system", "remount it read-write"),
    errno.EACCES: ("permission denied", "make the output path writable"),
    errno.EPERM: ("operation not permitted", "make the output path writable"),
    errno.ELOOP: ("symbolic link loop in the output path", "fix the link or choose another --out"),
    errno.ENOTDIR: (
        "a part of the output path is a file, not a folder",
        "choose an --out inside a folder",
    ),
    errno.EFBIG: (
        "file too large (the file-size limit, ulimit -f)",
        "raise the limit, or write a Zarr archive (one file per chunk)",
    ),
    errno.EIO: ("input/output error", "check the disk"),
}


# error codes of object stores (botocore's ClientError codes) whose credentials stopped
# working mid-run, and of a bucket that is gone
_DENIED = frozenset({"AccessDenied", "InvalidAccessKeyId", "ExpiredToken", "ExpiredTokenException",
                     "InvalidToken", "InvalidClientTokenId", "SignatureDoesNotMatch",
                     "RequestExpired", "TokenRefreshRequired"})  # fmt: skip
_NO_BUCKET = frozenset({"NoSuchBucket"})


def _codes(e: BaseException) -> set[str]:
    """Exception type names and ``response["Error"]["Code"]`` values along ``e``'s causes."""
    out: set[str] = set()
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        out.add(type(cur).__name__)
        code = (getattr(cur, "response", None) or {}).get("Error", {}).get("Code")
        if isinstance(code, str):
            out.add(code)
        cur = cur.__cause__ or cur.__context__
    return out


def _remote_cause(e: OSError, url: str) -> tuple[str, str] | None:
    """``(what happened, what to do)`` for a failed write to object storage, or None."""
    from attnscope.store.backends.remote import bucket_of

    codes = _codes(e)
    text = " ".join(str(e).split())[:160]
    if codes & _NO_BUCKET or (isinstance(e, FileNotFoundError) and bucket_of(url)):
        return (f"bucket {bucket_of(url)!r} no longer exists ({text})",
                "restore the bucket (attnscope never creates buckets)")  # fmt: skip
    if codes & _DENIED or isinstance(e, PermissionError):
        return (f"access to the storage was refused mid-run ({text})",
                "renew the credentials (storage options key/secret/token, AWS_* or the "
                "profile)")  # fmt: skip
    return None


def storage_error(e: OSError, path: Any, committed: int) -> CaptureError:
    """A one-line error for a failed write: what the errno means (on object storage: a
    bucket that is gone, credentials that stopped working), what to do, and that the
    committed samples are safe (only disk full / quota advises freeing space)."""
    from attnscope.store.backends.location import locate

    what, todo = _ADVICE.get(e.errno or 0, (e.strerror or str(e), "fix the cause"))
    cause = _remote_cause(e, str(path)) if locate(path).remote else None
    if cause is not None:
        what, todo = cause
    if committed:
        then = (
            f"the {committed} samples committed before are safe: {todo} and run again "
            "with resume=True (attnscope capture ... --resume; a rank of a multi-process "
            "capture: its same command)"
        )
    else:
        then = f"no sample was committed: {todo} and run again (--resume if the archive exists)"
    no = "" if e.errno is None else f" ([Errno {e.errno}])"
    err = CaptureError(f"{what} while writing {str(path)!r}{no}; {then}")
    err.__cause__ = e
    return err


def stored_nbytes(arrays: Captured) -> int:
    """Bytes of the captured tensors in the dtype they are stored in.

    Counted on the torch tensors, not on the numpy arrays handed to the store: numpy has
    no bfloat16, so those are float32 and would count bfloat16 runs twice.
    """
    return sum(
        sum(t.numel() * t.element_size() for t in (v if isinstance(v, tuple) else (v,)))
        for v in arrays.values()
    )


def to_host(arrays: Captured) -> dict[str, Any]:
    """The captured (host) tensors as the numpy arrays / top-k dicts ``append`` takes."""
    return {n: _host(v) for n, v in arrays.items()}


def _host(v: Any) -> Any:
    if isinstance(v, tuple):
        return {"values": _numpy(v[0]), "indices": v[1].numpy()}
    return _numpy(v)


def _numpy(t: torch.Tensor) -> np.ndarray:
    # numpy has no bfloat16: hand bfloat16 to the store as float32 (it stores the declared dtype).
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _n_samples(v: Any) -> int:
    return int((v[0] if isinstance(v, tuple) else v).shape[0])

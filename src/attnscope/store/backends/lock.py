"""Writer leases: JSON lock files naming pid, host and sample range.

A directory archive keeps its locks in ``<archive>/.attnscope-locks/``; a file archive
(HDF5, zip) in a sidecar ``<archive>.attnscope-locks/``. Each writer owns one file:
``all.json`` for a whole-archive writer, ``range-<start>-<stop>.json`` for a
disjoint-range writer. The check-and-create step runs under ``flock`` on a mutex file
so two writers cannot both pass it. A lock whose pid is dead on this host is stale and
removed; a lock from another host is reported, never broken.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import uuid
from contextlib import contextmanager
from typing import Any

from attnscope.errors import ArchiveLockedError

__all__ = ["Lease", "lock_dir", "alive", "overlap", "lock_record"]

ALL = "all"
LOCK_DIR_NAME = ".attnscope-locks"
#: suffix of a file archive (HDF5) while it is created: renamed into place once complete
CREATING = ".attnscope-creating"


def lock_dir(path: str, *, inside: bool) -> str:
    """Where the locks of ``path`` live: inside a directory archive, else a sidecar."""
    path = os.path.abspath(path)
    if inside:
        return os.path.join(path, LOCK_DIR_NAME)
    return path + LOCK_DIR_NAME


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


MUTEX = ".mutex"


@contextmanager
def _mutex(d: str):  # type: ignore[no-untyped-def]
    """Hold the flock of ``d/.mutex``, creating the folder if needed.

    The last writer to leave removes the folder (see :meth:`Lease.release`), so after
    getting the lock check that the file is still the one at that path; if it was
    removed meanwhile, start again on a fresh one.
    """
    path = os.path.join(d, MUTEX)
    while True:
        os.makedirs(d, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        except FileNotFoundError:  # the folder went away between the two calls
            continue
        try:
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX)
            except ImportError:  # pragma: no cover - non-POSIX: best effort
                pass
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield
                return
        finally:
            os.close(fd)  # releases the flock


def overlap(a: tuple[int, int] | None, b: tuple[int, int] | None) -> bool:
    if a is None or b is None:
        return True
    return a[0] < b[1] and b[0] < a[1]


def lock_record(host: str, rng: tuple[int, int] | None) -> dict:
    """What a writer's lock file says: who holds it, since when, which samples, and a
    random token that tells this writer's record from a later one at the same name."""
    return {
        "pid": os.getpid(),
        "host": host,
        "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "range": None if rng is None else list(rng),
        "token": uuid.uuid4().hex,
    }


def lost_error(archive: str, file: str, found: Any) -> ArchiveLockedError:
    """The one line a writer raises when its lease record is gone or another writer's."""
    what = "is gone" if found is None else f"now names another writer (pid {found.get('pid')} " \
        f"on host {found.get('host')!r})"
    err = ArchiveLockedError(
        f"{archive!r}: this writer's lease {file} {what}; stopped before writing more (its "
        "committed batches are kept). Expected the lease to stay until close: do not delete "
        "the lock of a running writer"
    )
    err.whole = True
    return err


class Lease:
    """A held writer lock; :meth:`release` is idempotent."""

    def __init__(self, archive: str, sample_range: tuple[int, int] | None, *, inside: bool) -> None:
        self.archive = archive
        self.range = sample_range
        self.dir = lock_dir(archive, inside=inside)
        name = ALL if sample_range is None else f"range-{sample_range[0]}-{sample_range[1]}"
        self.file = os.path.join(self.dir, name + ".json")
        self.held = False
        self.token: str | None = None

    def check(self) -> None:
        """Raise :func:`lost_error` unless this writer's record is still in place (called
        before each group commit: a lock deleted by hand must not let two writers on)."""
        try:
            with open(self.file, encoding="utf-8") as fh:
                found = json.load(fh)
        except (OSError, ValueError):
            found = None
        if not isinstance(found, dict) or found.get("token") != self.token:
            raise lost_error(self.archive, self.file, found if isinstance(found, dict) else None)

    def acquire(self) -> Lease:
        me = socket.gethostname()
        with _mutex(self.dir):
            for fn in sorted(os.listdir(self.dir)):
                if not fn.endswith(".json"):
                    continue
                full = os.path.join(self.dir, fn)
                try:
                    with open(full, encoding="utf-8") as fh:
                        rec: dict[str, Any] = json.load(fh)
                    other = None if rec.get("range") is None else tuple(rec["range"])
                except (OSError, ValueError):
                    # Records are written atomically (below), so an unreadable one is debris
                    # of an older crash, not a live writer.
                    os.remove(full)
                    continue
                if (
                    rec.get("host") == me
                    and isinstance(rec.get("pid"), int)
                    and not alive(rec["pid"])
                ):
                    os.remove(full)  # stale: its writer died on this host
                    continue
                if overlap(self.range, other):  # type: ignore[arg-type]
                    want = (
                        "the whole archive" if self.range is None else f"samples {list(self.range)}"
                    )
                    held = "the whole archive" if other is None else f"samples {list(other)}"
                    err = ArchiveLockedError(
                        f"{self.archive!r} is locked: a writer (pid {rec.get('pid')} on host "
                        f"{rec.get('host')!r}, since {rec.get('since')}) holds {held}, and this "
                        f"writer wants {want}. Wait for it, open a disjoint sample_range, or "
                        f"delete {full!r} if that writer is gone."
                    )
                    err.whole = other is None
                    raise err
            rec = lock_record(me, self.range)
            self.token = rec["token"]
            tmp = f"{self.file}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(rec, fh)
            os.replace(tmp, self.file)  # under the mutex: never a torn record
        self.held = True
        return self

    def release(self) -> None:
        """Drop this writer's lock file; the last writer out removes the lock folder."""
        if not self.held:
            return
        self.held = False
        try:
            with _mutex(self.dir):
                try:
                    with open(self.file, encoding="utf-8") as fh:
                        mine = json.load(fh).get("token") == self.token
                    if mine:  # never another writer's record
                        os.remove(self.file)
                except (OSError, ValueError, AttributeError):
                    pass
                if set(os.listdir(self.dir)) <= {MUTEX}:
                    os.remove(os.path.join(self.dir, MUTEX))
                    os.rmdir(self.dir)
        except OSError:
            pass  # a read-only or vanished folder: the lock file is what mattered


def locks_inside(path: str, fmt: str) -> bool:
    """Whether the writer locks live inside the archive (a Zarr directory) or beside it."""
    return fmt == "zarr" and not path.lower().endswith(".zip")

"""Where an archive lives, resolved once at the door.

:func:`locate` turns what a user passed (``str``, ``pathlib.Path``, ``file://`` or fsspec URL)
into a :class:`Location`: :class:`LocalLocation` (an absolute path) or
:class:`RemoteLocation` (a normalised URL). The store's entry points (``open_archive``,
``ArchiveWriter``, ``verify``, ``info``, ``capture``) call it once; everything below asks the
location what to do (``exists``, ``holds_no_data``, ``lease``, ...) instead of asking
whether a string is a URL. :func:`locate` of a location returns it unchanged.

A location *is* its resolved string (a ``str`` subclass): messages, ``os.path`` calls and
zarr/h5py accept it as is, and ``repr`` shows the string, so errors read as before.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

from attnscope.errors import ArchiveCorruptError, ArchiveNotFoundError, ConfigError
from attnscope.store.backends import remote
from attnscope.store.backends.lock import CREATING, LOCK_DIR_NAME, Lease

__all__ = ["Location", "LocalLocation", "RemoteLocation", "locate"]

#: a root ``zarr.json`` being written (zarr's ``LocalStore``: temporary file, then rename)
_PARTIAL_ROOT = re.compile(r"zarr\.[0-9a-f]+\.partial")


class Location(str):
    """An archive's place: the resolved path or URL, and what can be done there."""

    remote: bool = False

    def __repr__(self) -> str:
        return str.__repr__(self)

    def __reduce__(self) -> tuple[Any, ...]:  # pickled to Dask workers and spawned ranks
        return (locate, (str(self),))

    @property
    def name(self) -> str:
        """The last component (``run.zarr``)."""
        return self.rstrip("/").rsplit("/", 1)[-1]

    def exists(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def holds_no_data(self) -> bool:  # pragma: no cover - abstract
        """Whether this is what a writer stopped before its first commit leaves behind."""
        raise NotImplementedError

    def sniff_format(self) -> str:  # pragma: no cover - abstract
        """``"zarr"`` or ``"hdf5"`` for the archive here, from what is stored."""
        raise NotImplementedError

    def lease(self, sample_range: tuple[int, int] | None, *, inside: bool) -> Any:
        """An unheld writer lease (``acquire()`` it) for ``sample_range`` (``None``: all)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def clear_except_locks(self) -> None:  # pragma: no cover - abstract
        """Delete the archive here, keeping its writer locks."""
        raise NotImplementedError

    def disk_size(self) -> int:  # pragma: no cover - abstract
        """Bytes stored here."""
        raise NotImplementedError

    def check_writable(self) -> str:  # pragma: no cover - abstract
        """Where the archive would be created, if this process may create it; a one-line
        :class:`ConfigError` otherwise. Creates nothing."""
        raise NotImplementedError

    def free_bytes(self) -> int | None:
        """Free space where the archive goes (``None``: unknown, e.g. object storage)."""
        return None

    def refuse_hdf5(self, fmt: str) -> None:
        """HDF5 (and zip) archives are local files: refused at a URL."""

    def no_data_message(self) -> str:
        """What :meth:`holds_no_data` means, for users: one line naming what is there."""
        return (
            f"{str(self)!r} holds no committed data: {self._no_data_what()}; re-run capture "
            "(create and --overwrite accept it)"
        )

    def _no_data_what(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


class LocalLocation(Location):
    """An absolute local path: atomic renames and ``flock`` leases."""

    def exists(self) -> bool:
        return os.path.exists(self)

    def holds_no_data(self) -> bool:
        if os.path.isdir(self):
            return self.empty_dir()
        return not os.path.exists(self) and os.path.isdir(self + LOCK_DIR_NAME)

    def empty_dir(self) -> bool:
        """A directory holding at most the lock folder, the temporary file of a root
        ``zarr.json`` (a writer killed while writing it), and a root ``zarr.json`` without
        attnscope metadata (a writer killed between creating the group and its metadata)."""
        names = {n for n in os.listdir(self) if not _PARTIAL_ROOT.fullmatch(n)}
        if not names <= {LOCK_DIR_NAME, "zarr.json"}:
            return False
        if "zarr.json" not in names:
            return True
        try:
            with open(os.path.join(self, "zarr.json"), "rb") as fh:
                return remote.bare_group(fh.read())
        except OSError:
            return False

    def _no_data_what(self) -> str:
        if os.path.isdir(os.path.join(self, LOCK_DIR_NAME)) or os.path.isdir(self + LOCK_DIR_NAME):
            return ("only the lock folder of a writer that stopped before its first commit (e.g. "
                    "a capture killed while loading the model)")  # fmt: skip
        if os.path.isdir(self) and not os.listdir(self):
            return "it is an empty folder"
        return "only the root group of a writer that stopped before its first commit"

    def sniff_format(self) -> str:
        if not os.path.exists(self):
            raise ArchiveNotFoundError(f"no archive at {str(self)!r}")
        if os.path.isdir(self):
            if not os.path.exists(os.path.join(self, "zarr.json")):
                raise ArchiveCorruptError(
                    f"{str(self)!r} is a directory without zarr.json: not an attnscope Zarr archive"
                )
            return "zarr"
        if self.lower().endswith(".zip"):
            return "zarr"
        with open(self, "rb") as fh:
            head = fh.read(8)
        if head == b"\x89HDF\r\n\x1a\n" or self.lower().endswith((".h5", ".hdf5")):
            return "hdf5"
        raise ArchiveCorruptError(
            f"{str(self)!r} is neither a Zarr directory/zip nor an HDF5 file: not an attnscope "
            "archive"
        )

    def lease(self, sample_range: tuple[int, int] | None, *, inside: bool) -> Lease:
        return Lease(self, sample_range, inside=inside)

    def clear_except_locks(self) -> None:
        """Delete the archive, keeping the lock folder of a directory archive (and the file
        a killed creation left at ``path + CREATING``)."""
        if os.path.isfile(self + CREATING):
            os.remove(self + CREATING)
        if os.path.isdir(self):
            for entry in os.listdir(self):
                if entry != LOCK_DIR_NAME:
                    full = os.path.join(self, entry)
                    (shutil.rmtree if os.path.isdir(full) else os.remove)(full)
        elif os.path.exists(self):
            os.remove(self)

    def disk_size(self) -> int:
        if os.path.isdir(self):
            total = 0
            for root, _dirs, files in os.walk(self):
                for f in files:
                    try:
                        total += os.path.getsize(os.path.join(root, f))
                    except OSError:
                        pass
            return total
        return os.path.getsize(self) if os.path.exists(self) else 0

    def check_writable(self) -> str:
        probe = str(self) if os.path.exists(self) else os.path.dirname(self)
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if os.path.exists(self) and not os.path.isdir(self):
            ok = os.access(self, os.W_OK) and os.access(os.path.dirname(self), os.W_OK | os.X_OK)
        else:
            ok = os.path.isdir(probe) and os.access(probe, os.W_OK | os.X_OK)
        if not ok:
            raise ConfigError(
                f"cannot write an archive at {str(self)!r}: {probe!r} is not a writable "
                "directory; expected a path under a directory this user may write to"
            )
        return probe

    def free_bytes(self) -> int | None:
        return shutil.disk_usage(self.check_writable()).free


class RemoteLocation(Location):
    """A normalised fsspec URL (Zarr only): object-store listings and conditional-create
    leases (:mod:`.remote`)."""

    remote = True

    def exists(self) -> bool:
        return remote.exists(self)

    def holds_no_data(self) -> bool:
        return remote.holds_no_data(self)

    def _no_data_what(self) -> str:
        return "only the lock objects of a writer that stopped before its first commit"

    def sniff_format(self) -> str:
        return remote.sniff_format(self)

    def lease(self, sample_range: tuple[int, int] | None, *, inside: bool) -> Any:
        return remote.RemoteLease(self, sample_range)

    def clear_except_locks(self) -> None:
        remote.clear_except_locks(self)

    def disk_size(self) -> int:
        return remote.disk_size(self)

    def check_writable(self) -> str:
        remote.check_reachable(self)
        return str(self)

    def refuse_hdf5(self, fmt: str) -> None:
        remote.refuse_hdf5(self, fmt)


def locate(where: str | os.PathLike[str]) -> Location:
    """The :class:`Location` of ``where`` (itself if it already is one).

    A ``file://`` URL is its local path; any other URL stays whole (``pathlib.Path`` would
    fold ``s3://`` into ``s3:/``); a local path becomes absolute.
    """
    if isinstance(where, Location):
        return where
    return _resolve(where)


def _resolve(where: Any) -> Location:
    if not isinstance(where, (str, os.PathLike)):
        raise ConfigError(f"archive location {where!r} is not a path or URL; expected a str or "
                          "os.PathLike")  # fmt: skip
    raw = remote.fspath(where)
    if not isinstance(raw, str):
        raise ConfigError(f"archive location {where!r} is bytes; expected a str path or URL")
    if remote.is_url(raw):
        remote.refuse_chained(raw)
        return RemoteLocation(raw)
    return LocalLocation(os.path.abspath(raw))

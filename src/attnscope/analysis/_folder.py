"""Where analysis tables live: a local folder or a folder at an fsspec URL (``s3://...``).

A folder at a URL is reached with the storage options its archive would use
(:func:`attnscope.store.backends.remote.storage_options`: ``set_storage_options`` and
``ATTNSCOPE_STORAGE_OPTIONS``); credential, access and missing-bucket failures are the
store's one-line errors. A table gets its final name only when complete: locally an
atomic rename; at a URL a copy of the finished ``.partial`` object (an object appears
whole or not at all) and the partial's removal.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from attnscope.errors import ConfigError
from attnscope.store.backends import remote
from attnscope.store.backends.location import locate

__all__ = ["TableFolder"]


class TableFolder:
    """A tables folder: ``pathlib.Path`` operations that also work at a URL.

    Parameters
    ----------
    where
        A local folder, a ``file://`` URL (its local path) or an fsspec URL.
    """

    def __init__(self, where: str | os.PathLike[str] | TableFolder) -> None:
        if isinstance(where, TableFolder):
            where = where.where
        p = remote.fspath(where)
        self.url: str | None = p if remote.is_url(p) else None
        self.local: Path | None = None if self.url is not None else Path(p)
        if self.url is not None:
            remote.refuse_chained(self.url)

    @property
    def where(self) -> str:
        return self.url if self.url is not None else str(self.local)

    def __str__(self) -> str:
        return self.where

    def file(self, name: str) -> Any:
        """``name`` in the folder: a ``Path``, or a
        :class:`~attnscope.store.backends.location.RemoteLocation` (a ``str``; ``.name`` the
        file name)."""
        if self.local is not None:
            return self.local / name
        return locate(f"{self.url}/{name}")

    def _fs(self) -> tuple[Any, str]:
        assert self.url is not None
        remote.check_reachable(self.url)  # credentials and bucket: one line each
        return remote.filesystem(self.url)

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``; at a URL, credential and access failures become the
        store's one-line errors (``remote.storage_call``)."""
        if self.url is None:
            return fn(*args, **kwargs)
        return remote.storage_call(self.url, fn, *args, **kwargs)

    def refuse_file(self) -> None:
        """Refuse a folder path that is a file (an object, at a URL)."""
        if self.local is not None:
            if self.local.exists() and not self.local.is_dir():
                raise ConfigError(f"tables folder {str(self.local)!r} is a file; expected a folder")
            return
        fs, root = self._fs()
        if self.call(fs.isfile, root):
            raise ConfigError(f"tables folder {self.url!r} is an object; expected a folder")

    def prepare(self) -> None:
        """:meth:`refuse_file`, then make the folder (object stores have no folders)."""
        self.refuse_file()
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)

    def exists(self, name: str) -> bool:
        if self.local is not None:
            return (self.local / name).exists()
        fs, root = self._fs()
        self.call(fs.invalidate_cache, root)
        return bool(self.call(fs.exists, f"{root}/{name}"))

    def parquet_target(self, name: str) -> tuple[Any, Any]:
        """``(where, filesystem)`` for ``pyarrow.parquet`` writers and readers."""
        if self.local is not None:
            return self.local / name, None
        fs, root = self._fs()
        return f"{root}/{name}", fs

    def replace(self, src: str, dst: str) -> None:
        """Give the finished ``src`` the name ``dst`` (replacing any ``dst``)."""
        if self.local is not None:
            os.replace(self.local / src, self.local / dst)
            return
        fs, root = self._fs()
        self.call(fs.copy, f"{root}/{src}", f"{root}/{dst}")
        self.call(fs.rm, f"{root}/{src}")

    def remove(self, name: str) -> None:
        """Delete ``name`` if it is there."""
        if self.local is not None:
            (self.local / name).unlink(missing_ok=True)
            return
        fs, root = self._fs()
        try:
            self.call(fs.rm, f"{root}/{name}")
        except FileNotFoundError:
            pass

    def write_text(self, name: str, text: str) -> Any:
        """Write a UTF-8 document (one PUT at a URL); returns :meth:`file`."""
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)
            (self.local / name).write_text(text, encoding="utf-8")
        else:
            fs, root = self._fs()
            self.call(fs.pipe_file, f"{root}/{name}", text.encode("utf-8"))
        return self.file(name)

    def read_text(self, name: str) -> str:
        if self.local is not None:
            return (self.local / name).read_text(encoding="utf-8")
        fs, root = self._fs()
        return self.call(fs.cat_file, f"{root}/{name}").decode("utf-8")

    def read_schema(self, name: str) -> Any:
        import pyarrow.parquet as pq

        where, fs = self.parquet_target(name)
        if fs is None:
            return pq.read_schema(where)
        return self.call(pq.read_schema, where, filesystem=fs)

    def read_table(
        self, name: str, columns: list[str] | None = None, filters: Any = None
    ) -> Any:
        import pyarrow.parquet as pq

        where, fs = self.parquet_target(name)
        if fs is None:
            return pq.read_table(where, columns=columns, filters=filters)
        return self.call(pq.read_table, where, columns=columns, filters=filters, filesystem=fs)
